"""dsrh-lightning: deep supervised hashing for image retrieval on PyTorch Lightning."""

__version__ = "0.1.0"
