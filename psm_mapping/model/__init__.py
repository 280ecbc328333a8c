"""The PSM model in plain torch: SatMAE ViT, metadata fusion, CLAP encoders, Gaussian heads."""
from .heads import ProbEmbedding, Projector, cosine, csd, l2norm
from .metadata import Metadata
from .psm import PSM, PSMConfig

__all__ = ["PSM", "PSMConfig", "Metadata", "ProbEmbedding", "Projector", "csd", "cosine", "l2norm"]
