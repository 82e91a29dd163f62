"""hf-ches: find the preference pairs that will hurt DPO (CHES), measure ranking accuracy, publish cleaned data.

The public names are imported lazily, so ``import hf_ches`` (and the ``evaluate`` metric that builds on it) does
not pay for torch and transformers until a scorer is used.

>>> from hf_ches import CHESScorer, LogProbScorer
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CHESScorer": "hf_ches.transform",
    "LogProbScorer": "hf_ches.transform",
    "ScorerConfig": "hf_ches.transform",
    "GradientKernelScorer": "hf_ches.kernels",
    "SelectionRule": "hf_ches.filtering",
    "select_pairs": "hf_ches.filtering",
    "RankingAccuracy": "hf_ches.metric",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_ches' has no attribute {name!r}")
