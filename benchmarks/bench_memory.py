"""Peak memory of scoring against the token budget, for the built-in models. Not a test.

Each measurement runs in a fresh subprocess (so peaks do not mix): it loads the model, notes the peak resident set
size of the load (``VmHWM``) and the resident size after it, resets the peak (``/proc/self/clear_refs``), scores the
pairs with ``CHESScorer`` (default scores: ches, ln_ches, logps) at one ``token_budget``, and notes the peak again;
on a CUDA device also ``torch.cuda.max_memory_allocated`` of the scoring. The pairs are the first ``--pairs`` of
the HH-RLHF harmless sample (``hf_ches.testing.real_data``; ``--data synthetic``: hf-ches' synthetic pairs). The
built-in models load from their converted float32 safetensors folders (``hf_ches.models.builtin_folder``; a
missing folder is converted first, in a process of its own). Per model, a least-squares line through (token budget,
scoring peak) gives the memory per 1,000 tokens of budget, from which README's advice on ``--token_budget`` comes.
The check of issue 22: the whole process that scores 200 HH pairs with gemma3-270m at the CPU default budget, load
included, peaks at most at its float32 weights + 1 GiB.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py                 # smollm2, gemma3-270m; 200 HH pairs
    python benchmarks/bench_memory.py --models tiny --data synthetic --pairs 8 --token_budgets 256 512  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def rss(field: str) -> int:
    """A field of ``/proc/self/status`` in bytes (``VmHWM``: peak resident set size, ``VmRSS``: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(model: str, token_budget: int, data: str, pairs: int, device: str | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from datasets import Dataset, disable_progress_bars

    from hf_ches import CHESScorer
    from hf_ches.testing import HH_RLHF_SAMPLE, real_data, synthetic_pairs

    torch.set_num_threads(1)
    disable_progress_bars()
    rows = (synthetic_pairs(pairs, "implicit") if data == "synthetic"
            else [json.loads(line) for line in real_data(HH_RLHF_SAMPLE).read_text().splitlines()[:pairs]])
    rows = Dataset.from_dict(rows) if isinstance(rows, dict) else Dataset.from_list(rows)
    scorer = CHESScorer(model, token_budget=token_budget, device=device)
    loaded = scorer.load()
    weights = sum(p.numel() for p in loaded.model.parameters()) * 4  # float32 bytes
    load_peak, after_load = rss("VmHWM"), rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    on_cuda = loaded.head.weight.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    scored = scorer.map(rows, batch_size=256, load_from_cache_file=False)
    assert len(scored) == pairs and not np.isnan(np.asarray(scored["ches"])).any()
    scoring_peak = rss("VmHWM")
    return {"model": model, "token_budget": token_budget, "pairs": pairs, "data": data,
            "device": str(loaded.head.weight.device), "vocab_size": int(loaded.head.weight.shape[0]),
            "float32_weights_bytes": weights, "load_peak_rss": load_peak, "rss_after_load": after_load,
            "scoring_peak_rss": scoring_peak, "scoring_over_load_rss": scoring_peak - after_load,
            "process_peak_rss": max(load_peak, scoring_peak),
            "cuda_max_allocated": torch.cuda.max_memory_allocated() if on_cuda else None}


def run_child(model: str, token_budget: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", model, str(token_budget), "--data", args.data, "--pairs",
           str(args.pairs)] + (["--device", args.device] if args.device else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{model} at {token_budget}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"],
                        help="model names or paths; 'tiny' builds a tiny random Llama")
    parser.add_argument("--token_budgets", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--data", choices=["hh", "synthetic"], default="hh")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_memory_cpu.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TOKEN_BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.data, args.pairs, args.device)))
        return
    if args.data == "hh":
        from hf_ches.testing import HH_RLHF_SAMPLE, real_data

        try:
            real_data(HH_RLHF_SAMPLE)
        except FileNotFoundError as missing:
            sys.exit(f"{missing}; or pass --data synthetic")
    results, summary = [], {}
    for model in args.models:
        path = model
        if model == "tiny":
            from hf_ches.testing import build_tiny_model

            path = build_tiny_model(tempfile.mkdtemp())
        rows = []
        for budget in args.token_budgets:
            row = run_child(path, budget, args) | {"model": model}
            rows.append(row)
            print(f"{model:12s} token_budget {budget:6d}: load peak {row['load_peak_rss'] / GIB:.2f} GiB, after "
                  f"load {row['rss_after_load'] / GIB:.2f} GiB, scoring peak {row['scoring_peak_rss'] / GIB:.2f} GiB"
                  + (f", cuda {row['cuda_max_allocated'] / GIB:.2f} GiB" if row["cuda_max_allocated"] else ""),
                  flush=True)
        budgets = np.array([r["token_budget"] for r in rows], dtype=float)
        peaks = np.array([r["scoring_peak_rss"] for r in rows], dtype=float)
        slope, intercept = np.polyfit(budgets, peaks, 1) if len(rows) > 1 else (float("nan"), peaks[0])
        weights = rows[0]["float32_weights_bytes"]
        summary[model] = {"float32_weights_gib": weights / GIB, "mib_per_1k_tokens": slope * 1000 / 2**20,
                          "intercept_gib": intercept / GIB,
                          "max_scoring_peak_over_weights_gib": (peaks.max() - weights) / GIB}
        print(f"{model:12s} scoring peak = {intercept / GIB:.2f} GiB + {slope * 1000 / 2**20:.1f} MiB per 1,000 "
              f"tokens of budget (float32 weights {weights / GIB:.2f} GiB)")
        results += rows
    out = {"pairs": args.pairs, "data": args.data, "token_budgets": args.token_budgets, "threads": 1,
           "measurements": results, "summary": summary}
    if "gemma3-270m" in summary and args.data == "hh" and args.pairs >= 200:
        default = [r for r in results if r["model"] == "gemma3-270m" and r["token_budget"] == 2048]
        if default:
            peak, limit = default[0]["process_peak_rss"], default[0]["float32_weights_bytes"] + GIB
            out["issue22_check"] = {"process_peak_rss": peak, "limit": limit, "passes": peak <= limit}
            print(f"gemma3-270m, {args.pairs} HH pairs at the CPU default budget 2048: peak RSS of the process, load "
                  f"included, {peak / GIB:.2f} GiB, limit (float32 weights + 1 GiB) {limit / GIB:.2f} GiB: "
                  f"{'PASS' if peak <= limit else 'FAIL'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
