"""Built-in fusions: how the layers' class scores (or readout features) combine into a prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffablate import hookimpl
from ffablate.errors import ConfigError


class _Fusion(nn.Module):
    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int]):
        super().__init__()
        self.num_layers, self.num_classes = num_layers, num_classes

    def loss(self, scores: list[Tensor], features: list[Tensor], labels: Tensor) -> Tensor:
        return F.cross_entropy(self(scores, features), labels)


class Last(_Fusion):
    """Predict from the last block's scores alone."""

    def forward(self, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        return scores[-1]


class Sum(_Fusion):
    """Sum the scores of every block (Hinton 2022's inference rule)."""

    def forward(self, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        return torch.stack(scores).sum(0)


class SumFromK(_Fusion):
    """Sum the scores of blocks k.. (0-based); DeeperForward searches this layer range at inference."""

    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int], k: int = 1):
        super().__init__(num_layers, num_classes, feature_dims)
        if not 0 <= k < num_layers:
            raise ConfigError(f"fusion.k must be in 0..{num_layers - 1} for {num_layers} blocks, got {k}")
        self.k = k

    def forward(self, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        return torch.stack(scores[self.k :]).sum(0)


def _standardized(scores: list[Tensor]) -> list[Tensor]:
    """Each block's class scores centred and scaled per sample. Goodness scales differ by orders of magnitude
    between recipes and blocks (sumsq grows with width: hundreds at initialisation, against pooled features near 1),
    which a linear layer trained by Adam, whose steps are about lr per weight, cannot absorb."""
    return [(s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6) for s in (x.float() for x in scores)]


class LearnedWeights(_Fusion):
    """Softmax-weighted sum of per-block standardized scores; the weights are fit on detached scores."""

    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int]):
        super().__init__(num_layers, num_classes, feature_dims)
        self.logits = nn.Parameter(torch.zeros(num_layers))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        weights = self.logits.softmax(0)
        return self.scale * sum(w * s for w, s in zip(weights, _standardized(scores), strict=True))


class Readout(_Fusion):
    """A linear classifier on the concatenated readout features and standardized class scores of all blocks,
    trained on detached inputs (a linear probe, as in SCFF); it never sends gradients into the blocks.

    The scores are part of its input because pooled features are linear in the activity while goodness is
    quadratic: a probe on features alone cannot recover what each block's goodness already knows.
    """

    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int]):
        super().__init__(num_layers, num_classes, feature_dims)
        self.linear = nn.Linear(sum(feature_dims) + num_layers * num_classes, num_classes)

    def forward(self, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        return self.linear(torch.cat([f.float() for f in features] + _standardized(scores), dim=1))


@hookimpl
def ffablate_register_fusion(register):
    register("last", Last, "last block's scores")
    register("sum", Sum, "sum of all blocks' scores (Hinton)")
    register(
        "sum-from-k", SumFromK, "sum of blocks k.. (DeeperForward)", space={"k": {"type": "int", "low": 0, "high": 2}}
    )
    register("learned-weights", LearnedWeights, "softmax-weighted standardized scores, fit on detached scores")
    register("readout", Readout, "linear probe on detached readout features and scores of all blocks")
