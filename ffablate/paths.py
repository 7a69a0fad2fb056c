"""The three normalization paths from one block's activity, shared by norm and goodness plugins."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class NormPaths:
    """What a norm plugin hands on: the goodness input, the forward output and the readout features.

    ``sumsq``/``sumabs`` are per-sample sums over ``goodness_input``; a fused kernel that computes them in the same
    pass as the forward output leaves them here, otherwise they are computed on first use.
    """

    goodness_input: Tensor
    forward: Tensor
    readout: Tensor
    _sumsq: Tensor | None = None
    _sumabs: Tensor | None = None

    @property
    def numel_per_sample(self) -> int:
        return self.goodness_input[0].numel()

    def sumsq(self) -> Tensor:
        if self._sumsq is None:
            self._sumsq = self.goodness_input.flatten(1).float().square().sum(dim=1)
        return self._sumsq

    def sumabs(self) -> Tensor:
        if self._sumabs is None:
            self._sumabs = self.goodness_input.flatten(1).float().abs().sum(dim=1)
        return self._sumabs
