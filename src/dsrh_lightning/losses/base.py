"""The interface of a ranking method: an ``nn.Module`` that turns the network's outputs into the ranking term.

A ranking method owns its hyperparameters (read from the config in ``__init__``), its buffers
(CSQ's hash centres) and its schedules (HashNet's tanh scale), and declares what it consumes:

* ``explicit_triplets`` / ``in_batch``: whether it accepts batches of explicit (query, positive,
  negative) rows (``data.sampling=triplets``) and/or plain batches whose triplets or pairs it
  takes from inside the batch (``data.sampling=balanced|random``);
* ``consumes``: ``"codes"`` (the relaxed sigmoid codes in (0, 1)) or ``"code_logits"`` (the hash
  layer's pre-activation).

The module (:class:`~dsrh_lightning.lightning.module.HashingModule`) adds the orthogonality, balance and
classification terms and logs every extra scalar a method returns as ``train/<name>``.
A new method: one file with one subclass, one line in :mod:`.registry`, one experiment YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

__all__ = ["RankingLoss", "RankingResult"]


@dataclass
class RankingResult:
    """What a ranking method hands back to the module.

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
    """Base class of the ranking methods (see the module docstring)."""

    #: the config name (set by the registry when the class is looked up).
    name: str = ""
    #: accepts explicit (query, positive, negative) rows (``data.sampling=triplets``).
    explicit_triplets: bool = True
    #: accepts plain batches and mines inside them (``data.sampling=balanced|random``).
    in_batch: bool = True
    #: the network output it reads: "codes" or "code_logits".
    consumes: str = "codes"

    def __init__(self, cfg, num_classes: int) -> None:
        """``cfg``: the whole run config (``loss.*``, ``model.bits``, ``data.max_triplets``)."""
        super().__init__()
        self.bits = int(cfg.model.bits)
        self.num_classes = int(num_classes)

    def forward(self, out: Dict[str, torch.Tensor], labels: torch.Tensor, *, explicit: bool, step: int,
                generator: Optional[torch.Generator] = None) -> RankingResult:
        """The ranking term of one training batch.

        Args:
            out: the network's outputs (``codes``, ``code_logits``, ``logits``), rows of
                ``3 * b`` images (query, positive, negative of each triplet) when ``explicit``.
            labels: ``(b, 3)`` / ``(b, 3, c)`` labels of explicit triplets, ``(b,)`` / ``(b, c)`` otherwise.
            explicit: the batch holds explicit triplets.
            step: the global step (schedules).
            generator: the step's generator for random draws (triplet subsets).
        """
        raise NotImplementedError

    @staticmethod
    def flat_labels(labels: torch.Tensor, explicit: bool) -> torch.Tensor:
        """Labels aligned with the rows of ``out`` (explicit triplets are flattened)."""
        return labels.flatten(0, 1) if explicit else labels
