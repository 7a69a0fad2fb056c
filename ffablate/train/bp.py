"""Backpropagation twins of the FF network: the same backbone (blocks and norm modules), trained end to end.

- ``bp``: one linear head on the last block's readout features.
- ``bp-deepsup``: a head on every block, cross-entropies summed (the DTG-FF paper's BP-DeepSup baseline).
- ``bp-ga``: ``bp-deepsup`` with gradient accumulation over micro-batches up to the same effective batch.
- ``bp-ckpt``: ``bp-deepsup`` with activation checkpointing per block.

Prediction uses the last head; every head's accuracy is reported per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ffablate.config import RunConfig
from ffablate.data import DeviceLoader
from ffablate.model import build_backbone
from ffablate.plugins import Registry
from ffablate.train import common


class BPNet(nn.Module):
    def __init__(
        self, config: RunConfig, in_shape: tuple[int, int, int], num_classes: int, plugins: Registry | None = None
    ):
        super().__init__()
        self.backbone = build_backbone(config, in_shape, plugins)
        dims = self.backbone.feature_dims
        self.deep_supervision = config.method != "bp"
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in (dims if self.deep_supervision else dims[-1:]))
        self.checkpointed = config.method == "bp-ckpt"

    def features(self, x: Tensor) -> list[Tensor]:
        if not (self.checkpointed and self.training):
            return self.backbone(x)
        h, features = self.backbone.prepare(x), []
        for index in range(len(self.backbone.blocks)):
            modules = (self.backbone.blocks[index], self.backbone.norms[index])
            h, readout = checkpoint(
                self._block,
                index,
                h,
                use_reentrant=False,
                context_fn=lambda modules=modules: (contextlib.nullcontext(), _buffers_kept(modules)),
            )
            features.append(readout)
        return features

    def _block(self, index: int, h: Tensor) -> tuple[Tensor, Tensor]:
        paths = self.backbone.block_paths(index, h)
        return paths.forward, paths.readout

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every head (one head for ``bp``)."""
        features = self.features(x)
        used = features if self.deep_supervision else features[-1:]
        return [head(f.float()) for head, f in zip(self.heads, used, strict=True)]

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(the last head's logits, every head's logits) under the run's autocast: FFNet.predict's twin, what
        evaluation scores."""
        with common.autocast(x.device):
            logits = self(x)
        return logits[-1], logits


@contextlib.contextmanager
def _buffers_kept(modules: tuple[nn.Module, ...]) -> Iterator[None]:
    """Restore the modules' buffers after the backward's recompute: a block runs once per step as far as its
    batch-norm running statistics know, as it does without checkpointing."""
    saved = [(buf, buf.clone()) for m in modules for buf in m.buffers()]
    try:
        yield
    finally:
        for buf, value in saved:
            buf.copy_(value)


def bp_loss(logits: list[Tensor], y: Tensor) -> Tensor:
    # fp32, as FF's losses: under bf16 autocast the heads' logits are bf16.
    return sum(F.cross_entropy(out.float(), y) for out in logits)


class BPTrainer:
    def __init__(self, config: RunConfig, data: common.RunData, device: torch.device, plugins: Registry | None = None):
        self.config, self.data, self.device = config, data, device
        self.net = BPNet(config, data.in_shape, data.dataset.num_classes, plugins).to(device)
        self.optimizer = common.make_optimizer(self.net.parameters(), config)

    def train_step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        chunks = x.split(self.config.micro_batch) if self.config.method == "bp-ga" else (x,)
        labels = y.split(self.config.micro_batch) if self.config.method == "bp-ga" else (y,)
        losses = []
        for xc, yc in zip(chunks, labels, strict=True):
            with common.autocast(self.device):
                logits = self.net(xc)
            # Weighting by the chunk's share makes the accumulated gradient the full batch's mean gradient (exactly
            # so without batch statistics; coupled-bn normalizes each chunk by its own).
            loss = bp_loss(logits, yc) * (yc.numel() / y.numel())
            loss.backward()
            losses.append(("bp step", loss))
        total = sum(common.checked_losses(losses))
        self.optimizer.step()
        return total

    def rehearse(self, x: Tensor, y: Tensor) -> None:
        """One step on ``x, y`` (FFTrainer.rehearse's twin); the trainer is spent."""
        self.train_step(x, y)

    def evaluate(self, loader: DeviceLoader) -> tuple[float, list[float]]:
        """Fused (the last head's) and per-block accuracy on ``loader``'s images."""
        return common.evaluate(self.net, loader)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizer by name, as a resumable checkpoint keeps its state (FFTrainer.optimizers' twin)."""
        return {"net": self.optimizer}

    def fit(
        self,
        progress: common.Progress | None = None,
        on_epoch: common.EpochCallback | None = None,
        *,
        resume: common.TrainingState | None = None,
        keep: common.EpochKeeper | None = None,
    ) -> common.RunResult:
        """Train, then score the test split; ``keep`` and ``resume`` as FFTrainer.fit's."""
        cfg, loader = self.config, self.data.train
        session = common.Session(self.net, self.optimizers(), self.device, cfg.epochs, resume)
        total_steps = cfg.epochs * len(loader)
        for epoch in range(cfg.epochs):
            if not session.pending(epoch):
                continue
            loader.set_epoch(epoch)
            with session.watch, session.memory:
                for step, (x, y) in enumerate(loader):
                    done = epoch * len(loader) + step
                    common.set_lr([self.optimizer], cfg, done, total_steps)
                    loss = self.train_step(x, y)
                    session.images += y.numel()
                    if progress:
                        progress(done + 1, total_steps, {"loss": loss})
            session.end_epoch(loss, self.evaluate, self.data, on_epoch, keep)
        return session.finish(cfg, self.evaluate, self.data)
