"""The main job on built-in defaults (`hf-ches demo`), and the paper's prediction on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_ches.demo import main
from hf_ches.filtering import SELECTION_EVIDENCE


def test_demo_end_to_end_with_a_tiny_model(tiny_model, tmp_path, capsys):
    """The whole demo (score → select → card → publish over loopback → load back → metric) on the shipped data."""
    assert main(["--model_name_or_path", tiny_model, "--dtype", "float32", "--output_dir", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    printed = capsys.readouterr().out
    for config, r in report["formats"].items():
        assert r["kept"] + r["removed"] == r["pairs"] and r["removed"] == 0  # the default flags, removes none
        assert 0 <= r["flagged"] <= r["kept"]
        assert (tmp_path / "d" / config / "README.md").is_file()
        assert (tmp_path / "d" / config / "ches" / "score_histogram.png").stat().st_size > 1000
        assert 0.0 <= r["ranking_accuracy"] <= 1.0
        assert f"[{config}] {r['pairs']} pairs: kept {r['kept']}" in printed
    assert sum(r["pairs"] for r in report["formats"].values()) >= 200
    assert "publish to the real Hub: HF_TOKEN=hf_... hf-ches publish" in printed
    selection = " ".join(printed.split("selection: ", 1)[1].split("\n[")[0].split())  # the wrapped lines, joined
    assert selection == f"flag the pairs with entk_w > 0 (remove none); score entk_w, why: {SELECTION_EVIDENCE}"
    assert "docs/selection.md in the hf-ches repository" in selection


@pytest.mark.slow
def test_real_model_scores_near_duplicates_higher():
    """Razin et al.: the more alike chosen and rejected look to the model, the higher their CHES. On the shipped data
    with the real SmolLM2-135M-Instruct, near-duplicate pairs must have a higher mean ln_ches than the others."""
    from hf_ches import CHESScorer
    from hf_ches.shipped import load_shipped_pairs

    ds = load_shipped_pairs("standard")
    near = [i for i, flag in enumerate(ds["near_duplicate"]) if flag][:24]
    other = [i for i, flag in enumerate(ds["near_duplicate"]) if not flag][:24]
    scored = CHESScorer("smollm2").map(ds.select(near + other), batch_size=64)
    ln = np.asarray(scored["ln_ches"])
    assert ln[: len(near)].mean() > ln[len(near):].mean()
