"""Time ranking accuracy on 1,000,000 pairs for each config. The target is under 2 s for the math.

Run: `.venv/bin/python benchmarks/bench_metric.py [--pairs N] [--skip-evaluate]`.

Two timings per config:
- `hf_ches.ranking`: the math on Python lists (what `_compute` receives), with 1000-resample bootstrap intervals
  and per-example flags. This is the one with the < 2 s target.
- `evaluate compute`: `RankingAccuracy(...).compute(...)` end to end. It adds evaluate's own work: datasets encodes
  every value in Python, writes an Arrow cache file and reads it back. That costs several seconds per million
  rows and input column, and this project cannot change it.
"""

import argparse
import tempfile
import time

import numpy as np

from hf_ches import ranking


def make_inputs(num_pairs: int, seed: int = 0) -> dict[str, dict[str, list]]:
    rng = np.random.default_rng(seed)
    logps = rng.normal(-120.0, 30.0, size=(4, num_pairs))  # [4, N] policy and reference, chosen and rejected
    list_lengths = rng.integers(2, 5, size=num_pairs // 2)  # [N / 2] responses per prompt: 2 to 4, ~1.5 pairs each
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


PURE = {
    "default": ranking.ranking_accuracy,
    "length_normalized": ranking.ranking_accuracy,
    "idealized": ranking.idealized_ranking_accuracy,
    "listwise": ranking.listwise_ranking_accuracy,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="number of pairs (listwise: pairs / 2 lists)")
    parser.add_argument("--skip-evaluate", action="store_true", help="time only the hf_ches.ranking math")
    args = parser.parse_args()
    all_inputs = make_inputs(args.pairs)
    options = ranking.RankingOptions(return_per_example=True)
    print(f"{args.pairs:,} pairs, {options.n_resamples} bootstrap resamples, per-example flags on")
    for config_name, inputs in all_inputs.items():
        start = time.perf_counter()
        result = PURE[config_name](**inputs, options=options)
        seconds = time.perf_counter() - start
        verdict = "ok" if seconds < 2.0 else "SLOWER THAN 2 s"
        accuracy = result["ranking_accuracy"]
        print(f"{config_name:>18}  hf_ches.ranking   {seconds:6.2f} s  {verdict}  accuracy {accuracy:.4f}")
        if args.skip_evaluate:
            continue
        from hf_ches.metric import RankingAccuracy

        with tempfile.TemporaryDirectory() as cache_dir:
            metric = RankingAccuracy(config_name=config_name, cache_dir=cache_dir)
            start = time.perf_counter()
            metric.compute(**inputs)
            print(f"{config_name:>18}  evaluate compute  {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
