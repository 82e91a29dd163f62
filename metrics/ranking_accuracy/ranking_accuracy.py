"""Ranking accuracy (Chen et al. 2024) for `evaluate.load("path/to/metrics/ranking_accuracy")`.

The class lives in the hf_ches package (`pip install hf-ches`), so this script and
`from hf_ches.metric import RankingAccuracy` are one and the same metric.
"""

from hf_ches.metric import RankingAccuracy

__all__ = ["RankingAccuracy"]
