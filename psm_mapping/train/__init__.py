"""Training data, evaluation metrics and (later) the Lightning module."""
from __future__ import annotations

from .metrics import RetrievalMetrics, retrieval_metrics

__all__ = ["RetrievalMetrics", "retrieval_metrics"]
