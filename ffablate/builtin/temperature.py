"""Built-in temperature schedules: T in p(positive) = sigmoid((g - theta) / T), or logits g / T for class-wise
goodness. Each block gets its own instance. The dynamic schedules are ffablate's own definitions: the DTG-FF paper's
equations are not published to us.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ffablate import hookimpl
from ffablate.errors import ConfigError


def _scalar(value: float) -> Tensor:
    """T as a 0-dim CPU tensor: it combines with CUDA tensors as a kernel argument, where a CUDA tensor made from a
    Python float would cost a host-to-device copy, and a host sync, per block per step."""
    return torch.tensor(value)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"temperature.{name} must be positive, got {value}")
    return float(value)


class Constant(nn.Module):
    """T fixed at ``t`` (the default 0.3 suits class-wise mean-square goodness; Hinton's sigmoid used 1)."""

    def __init__(self, t: float = 0.3):
        super().__init__()
        self.t = _positive("t", t)

    def forward(self, progress: float, goodness: Tensor) -> Tensor:
        return _scalar(self.t)


class Linear(nn.Module):
    """T moves linearly from ``start`` to ``end`` over training (annealing when start > end)."""

    def __init__(self, start: float = 2.0, end: float = 0.5):
        super().__init__()
        self.start, self.end = _positive("start", start), _positive("end", end)

    def forward(self, progress: float, goodness: Tensor) -> Tensor:
        return _scalar(self.start + (self.end - self.start) * progress)


class Cosine(nn.Module):
    """T follows half a cosine from ``start`` to ``end``: slow at both ends, fast in the middle."""

    def __init__(self, start: float = 2.0, end: float = 0.5):
        super().__init__()
        self.start, self.end = _positive("start", start), _positive("end", end)

    def forward(self, progress: float, goodness: Tensor) -> Tensor:
        weight = 0.5 * (1 - math.cos(math.pi * progress))
        return _scalar(self.start + (self.end - self.start) * weight)


class Adaptive(nn.Module):
    """T = ``scale`` x running std of the batch goodness, so logits stay scale-free as goodness grows.

    The std is taken over samples (and classes for class-wise goodness) and smoothed with ``momentum``.
    """

    def __init__(self, scale: float = 1.0, momentum: float = 0.9, floor: float = 1e-3):
        super().__init__()
        self.scale = _positive("scale", scale)
        if not 0 <= momentum <= 1:  # 1 keeps the first batch's spread
            raise ConfigError(f"temperature.momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.floor = _positive("floor", floor)
        self.register_buffer("spread", torch.tensor(float("nan")))

    def forward(self, progress: float, goodness: Tensor) -> Tensor:
        if self.training:
            batch_spread = goodness.detach().float().std().clamp_min(self.floor)
            smoothed = self.spread * self.momentum + (1 - self.momentum) * batch_spread
            # The first batch (spread still NaN) starts the average; chosen on the device, without a host sync.
            self.spread.copy_(torch.where(torch.isnan(self.spread), batch_spread, smoothed))
        return self.scale * self.spread.clamp_min(self.floor)


class Learned(nn.Module):
    """T = floor + exp(log_t), a per-block parameter trained by its block's own loss, starting at ``init``.

    The floor is added, not clamped: below a clamp the gradient is zero, and once Adam's momentum carried log_t
    there, T would never move again.
    """

    def __init__(self, init: float = 1.0, floor: float = 0.01):
        super().__init__()
        if not init > floor > 0:
            raise ConfigError(f"temperature init must exceed its floor (> 0): got init={init}, floor={floor}")
        self.log_t = nn.Parameter(torch.tensor(math.log(init - floor)))
        self.floor = floor

    def forward(self, progress: float, goodness: Tensor) -> Tensor:
        return self.floor + self.log_t.exp()


@hookimpl
def ffablate_register_temperature(register):
    positive = {"type": "float", "low": 0.05, "high": 5.0, "log": True}
    register("constant", Constant, "fixed T", space={"t": positive})
    register("linear", Linear, "T linear from start to end", space={"start": positive, "end": positive})
    register("cosine", Cosine, "T cosine from start to end", space={"start": positive, "end": positive})
    register("adaptive", Adaptive, "T = scale x running std of batch goodness", space={"scale": positive})
    register("learned", Learned, "T a trained per-block parameter", space={"init": positive})
