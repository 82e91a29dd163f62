"""Which dtype scores fastest with the real SmolLM2-135M-Instruct GGUF model on this machine? Not a test.

transformers keeps a GGUF checkpoint's weights packed and computes in float32, so asking for bfloat16 casts every
matmul's input and output (it says so in a notice at load time). This measures the scorer's throughput in each
dtype on the same HH-RLHF pairs, in one run, interleaved, the fastest of ``--repeats`` counting:

    python benchmarks/bench_dtype.py --pairs 64
"""

from __future__ import annotations

import argparse
import json
import time

import transformers
from datasets import disable_progress_bars, load_dataset

from hf_ches import CHESScorer
from hf_ches.models import DEFAULT_MODEL
from hf_ches.testing import HH_RLHF_SAMPLE, real_data

NO_CACHE = dict(keep_in_memory=True, load_from_cache_file=False)  # every map scores; none reads a cache file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="HH-RLHF pairs scored per run")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    disable_progress_bars()
    transformers.logging.set_verbosity_error()  # the GGUF dtype notice is what is being measured here
    pairs = load_dataset("json", data_files=str(real_data(HH_RLHF_SAMPLE)), split="train").select(range(args.pairs))
    scorers = {dtype: CHESScorer(DEFAULT_MODEL, dtype=dtype) for dtype in args.dtypes}
    for scorer in scorers.values():
        scorer.load()
        scorer.map(pairs.select(range(8)), **NO_CACHE)  # first-call costs out of the timing
    best = {dtype: float("inf") for dtype in scorers}
    for repeat in range(args.repeats):
        for dtype, scorer in scorers.items():
            start = time.perf_counter()
            scorer.map(pairs, **NO_CACHE)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    results = {dtype: {"seconds": round(s, 2), "pairs_per_s": round(args.pairs / s, 2)} for dtype, s in best.items()}
    fastest = min(best, key=best.get)
    print(json.dumps({"pairs": args.pairs, "transformers": transformers.__version__, "results": results,
                      "fastest": fastest}, indent=2))


if __name__ == "__main__":
    main()
