"""Which score, and which rule, picks the pairs whose chosen log-prob DPO lowers? The evidence behind the default
selection (``docs/selection.md``). Not a test.

Cells: {SmolLM2-135M-Instruct, Gemma 3 270M} × {HH-RLHF harmless, LLaMA-Factory English} (``hf_ches.testing
.real_data``). Each cell draws a seeded pool of ``--pool_size`` pairs whose prompt has at most ``--max_prompt``
tokens, truncated to ``--max_length`` tokens (TRL's ``keep_start``, the same tokens in scoring and training), and
runs up to three stages:

1. ``onestep`` (every cell): the scores of :mod:`hf_ches.validate` (``ches``, ``ln_ches``, ``entk_w``,
   ``ln_entk_w``, −edit distance, last-hidden IP, the two length baselines), then one DPO step per pair from the
   same start, its gradient computed once and stepped twice (SGD at ``--sgd_lr``, sign-GD at ``--sign_lr``);
   :func:`hf_ches.validate.summarize` for each: ρ, the partial ρ given both lengths, ρ with the per-token change,
   the top-10% share, the sign rules.
2. ``manystep`` (``--many_step_cells``): TRL's ``DPOTrainer`` (β 0.1, RMSprop, constant rate, no clipping, float32)
   on the top and bottom ``--subset_size`` pairs of the pool by ``ches``, ``ln_ches`` and ``entk_w`` and on a
   seeded random subset. The budget: the first rate of ``--lr_grid`` after which some chosen log-prob of the random
   subset fell. Per subset: mean Δ log π(chosen) with a bootstrap interval and the share that fell; over every
   trained (pair, run), each candidate's AUROC for "this pair's chosen log-prob fell".
3. ``filter`` (same cells): train on a seeded sample of ``--sample_size`` pool pairs, on it less its top 10% by
   ``ches``, ``ln_ches`` and ``entk_w``, less the pairs that ``entk_w > 0`` and ``ches > 0`` flag, and less a
   random 10%; the share of the sample's chosen log-probs that fell and their mean Δ.

Resumable: each cell's stage is a JSON file under ``--output_dir`` (``<cell>.<stage>.json``), written as it finishes
(the many-step and filter runs also after every training run), and skipped (or continued) on a rerun. ``--plot``
draws the one figure from what exists; ``--table`` prints the Markdown tables of ``docs/selection.md``.

    OMP_NUM_THREADS=1 nohup python benchmarks/selection_study.py --stages onestep > onestep.log 2>&1 &
    OMP_NUM_THREADS=1 nohup python benchmarks/selection_study.py --stages manystep filter > many.log 2>&1 &
    python benchmarks/selection_study.py --plot --table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars

from hf_ches import CHESScorer
from hf_ches.displacement import auroc, bootstrap_interval
from hf_ches.models import load_model_and_tokenizer
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import HH_RLHF_SAMPLE, LLAMAFACTORY_DPO, real_data
from hf_ches.validate import (
    LENGTH_BASELINES, ValidateArguments, candidates, measure_step, pair_gradients, score_columns, summarize,
)

from benchmarks.reproduce_displacement import logps, train

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": "smollm2", "gemma3": "gemma3-270m"}
DATASETS = {"hh": HH_RLHF_SAMPLE, "lf": LLAMAFACTORY_DPO[0]}
CELLS = [f"{m}-{d}" for m in MODELS for d in DATASETS]  # smollm2-hh, smollm2-lf, gemma3-hh, gemma3-lf
SCORES = ["ches", "ln_ches", "edit_distance", "last_hidden_ip", "entk_w"]  # validate's --scores names
RANKED = ["entk_w", "ches", "ln_ches"]  # the scores whose top and bottom subsets are trained, in this order
RULES = ["entk_w", "ches"]  # the sign rules "score > 0" of the filter test
# Gemma 3 270M is a base model without a chat template; the LLaMA-Factory rows are conversations, so they get
# Gemma's turn markup (a system turn is a user turn, as Gemma has no system role).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}")


def load_rows(dataset: str) -> Dataset:
    """The real pairs in one of TRL's formats: HH-RLHF as it is (implicit prompt, strings), LLaMA-Factory's
    ShareGPT rows as conversational ``prompt``/``chosen``/``rejected`` message lists (`hf_ches.pairs.read_rows`)."""
    path = real_data(DATASETS[dataset])
    if dataset == "hh":
        return Dataset.from_list([json.loads(line) for line in open(path, encoding="utf-8")])
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = read_rows({k: [r[k] for r in raw] for k in raw[0]}, range(len(raw)))
    return Dataset.from_list([{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows])


class Cell:
    """One model × dataset: the model, its pool of pairs (scored once, cached in ``<cell>.pool.json``)."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        model_key, self.dataset = name.split("-")
        self.model, self.tokenizer = load_model_and_tokenizer(
            MODELS[model_key], dtype="float32", device="cpu",
            chat_template=GEMMA_TEMPLATE if model_key == "gemma3" else None)
        self.rows = load_rows(self.dataset)
        path = args.output_dir / f"{name}.pool.json"
        if path.exists():
            self.pool = json.loads(path.read_text())
        else:
            self.pool = self.draw_and_score()
            write(path, self.pool)
        self.index = np.asarray(self.pool["row_index"])
        self.pairs = Dataset.from_dict(self.rows[self.index.tolist()])  # the pool's rows, in pool order
        self.columns = {k: np.asarray(v, dtype=np.float64) for k, v in self.pool["columns"].items()}

    def tokenized(self, rows: Dataset) -> list:
        return tokenize_pairs(read_rows(rows.to_dict(), range(len(rows))), self.tokenizer, self.args.max_length,
                              on_invalid="flag")

    def draw_and_score(self) -> dict:
        """The seeded pool (prompts of at most ``max_prompt`` tokens), its scores, lengths and log-probs."""
        args = self.args
        pairs = self.tokenized(self.rows)
        fits = [p.index for p in pairs if p.scorable and len(p.prompt_ids) <= args.max_prompt]
        rng = np.random.default_rng(args.seed)
        index = np.sort(rng.choice(fits, min(args.pool_size, len(fits)), replace=False))
        pool = Dataset.from_dict(self.rows[index.tolist()])
        scored = CHESScorer(self.model, self.tokenizer, scores=(*SCORES, "logps"), max_length=args.max_length,
                            on_invalid="flag").map(pool)
        tokens = self.tokenized(pool)
        columns = {c: list(scored[c]) for c in [*score_columns(SCORES), "chosen_logps", "rejected_logps"]}
        columns |= {"chosen_tokens": [len(p.chosen_ids) for p in tokens],
                    "rejected_tokens": [len(p.rejected_ids) for p in tokens]}
        return {"cell": self.name, "num_rows": len(self.rows), "num_fit": len(fits), "row_index": index.tolist(),
                "columns": columns}


def finished(path: Path) -> bool:
    """Whether a stage's JSON exists and is complete (one closed by ``--close_partial`` is not)."""
    return path.exists() and json.loads(path.read_text()).get("complete", False)


def write(path: Path, data: dict) -> None:
    """Write ``data`` as JSON, atomically (a killed run leaves the previous file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def mean_interval(values: np.ndarray, seed: int) -> dict:
    """Mean, its 95% percentile-bootstrap interval, and the share below 0."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "ci": bootstrap_interval(np.mean, values, seed=seed),
            "share_fell": float(np.mean(values < 0)), "num_pairs": int(len(values))}


def onestep(cell: Cell, args: argparse.Namespace, path: Path) -> dict:
    """One DPO step per pool pair (one gradient, an SGD and a sign-GD step), summarized per optimizer; the deltas
    are saved to ``path`` every 10 pairs and a rerun continues from there."""
    params = list(cell.model.parameters())
    steps = {"sgd": args.sgd_lr, "sign": args.sign_lr}
    measured = json.loads(path.read_text()) if path.exists() else {
        "seconds": 0, **{opt: {"delta_chosen_logps": [], "delta_rejected_logps": []} for opt in steps}}
    done, clock = len(measured["sgd"]["delta_chosen_logps"]), time.perf_counter() - measured["seconds"]
    for i, pair in enumerate(cell.tokenized(cell.pairs)):
        if i < done:
            continue
        before, grads = pair_gradients(cell.model, params, pair, beta=args.beta)
        for opt, lr in steps.items():
            for k, v in measure_step(cell.model, params, pair, grads, before, learning_rate=lr, optimizer=opt).items():
                measured[opt][k].append(v)
        del grads
        if (i + 1) % 10 == 0:
            measured["seconds"] = round(time.perf_counter() - clock)
            write(path, measured)
            print(f"{cell.name} onestep: {i + 1}/{len(cell.pairs)} pairs ({measured['seconds']} s)", flush=True)
    measured["seconds"] = round(time.perf_counter() - clock)
    return summarize_onestep(cell.name, cell.columns, measured, args)


def summarize_onestep(name: str, pool: dict[str, np.ndarray], measured: dict, args: argparse.Namespace) -> dict:
    """`hf_ches.validate.summarize` of the pairs measured so far (the first ones of the pool), per optimizer."""
    steps = {"sgd": args.sgd_lr, "sign": args.sign_lr}
    n = len(measured["sgd"]["delta_chosen_logps"])
    out = {"cell": name, "learning_rates": steps, "beta": args.beta, "seconds": measured["seconds"],
           "num_measured": n, "pool_size": len(next(iter(pool.values())))}
    for opt, lr in steps.items():
        columns = {k: v[:n] for k, v in pool.items()} | {k: np.asarray(v) for k, v in measured[opt].items()}
        options = ValidateArguments(scores=SCORES, optimizer=opt, learning_rate=lr, beta=args.beta)
        out[opt] = summarize(columns, options, args.seed) | {"delta_chosen_logps": measured[opt]["delta_chosen_logps"]}
    return out


def trained_delta(cell: Cell, idx: np.ndarray, measure: np.ndarray, lr: float, args: argparse.Namespace) -> np.ndarray:
    """Train on pool positions ``idx``; Δ log π(chosen) of pool positions ``measure`` against the start."""
    model = train(cell.model, cell.tokenizer, cell.pairs.select(idx.tolist()), lr, args, max_length=args.max_length)
    after, _ = logps(model, cell.tokenizer, cell.pairs.select(measure.tolist()), max_length=args.max_length)
    return after - cell.columns["chosen_logps"][measure]


def manystep(cell: Cell, args: argparse.Namespace, path: Path) -> dict:
    """The budget on the random subset, then the top and bottom subsets of each ranked score; AUROC over all."""
    out = json.loads(path.read_text()) if path.exists() else {"cell": cell.name, "runs": {}, "lr_sweep": {}}
    rng = np.random.default_rng(args.seed + 1)
    n, size = len(cell.index), args.subset_size
    subsets = {"random": np.sort(rng.choice(n, size, replace=False))}
    for name in RANKED:
        order = np.argsort(cell.columns[name], kind="stable")
        subsets |= {f"{name} top": np.sort(order[-size:]), f"{name} bottom": np.sort(order[:size])}
    if out.get("learning_rate") is None:
        for lr in args.lr_grid:
            key, clock = f"{lr:g}", time.perf_counter()
            if key not in out["lr_sweep"]:  # a rerun keeps the rates already measured
                delta = trained_delta(cell, subsets["random"], subsets["random"], lr, args)
                out["lr_sweep"][key] = mean_interval(delta, args.seed) | {
                    "positions": subsets["random"].tolist(), "delta_chosen_logps": delta.tolist(),
                    "seconds": round(time.perf_counter() - clock)}
                write(path, out)
            print(f"{cell.name} budget: lr {key}, {out['lr_sweep'][key]['share_fell']:.0%} of the random "
                  f"subset's chosen log-probs fell", flush=True)
            if out["lr_sweep"][key]["share_fell"] > 0 or lr == args.lr_grid[-1]:
                out["learning_rate"], out["runs"]["random"] = lr, out["lr_sweep"][key]
                break
        write(path, out)
    for name, idx in subsets.items():
        if name in out["runs"]:
            continue
        clock = time.perf_counter()
        delta = trained_delta(cell, idx, idx, out["learning_rate"], args)
        out["runs"][name] = mean_interval(delta, args.seed) | {
            "positions": idx.tolist(), "delta_chosen_logps": delta.tolist(),
            "seconds": round(time.perf_counter() - clock)}
        print(f"{cell.name} {name}: mean Δ log π(chosen) {delta.mean():+.2f}, {np.mean(delta < 0):.0%} fell "
              f"({out['runs'][name]['seconds']} s)", flush=True)
        write(path, out)
    return manystep_summary(cell.columns, out, args)


def manystep_summary(pool: dict[str, np.ndarray], out: dict, args: argparse.Namespace) -> dict:
    """Each candidate's AUROC for "chosen fell" over every trained (pair, run) of ``out["runs"]``, and the budget."""
    positions = np.concatenate([r["positions"] for r in out["runs"].values()]).astype(int)
    fell = np.concatenate([r["delta_chosen_logps"] for r in out["runs"].values()]) < 0
    out["auroc"] = {name: auroc(v[positions], fell) for name, v in candidates(pool, SCORES).items()}
    out["num_trained_pairs"], out["share_fell_all"] = int(len(fell)), float(fell.mean())
    out["budget"] = {"learning_rate": out["learning_rate"], "epochs": args.epochs, "batch_size": args.batch_size,
                     "subset_size": args.subset_size, "optimizer": "rmsprop", "beta": args.beta}
    return out


def filter_test(cell: Cell, args: argparse.Namespace, path: Path, learning_rate: float) -> dict:
    """Train on the sample and on it less each removal; Δ log π(chosen) over the whole sample."""
    out = json.loads(path.read_text()) if path.exists() else {"cell": cell.name, "runs": {}}
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(len(cell.index), args.sample_size, replace=False))
    drop = max(1, round(0.1 * len(sample)))
    runs = {"whole sample": sample}
    for name in RANKED:
        by = sample[np.argsort(cell.columns[name][sample], kind="stable")]
        runs[f"less top 10% {name}"] = np.sort(by[:-drop])
    for rule in RULES:
        runs[f"less {rule} > 0"] = sample[~(cell.columns[rule][sample] > 0)]
    runs["less random 10%"] = np.sort(rng.choice(sample, len(sample) - drop, replace=False))
    out |= {"learning_rate": learning_rate, "sample_size": len(sample), "num_removed_top": drop,
            "sample_positions": sample.tolist()}
    for name, idx in runs.items():
        if name in out["runs"]:
            continue
        same = next((k for k, v in runs.items() if k in out["runs"] and np.array_equal(v, idx)), None)
        clock = time.perf_counter()
        delta = (np.asarray(out["runs"][same]["delta_chosen_logps"]) if same is not None
                 else trained_delta(cell, idx, sample, learning_rate, args))
        trained = np.isin(sample, idx)
        out["runs"][name] = {"num_trained": int(len(idx)), "num_removed": int(len(sample) - len(idx)),
                             "same_as": same, "all": mean_interval(delta, args.seed),
                             "trained": mean_interval(delta[trained], args.seed),
                             "delta_chosen_logps": delta.tolist(), "seconds": round(time.perf_counter() - clock)}
        print(f"{cell.name} filter, {name}: {np.mean(delta < 0):.0%} of the sample's chosen log-probs fell, mean Δ "
              f"{delta.mean():+.2f} ({out['runs'][name]['seconds']} s)", flush=True)
        write(path, out)
    return out


def table(output_dir: Path) -> str:
    """The Markdown tables of docs/selection.md from the JSON files that exist."""
    def ci(stat: dict, key: str = "ci") -> str:
        low, high = stat[key]
        return f"[{low:.2f}, {high:.2f}]"

    lines = []
    for cell in CELLS:
        path = output_dir / f"{cell}.onestep.json"
        if not path.exists():
            continue
        one = json.loads(path.read_text())
        for opt in ("sgd", "sign"):
            r = one[opt]
            partial = "" if one.get("complete") else f" (PARTIAL: the first {one['num_measured']} pairs of the pool)"
            lines += [f"\n### {cell}, one {opt} step (lr {one['learning_rates'][opt]:g}), "
                      f"{r['spearman']['ches']['num_pairs']} pairs{partial}: {r['share_displaced']:.0%} displaced, "
                      f"mean Δ log π(chosen) {r['mean_delta_chosen_logps']:+.3f}\n",
                      "| candidate | ρ | 95% | partial ρ (lengths) | 95% | ρ per token | 95% | top 10% recovered |",
                      "|---|---|---|---|---|---|---|---|"]
            for name, s in r["spearman"].items():
                lines.append(f"| `{name}` | {s['rho']:.2f} | {ci(s)} | {s['partial_rho']:.2f} | {ci(s, 'partial_ci')} "
                             f"| {s['per_token_rho']:.2f} | {ci(s, 'per_token_ci')} | {s['top_share']:.0%} |")
            for rule, s in r["sign_rules"].items():
                lines.append(f"\n`{rule}`: holds for {s['share_flagged']:.0%}, agrees with \"log π(chosen) fell\" on "
                             f"{s['agreement']:.0%}.")
    for cell, many, partial in stage_results(output_dir, "manystep"):
        lines += [f"\n### {cell}, DPOTrainer{partial}: the budget sweep on the random subset\n",
                  "| rate | pairs | mean Δ log π(chosen) | 95% | share fell |", "|---|---|---|---|---|"]
        lines += [f"| {lr} | {r['num_pairs']} | {r['mean']:+.2f} | {ci(r)} | {r['share_fell']:.0%} |"
                  for lr, r in many["lr_sweep"].items()]
        lines += ["", f"Subsets at lr {many.get('learning_rate')}:", "",
                  "| subset | pairs | mean Δ log π(chosen) | 95% | share fell |", "|---|---|---|---|---|"]
        for name, r in many["runs"].items():
            lines.append(f"| {name} | {r['num_pairs']} | {r['mean']:+.2f} | {ci(r)} | {r['share_fell']:.0%} |")
        if "auroc" in many:
            lines += ["", f"AUROC for \"this pair's chosen log-prob fell\" over the {many['num_trained_pairs']} "
                          f"trained (pair, run)s, of which {many['share_fell_all']:.0%} fell:", "",
                      "| candidate | AUROC |", "|---|---|"]
            lines += [f"| `{k}` | {v:.2f} |" for k, v in many["auroc"].items()]
    for cell, f, partial in stage_results(output_dir, "filter"):
        lines += [f"\n### {cell}, filter test{partial}: {f['sample_size']} pairs, lr {f['learning_rate']:g}\n",
                  "| trained on | pairs | share of the sample's chosen that fell | mean Δ (sample) | 95% |",
                  "|---|---|---|---|---|"]
        for name, r in f["runs"].items():
            lines.append(f"| {name} | {r['num_trained']} | {r['all']['share_fell']:.0%} | {r['all']['mean']:+.2f} | "
                         f"{ci(r['all'])} |")
    return "\n".join(lines)


# The removals the verdict weighs, cheapest first (docs/selection.md, "Candidates"): each with the score behind it.
REMOVALS = {"less top 10% ches": "ches", "less top 10% ln_ches": "ln_ches", "less ches > 0": "ches",
            "less top 10% entk_w": "entk_w", "less entk_w > 0": "entk_w"}


def verdict(output_dir: Path) -> tuple[list[str], str]:
    """The rule of docs/selection.md applied to the JSON that exists: a removal qualifies when, on every cell of the
    filter test, fewer of the sample's chosen log-probs fell than with a random 10% removed and their mean Δ is
    higher, and when its score beats the length baselines: a partial ρ whose interval lies above 0 on every one-step
    cell and update, and an AUROC above both length baselines' on every many-step cell. The first qualifying
    removal (cheapest first) is the default; with none, the default flags by the sign rule of the score with the
    highest mean partial ρ and removes nothing. Returns the lines of the check and the verdict line."""
    filters = {cell: f for cell, f, _ in stage_results(output_dir, "filter")}
    many = {cell: m for cell, m, _ in stage_results(output_dir, "manystep") if "auroc" in m}
    one = {cell: json.loads((output_dir / f"{cell}.onestep.json").read_text()) for cell in CELLS
           if (output_dir / f"{cell}.onestep.json").exists()}
    lines = ["| removal | beats random removal (filter test cells) | partial ρ > 0 (one-step cells × updates) | "
             "AUROC > length (many-step cells) |", "|---|---|---|---|"]
    qualified = []
    for removal, score in REMOVALS.items():
        vs_random = []
        for cell, f in filters.items():
            runs = f["runs"]
            if removal in runs and "less random 10%" in runs:
                r, rand = runs[removal]["all"], runs["less random 10%"]["all"]
                vs_random.append(r["share_fell"] < rand["share_fell"] and r["mean"] > rand["mean"])
        partial = [o[opt]["spearman"][score]["partial_ci"][0] > 0 for o in one.values() for opt in ("sgd", "sign")]
        auc = [m["auroc"][score] > max(m["auroc"][b] for b in LENGTH_BASELINES) for m in many.values()]
        checks = [vs_random, partial, auc]
        passed = all(c and all(c) for c in checks)
        qualified += [removal] if passed else []
        lines.append(f"| {removal} | " + " | ".join(f"{sum(c)} of {len(c)}" for c in checks) + " |")
    if qualified:
        score = REMOVALS[qualified[0]]
        rule = f"{score} > 0" if "> 0" in qualified[0] else "remove_top=0.1"
        return lines, f"**Verdict:** score `{score}`, rule `{rule}`, remove."
    mean_partial = {s: np.mean([o[opt]["spearman"][s]["partial_rho"] for o in one.values() for opt in ("sgd", "sign")])
                    for s in dict.fromkeys(REMOVALS.values())}
    best = max(mean_partial, key=mean_partial.get)
    return lines, f"**Verdict:** score `{best}`, rule `{best} > 0`, flag (remove none)."


def stage_results(output_dir: Path, stage: str):
    """``(cell, results, label)`` of each cell with a finished (``<cell>.<stage>.json``) or, failing that, an
    unfinished (``.partial``, labelled) many-step or filter stage."""
    for cell in CELLS:
        for suffix in (".json", ".partial"):
            path = output_dir / f"{cell}.{stage}{suffix}"
            if path.exists():
                data = json.loads(path.read_text())
                yield cell, data, "" if data.get("complete") else " (PARTIAL: unfinished)"
                break


def plot(output_dir: Path) -> None:
    """One figure: per cell, each candidate's partial ρ with −Δ log π(chosen) given both lengths and its 95%
    interval, after one SGD step (left) and one sign-GD step (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in CELLS if (output_dir / f"{c}.onestep.json").exists()]
    fig = Figure(figsize=(11, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(cells))
    for ax, opt in zip(fig.subplots(1, 2), ("sgd", "sign")):
        for i, cell in enumerate(cells):
            one = json.loads((output_dir / f"{cell}.onestep.json").read_text())
            stats = one[opt]["spearman"]
            names = list(stats)
            rho = np.array([stats[n]["partial_rho"] for n in names])
            low, high = (np.array([stats[n]["partial_ci"][k] for n in names]) for k in (0, 1))
            label = cell if one.get("complete") else f"{cell} (first {one['num_measured']} pairs)"
            ax.bar(np.arange(len(names)) + (i - (len(cells) - 1) / 2) * width, np.nan_to_num(rho), width,
                   yerr=np.nan_to_num([rho - low, high - rho]), label=label, capsize=2)
        ax.set_xticks(np.arange(len(names)), names, rotation=35, fontsize=7, ha="right")
        ax.axhline(0, color="#999999", linewidth=0.8)
        ax.set_title(f"one {opt} step: partial ρ with −Δ log π(chosen) given both lengths", fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(output_dir / "selection_study.png", format="png", metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS)
    parser.add_argument("--many_step_cells", nargs="+", default=["smollm2-hh", "smollm2-lf", "gemma3-hh"])
    parser.add_argument("--stages", nargs="+", default=["onestep", "manystep", "filter"],
                        choices=["onestep", "manystep", "filter"])
    parser.add_argument("--max_prompt", type=int, default=128, help="pool prompts have at most this many tokens")
    parser.add_argument("--max_length", type=int, default=192, help="truncation of prompt + completion (keep_start)")
    parser.add_argument("--pool_size", type=int, default=100)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sgd_lr", type=float, default=1e-5)
    parser.add_argument("--sign_lr", type=float, default=1e-7)
    parser.add_argument("--subset_size", type=int, default=20)
    parser.add_argument("--sample_size", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lr_grid", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results" / "selection_study")
    parser.add_argument("--plot", action="store_true", help="only draw the figure from the existing JSON")
    parser.add_argument("--table", action="store_true", help="only print the Markdown tables")
    parser.add_argument("--close_partial", action="store_true",
                        help="summarize the one-step pairs measured so far of each unfinished cell, marked incomplete")
    args = parser.parse_args()
    settings = {k: (str(v.resolve()).removeprefix(str(ROOT) + "/") if isinstance(v, Path) else v)
                for k, v in vars(args).items()}  # no machine's folders in the results
    if args.close_partial:
        for name in args.cells:
            pool = args.output_dir / f"{name}.pool.json"
            if not pool.exists():
                continue
            columns = {k: np.asarray(v, dtype=np.float64) for k, v in json.loads(pool.read_text())["columns"].items()}
            for stage in ("onestep", "manystep"):
                partial, final = (args.output_dir / f"{name}.{stage}.{s}" for s in ("partial", "json"))
                if not partial.exists() or final.exists():
                    continue
                measured = json.loads(partial.read_text())
                if stage == "onestep":
                    result = summarize_onestep(name, columns, measured, args)
                elif measured.get("learning_rate") is not None:
                    result = manystep_summary(columns, measured, args)
                else:
                    continue
                write(final, result | {"settings": settings, "complete": False})
                print(f"{name}: closed the unfinished {stage} stage", flush=True)
        return
    if args.plot or args.table:
        if args.plot:
            plot(args.output_dir)
        if args.table:
            print(table(args.output_dir))
            checks, line = verdict(args.output_dir)
            print("\n" + "\n".join(checks) + "\n\n" + line)
        return
    torch.set_num_threads(1)
    disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for name in args.cells:
        todo = [s for s in args.stages if (s == "onestep" or name in args.many_step_cells)
                and not finished(args.output_dir / f"{name}.{s}.json")]
        if not todo:
            continue
        clock = time.perf_counter()
        cell = Cell(name, args)
        print(f"{name}: pool of {len(cell.index)} pairs (of {cell.pool['num_fit']} with prompts within "
              f"{args.max_prompt} tokens, {cell.pool['num_rows']} rows) ({time.perf_counter() - clock:.0f} s)",
              flush=True)
        for stage in todo:
            path = args.output_dir / f"{name}.{stage}.json"
            if stage == "onestep":
                result = onestep(cell, args, path.with_suffix(".partial"))
            elif stage == "manystep":
                if path.exists() and not path.with_suffix(".partial").exists():  # closed early: go on from it
                    path.replace(path.with_suffix(".partial"))
                result = manystep(cell, args, path.with_suffix(".partial"))
            else:
                many = args.output_dir / f"{name}.manystep.json"
                lr = json.loads(many.read_text())["learning_rate"] if many.exists() else None
                if lr is None:
                    print(f"{name} filter: skipped, no many-step budget yet", flush=True)
                    continue
                result = filter_test(cell, args, path.with_suffix(".partial"), lr)
            write(path, result | {"settings": settings, "complete": True})
            path.with_suffix(".partial").unlink(missing_ok=True)
            print(f"{name}: wrote {path.name}", flush=True)


if __name__ == "__main__":
    main()
