"""What chunking costs: ``score_in_chunks`` (``hf_ches.runner``, what ``hf-ches score`` runs) against one plain
``scorer.map`` of the same rows with the same scorer. Not a test.

Both runs score the real HH-RLHF sample (``hf_ches.testing.real_data``: never in the repository), after a
warm-up that loads the model and checks that both give the same rows, and both end with their result on disk: the
plain map in its datasets cache file (never read back from an earlier run), the chunked run in a fresh folder of
chunk files, read back as one dataset. The two runs alternate (which one goes first swaps every repeat) and the
fastest of each counts. The model is a random Llama saved to disk and loaded by path, as a user's is; the tiny
default does the least work per row, so the fixed cost of each chunk weighs the most there.

    python benchmarks/bench_chunks.py                                        # tiny Llama, 1,156 pairs, 5 chunks
    python benchmarks/bench_chunks.py --hidden_size 256 --num_layers 4 --vocab_size 16384   # bench_ches' cpu-small
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars, load_dataset

from hf_ches import CHESScorer
from hf_ches.runner import chunk_names, score_in_chunks
from hf_ches.testing import HH_RLHF_SAMPLE, build_tiny_model, real_data


def same_rows(a: Dataset, b: Dataset) -> bool:
    """Whether two scored datasets hold the same columns and values (NaN equal to NaN)."""
    return a.column_names == b.column_names and all(
        np.array_equal(np.asarray(a[c], dtype=object), np.asarray(b[c], dtype=object)) for c in a.column_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1156, help="first rows of the HH-RLHF sample (1,156 in all)")
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64, help="map batch; divides --chunk_size")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=None, help="default: the test tokenizer's")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; the fastest of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a CPU another job shares: "
                                                                   "busy-waiting OpenMP threads stall for seconds)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.chunk_size % args.batch_size:
        parser.error("--batch_size must divide --chunk_size (else the map batches, and the scores, differ)")
    disable_progress_bars()
    logging.getLogger("hf_ches").setLevel(logging.ERROR)  # the boundary-shift warning of every chunked run
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = load_dataset("json", data_files=str(real_data(HH_RLHF_SAMPLE)), split="train").select(range(args.pairs))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(tmp, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                 vocab_size=args.vocab_size)
        scorer = CHESScorer(model)
        runs = {
            "map": lambda i: scorer.map(rows, warn=False, batch_size=args.batch_size, load_from_cache_file=False),
            "chunks": lambda i: score_in_chunks(scorer, rows, Path(tmp, f"chunks-{i}"), chunk_size=args.chunk_size,
                                                batch_size=args.batch_size),
        }
        identical = same_rows(runs["map"]("warm-up"), runs["chunks"]("warm-up"))
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                runs[name](repeat)
                seconds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in seconds.items()}
    ratio, median_ratio = best["chunks"] / best["map"], statistics.median(
        c / m for c, m in zip(seconds["chunks"], seconds["map"]))
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} pairs={args.pairs} "
          f"chunks={len(chunk_names(args.pairs, args.chunk_size))}x{args.chunk_size} batch={args.batch_size} "
          f"model=llama h{args.hidden_size} l{args.num_layers}; {args.repeats} alternating repeats; identical rows: "
          f"{identical}")
    for name, times in seconds.items():
        print(f"{name:<7} fastest {best[name]:7.2f} s   all {' '.join(f'{t:.2f}' for t in times)}")
    print(f"chunked_over_map {ratio:.3f} (fastest of each; median of the paired ratios {median_ratio:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "ratio": ratio,
                                               "median_ratio": median_ratio, "identical": identical}, indent=2))


if __name__ == "__main__":
    main()
