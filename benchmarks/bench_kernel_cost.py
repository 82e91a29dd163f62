"""Cost of each kernel-view score per pair, relative to CHES alone, on realistic lengths. Not a test.

Same model shapes and pairs as ``bench_ches.py``; every scorer runs on the same pairs after a warm-up:
``ches`` (CHES + ln-CHES), ``+logps``, ``+entk_w`` (the exact output-layer eNTK, same forward pass), and the
gradient kernels of ``GradientKernelScorer`` for the output embedding and for the last block.

    python benchmarks/bench_kernel_cost.py                                       # CPU
    python benchmarks/bench_kernel_cost.py --shape qwen2.5-0.5b --dtype bfloat16  # GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM

from benchmarks.bench_ches import SHAPES, realistic_pairs
from hf_ches import CHESScorer
from hf_ches.kernels import GradientKernelScorer
from hf_ches.testing import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    disable_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SHAPES[args.shape](), dtype=getattr(torch, args.dtype)).to(device)
    tokenizer = build_tokenizer()
    ds = Dataset.from_dict(realistic_pairs(args.pairs))
    scorers = {
        "ches": CHESScorer(model, tokenizer, scores=("ches", "ln_ches")),
        "ches+logps": CHESScorer(model, tokenizer),
        "ches+entk_w": CHESScorer(model, tokenizer, scores=("ches", "ln_ches", "entk_w")),
        "ntk+signgd[output]": GradientKernelScorer(model, tokenizer, parameters="output"),
        "ntk+signgd[last:1]": GradientKernelScorer(model, tokenizer, parameters="last:1"),
    }
    seconds = {}
    for name, scorer in scorers.items():
        scorer.map(ds.select(range(2)), load_from_cache_file=False)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scorer.map(ds, batch_size=args.pairs, load_from_cache_file=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    print(f"device={device} shape={args.shape} dtype={args.dtype} pairs={args.pairs}")
    print(f"{'score':<22} {'ms/pair':>9} {'x CHES':>7}")
    for name, s in seconds.items():
        print(f"{name:<22} {1e3 * s / args.pairs:9.1f} {s / seconds['ches']:7.2f}")


if __name__ == "__main__":
    main()
