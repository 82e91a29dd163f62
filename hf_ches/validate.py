"""``hf-ches validate``: does a score predict likelihood displacement for *your* model and data?

The recipe: draw a seeded sample of pairs, score them, then for each pair on its own take one DPO step with the
model itself as the reference (so the margin starts at 0) and measure ``Δ log π(y+) = log π_after(y+) −
log π_before(y+)`` (and the same for ``y−``); the weights are restored exactly after every pair. A score is worth
filtering by when it ranks the pairs as ``−Δ`` does (Spearman's ρ, with a bootstrap interval). The math (the loss,
the step, ρ and its interval) is in :mod:`hf_ches.displacement`; this module loads, loops and writes.

    hf-ches validate --dataset_name pairs.jsonl --model_name_or_path smollm2 --num_samples 100 \\
        --learning_rate 1e-5 --parameters all --output_dir validation/

``--output_dir`` gets ``pairs.parquet`` (``row_index``, every score column, ``chosen_logps`` and ``rejected_logps``
before the step, ``delta_chosen_logps``, ``delta_rejected_logps``), ``validation.json`` (options, model, counts,
the share of displaced pairs, ρ of each score with ``−Δ`` and its interval) and ``scatter.png`` (each score
against ``Δ log π(y+)``).

>>> import tempfile
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> from datasets import Dataset
>>> folder = tempfile.mkdtemp()
>>> _ = Dataset.from_dict(synthetic_pairs(6)).to_json(f"{folder}/pairs.jsonl")
>>> result = run(ValidateArguments(dataset_name=f"{folder}/pairs.jsonl", model_name_or_path=build_tiny_model(folder),
...                                num_samples=4, learning_rate=1e-2, output_dir=f"{folder}/out", progress=False))
>>> result["counts"], sorted(result["spearman"])[:3]
({'num_rows': 6, 'num_samples': 4, 'num_scored': 4}, ['ches', 'edit_distance', 'entk_w'])
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_ches.displacement import OPTIMIZERS, apply_step, dpo_sigmoid_loss, spearman, spearman_interval
from hf_ches.kernels import _parse_parameters, _tracking_only, ntk_pair, select_parameters, sequence_logp
from hf_ches.kernels import signgd_displacement as signgd_score
from hf_ches.pairs import TokenizedPair
from hf_ches.pipeline import load_source, shared_field

# --scores: the CHESScorer scores, and the gradient kernels of the step's own parameters (free: the step computes
# both gradients anyway). Each adds these columns; all are oriented so that high predicts displacement, except
# edit_distance (the paper's baseline: high means the completions differ).
SCORE_COLUMNS = {
    "ches": ("ches",), "ln_ches": ("ln_ches",), "edit_distance": ("edit_distance",),
    "last_hidden_ip": ("last_hidden_ip",), "entk_w": ("entk_w", "ln_entk_w"),
    "ntk": ("ntk_displacement", "ntk_cosine"), "signgd": ("signgd_displacement",),
}
KERNEL_SCORES = ("ntk", "signgd")
DEFAULT_SCORES = ("ches", "ln_ches", "edit_distance", "last_hidden_ip", "entk_w", "ntk", "signgd")
PAIRS_FILE, RESULTS_FILE, PLOT_FILE = "pairs.parquet", "validation.json", "scatter.png"


@dataclass(frozen=True)
class ValidateArguments:
    """Options of ``hf-ches validate`` (TRL's names where TRL has one)."""

    dataset_name: str = field(metadata={"help": "Hub dataset id, local folder, or data files (*.jsonl, *.json, "
                                                "*.parquet, *.csv) of preference pairs (TRL's formats)."})
    output_dir: str = field(metadata={"help": "Where pairs.parquet, validation.json and scatter.png go."})
    model_name_or_path: str = field(default="smollm2", metadata={
        "help": "The model to step: Hub id, local folder, .gguf file or 'smollm2'."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    dataset_config: str | None = shared_field("dataset_config")
    dataset_revision: str | None = shared_field("dataset_revision")
    dataset_split: str = field(default="train", metadata={"help": "The split to sample from."})
    num_samples: int | None = field(default=100, metadata={
        "help": "Pairs to draw (numpy default_rng(seed).choice, no replacement); all when not given."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample and of the bootstrap."})
    beta: float = field(default=0.1, metadata={"help": "DPO β of the sigmoid loss."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Step size η of the one step."})
    optimizer: str = field(default="sgd", metadata={
        "help": "'sgd': θ -= η ∇ℓ; 'sign': θ -= η sign(∇ℓ) (Adam's first steps).", "choices": list(OPTIMIZERS)})
    parameters: str = field(default="all", metadata={
        "help": "The parameters the step trains: all, output, last:K, lora, trainable or re:<regex>."})
    scores: list[str] = field(default_factory=lambda: list(DEFAULT_SCORES), metadata={
        "help": f"Scores to test, any of {list(SCORE_COLUMNS)}; ntk and signgd are the gradient kernels of "
                "--parameters, computed from the step's own gradients."})
    dtype: str = field(default="float32", metadata={
        "help": "Model dtype. A bfloat16 step of a small η rounds back to the same weights: keep float32.",
        "choices": ["float32", "float64", "bfloat16"]})
    device: str | None = field(default=None, metadata={"help": "Device; when not given: cuda if available, else cpu."})
    max_length: int | None = shared_field("max_length")
    on_invalid: str = field(default="raise", metadata={
        "help": "Rows that cannot be scored (no completion token left): 'raise', or 'flag' (such rows get NaN "
                "deltas and are left out of the correlations).", "choices": ["raise", "flag"]})
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples behind each interval."})
    confidence_level: float = field(default=0.95, metadata={"help": "Coverage of the bootstrap intervals."})
    token: str | None = shared_field("token")
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        bad = [s for s in self.scores if s not in SCORE_COLUMNS]
        if bad or not self.scores:
            raise ValueError(f"--scores: expected a non-empty subset of {list(SCORE_COLUMNS)}, got {self.scores}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        _parse_parameters(self.parameters)
        for name in ("beta", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name}: expected a number > 0, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num_samples: expected an integer >= 1, got {self.num_samples}")


def score_columns(scores: list[str] | tuple[str, ...]) -> list[str]:
    """The columns that ``scores`` add, in order.

    >>> score_columns(["ln_ches", "entk_w", "signgd"])
    ['ln_ches', 'entk_w', 'ln_entk_w', 'signgd_displacement']
    """
    return [column for s in scores for column in SCORE_COLUMNS[s]]


def dpo_step(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    pair: TokenizedPair,
    *,
    beta: float,
    learning_rate: float,
    optimizer: str,
) -> dict[str, float]:
    """One DPO step on one pair, the model itself as the reference; measure, then restore ``params`` bit for bit.

    The loss is :func:`~hf_ches.displacement.dpo_sigmoid_loss` of the pair's summed completion log-probs (TRL's
    tokens, the model's own logits: :func:`~hf_ches.kernels.sequence_logp`); its gradient w.r.t. ``params`` is
    ``ℓ′₊ g+ + ℓ′₋ g−`` with ``g± = ∇ log π(y±)``, taken separately so the gradient kernels of the same parameters
    come for free. Returns ``chosen_logps``, ``rejected_logps`` (before), ``delta_chosen_logps``,
    ``delta_rejected_logps``, ``ntk_displacement``, ``ntk_cosine`` and ``signgd_displacement``.
    """
    prompt = pair.prompt_ids
    chosen, rejected = prompt + pair.chosen_ids, prompt + pair.rejected_ids
    with torch.enable_grad(), _tracking_only(model, params):
        lp_c = sequence_logp(model, chosen, len(prompt))  # scalar, with its graph
        lp_r = sequence_logp(model, rejected, len(prompt))
        loss = dpo_sigmoid_loss(lp_c - lp_c.detach(), lp_r - lp_r.detach(), beta)  # the reference is the policy
        dl_c, dl_r = torch.autograd.grad(loss, [lp_c, lp_r], retain_graph=True)  # ℓ′ per side: −β/2, +β/2 at 0
        g_c = torch.autograd.grad(lp_c, params)
        g_r = torch.autograd.grad(lp_r, params)
    grads = [dl_c * a + dl_r * b for a, b in zip(g_c, g_r)]  # ∇ℓ, per tensor
    pp, pm, mm = ntk_pair(g_c, g_r)
    row = {"ntk_displacement": pm - pp, "ntk_cosine": pm / math.sqrt(pp * mm) if pp * mm > 0 else math.nan,
           "signgd_displacement": signgd_score(g_c, g_r)}
    del g_c, g_r
    saved = [p.detach().clone() for p in params]
    try:
        apply_step(params, grads, learning_rate, optimizer)
        del grads
        with torch.no_grad():
            after_c = sequence_logp(model, chosen, len(prompt)).item()
            after_r = sequence_logp(model, rejected, len(prompt)).item()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    before_c, before_r = lp_c.item(), lp_r.item()
    return row | {"chosen_logps": before_c, "rejected_logps": before_r,
                  "delta_chosen_logps": after_c - before_c, "delta_rejected_logps": after_r - before_r}


def summarize(columns: dict[str, np.ndarray], scores: list[str], options: ValidateArguments) -> dict[str, Any]:
    """Counts, the share of displaced pairs and ρ(score, −Δ log π(y+)) with its bootstrap interval: pure.

    >>> cols = {"delta_chosen_logps": np.array([-0.3, 0.1, -0.2, 0.4]), "ches": np.array([3.0, 1.0, 2.0, 0.0])}
    >>> out = summarize(cols, ["ches"], ValidateArguments("d", "o", n_resamples=50))
    >>> out["share_displaced"], out["spearman"]["ches"]["rho"]
    (0.5, 1.0)
    """
    delta = np.asarray(columns["delta_chosen_logps"], dtype=np.float64)
    ok = ~np.isnan(delta)
    out: dict[str, Any] = {
        "share_displaced": float(np.mean(delta[ok] < 0)),
        "mean_delta_chosen_logps": float(delta[ok].mean()),
        "median_abs_delta_chosen_logps": float(np.median(np.abs(delta[ok]))),
    }
    if "delta_rejected_logps" in columns:
        rejected = np.asarray(columns["delta_rejected_logps"], dtype=np.float64)[ok]
        out["share_rejected_rose"] = float(np.mean(rejected > 0))
        out["mean_delta_rejected_logps"] = float(rejected.mean())
    out["spearman"] = {}
    for column in score_columns(scores):
        values = np.asarray(columns[column], dtype=np.float64)
        keep = ok & ~np.isnan(values)
        out["spearman"][column] = {
            "rho": spearman(values[keep], -delta[keep]),
            "ci": spearman_interval(values[keep], -delta[keep], options.n_resamples, options.confidence_level,
                                    options.seed),
            "num_pairs": int(keep.sum()),
        }
    return out


def scatter_png(columns: dict[str, np.ndarray], results: dict[str, Any], path: str | Path) -> Path:
    """Each score (x, symmetric-log scale) against ``Δ log π(y+)`` (y), one panel per score, ρ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["spearman"])
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.9 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    delta = np.asarray(columns["delta_chosen_logps"], dtype=np.float64)
    for ax, name in zip(axes, names):
        x = np.asarray(columns[name], dtype=np.float64)
        ax.scatter(x, delta, s=8, alpha=0.6, color="#4c78a8")
        ax.axhline(0, color="#999999", linewidth=0.8)
        scale = np.nanmedian(np.abs(x))
        if scale > 0 and np.nanmax(np.abs(x)) > 100 * scale:
            ax.set_xscale("symlog", linthresh=float(scale))
        stat = results["spearman"][name]
        ax.set_title(f"{name}: ρ = {stat['rho']:.2f} [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}]", fontsize=9)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("Δ log π(chosen)", fontsize=8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def run(args: ValidateArguments) -> dict[str, Any]:
    """Sample, score, step each pair, and write ``pairs.parquet``, ``validation.json`` and ``scatter.png``."""
    from datasets import Dataset, disable_progress_bars, enable_progress_bars
    from tqdm.auto import tqdm

    from hf_ches import __version__
    from hf_ches.models import load_model_and_tokenizer, model_fingerprint
    from hf_ches.pairs import read_rows, tokenize_pairs
    from hf_ches.report import ROW_INDEX, subsample
    from hf_ches.transform import CHESScorer

    start = time.perf_counter()
    source = types.SimpleNamespace(dataset_name=args.dataset_name, dataset_config=args.dataset_config,
                                   dataset_revision=args.dataset_revision, dataset_splits=[args.dataset_split],
                                   token=args.token)
    rows = load_source(source)[args.dataset_split]
    sample = subsample(rows, args.num_samples, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, revision=args.model_revision,
                                                dtype=args.dtype, device=device)
    params = [p for _, p in select_parameters(model, args.parameters)]

    columns: dict[str, Any] = {ROW_INDEX: np.asarray(sample[ROW_INDEX])}
    forward_scores = tuple(s for s in args.scores if s not in KERNEL_SCORES)
    (enable_progress_bars if args.progress else disable_progress_bars)()
    if forward_scores:
        scorer = CHESScorer(model, tokenizer, scores=forward_scores, max_length=args.max_length,
                            on_invalid=args.on_invalid)
        scored = scorer.map(sample.select_columns([c for c in ("prompt", "chosen", "rejected")
                                                  if c in sample.column_names]))
        columns |= {c: np.asarray(scored[c], dtype=np.float64) for c in score_columns(forward_scores)}

    batch = sample.remove_columns(ROW_INDEX).to_dict()
    pairs = tokenize_pairs(read_rows(batch, list(columns[ROW_INDEX])), tokenizer, args.max_length, args.on_invalid)
    stepped = []
    for pair in tqdm(pairs, desc="One DPO step per pair", disable=not args.progress):
        if not pair.scorable:
            stepped.append({})
            continue
        stepped.append(dpo_step(model, params, pair, beta=args.beta, learning_rate=args.learning_rate,
                                optimizer=args.optimizer))
    measured = ["chosen_logps", "rejected_logps", "delta_chosen_logps", "delta_rejected_logps"]
    kernel_columns = score_columns([s for s in args.scores if s in KERNEL_SCORES])
    for name in kernel_columns + measured:
        columns[name] = np.array([row.get(name, math.nan) for row in stepped], dtype=np.float64)

    results = {
        "options": asdict(args),
        "model": {"name_or_path": args.model_name_or_path, "revision": args.model_revision, "dtype": args.dtype,
                  "device": device, "fingerprint": model_fingerprint(args.model_name_or_path, args.model_revision),
                  "num_step_parameters": sum(p.numel() for p in params)},
        "counts": {"num_rows": len(rows), "num_samples": len(sample),
                   "num_scored": int(np.sum(~np.isnan(columns["delta_chosen_logps"])))},
        **summarize(columns, list(args.scores), args),
        "hf_ches_version": __version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [ROW_INDEX, *score_columns([s for s in args.scores if s not in KERNEL_SCORES]), *kernel_columns,
             *measured]
    Dataset.from_dict({name: columns[name] for name in order}).to_parquet(str(out / PAIRS_FILE))
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    scatter_png(columns, results, out / PLOT_FILE)
    return results


def render_table(results: dict[str, Any]) -> str:
    """A Markdown table of ρ(score, −Δ log π(y+)) with intervals, and the share displaced.

    >>> print(render_table({"share_displaced": 0.25, "counts": {"num_scored": 4},
    ...                     "spearman": {"ches": {"rho": 0.5, "ci": [0.1, 0.8]}}}))
    | score | Spearman ρ with −Δ log π(chosen) | 95% interval |
    |---|---|---|
    | `ches` | 0.50 | [0.10, 0.80] |
    <BLANKLINE>
    4 pairs; 25% displaced (Δ log π(chosen) < 0).
    """
    lines = ["| score | Spearman ρ with −Δ log π(chosen) | 95% interval |", "|---|---|---|"]
    for name, stat in results["spearman"].items():
        lines.append(f"| `{name}` | {stat['rho']:.2f} | [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}] |")
    lines += ["", f"{results['counts']['num_scored']} pairs; {results['share_displaced']:.0%} displaced "
                  "(Δ log π(chosen) < 0)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "hf-ches validate") -> dict[str, Any]:
    """Parse ``argv`` into :class:`ValidateArguments`, run, print the table."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ValidateArguments, prog=prog, description=__doc__.split("\n\n")[1])
    try:
        (args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    results = run(args)
    print(render_table(results))
    print(f"\nWrote {args.output_dir}/{PAIRS_FILE}, {RESULTS_FILE}, {PLOT_FILE} ({results['seconds']} s)")
    return results
