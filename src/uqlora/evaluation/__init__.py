"""Evaluation: calibration metrics (metrics), reliability diagrams (reliability), run comparison tables (compare).

Only the metrics are re-exported here, so importing them does not pull in matplotlib.
"""

from uqlora.evaluation.metrics import (
    classification_metrics,
    mutual_information,
    predictive_entropy,
    reliability_bins,
)

__all__ = ["classification_metrics", "mutual_information", "predictive_entropy", "reliability_bins"]
