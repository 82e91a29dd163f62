"""hf-ches: find the preference pairs that will hurt DPO (CHES), measure ranking accuracy, publish cleaned data.

>>> from hf_ches import CHESScorer, LogProbScorer
"""

__version__ = "0.1.0"

from hf_ches.transform import CHESScorer, LogProbScorer, ScorerConfig

__all__ = ["CHESScorer", "LogProbScorer", "ScorerConfig", "__version__"]
