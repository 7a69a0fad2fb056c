"""Built-in goodness functions: how "good" a block's activity is, per sample or per class."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ffablate import hookimpl
from ffablate.errors import ConfigError
from ffablate.paths import NormPaths


class SumSq:
    """Sum of squared activities per sample (Hinton 2022). Grows with layer width: set the threshold to match."""

    per_class = False

    def __call__(self, paths: NormPaths, num_classes: int) -> Tensor:
        return paths.sumsq()


class MeanSq:
    """Mean of squared activities per sample (as in DeeperForward): width-independent, so one threshold fits all."""

    per_class = False

    def __call__(self, paths: NormPaths, num_classes: int) -> Tensor:
        return paths.sumsq() / paths.numel_per_sample


class L1:
    """Mean absolute activity per sample: a goodness that grows linearly, not quadratically, with activity."""

    per_class = False

    def __call__(self, paths: NormPaths, num_classes: int) -> Tensor:
        return paths.sumabs() / paths.numel_per_sample


class LogSumExp:
    """Smooth maximum of squared activities, ``tau * log mean exp(h^2 / tau)``: rewards a few strong units.

    ffablate's own definition; ``tau`` trades between mean-of-squares (large tau) and max (small tau).
    """

    per_class = False

    def __init__(self, tau: float = 1.0):
        if tau <= 0:
            raise ConfigError(f"goodness.tau must be positive, got {tau}")
        self.tau = tau

    def __call__(self, paths: NormPaths, num_classes: int) -> Tensor:
        sq = paths.goodness_input.flatten(1).float().square() / self.tau
        return self.tau * (torch.logsumexp(sq, dim=1) - math.log(sq.shape[1]))


class ClassWise:
    """Per-class goodness from channel groups (CwComp, AAAI 2024; DeeperForward): the first K*G channels are split
    into K groups of G, and class k's goodness is the mean square of group k. Needs no negative data.
    """

    per_class = True

    def __call__(self, paths: NormPaths, num_classes: int) -> Tensor:
        h = paths.goodness_input
        channels = h.shape[1]
        group = channels // num_classes
        if group < 1:
            raise ConfigError(
                f"classwise goodness needs at least one channel per class: a block has {channels} channels "
                f"for {num_classes} classes; widen it (--set channels=...) or choose another goodness"
            )
        used = h[:, : group * num_classes].reshape(h.shape[0], num_classes, -1)
        return used.float().square().mean(dim=2)


@hookimpl
def ffablate_register_goodness(register):
    register("sumsq", SumSq, "sum of squared activities (Hinton 2022)")
    register("meansq", MeanSq, "mean of squared activities (DeeperForward)")
    register("l1", L1, "mean absolute activity")
    register(
        "logsumexp",
        LogSumExp,
        "smooth max of squared activities (ffablate's own)",
        space={"tau": {"type": "float", "low": 0.1, "high": 10.0, "log": True}},
    )
    register("classwise", ClassWise, "per-class mean square of channel groups (CwComp)")
