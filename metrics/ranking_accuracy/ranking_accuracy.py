"""Ranking accuracy (Chen et al. 2024) for `evaluate.load("path/to/metrics/ranking_accuracy")`.

The class lives in the hf_ches package, so this script and `from hf_ches.metric import RankingAccuracy` are one and
the same metric. It needs no torch: `pip install --no-deps` of hf-ches next to evaluate is enough (see README.md).
"""

from hf_ches.metric import RankingAccuracy

__all__ = ["RankingAccuracy"]
