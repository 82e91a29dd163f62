"""What the host costs an accelerator, measured without one: ``ds.map(CHESScorer)`` against an emulated device.

On a GPU the model runs while the host tokenizes, pads and writes Arrow; whatever the host does while the device
waits is lost throughput. This measures that loss on a CPU. The model's trunk is replaced by an emulated device
that takes ``launch + tokens / throughput`` seconds per micro-batch (a sleep, which releases the GIL as a CUDA wait
does) and returns zeros, and the scorer takes its accelerator path (tokenize ahead on threads, longest first). The
emulated *limit* is the device time of all pairs packed at once with no host work at all. Not a test.

Defaults: the trunk throughput of Qwen2.5-0.5B on an H200 (``performance.md``), CHES-only scores, real tokenizer,
real ``datasets``. The emulation is pessimistic in one way (the host sleeps with the device, where CUDA would let it
queue the next micro-batch) and leaves out kernel launches; this host's 2 cores tokenize slower than a GPU host's.

    python benchmarks/bench_host.py --pairs 512 --batch_sizes 256 512
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.bench_ches import realistic_pairs
from hf_ches.batching import plan_microbatches
from hf_ches.pairs import PendingPairs, read_rows
from hf_ches.testing import AcceleratorOrderScorer, build_tokenizer


class EmulatedDevice(torch.nn.Module):
    """A trunk that spends ``launch_s + B*T / tokens_per_s`` seconds per micro-batch and returns zero states."""

    def __init__(self, hidden: int, tokens_per_s: float, launch_s: float):
        super().__init__()
        self.hidden, self.tokens_per_s, self.launch_s, self.busy = hidden, tokens_per_s, launch_s, 0.0

    def seconds(self, tokens: int) -> float:
        return self.launch_s + tokens / self.tokens_per_s

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        seconds = self.seconds(input_ids.numel())
        self.busy += seconds
        time.sleep(seconds)
        return SimpleNamespace(last_hidden_state=torch.zeros(()).expand(*input_ids.shape, self.hidden))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[256, 512], help="rows per Dataset.map batch")
    parser.add_argument("--tokens_per_s", type=float, default=312e3, help="emulated device throughput")
    parser.add_argument("--launch_ms", type=float, default=1.0, help="emulated fixed cost per micro-batch")
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
    scorer = AcceleratorOrderScorer(model, tokenizer, scores=("ches", "ln_ches"), token_budget=args.token_budget)
    scorer.load()  # checks the real trunk once; then the device stands in for it
    device = model.model = EmulatedDevice(config.hidden_size, args.tokens_per_s, args.launch_ms / 1e3)

    rows = realistic_pairs(args.pairs)
    ds = Dataset.from_dict(rows)
    pairs = list(PendingPairs(read_rows(rows, range(args.pairs)), tokenizer))
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs] + [len(p.prompt_ids) + len(p.rejected_ids)
                                                                         for p in pairs]
    limit = sum(device.seconds(len(g) * lengths[g[0]]) for g in plan_microbatches(lengths, args.token_budget))
    print(f"pairs={args.pairs} tokens={sum(lengths)} token_budget={args.token_budget} "
          f"device={args.tokens_per_s:.0f} tokens/s + {args.launch_ms} ms per micro-batch; "
          f"emulated limit {limit:.3f} s")
    print(f"{'map batch':>9} {'map s':>7} {'device busy s':>13} {'host-only s':>11} {'limit / map':>11}")
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
        print(f"{batch_size:>9} {seconds:7.3f} {busy:13.3f} {seconds - busy:11.3f} {limit / seconds:11.3f}")


if __name__ == "__main__":
    main()
