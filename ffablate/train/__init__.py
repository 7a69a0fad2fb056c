"""Trainers: ``run(config)`` trains the method the config names and returns its metrics."""

from __future__ import annotations

from ffablate.config import FF_METHODS, RunConfig
from ffablate.plugins import Registry
from ffablate.train import common
from ffablate.train.common import RunResult, TrainingDiverged

__all__ = ["RunResult", "TrainingDiverged", "build_trainer", "run"]


def build_trainer(
    config: RunConfig,
    *,
    data_root: str | None = None,
    download: bool = False,
    plugins: Registry | None = None,
    data: common.RunData | None = None,
):
    """The trainer for ``config.method`` with its data on the device (``data`` reuses already-loaded data)."""
    from ffablate.train.bp import BPTrainer
    from ffablate.train.ff import FFTrainer

    config.validate()
    device = common.resolve_device(config.device)
    common.seed_everything(config.seed)
    data = data or common.prepare_data(config, device, data_root, download)
    trainer_cls = FFTrainer if config.method in FF_METHODS else BPTrainer
    return trainer_cls(config, data, device, plugins)


def run(
    config: RunConfig,
    *,
    data_root: str | None = None,
    download: bool = False,
    progress: common.Progress | None = None,
    on_epoch: common.EpochCallback | None = None,
    plugins: Registry | None = None,
    data: common.RunData | None = None,
) -> RunResult:
    trainer = build_trainer(config, data_root=data_root, download=download, plugins=plugins, data=data)
    return trainer.fit(progress=progress, on_epoch=on_epoch)
