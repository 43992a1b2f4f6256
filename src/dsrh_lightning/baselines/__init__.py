"""Classical (unsupervised) hashing baselines on fixed feature vectors: fit on training features,
encode any features to uint8 {0,1} codes. Evaluated by :func:`dsrh_lightning.metrics.retrieval_metrics`
like the deep models."""

from .classical import ITQ, LSH, PCAH, SpectralHashing, build_baseline

BASELINES = ("lsh", "pcah", "itq", "sh")

__all__ = ["BASELINES", "ITQ", "LSH", "PCAH", "SpectralHashing", "build_baseline"]
