"""Reference log-probs: ``LogProbScorer`` against what DPO users run instead, TRL's ``precompute_ref_log_probs``.

Both start from the same raw preference rows and the same weights, and both end with ``ref_chosen_logps`` and
``ref_rejected_logps`` per row; both times include tokenization. Not a test.

* ``hf-ches``  ``LogProbScorer(model, tokenizer, column_prefix="ref_").map(ds)``;
* ``trl``      ``DPOTrainer(..., args=DPOConfig(precompute_ref_log_probs=True))``, which tokenizes the rows and
               precomputes the reference log-probs when it is built (TRL's default batch sizes; float32, since
               ``DPOConfig``'s default bfloat16 autocast is a slow path on a CPU without bfloat16 matrix units).

It also prints the largest difference between the two sets of log-probs, which should be float32 round-off of the
log-probs' scale.

    python benchmarks/bench_trl.py                  # CPU: llama-shaped, hidden 256, vocab 16k, 256 pairs
    python benchmarks/bench_trl.py --shape qwen2.5-0.5b --dtype bfloat16 --pairs 512   # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM

from benchmarks.bench_ches import SHAPES, realistic_pairs, timed
from hf_ches import LogProbScorer
from hf_ches.testing import build_tokenizer


def trl_reference(model, tokenizer, ds: Dataset, dtype: str) -> Dataset:
    """The rows as TRL's DPOTrainer prepares them with ``precompute_ref_log_probs=True`` (reference = ``model``)."""
    from trl import DPOConfig, DPOTrainer

    on_gpu = model.device.type == "cuda"
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", precompute_ref_log_probs=True,
                     use_cpu=not on_gpu, bf16=on_gpu and dtype == "bfloat16", disable_tqdm=True)
    return DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tokenizer).train_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each counts")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute bar
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SHAPES[args.shape](), dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = build_tokenizer()
    ds = Dataset.from_dict(realistic_pairs(args.pairs))
    scorer = LogProbScorer(model, tokenizer, column_prefix="ref_")
    runs = {"hf-ches": lambda: scorer.map(ds), "trl": lambda: trl_reference(model, tokenizer, ds, args.dtype)}
    out = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared below
    ours, theirs = ([np.asarray(o[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")] for o in out.values())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
    scale = max(float(np.max(np.abs(a))) for a in ours)  # the log-probs' scale, for the relative difference
    results: dict[str, dict] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy moment does not favour one run
        for name, run in runs.items():
            seconds, peak = timed(run, device)
            if name not in results or seconds < results[name]["seconds"]:
                results[name] = {"seconds": seconds, "pairs_per_s": args.pairs / seconds, "peak_mib": peak / 2**20}
    speedup = results["trl"]["seconds"] / results["hf-ches"]["seconds"]
    print(f"device={device} shape={args.shape} dtype={args.dtype} pairs={args.pairs} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}; best of {args.repeats} interleaved repeats")
    print(f"{'run':<8} {'seconds':>8} {'pairs/s':>9} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:<8} {r['seconds']:8.2f} {r['pairs_per_s']:9.1f} {r['peak_mib']:9.1f}")
    print(f"speedup_over_trl_precompute {speedup:.2f}x; largest |log-prob difference| {diff:.2e} "
          f"({diff / scale:.1e} of the largest |log-prob|)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "speedup_over_trl": speedup, "max_abs_diff": diff}, f,
                      indent=2)


if __name__ == "__main__":
    main()
