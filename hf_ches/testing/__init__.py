"""Test tools for hf-ches and for pipelines built on it, all offline: tiny models, synthetic pairs, a loopback Hub.

They ship in the package, as ``numpy.testing`` and ``torch.testing`` do, rather than in ``tests/``: ``hf-ches demo``
publishes to the loopback Hub from an installed wheel, and users testing their own pipelines get the same tools.
The product's modules import none of them, apart from the demo (and doctests).

- this module: tiny random models, a locally trained tokenizer and synthetic preference rows, built in seconds;
- ``hub_server``: a server that speaks the Hub's HTTP protocol on 127.0.0.1 (stdlib only);
- ``local_hub``: ``LocalHub`` runs that server for a ``with`` block; ``clients_pointed_at`` points
  huggingface_hub and datasets at it;
- :func:`real_data`: where the real third-party preference files are, which the repository never holds.

Tests, benchmarks and examples share these builders so that every part of the project is exercised on the same
kind of model: a real ``transformers`` architecture with random weights, saved to disk and loaded back by path,
exactly as a user's model would be.

>>> import tempfile
>>> path = build_tiny_model(tempfile.mkdtemp(), arch="llama")
>>> from transformers import AutoModelForCausalLM
>>> AutoModelForCausalLM.from_pretrained(path).config.model_type
'llama'
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A ChatML-like template: the prompt ends with the assistant header when add_generation_prompt=True, so the
# rendered prompt is a prefix of the rendered conversation, as with most real chat templates.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an model answer question prefer chosen rejected data token likelihood training safe unsafe helpful "
    "water boils at one hundred degrees sea level paris capital france python list sort function return value "
    "please explain how why what when where cannot help with that request sorry here is step first then finally "
    "good bad correct wrong number date unit code error result because therefore however also not very more less"
).split()


def synthetic_text(rng: random.Random, n_words: int) -> str:
    """Return ``n_words`` random words from a small English vocabulary, with light punctuation.

    >>> synthetic_text(random.Random(0), 4)
    'first bad question please.'
    """
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(words) + "."


def build_tokenizer(vocab_size: int = 600, add_bos: bool = True):
    """Train a byte-level BPE tokenizer on synthetic text and wrap it as a ``PreTrainedTokenizerFast``.

    ``add_bos`` makes plain ``tokenizer(text)`` prepend ``<|bos|>`` (as Llama tokenizers do), which is the case
    where the prompt and the completion must be split on token ids, not on text.

    >>> tok = build_tokenizer()
    >>> tok("the answer")["input_ids"][0] == tok.bos_token_id
    True
    """
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [synthetic_text(rng, rng.randint(5, 30)) for _ in range(2000)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", backend.token_to_id("<|bos|>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4):
    """A small ``transformers`` config for ``arch`` in {"llama", "qwen2", "gpt2", "gemma2"}.

    ``qwen2`` ties the output embedding to the input embedding (as Qwen2.5-0.5B does); ``gemma2`` adds final
    logit soft-capping, so the logits are not a plain linear function of the hidden states.
    """
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=4096, **common)
    sizes = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **sizes, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **sizes, **common)
    if arch == "gemma2":
        return Gemma2Config(
            head_dim=hidden_size // num_heads, final_logit_softcapping=3.0, query_pre_attn_scalar=16, **sizes, **common
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of llama, qwen2, gpt2, gemma2")


def build_tiny_model(
    directory: str | Path,
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer=None,
) -> str:
    """Save a random ``arch`` model and a tokenizer to ``directory`` and return its path.

    ``vocab_size`` may exceed the tokenizer's vocabulary (the extra rows are never targets but still enter the
    softmax), which is how the benchmarks get a realistic output-embedding cost from a small tokenizer.
    ``tokenizer`` defaults to the locally trained one (:func:`build_tokenizer`); a real one (e.g. SmolLM2's) gives
    real token ids at a tiny model's cost.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(arch, vocab_size or len(tokenizer), hidden_size, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if arch == "gemma2":  # random Gemma weights give near-zero logits; scale up so soft-capping is exercised
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
    path = Path(directory) / f"tiny-{arch}-v{config.vocab_size}-h{hidden_size}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def synthetic_pairs(
    n: int,
    fmt: str = "standard",
    seed: int = 0,
    prompt_words: tuple[int, int] = (3, 30),
    answer_words: tuple[int, int] = (1, 40),
) -> dict[str, list]:
    """``n`` random preference rows as a column dict, in TRL's ``standard``, ``conversational`` or ``implicit`` format.

    ``implicit`` rows carry the prompt inside ``chosen`` and ``rejected`` (conversational messages), as
    ``Anthropic/hh-rlhf`` does. A share of rows are near-duplicates (rejected = chosen with one word changed).

    >>> rows = synthetic_pairs(2)
    >>> sorted(rows), len(rows["chosen"])
    (['chosen', 'prompt', 'rejected'], 2)
    """
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompt = synthetic_text(rng, rng.randint(*prompt_words))
        good = synthetic_text(rng, rng.randint(*answer_words))
        if rng.random() < 0.3:
            words = good.split()
            words[rng.randrange(len(words))] = rng.choice(_WORDS)
            bad = " ".join(words)
        else:
            bad = synthetic_text(rng, rng.randint(*answer_words))
        prompts.append(prompt)
        chosen.append(" " + good)
        rejected.append(" " + bad)
    if fmt == "standard":
        return {"prompt": prompts, "chosen": chosen, "rejected": rejected}

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text.strip()}]

    if fmt == "conversational":
        return {
            "prompt": [user(p) for p in prompts],
            "chosen": [assistant(c) for c in chosen],
            "rejected": [assistant(r) for r in rejected],
        }
    if fmt == "implicit":
        return {
            "chosen": [user(p) + assistant(c) for p, c in zip(prompts, chosen)],
            "rejected": [user(p) + assistant(r) for p, r in zip(prompts, rejected)],
        }
    raise ValueError(f"unknown format {fmt!r}; expected standard, conversational or implicit")


REAL_DATA_VARIABLE = "HF_CHES_REAL_DATA"
HH_RLHF_SAMPLE = "hh-rlhf-harmless/test-sample.jsonl"  # 1,156 pairs of Anthropic/hh-rlhf harmless-base, split test
LLAMAFACTORY_DPO = ("llamafactory-dpo-demo/dpo_en_demo.json", "llamafactory-dpo-demo/dpo_zh_demo.json")


def real_data(name: str) -> Path:
    """The path of ``name`` in the folder of real third-party data that tests and benchmarks read: the folder the
    environment variable ``HF_CHES_REAL_DATA`` names, else ``shared/data`` beside the repository's checkout.

    Third-party rows are never copied into the repository; where the folder is absent, this raises a
    FileNotFoundError that says where it looked (the tests skip with it as the reason).

    >>> real_data("no-such/file.jsonl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: real data no-such/file.jsonl is not in ...; set HF_CHES_REAL_DATA to the folder that holds it
    """
    root = Path(os.environ.get(REAL_DATA_VARIABLE) or Path(__file__).resolve().parents[3] / "shared" / "data")
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"real data {name} is not in {root}; set {REAL_DATA_VARIABLE} to the folder that "
                                "holds it")
    return path
