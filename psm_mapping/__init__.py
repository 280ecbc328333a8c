"""psm-mapping: soundscape maps from satellite imagery with PSM (ACM MM 2024).

Public API::

    from psm_mapping import PSM, Metadata, ProbEmbedding, csd
"""
from __future__ import annotations

from .errors import (AudioError, CheckpointError, ImageryError, InputError, OutputError, PSMError,
                     RegionError, StoreError, TokenizerError)
from .model import PSM, Metadata, ProbEmbedding, PSMConfig, cosine, csd

__version__ = "0.1.0"

__all__ = [
    "PSM", "PSMConfig", "Metadata", "ProbEmbedding", "csd", "cosine", "retrieval_metrics",
    "PSMError", "InputError", "CheckpointError", "TokenizerError", "AudioError", "ImageryError",
    "RegionError", "StoreError", "OutputError", "__version__",
]


def __getattr__(name):  # lazy: keep `import psm_mapping` light
    if name in ("retrieval_metrics", "RetrievalMetrics"):
        from .train import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'psm_mapping' has no attribute {name!r}")
