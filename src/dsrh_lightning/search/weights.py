"""A short fingerprint of a model's weights (stored in codes files; search warns on a mismatch)."""

from __future__ import annotations

import hashlib

__all__ = ["weights_hash"]


def weights_hash(state_dict) -> str:
    """A short (16 hex digit) SHA-256 of a state dict: names, dtypes, shapes and values."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
