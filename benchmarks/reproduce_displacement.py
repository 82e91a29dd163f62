"""Paper 1's percentile-subset experiment (Razin et al. 2024, Sec. 5), rerun on HH-RLHF with SmolLM2. Not a test.

1. Score a seeded pool of HH-RLHF harmless pairs (``hf_ches.testing.real_data``, the implicit-prompt format,
   TRL's tokens) with SmolLM2-135M-Instruct: ``ches``, ``ln_ches`` and the log-probs.
2. Take ``--subset_size`` pairs centered at the 0th, 50th and 100th percentile of ``ln_ches`` and of ``ches`` (the
   paper's window rule, :func:`hf_ches.displacement.quantile_slice`), plus one seeded random subset.
3. Pick the learning rate by a small sweep on the random subset: the smallest rate of ``--lr_grid`` after which the
   subset's own DPO loss (computed from the log-probs before and after) is at most ``--target_loss``.
4. Train each subset with TRL's ``DPOTrainer`` from the same start (β = 0.1, RMSprop as in the paper, constant rate,
   no clipping, reference log-probs precomputed) and report the mean change of log π(chosen) and log π(rejected)
   over the subset's pairs, before against after.
5. Train on a seeded "whole" sample of ``--sample_size`` pairs, on it less its top 10% by ``ln_ches``, and on it less
   a random 10%; report the share of pairs whose chosen log-prob fell (over the pairs trained on, and over all).

Every run trains a fresh float32 copy of the start (:func:`plain_copy`).
Results: ``benchmarks/results/reproduce_displacement.json`` and ``.png``.

    OMP_NUM_THREADS=1 python benchmarks/reproduce_displacement.py      # docs/validation.md's numbers (28 min, 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM

from hf_ches import CHESScorer, LogProbScorer
from hf_ches.displacement import quantile_slice
from hf_ches.models import load_model_and_tokenizer
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import HH_RLHF_SAMPLE, real_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BETA = 0.1
QUANTILES = {"bottom": 0.0, "middle": 0.5, "top": 1.0}


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of ``model`` to train or score: ``Trainer`` trains in place and TRL patches the forward of the
    model it trains. The copy has none of the quantization marks of a model loaded from a GGUF file, which
    ``Trainer`` refuses (the built-in models load from safetensors and carry none)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for mark in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, mark):
            delattr(config, mark)
    copy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copy.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return copy


def logps(model, tokenizer, rows: Dataset, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of ``chosen`` and ``rejected`` (TRL's tokens, truncated to ``max_length`` as TRL's
    ``keep_start``), float32 forward; ``rows`` are pairs in one of TRL's formats."""
    scored = LogProbScorer(model.eval(), tokenizer, on_invalid="flag", max_length=max_length).map(rows)
    return np.asarray(scored["chosen_logps"]), np.asarray(scored["rejected_logps"])


def train(base, tokenizer, rows: Dataset, lr: float, args, max_length: int | None = None) -> torch.nn.Module:
    """DPO with TRL's ``DPOTrainer`` on ``rows`` (pairs in one of TRL's formats) from a fresh plain copy of ``base``,
    ``args.epochs`` epochs of batches of ``args.batch_size``, sequences truncated to ``max_length`` (``keep_start``);
    the trained weights."""
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), beta=BETA, learning_rate=lr, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, optim="rmsprop", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, max_length=max_length, truncation_mode="keep_start",
        precompute_ref_log_probs=True,
        save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
        use_cpu=base.device.type == "cpu",
        # DPOConfig defaults to bf16 autocast; a CPU without bfloat16 matrix units runs those matmuls on a slow
        # fallback path, so train float32 there (the model is a float32 copy anyway)
        bf16=base.device.type == "cuda",
        seed=args.seed, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default recomputes every forward: a third more work, same math
    )
    trainer = DPOTrainer(model=plain_copy(base), args=config, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return plain_copy(trainer.model).to(base.device).eval()  # TRL patches the trained model's forward: score a copy


def relative(path: str) -> str:
    """``path`` from the repository root when it lies inside it (the results name no machine's folders)."""
    return str(Path(path).resolve()).removeprefix(str(ROOT) + "/")


def dpo_loss(d_chosen: np.ndarray, d_rejected: np.ndarray) -> float:
    """Mean DPO loss of trained pairs against the start (the reference): ``−log σ(β (Δ+ − Δ−))``."""
    return float(np.mean(np.logaddexp(0.0, -BETA * (d_chosen - d_rejected))))


def table(out: dict) -> str:
    """Markdown tables of the subsets and of the filtering runs."""
    lines = ["| subset | mean ln_ches | mean ches | mean Δ log π(chosen) | mean Δ log π(rejected) "
             "| share chosen fell |", "|---|---|---|---|---|---|"]
    for name, r in out["subsets"].items():
        lines.append(f"| {name} | {r['mean_ln_ches']:.3g} | {r['mean_ches']:.3g} | "
                     f"{r['mean_delta_chosen_logps']:+.2f} | "
                     f"{r['mean_delta_rejected_logps']:+.2f} | {r['share_chosen_fell']:.2f} |")
    lines += ["", "| trained on | pairs | share chosen fell (trained pairs) | share chosen fell (all sample pairs) |",
              "|---|---|---|---|"]
    for name, r in out["filtering"].items():
        lines.append(f"| {name} | {r['num_trained']} | {r['share_chosen_fell_trained']:.2f} | "
                     f"{r['share_chosen_fell_all']:.2f} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    """Bars of the mean Δ log π(chosen) and Δ log π(rejected) per subset, each pair's Δ log π(chosen) as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(out["subsets"])
    x = np.arange(len(names))
    for shift, key, color in ((-0.2, "chosen", "#4c78a8"), (0.2, "rejected", "#f58518")):
        ax.bar(x + shift, [out["subsets"][n][f"mean_delta_{key}_logps"] for n in names], 0.4, color=color,
               label=f"mean Δ log π({key})")
    for i, n in enumerate(names):
        dots = out["subsets"][n]["delta_chosen_logps"]
        ax.scatter(np.full(len(dots), i - 0.2), dots, s=6, color="black", zorder=3)
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylabel("after − before (nats)")
    s = out["settings"]
    ax.set_title(f"{out['model']}: DPO on {s['subset_size']} HH-RLHF pairs per subset, {s['epochs']} epochs, "
                 f"lr {s['learning_rate']:.0e}", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="jsonl of {chosen, rejected} pairs (implicit prompt); default: "
                                                     "the real HH-RLHF sample")
    parser.add_argument("--model_name_or_path", default="smollm2")
    parser.add_argument("--max_tokens", type=int, default=96,
                        help="keep pairs whose prompt + longer completion has at most this many tokens")
    parser.add_argument("--pool_size", type=int, default=200, help="pairs scored (seeded draw of the kept pairs)")
    parser.add_argument("--subset_size", type=int, default=10, help="pairs per percentile subset")
    parser.add_argument("--sample_size", type=int, default=20, help="pairs of the 'whole sample' runs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lr_grid", type=float, nargs="+", default=[3e-7, 1e-6])
    parser.add_argument("--target_loss", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "reproduce_displacement.json"))
    args = parser.parse_args()
    disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob bars
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    # --- 1. the pool: pairs that fit, seeded draw, scored ---
    base, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype="float32",
                                               device="cuda" if torch.cuda.is_available() else "cpu")
    data = args.data or real_data(HH_RLHF_SAMPLE)
    data_name = relative(args.data) if args.data else f"real data: {HH_RLHF_SAMPLE}"  # no machine's folders
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    batch = {"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
    pairs = tokenize_pairs(read_rows(batch, range(len(rows))), tokenizer, on_invalid="flag")
    fits = [p.index for p in pairs if p.scorable
            and len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= args.max_tokens]
    pool_index = np.sort(rng.choice(fits, min(args.pool_size, len(fits)), replace=False))
    pool = Dataset.from_dict({"chosen": [batch["chosen"][i] for i in pool_index],
                              "rejected": [batch["rejected"][i] for i in pool_index]})
    scored = CHESScorer(base, tokenizer, scores=("ches", "ln_ches", "logps"), on_invalid="flag").map(pool)
    score = {name: np.asarray(scored[name]) for name in ("ches", "ln_ches")}
    before = np.asarray(scored["chosen_logps"]), np.asarray(scored["rejected_logps"])
    print(f"{len(rows)} pairs, {len(fits)} within {args.max_tokens} tokens, pool of {len(pool)} scored "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    # --- 2. the subsets (positions in the pool) ---
    subsets = {f"{name} {label}": quantile_slice(np.argsort(score[name], kind="stable"), q, args.subset_size)
               for name in ("ln_ches", "ches") for label, q in QUANTILES.items()}
    subsets["random"] = np.sort(rng.choice(len(pool), args.subset_size, replace=False))

    def run_subset(idx: np.ndarray, lr: float) -> dict:
        clock = time.perf_counter()
        chosen, rejected = logps(train(base, tokenizer, pool.select(idx), lr, args), tokenizer, pool.select(idx))
        d_c, d_r, seconds = chosen - before[0][idx], rejected - before[1][idx], time.perf_counter() - clock
        return {"pool_positions": idx.tolist(), "row_index": pool_index[idx].tolist(),
                "mean_ln_ches": float(score["ln_ches"][idx].mean()), "mean_ches": float(score["ches"][idx].mean()),
                "mean_delta_chosen_logps": float(d_c.mean()), "mean_delta_rejected_logps": float(d_r.mean()),
                "share_chosen_fell": float(np.mean(d_c < 0)), "dpo_loss_after": dpo_loss(d_c, d_r),
                "delta_chosen_logps": d_c.tolist(), "delta_rejected_logps": d_r.tolist(), "seconds": round(seconds)}

    sweep, results, filtering, lr = {}, {}, {}, None

    def save(complete: bool) -> dict:
        """Write what has been measured so far (``complete`` says whether every run is in)."""
        out = {
            "model": args.model_name_or_path, "data": data_name, "complete": complete,
            "settings": vars(args) | {"data": data_name, "output": relative(args.output), "beta": BETA,
                                      "optimizer": "rmsprop", "lr_scheduler": "constant",
                                      "max_grad_norm": None, "learning_rate": lr,
                                      "num_threads": torch.get_num_threads()},
            "counts": {"rows": len(rows), "fit_max_tokens": len(fits), "pool": len(pool)},
            "lr_sweep": {f"{k:.0e}": {key: v[key] for key in ("dpo_loss_after", "mean_delta_chosen_logps")}
                         for k, v in sweep.items()},
            "subsets": {name: results[name] for name in subsets if name in results},
            "filtering": filtering, "seconds": round(time.perf_counter() - start),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return out

    # --- 3. learning-rate sweep on the random subset ---
    for candidate in sorted(args.lr_grid):
        sweep[candidate] = run_subset(subsets["random"], candidate)
        print(f"lr {candidate:.0e}: DPO loss after {sweep[candidate]['dpo_loss_after']:.3f}, mean Δ log π(chosen) "
              f"{sweep[candidate]['mean_delta_chosen_logps']:+.2f} ({sweep[candidate]['seconds']} s)", flush=True)
        if sweep[candidate]["dpo_loss_after"] <= args.target_loss:
            lr = candidate
            break
    lr = lr if lr is not None else max(args.lr_grid)
    results["random"] = sweep[lr]

    # --- 4. every subset from the same start (the extremes first) ---
    for name in sorted(subsets, key=lambda n: "middle" in n):
        if name not in results:
            results[name] = run_subset(subsets[name], lr)
            print(f"{name:16s} mean Δ log π(chosen) {results[name]['mean_delta_chosen_logps']:+.2f}, "
                  f"Δ log π(rejected) {results[name]['mean_delta_rejected_logps']:+.2f} "
                  f"({results[name]['seconds']} s)", flush=True)
            save(complete=False)

    # --- 5. the whole sample, less its top 10% by ln_ches, less a random 10% ---
    sample = np.sort(rng.choice(len(pool), min(args.sample_size, len(pool)), replace=False))
    drop = max(1, round(0.1 * len(sample)))
    by_ln_ches = sample[np.argsort(score["ln_ches"][sample], kind="stable")]
    training_sets = {"whole sample": sample, "less top 10% ln_ches": np.sort(by_ln_ches[:-drop]),
                     "less random 10%": np.sort(rng.choice(sample, len(sample) - drop, replace=False))}
    for name, idx in training_sets.items():
        clock = time.perf_counter()
        chosen, rejected = logps(train(base, tokenizer, pool.select(idx), lr, args), tokenizer, pool.select(sample))
        d_c, seconds = chosen - before[0][sample], time.perf_counter() - clock
        trained = np.isin(sample, idx)
        filtering[name] = {"num_trained": int(len(idx)), "share_chosen_fell_trained": float(np.mean(d_c[trained] < 0)),
                           "share_chosen_fell_all": float(np.mean(d_c < 0)),
                           "mean_delta_chosen_logps_trained": float(d_c[trained].mean()),
                           "mean_delta_rejected_logps_trained": float((rejected - before[1][sample])[trained].mean()),
                           "delta_chosen_logps_all": d_c.tolist(), "row_index": pool_index[idx].tolist(),
                           "seconds": round(seconds)}
        print(f"{name:22s} share of chosen log-probs that fell: {filtering[name]['share_chosen_fell_trained']:.2f} "
              f"of the {len(idx)} trained pairs, {filtering[name]['share_chosen_fell_all']:.2f} of all "
              f"{len(sample)} ({filtering[name]['seconds']} s)", flush=True)
        save(complete=False)

    out = save(complete=True)
    plot(out, Path(args.output).with_suffix(".png"))
    print("\n" + table(out))
    print(f"\nWrote {args.output} and {Path(args.output).with_suffix('.png')} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
