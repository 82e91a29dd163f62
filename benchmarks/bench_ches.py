"""Throughput of ``ds.map(CHESScorer(...))`` against the least work that yields the same outputs. Not a test.

Everything is measured in one run on the same preference pairs, with the same model in memory, after a warm-up:

* ``map``       ``Dataset.map(CHESScorer(model, tokenizer), batched=True)``: CHES, ln-CHES and DPO log-probs,
                tokenization and Arrow writing included; each pair's prompt computed once (prefix sharing, the
                default where the model supports it);
* ``unshared``  the same map with ``prefix_sharing=False``: chosen and rejected each run whole, prompt included;
* ``limit``     the least work for those outputs, written out plainly below: the trunk over length-sorted
                token-budget micro-batches of the pre-tokenized sequences, then the output embedding and
                log-softmax at completion positions only, in chunks;
* ``ches-only`` the map with ``scores=("ches", "ln_ches")`` (must skip the output embedding);
* ``trunk``     the trunk alone on the same micro-batches: the floor of a CHES-only run;
* ``naive``     the paper's loop: one example at a time, full ``output_hidden_states`` and full logits, float32;
* ``tokenize``  TRL tokenization of each map batch alone, on the host (the map overlaps most of it with the model).

``limit`` and ``trunk`` run every sequence whole (the padded limit), so with prefix sharing the map can beat them.
It also counts the tokens each way computes: sequence tokens (``2P + C + R`` per pair) and the padded micro-batches
of the unshared path, against ``P + C + R`` per pair and the rows of the shared one.

Targets: on CPU, unshared map ≤ 1.15 × limit time and faster than naive; with prefix sharing, ≥ 1.35 × the
unshared pairs/s on real data (HH-RLHF: long prompts) and ≥ 0.95 × on the shipped synthetic pairs (short prompts);
on a GPU, map ≥ 0.9 × limit throughput (≥ 1.3 × with prefix sharing on HH-shaped data), CHES-only ≥ 0.9 × trunk
throughput, ≥ 10× naive, peak memory far below full-vocabulary logits.

    python benchmarks/bench_ches.py                    # CPU: llama-shaped, hidden 256, vocab 16k, 256 pairs
    python benchmarks/bench_ches.py --model smollm2 --data hh --pairs 200        # CPU: real model, real pairs
    python benchmarks/bench_ches.py --model smollm2 --data shipped --pairs 133   # CPU: the shipped synthetic pairs
    python benchmarks/bench_ches.py --shape qwen2.5-0.5b --dtype bfloat16 --pairs 512   # GPU
    python benchmarks/bench_ches.py --shape qwen2.5-0.5b --dtype bfloat16 --data hh-shaped --pairs 512   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from collections.abc import Sequence

import numpy as np
import psutil
import torch
from datasets import Dataset, disable_progress_bars, load_dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hf_ches import CHESScorer
from hf_ches.transform import default_token_budget, tokenizer_threads
from hf_ches.batching import PairBatch, completion_positions, longest_first, pack, pack_rows, pad_right
from hf_ches.models import load_model_and_tokenizer
from hf_ches.pairs import PendingPairs, TokenizedPair, read_rows, tokenize_pairs
from hf_ches.shipped import load_shipped_pairs
from hf_ches.testing import HH_RLHF_SAMPLE, build_tokenizer, real_data, synthetic_text

SHAPES = {
    # hidden >= 256 and vocabulary >= 16k: the CPU target of the issue
    "cpu-small": lambda: LlamaConfig(
        vocab_size=16384, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # the real shapes of Qwen2.5-0.5B (random weights)
    "qwen2.5-0.5b": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
    ),
}


def realistic_pairs(n: int, seed: int = 0) -> dict[str, list]:
    """UltraFeedback-like lengths: prompt ~150 tokens, responses ~250, log-normal, capped at 1024 tokens."""
    rng = random.Random(seed)

    def words(median_tokens: float) -> int:  # the test tokenizer makes ~1.6 tokens per word
        return max(1, min(640, int(rng.lognormvariate(math.log(median_tokens / 1.6), 0.5))))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(synthetic_text(rng, words(150)))
        rows["chosen"].append(" " + synthetic_text(rng, words(250)))
        rows["rejected"].append(" " + synthetic_text(rng, words(250)))
    return rows


def hh_shaped_pairs(n: int, seed: int = 0) -> dict[str, list]:
    """HH-RLHF-like lengths for a random model's tokenizer: prompt ~124 tokens, answers ~41 and ~52 (the medians of
    the shipped HH sample with SmolLM2's tokenizer are in its card)."""
    rng = random.Random(seed)

    def text(median_tokens: float) -> str:  # the test tokenizer makes ~1.6 tokens per word
        return synthetic_text(rng, max(1, int(rng.lognormvariate(math.log(median_tokens / 1.6), 0.6))))

    return {"prompt": [text(124) for _ in range(n)], "chosen": [" " + text(41) for _ in range(n)],
            "rejected": [" " + text(52) for _ in range(n)]}


def load_rows(data: str, n: int) -> dict[str, list]:
    """``n`` preference rows: random text of UltraFeedback-like or HH-like lengths, the real HH-RLHF sample
    (``hf_ches.testing.real_data``), or the shipped synthetic pairs (standard format)."""
    if data == "realistic":
        return realistic_pairs(n)
    if data == "hh-shaped":
        return hh_shaped_pairs(n)
    real = data == "hh" and str(real_data(HH_RLHF_SAMPLE))
    ds = load_dataset("json", data_files=real, split="train") if real else load_shipped_pairs("standard")
    ds = ds.select(range(min(n, len(ds))))
    return {column: ds[column] for column in ds.column_names if column in ("prompt", "chosen", "rejected")}


def computed_tokens(pairs: Sequence[TokenizedPair], token_budget: int) -> dict[str, int]:
    """Tokens through the trunk: real and padded (rows × width), whole sequences (the unshared path and the limit)
    against prefix-shared pairs (:func:`hf_ches.batching.pack_rows`)."""
    batch = PairBatch(pairs)
    lengths = [len(s) for s in batch.sequences]
    padded = sum(len(g) * max(lengths[i] for i in g) for g in pack(longest_first(lengths), lengths.__getitem__,
                                                                    token_budget))
    segments = list(batch.segment_lengths)
    rows = pack_rows(longest_first(segments), segments.__getitem__, token_budget)
    shared_padded = sum(len(r) * max(sum(segments[j] for j in row) for row in r) for r in rows)
    return {"sequence_tokens": sum(lengths), "sequence_padded": padded, "shared_tokens": sum(segments),
            "shared_padded": shared_padded}


def sequences(pairs: Sequence[TokenizedPair]) -> tuple[list[list[int]], list[int]]:
    """Every pair's chosen sequence, then every rejected one (prompt + completion ids), and their prompt lengths."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    return seqs, [len(p.prompt_ids) for p in pairs] * 2


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU, sampled RSS growth on CPU (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc, self.base, self.running = psutil.Process(), psutil.Process().memory_info().rss, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()


def timed(fn, device: torch.device) -> tuple[float, int]:
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, mem.peak


@torch.inference_mode()
def limit(model, seqs, prompt_lens, token_budget: int, with_head: bool, chunk: int = 1024) -> None:
    """The least work: trunk on sorted micro-batches; output embedding + log-softmax at completion positions only.

    Right padding and a causal model need no attention mask; host-to-device copies come from pinned memory and do
    not make the host wait for the device.
    """
    device = model.device
    trunk, weight = model.model, model.get_output_embeddings().weight
    sums = torch.zeros(len(seqs), weight.shape[1], device=device)
    logps = torch.zeros(len(seqs), device=device)
    lengths, plens = np.array([len(s) for s in seqs]), np.array(prompt_lens)

    def to_device(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    for group in pack(longest_first(lengths), lengths.__getitem__, token_budget):  # rows x longest <= token_budget
        g = np.array(group)
        rows, cols = completion_positions(lengths[g], plens[g])  # completion-predicting positions P-1 … L-2
        ids, rows, cols, seq = map(to_device, (pad_right([seqs[i] for i in group], pad_id=0), rows, cols, g[rows]))
        h = trunk(input_ids=ids, use_cache=False).last_hidden_state
        sel = h[rows, cols]  # [M, d]
        sums.index_add_(0, seq, sel.float())
        if with_head:
            targets = ids[rows, cols + 1]
            for s in range(0, sel.shape[0], chunk):
                z = (sel[s : s + chunk] @ weight.T).float()  # [c, V]
                lp = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - torch.logsumexp(z, -1)
                logps.index_add_(0, seq[s : s + chunk], lp)
    sums.cpu(), logps.cpu()


def tokenize(rows: dict[str, list], tokenizer, batch_size: int) -> None:
    """TRL tokenization of each map batch alone, threaded as :class:`CHESScorer` does (which overlaps it with the
    model: the model starts on the longest pairs as soon as they are tokenized)."""
    n = len(rows["chosen"])
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        n_rows = len(batch["chosen"])
        list(PendingPairs(read_rows(batch, range(n_rows)), tokenizer, threads=tokenizer_threads(n_rows)))


@torch.inference_mode()
def naive(model, seqs, prompt_lens) -> None:
    """The paper's script: per example, unpadded, float32, full hidden states and full logits."""
    for ids, P in zip(seqs, prompt_lens):
        out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
        S = out.hidden_states[-1][0, P - 1 : -1].sum(0)
        targets = torch.tensor(ids[P:], device=model.device)[:, None]
        lp = torch.log_softmax(out.logits[0, P - 1 : -1].float(), -1).gather(1, targets).sum()
        S.cpu(), lp.cpu()


RUNS = ("map", "unshared", "limit", "ches-only", "trunk", "naive", "tokenize")
RATIOS = {  # name: (numerator run, denominator run, what), each a throughput ratio unless it says time
    "shared_over_unshared_pairs_per_s": ("map", "unshared", "throughput"),
    "unshared_time_over_limit_time": ("unshared", "limit", "time"),
    "map_time_over_limit_time": ("map", "limit", "time"),
    "map_throughput_over_limit": ("map", "limit", "throughput"),
    "ches_only_throughput_over_trunk": ("ches-only", "trunk", "throughput"),
    "map_speedup_over_naive": ("map", "naive", "throughput"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES), help="a random model of this shape")
    parser.add_argument("--model", default=None, choices=["smollm2"], help="a real model instead of --shape")
    parser.add_argument("--data", default="realistic", choices=["realistic", "hh-shaped", "hh", "shipped"],
                        help="random text of UltraFeedback-like or HH-like lengths, the real HH-RLHF sample, or "
                             "the shipped synthetic pairs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--token_budget", type=int, default=None, help="default: CHESScorer's for the device")
    parser.add_argument("--batch_size", type=int, default=256, help="rows per Dataset.map batch")
    parser.add_argument("--naive_pairs", type=int, default=64, help="time the naive loop on this many pairs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each counts")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                        help="the runs to time (default: all); ratios need both of their runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    disable_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.token_budget = args.token_budget or default_token_budget(device)
    torch.manual_seed(0)
    if args.model:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
        config = model.config
    else:
        config = SHAPES[args.shape]()
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(device).eval()
        tokenizer = build_tokenizer()
    rows = load_rows(args.data, args.pairs)
    args.pairs = len(rows["chosen"])
    ds = Dataset.from_dict(rows)
    pairs = tokenize_pairs(read_rows(rows, range(args.pairs)), tokenizer)
    seqs, plens = sequences(pairs)
    tokens = sum(len(s) for s in seqs)
    n_naive = min(args.naive_pairs, args.pairs)
    naive_seqs = seqs[:n_naive] + seqs[args.pairs : args.pairs + n_naive]
    naive_plens = plens[:n_naive] + plens[args.pairs : args.pairs + n_naive]
    naive_model = model if args.dtype == "float32" else AutoModelForCausalLM.from_config(config).to(device).eval()

    full = CHESScorer(model, tokenizer, token_budget=args.token_budget)
    unshared = CHESScorer(model, tokenizer, token_budget=args.token_budget, prefix_sharing=False)
    ches_only = CHESScorer(model, tokenizer, scores=("ches", "ln_ches"), token_budget=args.token_budget)
    runs = {
        "map": lambda: ds.map(full, batched=True, batch_size=args.batch_size),
        "unshared": lambda: ds.map(unshared, batched=True, batch_size=args.batch_size),
        "limit": lambda: limit(model, seqs, plens, args.token_budget, with_head=True),
        "ches-only": lambda: ds.map(ches_only, batched=True, batch_size=args.batch_size),
        "trunk": lambda: limit(model, seqs, plens, args.token_budget, with_head=False),
        "naive": lambda: naive(naive_model, naive_seqs, naive_plens),
        "tokenize": lambda: tokenize(rows, tokenizer, args.batch_size),
    }
    runs = {name: run for name, run in runs.items() if name in args.runs}
    limit(model, seqs[:32], plens[:32], args.token_budget, with_head=True)  # warm-up: allocator, kernels
    full.load(), unshared.load(), ches_only.load()  # the scorers' one-time architecture checks
    if "naive" in runs:
        naive(naive_model, naive_seqs[:2], naive_plens[:2])
    results: dict[str, dict] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy moment does not favour one run
        for name, fn in runs.items():
            if name == "naive" and name in results:
                continue  # slow and stable: once is enough
            seconds, peak = timed(fn, device)
            if name in results and results[name]["seconds"] <= seconds:
                continue
            n_pairs = n_naive if name == "naive" else args.pairs
            n_tokens = sum(len(s) for s in naive_seqs) if name == "naive" else tokens
            results[name] = {"seconds": seconds, "pairs_per_s": n_pairs / seconds,
                             "tokens_per_s": n_tokens / seconds, "peak_mib": peak / 2**20}
    logits_mib = args.token_budget * config.vocab_size * 4 / 2**20  # float32 logits of one micro-batch
    counts = computed_tokens(pairs, args.token_budget)
    sharing = full.shares_prefixes(full.load())
    print(f"device={device} model={args.model or args.shape} data={args.data} dtype={args.dtype} pairs={args.pairs} "
          f"tokens={tokens} token_budget={args.token_budget} prefix_sharing={sharing} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print("tokens through the trunk: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"best of {args.repeats} interleaved repeats" + (f"; naive: {n_naive} pairs, once" if "naive" in results else ""))
    print(f"{'run':<10} {'seconds':>8} {'pairs/s':>9} {'tokens/s':>10} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['seconds']:8.2f} {r['pairs_per_s']:9.1f} {r['tokens_per_s']:10.0f} {r['peak_mib']:9.1f}")
    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    ratios = {name: (results[a]["seconds"] / results[b]["seconds"] if kind == "time" else tps[a] / tps[b])
              for name, (a, b, kind) in RATIOS.items() if a in results and b in results}
    ratios["sequence_tokens_over_shared_tokens"] = counts["sequence_padded"] / counts["shared_padded"]
    ratios["full_vocab_logits_mib_per_microbatch"] = logits_mib
    for k, v in ratios.items():
        print(f"{k:<38} {v:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "prefix_sharing": sharing, "tokens": counts,
                       "results": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
