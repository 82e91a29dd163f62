"""On an accelerator: CHESScorer on the device matches the per-example float64 CPU reference. Not a test.

The unit tests run on CPU only (CI has no GPU); this script is the same check for a CUDA device, float32 models
of each tiny architecture, batch size 64, shuffled rows, with and without prefix sharing:

    python benchmarks/check_device.py
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import build_tiny_model, synthetic_pairs
from tests.plugins.models import reference_pair


def probe(device: str) -> None:
    """What float32 means on this device: the library's setting, and the error of one product and of attention."""
    a, b = torch.randn(512, 512, dtype=torch.float64), torch.randn(512, 512, dtype=torch.float64)
    exact = a @ b
    matmul = ((a.float().to(device) @ b.float().to(device)).double().cpu() - exact).abs().max() / exact.abs().max()
    q = torch.randn(1, 4, 64, 32, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    got = torch.nn.functional.scaled_dot_product_attention(*(q.float().to(device),) * 3, is_causal=True)
    attention = (got.double().cpu() - ref).abs().max() / ref.abs().max()
    print(f"float32 matmul precision {torch.get_float32_matmul_precision()!r}, cudnn.allow_tf32 "
          f"{torch.backends.cudnn.allow_tf32}; float32 relative error: matmul {matmul:.1e}, sdpa {attention:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="preference rows per architecture and format")
    args = parser.parse_args()
    disable_progress_bars()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe(device)
    worst = {}
    for arch in ("llama", "qwen2", "gpt2", "gemma2"):
        path = build_tiny_model(tempfile.mkdtemp(), arch=arch)
        model64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        for fmt in ("standard", "conversational", "implicit"):
            rows = synthetic_pairs(args.rows, fmt) | {"id": list(range(args.rows))}
            pairs = tokenize_pairs(read_rows(rows, range(args.rows)), AutoTokenizer.from_pretrained(path))
            refs = [reference_pair(model64, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
            for sharing in (True, False):
                scorer = CHESScorer(path, device=device, dtype="float32", token_budget=700, prefix_sharing=sharing)
                if scorer.shares_prefixes(scorer.load()) != sharing:
                    print(f"{arch}: prefix sharing unsupported on {device}")
                scored = scorer.map(Dataset.from_dict(rows).shuffle(seed=1), batch_size=64)
                worst = worse(worst, scored, refs)
    print(f"device={device}: worst relative error vs float64 CPU reference: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    print("PASS" if max(worst.values()) <= 1e-5 else "FAIL (tolerance 1e-5)")


def worse(worst: dict[str, float], scored: Dataset, refs: list[dict]) -> dict[str, float]:
    """``worst`` updated with the relative errors of ``scored`` against ``refs`` (CHES by its terms' scale)."""
    worst = dict(worst)
    for row in scored:
        ref = refs[row["id"]]
        for name in ("ches", "ln_ches"):
            worst[name] = max(worst.get(name, 0.0), abs(row[name] - ref[name]) / ref[f"{name}_scale"])
        for name in ("chosen_logps", "rejected_logps"):
            worst["logps"] = max(worst.get("logps", 0.0), abs(row[name] - ref[name]) / max(1.0, abs(ref[name])))
    return worst


if __name__ == "__main__":
    main()
