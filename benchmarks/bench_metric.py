"""Time ranking accuracy on 1,000,000 pairs for each config. The target is under 2 s.

Run: `.venv/bin/python benchmarks/bench_metric.py [--pairs N] [--repeats R] [--per-example] [--stock]`.

Timings per config, each the best of `--repeats` runs on the same inputs (Python lists, as a dataset column gives
them), with 1000-resample bootstrap intervals:
- `hf_ches.ranking`: the math alone, what `_compute` runs.
- `evaluate compute`: `RankingAccuracy(...).compute(**inputs)` end to end: pyarrow converts each column to its
  declared type, then the math, with no Arrow cache file. Both timings are checked to give the same result.
- `--stock`: the same compute through `add_batch` (evaluate's own, public), which encodes every value in Python
  (`Features.encode_batch`), writes the cache file and reads it back: the cost `compute(**inputs)` skips. Slow
  (seconds per config).

"listwise" gets N / 2 prompts of 2 to 4 responses. evaluate reads its list inputs back as Python lists (it allows
no other format for list features), which is most of its time.
"""

import argparse
import tempfile
import time
from collections.abc import Callable

import evaluate
import numpy as np

from hf_ches import ranking
from hf_ches.metric import COMPUTE, RankingAccuracy

TARGET_SECONDS = 2.0


def make_inputs(num_pairs: int, seed: int = 0) -> dict[str, dict[str, list]]:
    rng = np.random.default_rng(seed)
    logps = rng.normal(-120.0, 30.0, size=(4, num_pairs))  # [4, N] policy and reference, chosen and rejected
    list_lengths = rng.integers(2, 5, size=num_pairs // 2)  # [N / 2] responses per prompt: 2 to 4
    return {
        "default": {"chosen_logps": logps[0].tolist(), "rejected_logps": logps[1].tolist()},
        "length_normalized": {
            "chosen_logps": logps[0].tolist(),
            "rejected_logps": logps[1].tolist(),
            "chosen_num_tokens": rng.integers(1, 512, num_pairs).tolist(),
            "rejected_num_tokens": rng.integers(1, 512, num_pairs).tolist(),
        },
        "idealized": {
            "chosen_logps": logps[0].tolist(),
            "rejected_logps": logps[1].tolist(),
            "ref_chosen_logps": logps[2].tolist(),
            "ref_rejected_logps": logps[3].tolist(),
            "preference_probs": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], num_pairs).tolist(),
        },
        "listwise": {
            "logps": [rng.normal(-120.0, 30.0, k).tolist() for k in list_lengths],
            "scores": [rng.integers(1, 11, k).astype(float).tolist() for k in list_lengths],
        },
    }


def best_of(repeats: int, run: Callable[[], dict]) -> tuple[float, dict]:
    """The shortest wall time of `repeats` calls of `run`, and its result."""
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def compute(config_name: str, inputs: dict, options: dict, stock: bool = False) -> dict:
    """`RankingAccuracy.compute` in a fresh metric with its own cache folder, as a user runs it."""
    with tempfile.TemporaryDirectory() as cache_dir:
        metric = RankingAccuracy(config_name=config_name, cache_dir=cache_dir)
        if not stock:
            return metric.compute(**inputs, **options)
        evaluate.Metric.add_batch(metric, **inputs)  # evaluate's own Python encoding of every value
        return metric.compute(**options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="number of pairs (listwise: pairs / 2 lists)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is reported")
    parser.add_argument("--per-example", action="store_true", help="also return the per-example flags")
    parser.add_argument("--stock", action="store_true", help="also time compute through evaluate's own add_batch")
    args = parser.parse_args()
    all_inputs = make_inputs(args.pairs)
    options = {"return_per_example": args.per_example}
    print(f"{args.pairs:,} pairs, 1000 bootstrap resamples, per-example flags {'on' if args.per_example else 'off'}, "
          f"best of {args.repeats}; target < {TARGET_SECONDS:g} s")
    for config_name, inputs in all_inputs.items():
        runs = {
            "hf_ches.ranking": lambda: COMPUTE[config_name](**inputs, options=ranking.RankingOptions(**options)),
            "evaluate compute": lambda: compute(config_name, inputs, options),
        }
        if args.stock:
            runs["stock evaluate compute"] = lambda: compute(config_name, inputs, options, stock=True)
        results = []
        for label, run in runs.items():
            seconds, result = best_of(1 if label.startswith("stock") else args.repeats, run)
            results.append(result)
            verdict = "ok" if seconds < TARGET_SECONDS else f"over {TARGET_SECONDS:g} s"
            accuracy = result["ranking_accuracy"]
            print(f"{config_name:>18}  {label:<22} {seconds:6.2f} s  {verdict:<8} accuracy {accuracy:.4f}")
        if any(result != results[0] for result in results):
            raise SystemExit(f"{config_name}: the timed paths disagree")


if __name__ == "__main__":
    main()
