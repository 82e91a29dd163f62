"""What the host costs an accelerator, measured without one: ``ds.map(CHESScorer)`` against an emulated device.

On a GPU the model runs while the host tokenizes, pads and writes Arrow; whatever the host does while the device
waits is lost throughput. This measures that loss on a CPU. The model's trunk is replaced by an emulated device
that runs asynchronously, as CUDA does: a call queues ``launch + tokens / throughput`` seconds of work behind the
work already queued (at most ``--queue_depth`` micro-batches; a fuller queue makes the host wait, as CUDA's launch
queue does) and returns zero states at once; the end of :func:`hf_ches.forward.encode`, where the scorer reads its
sums back, waits for the queue to drain (a sleep, which releases the GIL as a CUDA wait does). The scorer takes its
accelerator path (tokenize ahead on threads, longest first). The emulated *limit* is the device time of all pairs
packed at once with no host work at all. Not a test.

Defaults: the trunk throughput of Qwen2.5-0.5B on an H200 (``benchmarks/README.md``), CHES-only scores, real tokenizer,
real ``datasets``. ``--synchronous`` makes the host wait for every micro-batch instead (what a device copy from
pageable memory or a ``.item()`` inside the loop would do). Kernel launches are left out, and this host's 2 cores
tokenize slower than a GPU host's.

    python benchmarks/bench_host.py --pairs 512 --batch_sizes 256 512
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from types import SimpleNamespace

import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.bench_ches import realistic_pairs, sequences
import hf_ches.transform
from hf_ches import CHESScorer
from hf_ches.batching import longest_first, pack
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import build_tokenizer


class EmulatedDevice(torch.nn.Module):
    """A trunk on an emulated accelerator: each call queues ``launch_s + B*T / tokens_per_s`` seconds of work and
    returns zero states; :meth:`synchronize` waits until the queued work is done."""

    def __init__(self, hidden: int, tokens_per_s: float, launch_s: float, queue_depth: int, synchronous: bool):
        super().__init__()
        self.hidden, self.tokens_per_s, self.launch_s = hidden, tokens_per_s, launch_s
        self.queue_depth, self.synchronous = queue_depth, synchronous
        self.busy, self.finish_times = 0.0, collections.deque()  # finish time of each queued micro-batch

    def seconds(self, tokens: int) -> float:
        return self.launch_s + tokens / self.tokens_per_s

    def forward(self, input_ids: torch.Tensor, position_ids: None = None, attention_mask: None = None,
                use_cache: bool = False) -> SimpleNamespace:
        while self.finish_times and self.finish_times[0] <= time.perf_counter():
            self.finish_times.popleft()
        if len(self.finish_times) >= self.queue_depth:  # the launch queue is full: wait for its oldest entry
            _sleep_until(self.finish_times.popleft())
        seconds = self.seconds(input_ids.numel())
        start = max(time.perf_counter(), self.finish_times[-1] if self.finish_times else 0.0)
        self.finish_times.append(start + seconds)
        self.busy += seconds
        if self.synchronous:
            self.synchronize()
        return SimpleNamespace(last_hidden_state=torch.zeros(()).expand(*input_ids.shape, self.hidden))

    def synchronize(self) -> None:
        if self.finish_times:
            _sleep_until(self.finish_times[-1])
        self.finish_times.clear()


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.perf_counter()))


def _synchronized(encode, device: EmulatedDevice):
    """``encode`` that waits for the device before returning, where the real one reads its sums back."""

    @functools.wraps(encode)
    def wrapper(*args, **kwargs):
        out = encode(*args, **kwargs)
        device.synchronize()
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[256, 512], help="rows per Dataset.map batch")
    parser.add_argument("--tokens_per_s", type=float, default=312e3, help="emulated device throughput")
    parser.add_argument("--launch_ms", type=float, default=1.0, help="emulated fixed cost per micro-batch")
    parser.add_argument("--queue_depth", type=int, default=2, help="micro-batches the host may queue ahead")
    parser.add_argument("--synchronous", action="store_true", help="the host waits for every micro-batch")
    parser.add_argument("--token_budget", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    disable_progress_bars()
    # The host-side tensor work is tiny here, and after each emulated wait, waking torch's OpenMP workers costs
    # milliseconds on this machine, which work queued on a GPU does not. The tokenizer stays parallel (its own pool).
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).eval()
    hf_ches.transform.tokenize_ahead = lambda device: True  # schedule as on an accelerator, on this CPU
    # the plain pass (whole sequences), whose limit is written out below
    scorer = CHESScorer(model, tokenizer, scores=("ches", "ln_ches"), token_budget=args.token_budget,
                        prefix_sharing=False)
    scorer.load()  # checks the real trunk once; then the device stands in for it
    device = model.model = EmulatedDevice(config.hidden_size, args.tokens_per_s, args.launch_ms / 1e3,
                                          args.queue_depth, args.synchronous)
    hf_ches.transform.encode = _synchronized(hf_ches.transform.encode, device)

    rows = realistic_pairs(args.pairs)
    ds = Dataset.from_dict(rows)
    lengths = [len(s) for s in sequences(tokenize_pairs(read_rows(rows, range(args.pairs)), tokenizer))[0]]
    limit = sum(device.seconds(len(g) * lengths[g[0]]) for g in pack(longest_first(lengths), lengths.__getitem__, args.token_budget))
    print(f"pairs={args.pairs} tokens={sum(lengths)} token_budget={args.token_budget} "
          f"device={args.tokens_per_s:.0f} tokens/s + {args.launch_ms} ms per micro-batch; "
          f"emulated limit {limit:.3f} s")
    print(f"{'map batch':>9} {'map s':>7} {'device busy s':>13} {'device idle s':>13} {'limit / map':>11}")
    for batch_size in args.batch_sizes:
        best = None
        for _ in range(args.repeats):
            device.busy = 0.0
            start = time.perf_counter()
            ds.map(scorer, batched=True, batch_size=batch_size)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, device.busy)
        seconds, busy = best
        print(f"{batch_size:>9} {seconds:7.3f} {busy:13.3f} {seconds - busy:13.3f} {limit / seconds:11.3f}")


if __name__ == "__main__":
    main()
