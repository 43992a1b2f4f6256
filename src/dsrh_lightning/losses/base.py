"""The interface of a ranking method: an ``nn.Module`` built from keyword arguments that turns the
network's outputs (and, for triplet losses, mined triplets) into the ranking term.

A ranking method takes its own settings as keyword arguments with defaults, validated in its
``__init__`` (``TripletRanking(bits=48, margin=1.0)``), owns its buffers (CSQ's hash centres) and
schedules (HashNet's tanh scale), and declares what it consumes:

* ``consumes``: the network output it reads, ``"codes"`` (the relaxed sigmoid codes in (0, 1)) or
  ``"code_logits"`` (the hash layer's pre-activation);
* ``triplets``: ``None`` for losses on pairs or single images (they ignore any triplets), ``"any"`` for
  losses that take triplets from any miner (:mod:`.miners`), ``"multilevel"`` for losses that need
  weighted multilevel triplets.

It works in a plain PyTorch loop without Lightning or a config::

    loss_fn, miner = TripletRanking(bits=16, margin=1.0), AllTriplets()
    codes = net(images)                               # (b, 16) in (0, 1)
    loss_fn(codes, labels, miner(codes, labels)).loss.backward()

The run config reaches it only through :func:`.from_config.build_ranking_loss`.
:class:`~dsrh_lightning.lightning.module.HashingModule` adds the orthogonality, balance and
classification terms and logs every extra scalar a method returns as ``train/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .miners import Triplets

__all__ = ["RankingLoss", "RankingResult"]


@dataclass
class RankingResult:
    """What a ranking method hands back.

    Attributes:
        loss: scalar ranking term (float32).
        orth: code matrices ``(m, k)`` the orthogonality penalty averages over.
        codes: ``(b, k)`` all codes of the batch (balance penalty, bit-balance log).
        labels: labels aligned with ``codes`` (classification stream).
        extras: scalars to log as ``train/<name>`` (schedules, triplet counts).
    """

    loss: torch.Tensor
    orth: List[torch.Tensor]
    codes: torch.Tensor
    labels: torch.Tensor
    extras: Dict[str, Union[float, torch.Tensor]] = field(default_factory=dict)


class RankingLoss(nn.Module):
    """Base class of the ranking methods (see the module docstring). Subclasses implement
    :meth:`compute`; ``__init__`` takes the method's own keyword arguments."""

    #: the config name (set by the registry when the class is looked up).
    name: str = ""
    #: the network output it reads: "codes" or "code_logits".
    consumes: str = "codes"
    #: which triplets it consumes: None (none), "any" (from any miner) or "multilevel" (weighted).
    triplets: Optional[str] = None

    def forward(self, out: Union[torch.Tensor, Mapping[str, torch.Tensor]], labels: torch.Tensor,
                triplets: Optional[Triplets] = None, *, step: int = 0) -> RankingResult:
        """The ranking term of one batch.

        Args:
            out: the network's outputs (``codes``, ``code_logits``, ``logits``), or the tensor named by
                ``consumes`` alone; ``b`` rows.
            labels: ``(b,)`` class ids or ``(b, c)`` multi-hot labels of the rows.
            triplets: mined triplets (:mod:`.miners`), for losses with ``triplets`` set; None = the
                loss's default miner over the whole batch (every valid triplet).
            step: the global step (schedules).
        """
        if isinstance(out, torch.Tensor):
            out = {self.consumes: out}
        if self.consumes not in out:
            raise ValueError(f"{type(self).__name__} reads the network output {self.consumes!r}; "
                             f"got {sorted(out)}")
        x = out[self.consumes]
        if x.ndim != 2 or len(labels) != len(x):
            raise ValueError(f"{type(self).__name__}: expected (b, k) {self.consumes} and b labels, got "
                             f"{tuple(x.shape)} and {tuple(labels.shape)}")
        if self.triplets is not None and triplets is None:
            triplets = self.default_miner()(x, labels)
        return self.compute(out, labels, triplets, step)

    def default_miner(self):
        """The miner used when ``forward`` gets no triplets (every valid triplet of the batch)."""
        from .miners import AllTriplets, MultilevelTriplets

        return MultilevelTriplets() if self.triplets == "multilevel" else AllTriplets()

    def compute(self, out: Mapping[str, torch.Tensor], labels: torch.Tensor, triplets: Optional[Triplets],
                step: int) -> RankingResult:
        """The method's term; ``out``, ``labels`` and ``triplets`` as in :meth:`forward` (checked)."""
        raise NotImplementedError

    @staticmethod
    def relaxed_codes(out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``(b, k)`` codes in (0, 1) of ``out``: ``codes``, or ``sigmoid(code_logits)`` when only the
        pre-activation was given (a plain loop)."""
        codes = out.get("codes")
        return torch.sigmoid(out["code_logits"]) if codes is None else codes

    def result(self, loss: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, **extras) -> RankingResult:
        """A result whose orthogonality penalty runs over all codes of the batch as one matrix."""
        return RankingResult(loss, [codes], codes, labels, extras)


def check_choice(name: str, value, choices) -> None:
    """``ValueError`` naming the keyword argument when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(repr(c) for c in choices)}")


def check_non_negative(name: str, value) -> float:
    """``float(value)``, or ``ValueError`` naming the keyword argument when it is negative or not finite."""
    v = float(value)
    if not (v >= 0 and v != float("inf")):
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
    return v


def check_positive_int(name: str, value) -> int:
    """``int(value)``, or ``ValueError`` naming the keyword argument when it is not a positive integer."""
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return int(value)


def pairwise_inputs(name: str, u: torch.Tensor, labels: torch.Tensor):
    """``(u, sim, off)`` for a loss over the ordered pairs ``i != j`` of a batch: the codes ``(b, k)`` as float32,
    the ``(b, b)`` float relevance of :mod:`dsrh_lightning.relevance` and the ``(b, b)`` bool off-diagonal mask;
    ``ValueError`` naming the loss ``name`` unless ``u`` is ``(b >= 2, k)``."""
    from ..relevance import relevance_matrix

    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError(f"{name} needs (b >= 2, k) codes, got {tuple(u.shape)}")
    off = ~torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
    return u.float(), relevance_matrix(labels, labels).float(), off
