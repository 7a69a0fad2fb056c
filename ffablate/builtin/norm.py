"""Built-in normalization modes: the three paths (goodness input, forward output, readout) from activity h.

The forward output is what the next block sees; the trainer detaches it. Normalizing it stops the next block from
reading goodness off the activity's magnitude (Hinton 2022). Whether goodness sees the same normalized tensor
("coupled") or the raw activity ("decoupled") is the ablation the DTG-FF paper calls crucial.
"""

from __future__ import annotations

from torch import Tensor, nn

from ffablate import hookimpl, ops
from ffablate.errors import ConfigError
from ffablate.paths import NormPaths


def pooled(x: Tensor) -> Tensor:
    """Readout features: per-channel spatial mean for (N, C, H, W), the activity itself for (N, D)."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def _positive_eps(eps: float) -> float:
    # A dead block (ReLU zero on every unit of a sample) divides 0 by the root of eps: 0 gives NaN, and the run
    # would end in a divergence message that blames the learning rate.
    if not eps > 0:
        raise ConfigError(f"norm.eps must be > 0, got {eps}")
    return eps


class NoNorm(nn.Module):
    """No normalization: all three paths see raw h (the baseline that lets goodness leak to the next block)."""

    def __init__(self, num_features: int):
        super().__init__()

    def forward(self, h: Tensor) -> NormPaths:
        return NormPaths(h, h, pooled(h))


class CoupledBatchNorm(nn.Module):
    """Batch norm (no affine) on h, and that one tensor feeds goodness, the next block and the readout."""

    def __init__(self, num_features: int, momentum: float = 0.1):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ConfigError(f"norm.momentum must be in [0, 1], got {momentum}")
        # The factory is not told whether the block is conv or dense; the layer matching h's rank is used.
        self.bn2d = nn.BatchNorm2d(num_features, affine=False, momentum=momentum)
        self.bn1d = nn.BatchNorm1d(num_features, affine=False, momentum=momentum)

    def forward(self, h: Tensor) -> NormPaths:
        if self.training and h.numel() == h.shape[1]:
            # One value per channel has no batch statistics: torch's ValueError would end a study with a traceback.
            raise ConfigError(
                f"norm 'coupled-bn' needs more than one value per channel, but a training batch of {h.shape[0]} "
                f"gives {tuple(h.shape)}: raise batch_size (micro_batch for -ga methods) or use norm=coupled-ln"
            )
        z = self.bn2d(h) if h.dim() == 4 else self.bn1d(h)
        return NormPaths(z, z, pooled(z))


class CoupledLayerNorm(nn.Module):
    """Per-sample standardization of h feeding all three paths. Scalar goodness becomes nearly constant under it,
    which is why this mode exists: it shows what coupling costs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = _positive_eps(eps)

    def forward(self, h: Tensor) -> NormPaths:
        z = nn.functional.layer_norm(h, h.shape[1:], eps=self.eps)
        return NormPaths(z, z, pooled(z))


class Decoupled(nn.Module):
    """Goodness on raw h; forward output h / RMS(h); readout the pooled forward output (ffablate's definition of
    decoupled normalization). One fused kernel pass yields all three plus the per-sample sums of h^2 and |h|.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = _positive_eps(eps)

    def forward(self, h: Tensor) -> NormPaths:
        sumsq, sumabs, out, readout = ops.goodness_norm(h, self.eps)
        return NormPaths(h, out, readout, _sumsq=sumsq, _sumabs=sumabs)


@hookimpl
def ffablate_register_norm(register):
    register("none", NoNorm, "raw activity on all three paths")
    register("coupled-bn", CoupledBatchNorm, "batch norm shared by all three paths")
    register("coupled-ln", CoupledLayerNorm, "per-sample layer norm shared by all three paths")
    register("decoupled", Decoupled, "raw goodness, RMS-normalized forward, pooled readout (fused kernel)")
