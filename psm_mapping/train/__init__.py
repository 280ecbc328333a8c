"""Training data, evaluation metrics and (later) the Lightning module."""
from __future__ import annotations

from .metrics import RetrievalMetrics, retrieval_metrics

__all__ = ["RetrievalMetrics", "retrieval_metrics"]

from .data import DataConfig, ShardDataset, drop_metadata  # noqa: E402
from .evaluate import EvaluationReport, evaluate  # noqa: E402
from .loss import InfoNCELoss, PCMEppLoss, build_criterion, total_loss  # noqa: E402

__all__ += ["DataConfig", "ShardDataset", "drop_metadata", "EvaluationReport", "evaluate", "InfoNCELoss",
            "PCMEppLoss", "build_criterion", "total_loss"]
