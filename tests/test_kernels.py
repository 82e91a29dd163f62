"""Kernel-view scores: the output-layer eNTK against autograd, and both kernels against real DPO steps.

All in float64 models. Note that Hugging Face RMSNorm layers compute in float32 even then, so ``ln π`` carries
noise of about 1e-7 relative: the step sizes below keep the first-order error well above it.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer
from hf_ches.forward import encode, inspect_model
from hf_ches.kernels import GradientKernelScorer, count_sketch, select_parameters
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.scores import alpha_ches, ches, ln_ches, output_gradient_gram
from hf_ches.testing import synthetic_pairs

BETA = 0.1
N_PAIRS = 4


@pytest.fixture(scope="module")
def setups(tiny_models):
    """Per architecture: a float64 model, its tokenizer, preference rows and their tokenized pairs."""
    out = {}
    for arch in ("llama", "qwen2", "gemma2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float64).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
        rows = synthetic_pairs(N_PAIRS, seed=1, answer_words=(1, 12))
        out[arch] = (model, tokenizer, rows, tokenize_pairs(read_rows(rows, range(N_PAIRS)), tokenizer))
    return out


def logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The test's own ``ln π(completion | prompt)``: full logits of the model's forward, log-softmax, gather."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [n, V]
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).sum()


# --- output-layer eNTK (entk_w) ---


def test_all_ones_weights_give_ches(setups):
    """With every token weight α set to 1 the weighted score is CHES and ln-CHES, on a model's own states."""
    model, _, _, pairs = setups["llama"]
    for pair in pairs:
        seqs = [pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids]
        enc = encode(model, seqs, [len(pair.prompt_ids)] * 2, needs={"states"})
        (h_c, h_r), (n_c, n_r) = enc.states, enc.num_tokens.tolist()
        got = alpha_ches(h_c, h_r, torch.ones(n_c, n_r), torch.ones(n_c, n_c))
        s_c, s_r = h_c.sum(0, keepdim=True), h_r.sum(0, keepdim=True)  # float64 sums of the same states
        assert got[0].item() == pytest.approx(ches(s_c, s_r).item(), rel=1e-10)
        ln = ln_ches(s_c, s_r, enc.num_tokens[:1], enc.num_tokens[1:])
        assert got[1].item() == pytest.approx(ln.item(), rel=1e-10)
        scale = abs(s_c @ s_r.T).item() + (s_c @ s_c.T).item()  # the float32 sums CHESScorer uses agree to 1e-6
        assert abs(got[0].item() - ches(enc.sums[:1], enc.sums[1:]).item()) <= 1e-6 * scale


def test_token_weights_are_gradient_inner_products():
    """``Σ α ⊙ H Hᵀ`` with ``α = G Gᵀ`` is the Frobenius product of the matrices ``Σ_k g_k h_kᵀ``."""
    g = torch.Generator().manual_seed(1)
    h_plus, h_minus, g_plus, g_minus = (torch.randn(*shape, generator=g, dtype=torch.float64)
                                        for shape in [(4, 6), (3, 6), (4, 9), (3, 9)])
    grad_plus, grad_minus = g_plus.T @ h_plus, g_minus.T @ h_minus  # [V, d] = Σ_k g_k h_kᵀ
    expected = (grad_plus * grad_minus).sum() - (grad_plus * grad_plus).sum()
    got, _ = alpha_ches(h_plus, h_minus, g_plus @ g_minus.T, g_plus @ g_plus.T)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def output_use_gradient(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """``∇ ln π`` w.r.t. the output embedding *as used by the output layer*: on a copy whose head has its own matrix.

    For tied embeddings the model's own gradient w.r.t. the shared matrix also has the input-embedding path;
    ``entk_w`` is the output-layer kernel only, so the reference unties a copy (the forward is unchanged).
    """
    untied = copy.deepcopy(model)
    head = untied.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    return torch.autograd.grad(logp(untied, prompt, completion), head.weight)[0]  # [V, d]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])  # untied, tied, tied + soft-capped logits
def test_output_kernel_equals_autograd(setups, arch):
    model, tokenizer, rows, pairs = setups[arch]
    head = inspect_model(model)
    for pair in pairs:
        seqs = [pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids]
        enc = encode(model, seqs, [len(pair.prompt_ids)] * 2, needs={"states"}, head=head)
        h_c, h_r = enc.states
        n = h_c.shape[0]
        targets = torch.tensor(pair.chosen_ids + pair.rejected_ids)
        alpha = output_gradient_gram(head, torch.cat([h_c, h_r]), targets, torch.cat(enc.lse), max_bytes=4 * 37 * 2 * n)
        h = torch.cat([h_c, h_r]).double()
        kernel = alpha * (h @ h.T)  # [N, N]: K_W(a, b) is the sum of a block
        g_c = output_use_gradient(model, pair.prompt_ids, pair.chosen_ids)
        g_r = output_use_gradient(model, pair.prompt_ids, pair.rejected_ids)
        expected = {"pp": (g_c * g_c).sum(), "pm": (g_c * g_r).sum(), "mm": (g_r * g_r).sum()}
        got = {"pp": kernel[:n, :n].sum(), "pm": kernel[:n, n:].sum(), "mm": kernel[n:, n:].sum()}
        for key in expected:
            assert got[key].item() == pytest.approx(expected[key].item(), rel=1e-5), (arch, key)
        if arch != "llama":  # the shared matrix's own gradient (both uses) is a different one
            shared = model.get_output_embeddings().weight
            full = torch.autograd.grad(logp(model, pair.prompt_ids, pair.chosen_ids), shared)[0]
            assert (full - g_c).norm() > 1e-3 * g_c.norm()


def test_entk_w_columns_equal_the_output_gradient_kernel(setups):
    """For an untied head, the forward-only ``entk_w`` equals the autograd kernel of ``parameters="output"``."""
    model, tokenizer, rows, _ = setups["llama"]
    ds = Dataset.from_dict(rows)
    # head_bytes=256: the log-probs one position a slice, the kernel 64 / (n+ + n−) vocabulary entries (at least 1)
    scored = CHESScorer(model, tokenizer, scores=("ches", "ln_ches", "entk_w"), head_bytes=256).map(ds)
    kernel = GradientKernelScorer(model, tokenizer, scores=("ntk",)).map(ds)
    plain = CHESScorer(model, tokenizer).map(ds)
    for row, k, base in zip(scored, kernel, plain):
        n_c, n_r = row["chosen_num_tokens"], row["rejected_num_tokens"]
        scale = abs(k["ntk_pm"]) + k["ntk_pp"]
        assert abs(row["entk_w"] - k["ntk_displacement"]) <= 1e-5 * scale
        ln_expected = k["ntk_pm"] / (n_c * n_r) - k["ntk_pp"] / n_c**2
        assert abs(row["ln_entk_w"] - ln_expected) <= 1e-5 * scale / min(n_c * n_r, n_c**2)
        assert (row["ches"], row["ln_ches"]) == (base["ches"], base["ln_ches"])


# --- gradient kernels against a real training step ---


def dpo_step(model, names: set[str], pair, eta: float, sign: bool) -> float:
    """``Δ ln π(y+|x)`` after one SGD (or sign-GD) step of size ``eta`` on the pair's DPO loss, on a fresh copy.

    The reference model is the model itself, frozen, so the margin ``u`` is 0 at this step.
    """
    model = copy.deepcopy(model)
    params = [p for name, p in model.named_parameters() if name in names]
    lp_c, lp_r = logp(model, pair.prompt_ids, pair.chosen_ids), logp(model, pair.prompt_ids, pair.rejected_ids)
    loss = -torch.nn.functional.logsigmoid(BETA * ((lp_c - lp_c.detach()) - (lp_r - lp_r.detach())))
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= eta * (g.sign() if sign else g)
        return (logp(model, pair.prompt_ids, pair.chosen_ids) - lp_c).item()


@pytest.mark.parametrize(
    "arch,parameters",
    [("llama", "output"), ("llama", "last:1"), ("llama", "all"), ("qwen2", "output"), ("qwen2", "all")],
)
def test_first_order_prediction_of_a_dpo_step(setups, arch, parameters):
    """``Δ ln π(y+) = η ℓ′ ntk_displacement + O(η²)`` for SGD and ``−η signgd_displacement + O(η²)`` for sign-GD.

    DPO: ``ℓ(u) = −log σ(βu)``, so ``ℓ′(u) = −β σ(−βu)`` and ``ℓ′(0) = −β/2``. The SGD step is
    ``−η ℓ′ (g+ − g−)``, the sign step ``−η sign(ℓ′ (g+ − g−)) = η sign(g+ − g−)``. The relative error must be small
    and shrink ten-fold with a ten-fold smaller step.
    """
    model, tokenizer, rows, pairs = setups[arch]
    scored = GradientKernelScorer(model, tokenizer, parameters=parameters).map(Dataset.from_dict(rows))
    names = {name for name, _ in select_parameters(model, parameters)}
    l_prime = -BETA / 2
    displacement, signgd = np.array(scored["ntk_displacement"]), np.array(scored["signgd_displacement"])
    variants = [  # (sign step?, two step sizes, first-order Δ ln π(y+) of a step)
        (False, (1e-3, 1e-4), lambda eta: eta * l_prime * displacement),
        (True, (1e-4, 1e-5), lambda eta: -eta * signgd),
    ]
    for sign, steps, predict in variants:
        errors = []
        for eta in steps:
            measured = np.array([dpo_step(model, names, pair, eta, sign) for pair in pairs])
            errors.append(np.linalg.norm(measured - predict(eta)) / np.linalg.norm(predict(eta)))
        assert errors[0] < 0.05, (sign, errors)
        assert 5 < errors[0] / errors[1] < 20, (sign, errors)


# --- projection, parameter subsets, fingerprint ---


def test_projection_keeps_inner_products_and_sign_score_stays_exact(setups):
    model, tokenizer, rows, _ = setups["llama"]
    ds, dim = Dataset.from_dict(rows), 4096
    exact = GradientKernelScorer(model, tokenizer, parameters="last:1").map(ds)
    sketched = GradientKernelScorer(model, tokenizer, parameters="last:1", projection_dim=dim, seed=3).map(ds)
    again = GradientKernelScorer(model, tokenizer, parameters="last:1", projection_dim=dim, seed=3).map(ds)
    assert sketched["ntk_pm"] == again["ntk_pm"] and sketched["ntk_pm"] != exact["ntk_pm"]
    for e, s in zip(exact, sketched):
        bound = 5 * (2 / dim) ** 0.5 * (e["ntk_pp"] * e["ntk_mm"]) ** 0.5  # 5 standard deviations of any entry
        for key in ("ntk_pp", "ntk_pm", "ntk_mm"):
            assert abs(s[key] - e[key]) <= bound, key
        assert s["signgd_displacement"] == e["signgd_displacement"]


def test_count_sketch_is_linear_and_seeded():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(7, 5, generator=g), torch.randn(300, generator=g)]
    b = [torch.randn(7, 5, generator=g), torch.randn(300, generator=g)]
    summed = count_sketch([x + y for x, y in zip(a, b)], 32, seed=1)
    assert torch.allclose(summed, count_sketch(a, 32, seed=1) + count_sketch(b, 32, seed=1), atol=1e-5)
    assert not torch.equal(count_sketch(a, 32, seed=1), count_sketch(a, 32, seed=2))


def names(model, spec: str) -> list[str]:
    return [name for name, _ in select_parameters(model, spec)]


def test_select_parameters(tiny_models):
    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    qwen2 = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    assert names(llama, "output") == ["lm_head.weight"]
    assert names(qwen2, "output") == ["model.embed_tokens.weight"]  # tied: the shared matrix
    last = names(gpt2, "last:1")
    assert last and all(n.startswith("transformer.h.1.") for n in last)
    assert set(names(llama, "last:2")) == {n for n, _ in llama.named_parameters() if n.startswith("model.layers.")}
    assert names(llama, "all") == names(llama, "trainable") == [n for n, _ in llama.named_parameters()]
    assert names(llama, "re:mlp\\.down") == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    for spec, message in [
        ("lora", "selects no parameter of LlamaForCausalLM"),
        ("last:3", "has 2 transformer blocks"),
        ("last:0", "expected one of"),
        ("bias", "expected one of"),
        ("re:(", "not a regular expression"),
    ]:
        with pytest.raises(ValueError, match=message):
            select_parameters(llama, spec)
    with pytest.raises(ValueError, match="expected one of"):
        GradientKernelScorer(tiny_models["llama"], parameters="bias")  # at construction, before any worker
    with pytest.raises(ValueError, match="scores must be"):
        GradientKernelScorer(tiny_models["llama"], scores=("ches",))
    with pytest.raises(ValueError, match="projection_dim"):
        GradientKernelScorer(tiny_models["llama"], projection_dim=0)


class LoraLinear(torch.nn.Module):
    """A hand-made LoRA adapter around a frozen linear layer (names ``lora_A``/``lora_B`` as in PEFT)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_adapter_parameters(setups, tiny_models):
    _, tokenizer, rows, _ = setups["llama"]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    attention = model.model.layers[1].self_attn
    attention.q_proj = LoraLinear(attention.q_proj)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    assert names(model, "lora") == names(model, "trainable") == [
        "model.layers.1.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.q_proj.lora_B.weight"
    ]
    scored = GradientKernelScorer(model, tokenizer, parameters="lora").map(Dataset.from_dict(rows))
    assert np.all(np.array(scored["ntk_pp"]) > 0) and np.all(np.abs(scored["ntk_cosine"]) <= 1 + 1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names(model, "lora")  # restored


def test_fingerprint_is_settings_and_model_identity(tiny_model):
    scorer = GradientKernelScorer(tiny_model, parameters="last:1")
    assert Hasher.hash(scorer) == Hasher.hash(GradientKernelScorer(tiny_model, parameters="last:1"))
    assert Hasher.hash(scorer) != Hasher.hash(GradientKernelScorer(tiny_model, parameters="all"))
    assert Hasher.hash(scorer) != Hasher.hash(GradientKernelScorer(tiny_model, parameters="last:1", seed=1))
    payload = pickle.dumps(scorer)
    clone = pickle.loads(payload)
    assert len(payload) < 4096 and set(vars(clone)) == {"config", "identity", "run", "pair_columns"}  # settings only: no weights
    scored = clone.map(Dataset.from_dict(synthetic_pairs(3)))  # the clone gets the model itself
    assert np.all(np.array(scored["ntk_pp"]) > 0)
    assert repr(scorer).startswith("GradientKernelScorer(")
