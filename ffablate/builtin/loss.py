"""Built-in layer losses: turn goodness (and threshold, temperature) into one block's local objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ffablate import hookimpl
from ffablate.errors import ConfigError


class SoftplusThreshold:
    """Hinton 2022: -log sigmoid((g+ - theta)/T) - log sigmoid((theta - g-)/T), averaged over the batch."""

    per_class = False

    def __call__(self, g_pos, g_neg, labels, threshold, temperature) -> Tensor:
        return (F.softplus(-(g_pos - threshold) / temperature) + F.softplus((g_neg - threshold) / temperature)).mean()


class SymBa:
    """SymBa (Lee & Song 2023; Trifecta's ``alpha``): softplus(-alpha (g+ - g-) / T), no threshold."""

    per_class = False

    def __init__(self, alpha: float = 4.0):
        if not alpha > 0:  # a negative alpha rewards negatives over positives
            raise ConfigError(f"loss.alpha must be positive, got {alpha}")
        self.alpha = alpha

    def __call__(self, g_pos, g_neg, labels, threshold, temperature) -> Tensor:
        return F.softplus(-self.alpha * (g_pos - g_neg) / temperature).mean()


class BCE:
    """Binary cross-entropy with the threshold-free probability p(positive) = 1 - exp(-g/T) (g >= 0).

    ffablate's own variant: positives are pushed to large goodness, negatives towards zero activity.
    """

    per_class = False

    def __init__(self, eps: float = 1e-6):
        if not eps > 0:  # the floor under log(p): at 0 a positive with zero goodness gives log(0)
            raise ConfigError(f"loss.eps must be positive, got {eps}")
        self.eps = eps

    def __call__(self, g_pos, g_neg, labels, threshold, temperature) -> Tensor:
        # log(1 - exp(-x)) via log(-expm1(-x)) stays finite for small x.
        log_p_pos = torch.log((-torch.expm1(-g_pos.clamp_min(0) / temperature)).clamp_min(self.eps))
        log_p_neg_is_neg = -(g_neg.clamp_min(0) / temperature)
        return -(log_p_pos.mean() + log_p_neg_is_neg.mean())


class ClassWiseCE:
    """Cross-entropy over per-class goodness / T (CwComp's channel-wise competitive loss)."""

    per_class = True

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing <= 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, g_pos, g_neg, labels, threshold, temperature) -> Tensor:
        return F.cross_entropy(g_pos / temperature, labels, label_smoothing=self.label_smoothing)


@hookimpl
def ffablate_register_loss(register):
    register("softplus-threshold", SoftplusThreshold, "Hinton's thresholded logistic loss")
    register(
        "symba",
        SymBa,
        "SymBa: softplus(-alpha (g+ - g-)/T)",
        space={"alpha": {"type": "float", "low": 1.0, "high": 16.0, "log": True}},
    )
    register("bce", BCE, "BCE with p = 1 - exp(-g/T) (ffablate's own)")
    register(
        "classwise-ce",
        ClassWiseCE,
        "cross-entropy over per-class goodness (CwComp)",
        space={"label_smoothing": {"type": "float", "low": 0.0, "high": 0.2}},
    )
