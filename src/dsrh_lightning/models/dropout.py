"""Dropout whose CPU mask costs half of ``nn.Dropout``'s and is bit-identical to it."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU training path that gives the same output and gradient.

    torch's CPU ``bernoulli_(q)`` draws, element by element in memory order, one 53-bit uniform
    ``u`` from the default generator and keeps the element when ``u < q``; ``torch.rand`` in float64
    draws the same uniforms from the same generator, in a kernel about twice as fast (1.7 vs 3.6 ms for
    a 192 x 1440 mask on 2 cores). So for a contiguous CPU input in training mode the mask is
    ``torch.rand(shape, float64) < 1 - p``, scaled by ``1 / (1 - p)`` in the input's dtype and
    multiplied in, exactly as ``torch.dropout`` does; every other case is ``nn.Dropout`` itself.
    ``tests/test_dropout.py`` checks the equality, so a torch that changes either kernel fails it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.device.type != "cpu" \
                or not x.is_contiguous():
            return super().forward(x)
        keep = 1.0 - self.p
        noise = (torch.rand(x.shape, dtype=torch.float64, device=x.device) < keep).to(x.dtype).div_(keep)
        return x * noise
