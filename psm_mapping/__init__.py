"""psm-mapping: soundscape maps from satellite imagery with PSM (ACM MM 2024).

Public API::

    from psm_mapping import PSM, Metadata, ProbEmbedding, csd
    from psm_mapping import open_session            # a store opened for answering (session.py)

The model names are imported on first use, so ``import psm_mapping`` (and the CLI's start)
does not import torch.
"""
from __future__ import annotations

from .errors import (AudioError, CheckpointError, ImageryError, InputError, OutputError, PSMError,
                     RegionError, StoreError, TokenizerError)

__version__ = "0.1.0"

__all__ = [
    "PSM", "PSMConfig", "Metadata", "ProbEmbedding", "csd", "cosine", "retrieval_metrics",
    "PSMError", "InputError", "CheckpointError", "TokenizerError", "AudioError", "ImageryError",
    "RegionError", "StoreError", "OutputError", "MapConfig", "map_region", "open_session", "query_store",
    "__version__",
]

#: lazily imported public names -> their module
_LAZY = {"PSM": "model", "PSMConfig": "model", "Metadata": "model", "ProbEmbedding": "model", "csd": "model",
         "cosine": "model", "retrieval_metrics": "train.metrics", "RetrievalMetrics": "train.metrics",
         "MapConfig": "config", "map_region": "run", "open_session": "session", "Session": "session",
         "query_store": "query"}


def __getattr__(name):  # lazy: keep `import psm_mapping` light
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'psm_mapping' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
