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

It runs in one process: the sample is small (100 pairs by default) and each pair's step needs the whole model, so
neither chunks nor ranks would pay. Under a launcher (``torchrun``) rank 0 runs it and the other ranks return at
once (`hf_ches.runner.is_main_process`), so that one process writes ``--output_dir``.

>>> import tempfile
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> from datasets import Dataset
>>> folder = tempfile.mkdtemp()
>>> _ = Dataset.from_dict(synthetic_pairs(6)).to_json(f"{folder}/pairs.jsonl")
>>> result = run(DataArguments(f"{folder}/pairs.jsonl"), ScoringArguments(build_tiny_model(folder), dtype="float32"),
...              SamplingArguments(num_samples=4), ValidateArguments(learning_rate=1e-2, progress=False),
...              OutputArguments(f"{folder}/out"))
>>> result["counts"], list(result["spearman"])[:3], result["best"]["by"]
({'num_rows': 6, 'num_samples': 4, 'num_scored': 4}, ['ches', 'ln_ches', '-edit_distance'], 'partial_rho')
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from hf_ches.displacement import (
    OPTIMIZERS, TOP_FRACTION, apply_step, best_line, bootstrap_interval, dpo_sigmoid_loss, partial_spearman,
    render_table, spearman, top_share,
)
from hf_ches.kernels import _parse_parameters, _tracking_only, ntk_pair, select_parameters, sequence_logp
from hf_ches.kernels import signgd_displacement as signgd_score
from hf_ches.pairs import TokenizedPair
from hf_ches.models import DEFAULT_MODEL
from hf_ches.recipes import (
    DataArguments,
    OutputArguments,
    Recipe,
    SamplingArguments,
    ScoringArguments,
    UsageError,
    check_arguments,
    run_recipe,
)
from hf_ches.sources import ROW_INDEX, check_hub_ids, load_source, model_provenance, source_name, subsample

logger = logging.getLogger(__name__)

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
COMMAND = "hf-ches validate"
PAIRS_FILE, RESULTS_FILE, PLOT_FILE = "pairs.parquet", "validation.json", "scatter.png"
MEASURED = ["chosen_logps", "rejected_logps", "delta_chosen_logps", "delta_rejected_logps"]  # by the step, per pair
LENGTHS = ["chosen_tokens", "rejected_tokens"]  # completion token counts (EOS included), per pair
# The candidates each score column gives, oriented so that high predicts displacement: the paper's edit-distance
# baseline is negated (alike completions score high), and two length baselines come from LENGTHS (a summed change
# grows with the token count, so a score must beat these to be worth more than a length filter).
NEGATED = {"edit_distance": "-edit_distance"}
LENGTH_BASELINES = ("-chosen_tokens", "rejected-chosen_tokens")
SIGN_RULES = ("entk_w", "ches")  # "score > 0": entk_w > 0 is the first-order prediction that log π(y+) falls


@dataclass(frozen=True)
class ValidateArguments:
    """The options of ``hf-ches validate`` that no other command has: the one DPO step and the correlations."""

    _argument_group_name = "validate arguments"

    beta: float = field(default=0.1, metadata={"help": "DPO beta of the sigmoid loss."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Step size (eta) of the one step."})
    optimizer: str = field(default="sgd", metadata={
        "help": "'sgd': theta -= eta * grad; 'sign': theta -= eta * sign(grad) (Adam's first steps).",
        "choices": list(OPTIMIZERS)})
    parameters: str = field(default="all", metadata={
        "help": "The parameters the step trains: all, output, last:K, lora, trainable or re:<regex>."})
    scores: list[str] = field(default_factory=lambda: list(DEFAULT_SCORES), metadata={
        "help": f"Scores to test, any of {list(SCORE_COLUMNS)}; ntk and signgd are the gradient kernels of "
                "--parameters, computed from the step's own gradients."})
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples behind each interval."})
    confidence_level: float = field(default=0.95, metadata={"help": "Coverage of the bootstrap intervals."})
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
        if self.n_resamples < 1 or not 0 < self.confidence_level < 1:
            raise ValueError(f"--n_resamples {self.n_resamples}, --confidence_level {self.confidence_level}: "
                             "expected an integer >= 1 and a level in (0, 1)")


def _one_split(groups: dict[type, Any]) -> None:
    """validate samples one split, and steps a model that is whole on one device."""
    splits = groups[DataArguments].dataset_splits
    if splits is not None and len(splits) != 1:
        raise ValueError(f"--dataset_splits: validate samples one split, got {splits}")
    if groups[ScoringArguments].device_map is not None:
        raise UsageError("--device_map: validate steps the whole model on one device (--device)")


VALIDATE = Recipe(
    "validate", (DataArguments, ScoringArguments, SamplingArguments, ValidateArguments, OutputArguments),
    required=("output_dir",), defaults={"model_name_or_path": DEFAULT_MODEL, "dtype": "float32", "num_samples": 100},
    helps={"num_samples": "Pairs drawn from the split without replacement by numpy default_rng(seed).choice; each "
                          "takes one DPO step of the whole model, so the default is a small sample.",
           "model_name_or_path": "Model to step and score with: Hub id, local folder, .gguf file or 'smollm2' (the "
                                 "real SmolLM2-135M-Instruct)."},
    check=_one_split, description="""\
Does a score predict likelihood displacement for your model and data? Draws a seeded sample of pairs, scores them,
then for each pair on its own takes one DPO step with the model itself as the reference (so the margin starts at
0) and measures the change of log pi(chosen) and log pi(rejected); the weights are restored exactly after every
pair. A score is worth filtering by when it ranks the pairs as the drop of log pi(chosen) does (Spearman's rho,
with a bootstrap interval).

--output_dir gets pairs.parquet (row_index, every score, the log-probs before the step and their deltas),
validation.json (options, model, counts, the share of displaced pairs, rho of each score and its interval) and
scatter.png (each score against the change of log pi(chosen)).""")


def score_columns(scores: list[str] | tuple[str, ...]) -> list[str]:
    """The columns that ``scores`` add, in order.

    >>> score_columns(["ln_ches", "entk_w", "signgd"])
    ['ln_ches', 'entk_w', 'ln_entk_w', 'signgd_displacement']
    """
    return [column for s in scores for column in SCORE_COLUMNS[s]]


def pair_gradients(
    model: torch.nn.Module, params: list[torch.nn.Parameter], pair: TokenizedPair, *, beta: float
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The gradient of one pair's DPO loss w.r.t. ``params``, the model itself as the reference, and what comes free.

    The loss is :func:`~hf_ches.displacement.dpo_sigmoid_loss` of the pair's summed completion log-probs (TRL's
    tokens, the model's own logits: :func:`~hf_ches.kernels.sequence_logp`); its gradient is ``ℓ′₊ g+ + ℓ′₋ g−``
    with ``g± = ∇ log π(y±)``, taken separately so the gradient kernels of the same parameters come for free.
    Returns ``({chosen_logps, rejected_logps, ntk_displacement, ntk_cosine, signgd_displacement}, grads)``.
    """
    prompt = pair.prompt_ids
    with torch.enable_grad(), _tracking_only(model, params):
        lp_c = sequence_logp(model, prompt + pair.chosen_ids, len(prompt))  # scalar, with its graph
        lp_r = sequence_logp(model, prompt + pair.rejected_ids, len(prompt))
        loss = dpo_sigmoid_loss(lp_c - lp_c.detach(), lp_r - lp_r.detach(), beta)  # the reference is the policy
        dl_c, dl_r = torch.autograd.grad(loss, [lp_c, lp_r], retain_graph=True)  # ℓ′ per side: −β/2, +β/2 at 0
        g_c = torch.autograd.grad(lp_c, params)
        g_r = torch.autograd.grad(lp_r, params)
    grads = [dl_c * a + dl_r * b for a, b in zip(g_c, g_r)]  # ∇ℓ, per tensor
    pp, pm, mm = ntk_pair(g_c, g_r)
    return {"chosen_logps": lp_c.item(), "rejected_logps": lp_r.item(), "ntk_displacement": pm - pp,
            "ntk_cosine": pm / math.sqrt(pp * mm) if pp * mm > 0 else math.nan,
            "signgd_displacement": signgd_score(g_c, g_r)}, grads


def measure_step(model: torch.nn.Module, params: list[torch.nn.Parameter], pair: TokenizedPair,
                 grads: list[torch.Tensor], before: dict[str, float], *, learning_rate: float, optimizer: str
                 ) -> dict[str, float]:
    """Step ``params`` along ``grads`` (`pair_gradients`), measure ``Δ log π(y±)`` against ``before``, and restore
    ``params`` bit for bit: ``{delta_chosen_logps, delta_rejected_logps}``."""
    prompt = pair.prompt_ids
    saved = [p.detach().clone() for p in params]
    try:
        apply_step(params, grads, learning_rate, optimizer)
        with torch.no_grad():
            after_c = sequence_logp(model, prompt + pair.chosen_ids, len(prompt)).item()
            after_r = sequence_logp(model, prompt + pair.rejected_ids, len(prompt)).item()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return {"delta_chosen_logps": after_c - before["chosen_logps"],
            "delta_rejected_logps": after_r - before["rejected_logps"]}


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

    `pair_gradients`, then `measure_step`: returns ``chosen_logps``, ``rejected_logps`` (before),
    ``delta_chosen_logps``, ``delta_rejected_logps``, ``ntk_displacement``, ``ntk_cosine`` and
    ``signgd_displacement``.
    """
    row, grads = pair_gradients(model, params, pair, beta=beta)
    return row | measure_step(model, params, pair, grads, row, learning_rate=learning_rate, optimizer=optimizer)


def candidates(columns: dict[str, np.ndarray], scores: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """The oriented candidate predictors of ``scores`` (`NEGATED`), and the `LENGTH_BASELINES` when ``columns`` has
    `LENGTHS`; each a float64 array, high predicting displacement.

    >>> cols = {"edit_distance": np.array([0.5]), "chosen_tokens": np.array([3]), "rejected_tokens": np.array([5])}
    >>> {k: v.tolist() for k, v in candidates(cols, ["edit_distance"]).items()}
    {'-edit_distance': [-0.5], '-chosen_tokens': [-3.0], 'rejected-chosen_tokens': [2.0]}
    """
    out = {}
    for column in score_columns(scores):
        values = np.asarray(columns[column], dtype=np.float64)
        out[NEGATED.get(column, column)] = -values if column in NEGATED else values
    if all(name in columns for name in LENGTHS):
        n_c, n_r = (np.asarray(columns[name], dtype=np.float64) for name in LENGTHS)
        out |= {"-chosen_tokens": -n_c, "rejected-chosen_tokens": n_r - n_c}
    return out


def summarize(columns: dict[str, np.ndarray], options: ValidateArguments, seed: int = 0) -> dict[str, Any]:
    """The share of displaced pairs and, for each candidate (`candidates`), ρ(score, −Δ log π(y+)), with `LENGTHS`
    also the partial ρ given both lengths, ρ with the per-token change −Δ / n+ and the share of the true top 10%
    (largest fall) that its top 10% recovers, each ρ with a bootstrap interval (``seed``); the sign rules
    (`SIGN_RULES`): how often ``score > 0`` and how often that agrees with "log π(y+) fell"; and the ``best``
    candidate by partial ρ (by ρ without lengths), length baselines excluded. Pure.

    >>> cols = {"delta_chosen_logps": np.array([-0.3, 0.1, -0.2, 0.4]), "ches": np.array([3.0, 1.0, 2.0, 0.0])}
    >>> out = summarize(cols, ValidateArguments(scores=["ches"], n_resamples=50))
    >>> out["share_displaced"], out["spearman"]["ches"]["rho"], out["sign_rules"]["ches > 0"]["agreement"]
    (0.5, 1.0, 0.75)
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
    lengths = [np.asarray(columns[name], dtype=np.float64) for name in LENGTHS] if LENGTHS[0] in columns else None
    interval = {"n_resamples": options.n_resamples, "confidence_level": options.confidence_level, "seed": seed}
    out["spearman"] = {}
    for name, values in candidates(columns, options.scores).items():
        keep = ok & ~np.isnan(values)
        x, y = values[keep], -delta[keep]
        stat = {"rho": spearman(x, y), "ci": bootstrap_interval(spearman, x, y, **interval),
                "num_pairs": int(keep.sum())}
        if lengths is not None:
            n_c, n_r = (length[keep] for length in lengths)
            partial = lambda a, b, c, r: partial_spearman(a, b, [c, r])  # noqa: E731
            stat |= {"partial_rho": partial(x, y, n_c, n_r), "partial_ci": bootstrap_interval(
                         partial, x, y, n_c, n_r, **interval),
                     "per_token_rho": spearman(x, y / n_c), "per_token_ci": bootstrap_interval(
                         spearman, x, y / n_c, **interval),
                     "top_share": top_share(x, y, TOP_FRACTION)}
        out["spearman"][name] = stat
    out["sign_rules"] = {}
    for column in SIGN_RULES:
        if column in columns:
            values = np.asarray(columns[column], dtype=np.float64)
            keep = ok & ~np.isnan(values)
            flagged, fell = values[keep] > 0, delta[keep] < 0
            out["sign_rules"][f"{column} > 0"] = {"share_flagged": float(flagged.mean()),
                                                  "agreement": float(np.mean(flagged == fell)),
                                                  "num_pairs": int(keep.sum())}
    key = "partial_rho" if lengths is not None else "rho"
    ranked = [(stat[key], name) for name, stat in out["spearman"].items()
              if name not in LENGTH_BASELINES and not math.isnan(stat[key])]
    out["best"] = None if not ranked else {"score": max(ranked)[1], "by": key}
    return out


def scatter_png(columns: dict[str, np.ndarray], results: dict[str, Any]) -> bytes:
    """Each score (x, symmetric-log scale) against ``Δ log π(y+)`` (y), one panel per score, ρ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = candidates(columns, results["options"]["scores"])
    names = list(results["spearman"])
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.9 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    delta = np.asarray(columns["delta_chosen_logps"], dtype=np.float64)
    for ax, name in zip(axes, names):
        x = values[name]
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def run(data: DataArguments, scoring: ScoringArguments | None = None, sampling: SamplingArguments | None = None,
        options: ValidateArguments | None = None, output: OutputArguments | None = None) -> dict[str, Any] | None:
    """Sample, score, step each pair, and write ``pairs.parquet``, ``validation.json`` and ``scatter.png``; a group
    that is not given has `VALIDATE`'s defaults (smollm2 in float32, 100 pairs). Under a launcher, rank 0 runs and
    the other ranks return None."""
    from datasets import Dataset

    from hf_ches import __version__
    from hf_ches import outputs
    from hf_ches.transform import CHESScorer
    from hf_ches.runner import ranks

    start = time.perf_counter()
    groups = check_arguments(VALIDATE, [g for g in (data, scoring, sampling, options, output) if g is not None])
    rank, world_size = ranks()
    if rank != 0:
        return None
    if world_size > 1:
        logger.info("validate runs in one process: rank 0 steps every pair, the other %d ranks have nothing to do",
                    world_size - 1)
    scoring, sampling = groups[ScoringArguments], groups[SamplingArguments]
    options, output = groups[ValidateArguments], groups[OutputArguments]
    outputs.check(output.output_dir, COMMAND, overwrite=output.overwrite)
    (split,) = data.dataset_splits or ["train"]
    check_hub_ids(data, [(scoring.model_name_or_path, scoring.model_revision)])
    rows = load_source(replace(data, dataset_splits=[split]))[split]
    sample = subsample(rows, sampling.num_samples, sampling.seed)
    scorer = CHESScorer(scoring.model_name_or_path, **scoring.scorer_options())  # loaded as every command loads it
    model, tokenizer = scorer.load().model, scorer.load().tokenizer
    params = [p for _, p in select_parameters(model, options.parameters)]
    columns = forward_columns(sample, scoring, options, data.pair_columns())
    columns |= step_columns(sample, model, tokenizer, params, scoring, options, data.pair_columns())
    results = {
        "options": {k: v for g in groups.values() for k, v in asdict(g).items()
                    if k not in ("token", "dataset_splits")} | {"dataset_split": split},
        "model": model_provenance(scorer) | {"num_step_parameters": sum(p.numel() for p in params)},
        "counts": {"num_rows": len(rows), "num_samples": len(sample),
                   "num_scored": int(np.sum(~np.isnan(columns["delta_chosen_logps"])))},
        **summarize(columns, options, sampling.seed),
        "hf_ches_version": __version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    order = [ROW_INDEX, *score_columns([s for s in options.scores if s not in KERNEL_SCORES]),
             *score_columns([s for s in options.scores if s in KERNEL_SCORES]), *LENGTHS, *MEASURED]
    outputs.write(output.output_dir, COMMAND, source_name(data), {
        PAIRS_FILE: Dataset.from_dict({name: columns[name] for name in order}),
        RESULTS_FILE: (json.dumps(results, indent=2, allow_nan=True) + "\n").encode("utf-8"),
        PLOT_FILE: scatter_png(columns, results)}, overwrite=output.overwrite)
    return results


def forward_columns(sample: Any, scoring: ScoringArguments, options: ValidateArguments, columns: dict[str, str]
                    ) -> dict[str, np.ndarray]:
    """``row_index`` and the columns of the scores that `CHESScorer` computes (the forward-pass scores), the pairs
    read from ``columns`` (`DataArguments.pair_columns`)."""
    from hf_ches.runner import counted_pass, progress_bars_off
    from hf_ches.transform import CHESScorer

    out: dict[str, np.ndarray] = {ROW_INDEX: np.asarray(sample[ROW_INDEX])}
    forward_scores = tuple(s for s in options.scores if s not in KERNEL_SCORES)
    if forward_scores:
        scorer = CHESScorer(scoring.model_name_or_path, scores=forward_scores, **scoring.scorer_options(),
                            **columns)  # the model `run` loaded, from the process's loaded models
        pairs = sample.select_columns(scorer.pair_columns.used(sample.column_names))
        with counted_pass(len(sample), "Scoring") if options.progress else progress_bars_off():
            scored = scorer.map(pairs, **scoring.map_options("Scoring"))
        out |= {c: np.asarray(scored[c], dtype=np.float64) for c in score_columns(forward_scores)}
    return out


def step_columns(sample: Any, model: torch.nn.Module, tokenizer: Any, params: list[torch.nn.Parameter],
                 scoring: ScoringArguments, options: ValidateArguments, columns: dict[str, str]
                 ) -> dict[str, np.ndarray]:
    """One `dpo_step` per pair of ``sample``: the kernel scores, `LENGTHS` and `MEASURED` (NaN for an unscorable
    pair)."""
    from hf_ches.pairs import Columns, read_rows, tokenize_pairs
    from hf_ches.runner import progress_bar

    batch = sample.remove_columns(ROW_INDEX).to_dict()
    rows = read_rows(batch, list(sample[ROW_INDEX]), columns=Columns.named(columns))
    pairs = tokenize_pairs(rows, tokenizer, scoring.max_length, scoring.on_invalid, scoring.boundary)
    stepped = []
    for pair in progress_bar(len(pairs), "One DPO step per pair", pairs, shown=options.progress, unit=" pairs"):
        if not pair.scorable:
            stepped.append({})
            continue
        stepped.append({"chosen_tokens": len(pair.chosen_ids), "rejected_tokens": len(pair.rejected_ids)}
                       | dpo_step(model, params, pair, beta=options.beta, learning_rate=options.learning_rate,
                                  optimizer=options.optimizer))
    names = score_columns([s for s in options.scores if s in KERNEL_SCORES]) + LENGTHS + MEASURED
    return {name: np.array([row.get(name, math.nan) for row in stepped], dtype=np.float64) for name in names}


def main(argv: list[str] | None = None, prog: str = COMMAND) -> dict[str, Any] | None:
    """Parse ``argv`` into the groups of `VALIDATE`, run, print the table."""
    results = run_recipe(VALIDATE, run, argv, prog)
    if results is None:  # a rank other than 0 under a launcher
        return None
    output_dir = results["options"]["output_dir"]
    print(render_table(results))
    print(f"\nWrote {output_dir}/{PAIRS_FILE}, {RESULTS_FILE}, {PLOT_FILE} ({results['seconds']} s)")
    print(best_line(results))
    return results
