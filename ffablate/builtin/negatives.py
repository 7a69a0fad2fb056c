"""Built-in negative data: how a label enters the input, and which wrong label makes a negative sample."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ffablate import hookimpl
from ffablate.errors import ConfigError

ScoreFn = Callable[[], Tensor]


def embed_label_pixels(x: Tensor, labels: Tensor | None, num_classes: int, on: float, off: float) -> Tensor:
    """Hinton 2022: overwrite the first K pixels (row-major, every channel) with a one-hot code of the label.

    ``labels=None`` writes the neutral code (all pixels ``off``) used for label-free readout features.
    """
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).clone()
    if flat.shape[2] < num_classes:
        raise ConfigError(f"cannot embed {num_classes} labels in {flat.shape[2]} pixels; use fewer classes")
    code = torch.full((n, num_classes), off, dtype=x.dtype, device=x.device)
    if labels is not None:
        code.scatter_(1, labels.view(-1, 1), on)
    flat[:, :, :num_classes] = code.unsqueeze(1)
    return flat.view_as(x)


def embed_label_channels(x: Tensor, labels: Tensor | None, num_classes: int, on: float, off: float) -> Tensor:
    """ffablate's own: append K constant input channels, a one-hot code of the label (``labels=None``: all ``off``).

    A convolution sees the label at every position, where the first K pixels reach only a corner of each map.
    The first block then has K more input channels than the BP baseline's, which sees no label.
    """
    n, _, h, w = x.shape
    code = torch.full((n, num_classes), off, dtype=x.dtype, device=x.device)
    if labels is not None:
        code.scatter_(1, labels.view(-1, 1), on)
    return torch.cat([x, code[:, :, None, None].expand(n, num_classes, h, w)], dim=1)


_EMBEDDINGS = {"pixels": embed_label_pixels, "channels": embed_label_channels}


class _LabelCode:
    embeds_label = True

    def __init__(self, on: float = 3.0, off: float = 0.0, into: str = "pixels"):
        if into not in _EMBEDDINGS:
            raise ConfigError(f"negatives.into must be one of {', '.join(_EMBEDDINGS)}, got {into!r}")
        self.on, self.off, self._embed = on, off, _EMBEDDINGS[into]

    def embed(self, x: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
        return self._embed(x, labels, num_classes, self.on, self.off)


def random_wrong(labels: Tensor, num_classes: int) -> Tensor:
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return (labels + offset) % num_classes


class RandomLabel(_LabelCode):
    """Negative = the same image with a uniformly random wrong label (Hinton 2022)."""

    def wrong_labels(self, labels: Tensor, num_classes: int, scores: ScoreFn) -> Tensor:
        return random_wrong(labels, num_classes)


class HardestLabel(_LabelCode):
    """Negative = the wrong label the current network scores highest (Hinton's "hard negatives"), with
    probability ``p``; otherwise a random wrong label. Costs K extra no-grad passes per batch.
    """

    def __init__(self, p: float = 0.5, on: float = 3.0, off: float = 0.0, into: str = "pixels"):
        super().__init__(on, off, into)
        if not 0 <= p <= 1:
            raise ConfigError(f"negatives.p must be in [0, 1], got {p}")
        self.p = p

    def wrong_labels(self, labels: Tensor, num_classes: int, scores: ScoreFn) -> Tensor:
        wrong = random_wrong(labels, num_classes)
        if self.p == 0:
            return wrong
        masked = scores().clone()
        masked.scatter_(1, labels.view(-1, 1), float("-inf"))
        hardest = masked.argmax(dim=1)
        use_hard = torch.rand(labels.shape, device=labels.device) < self.p
        return torch.where(use_hard, hardest, wrong)


class NoNegatives:
    """No label in the input and no negatives: for per-class goodness (CwComp, DeeperForward)."""

    embeds_label = False

    def embed(self, x: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
        return x

    def wrong_labels(self, labels: Tensor, num_classes: int, scores: ScoreFn) -> Tensor:
        raise ConfigError("negatives 'none' makes no negatives; use goodness=classwise with loss=classwise-ce")


@hookimpl
def ffablate_register_negatives(register):
    # `into` stays out of the declared spaces: a search over a negatives plugin's space keeps the one it had.
    register(
        "random-label",
        RandomLabel,
        "label one-hot in the first K pixels (into=channels: K extra input channels); random wrong label",
    )
    register(
        "hardest-label",
        HardestLabel,
        "like random-label, but the highest-scoring wrong label with prob p",
        space={"p": {"type": "float", "low": 0.0, "high": 1.0}},
    )
    register("none", NoNegatives, "no label embedding, no negatives (class-wise goodness)")
