"""Trainers: ``run(config)`` trains the method the config names and returns its metrics (``trained_run`` also
the trained network)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ffablate import ops
from ffablate.config import FF_METHODS, RunConfig
from ffablate.data import dataset_params
from ffablate.errors import ConfigError
from ffablate.plugins import Registry, plugin_sources, registry, typed_plugin_params, used_params
from ffablate.train import common
from ffablate.train.common import RunResult, TrainingDiverged, TrainingState

__all__ = [
    "RunResult",
    "TrainedRun",
    "TrainingDiverged",
    "TrainingState",
    "Unfinished",
    "build_trainer",
    "run",
    "trained_run",
]


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
    from ffablate.train.ff import FF_KINDS, FFTrainer

    config.validate()
    plugins = plugins or registry()
    # A misspelt plugin is named before the data load, whose own complaints (too few images for a batch) would
    # hide it; a BP run uses only the norm plugin (and the dataset's, which the load looks up in ``plugins`` too).
    for kind in ("norm", *(FF_KINDS if config.method in FF_METHODS else ())):
        plugins.get(kind, config.plugin_of(kind))
    config = typed_plugin_params(config, plugins)
    device = common.resolve_device(config.device)
    ops.backend(config.device)  # FFABLATE_KERNELS=fused with a build that cannot serve this device fails now
    common.seed_everything(config.seed)
    data = data or common.prepare_data(config, device, data_root, download, plugins)
    check_downsampling(config, data.in_shape)
    trainer_cls = FFTrainer if config.method in FF_METHODS else BPTrainer
    return trainer_cls(config, data, device, plugins)


@dataclass
class TrainedRun:
    """A finished run: its result, its trainer (the trained network in ``trainer.net``, the run's data in
    ``trainer.data``) and the plugins it ran with, for what outlives the run (``ffablate train --save``)."""

    result: RunResult
    trainer: Any  # FFTrainer or BPTrainer
    plugins: Registry


@dataclass
class Unfinished:
    """A run after one of its epochs, not yet done: what ``trained_run``'s ``keep`` is given to save it resumably
    (``checkpoint.EpochWriter``). ``config`` and ``plugin_params`` are as the finished run's result will record them."""

    trainer: Any  # FFTrainer or BPTrainer
    plugins: Registry
    config: dict[str, Any]
    plugin_params: dict[str, dict[str, Any]]
    state: TrainingState


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
    """Train ``config``'s network and return its result; the network goes with the trainer (``trained_run`` keeps
    both)."""
    return trained_run(
        config, data_root=data_root, download=download, progress=progress, on_epoch=on_epoch, plugins=plugins, data=data
    ).result


def trained_run(
    config: RunConfig,
    *,
    data_root: str | None = None,
    download: bool = False,
    progress: common.Progress | None = None,
    on_epoch: common.EpochCallback | None = None,
    plugins: Registry | None = None,
    data: common.RunData | None = None,
    resume: TrainingState | None = None,
    keep: Callable[[Unfinished], None] | None = None,
) -> TrainedRun:
    """``run``, keeping the trainer with the trained network beside the result. ``keep`` is given the run after
    every finished epoch; ``resume``, the state of one such run with this ``config``, trains only what it lacks."""
    from ffablate.train.ff import FF_KINDS

    plugins = plugins or registry()
    trainer = build_trainer(config, data_root=data_root, download=download, plugins=plugins, data=data)
    config = trainer.config
    # The dataset's parameters as the load passed them (classes=K is teacher-student's k), then the one record:
    # before training, since a resumable checkpoint written after an epoch holds it too.
    given = dataset_params(plugins.get("datasets", config.dataset), config.params_of("datasets"), config.classes)
    recorded = dataclasses.replace(config, plugin_params={**config.plugin_params, "datasets": given})
    kinds = ("datasets", "norm", *(FF_KINDS if config.method in FF_METHODS else ()))
    params = used_params(recorded, plugins, kinds)

    result = trainer.fit(
        progress=progress,
        on_epoch=on_epoch,
        resume=resume,
        keep=(lambda state: keep(Unfinished(trainer, plugins, config.to_dict(), params, state))) if keep else None,
    )
    result.plugin_params = params
    result.plugin_sources = plugin_sources(recorded, plugins, kinds)
    return TrainedRun(result, trainer, plugins)


def check_downsampling(config: RunConfig, in_shape: tuple[int, int, int]) -> None:
    """Each stride-2 block halves the image; one that would pool a 1-pixel map is a ConfigError, not a crash."""
    if config.backbone != "cnn":
        return
    size = min(in_shape[1:])
    allowed = max(0, size.bit_length() - 1)  # how many times ``size`` can be halved before it reaches 1
    if config.stride_list.count(2) > allowed:
        example = ",".join(["2"] * allowed + ["1"] * (len(config.widths) - allowed))
        raise ConfigError(
            f"strides {config.strides!r} halve {size}px images more than {allowed} times; "
            f"set later blocks to stride 1 (e.g. --set strides={example})"
        )
