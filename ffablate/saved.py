"""A trained run read back from its checkpoint (``ffablate train --save``): ``load_run`` rebuilds the network in eval
mode, ``SavedRun.predict`` scores raw images as the run's evaluation did, and ``SavedRun.evaluate`` repeats that
evaluation on the run's own test split. ``resume_run`` goes on with a run whose checkpoint is unfinished."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ffablate import __version__, checkpoint, ops
from ffablate.config import FF_METHODS, RunConfig
from ffablate.data import ImageDataset
from ffablate.errors import CheckpointError, ConfigError, DataNotFound, FFablateWarning, UnknownPlugin, described
from ffablate.plugins import Registry, package_version, registry
from ffablate.revision import source_revision
from ffablate.train import TrainedRun, Unfinished, common, trained_run


@dataclass(frozen=True)
class DatasetInfo:
    """The run's data as its checkpoint records them."""

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) of the raw uint8 images
    mean: list[float] | None  # per channel, in [0, 1] units: the network sees (x / 255 - mean) / std
    std: list[float] | None
    test_images: int
    test_sha256: str  # of the test split's images and labels (checkpoint.split_digest)


@dataclass
class Prediction:
    logits: Tensor  # (N, K) float32 on the CPU: the fused prediction's logits (FF: the fusion's; BP: the last head's)
    labels: Tensor  # (N,) int64: logits.argmax(1), the predicted classes
    per_layer: list[Tensor]  # per block, (N, K) each: FF its own class scores, BP-DeepSup its head's logits


@dataclass
class Evaluation:
    test_accuracy: float
    per_layer_accuracy: list[float]
    images: int  # test images scored
    data_source: str  # where the dataset's bytes came from this time
    kernel_backend: str


class SavedRun:
    """A trained network rebuilt from its checkpoint, in eval mode on ``device``.

    ``model``: the FFNet or BPNet. ``config``: the run's config as its record holds it. ``dataset``: what its data
    were (``DatasetInfo``). ``result``: the run's result record (``ffablate train --json``'s fields). ``ffablate``:
    the version and commit that trained it. ``plugins``: ``{kind: {"name", "package", "version"}}`` of the plugins
    it used."""

    def __init__(
        self,
        path: Path,
        saved: dict[str, Any],
        model: nn.Module,
        configs: tuple[RunConfig, RunConfig],
        device: torch.device,
        plugins: Registry,
    ):
        self.path, self.model, self.device = path, model, device
        self.config, model_config = configs
        self.dataset = dataset_info(saved["data"])
        self.result: dict[str, Any] = saved["result"]
        self.ffablate: dict[str, str] = saved["ffablate"]
        self.plugins: dict[str, dict[str, str | None]] = saved["plugins"]
        # Every plugin parameter the run used, defaults included: what the network and the data are rebuilt with.
        self._model_config, self._registry = model_config, plugins

    def __repr__(self) -> str:
        accuracy = self.result.get("test_accuracy")
        return f"SavedRun({self.path}: {self.config.method} on {self.dataset.name}, test accuracy {accuracy})"

    def predict(self, images: Tensor | np.ndarray) -> Prediction:
        """The logits of raw images, as the run's evaluation computes them.

        ``images``: uint8 pixels as the dataset stores them (0..255, before any normalization), shaped (N, C, H, W)
        as ``dataset.image_shape``, or one (C, H, W) image; a tensor or a NumPy array. Floats are refused: 0..1,
        0..255 and normalized values look alike. The images go through the run's evaluation loader (its mean and
        std, batches of 1,000 in order) and the model in eval mode (whatever mode it was left in, which is restored),
        so on the test split these are the very logits its accuracy counted."""
        x = self._raw_images(images)
        unlabelled = torch.zeros(len(x), dtype=torch.int64)  # the loader batches labels too; nothing reads these
        loader = common.eval_loader(x, unlabelled, self._model_config, self.device, self.dataset.mean, self.dataset.std)
        logits, layers = [], []
        with common.eval_mode(self.model):  # a model put in training mode would score on its batches' statistics
            for batch, _ in loader:
                fused, per_layer = self.model.predict(batch)
                logits.append(fused.float().cpu())
                layers.append([scores.float().cpu() for scores in per_layer])
        fused = torch.cat(logits)
        return Prediction(fused, fused.argmax(1), [torch.cat(parts) for parts in zip(*layers, strict=True)])

    def _raw_images(self, images: object) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if not isinstance(x, Tensor):
            raise ConfigError(f"predict takes a tensor or NumPy array of uint8 images, got {described(images)}")
        c, h, w = self.dataset.image_shape
        if x.dtype != torch.uint8:
            raise ConfigError(
                f"predict takes raw uint8 images (0..255, as the dataset stores them, before normalization), got "
                f"{x.dtype}; convert pixels in 0..1 with (x * 255).round().to(torch.uint8)"
            )
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w) or len(x) == 0:
            raise ConfigError(
                f"predict takes images of shape (N, {c}, {h}, {w}) with N >= 1, or one ({c}, {h}, {w}), as the run's "
                f"{self.dataset.name} images; got {tuple(x.shape)}{self._resize_hint()}"
            )
        return x

    def _resize_hint(self) -> str:
        """How the run's images got their size, where a dataset parameter set it (stl10, imagefolder)."""
        size = self.config.params_of("datasets").get("size")
        if not size:
            return ""
        return (
            f" (the run's images were {size}x{size}, datasets.size={size}: resize yours to that, e.g. with "
            "ffablate.builtin.datasets.resize_uint8)"
        )

    def test_split(self, data_root: str | None = None, download: bool = False) -> ImageDataset:
        """The run's dataset loaded again as the run loaded it (its classes, labels, limits, and the test subset's
        fixed seed): ``.test_x`` (uint8) and ``.test_y`` are the images and labels its test accuracy counted. Data
        that no longer match the record (other classes or image shape) are a CheckpointError; other test images
        (another copy of the data) a warning: the accuracy on them is not comparable with the recorded one."""
        check_plugins(self.path, self.plugins, ("datasets",), self._registry)
        try:
            ds = common.load_run_dataset(self._model_config, data_root, download, self._registry)
        except DataNotFound as exc:
            source = self.result.get("data_source")
            if not source or type(exc) is not DataNotFound:
                raise
            # Where this ffablate looks by default is seldom where the run's data are: say where they were.
            raise DataNotFound(
                f"{exc}; the run read it from {source}: give --data-root (data_root) the folder that holds it"
            ) from None
        info = self.dataset
        found = (ds.num_classes, list(ds.class_names), ds.image_shape)
        if found != (info.num_classes, info.class_names, info.image_shape):
            raise CheckpointError(
                f"the {info.name} data found here ({ds.source}) has classes {list(ds.class_names)} of {ds.image_shape} "
                f"images, the run's had {info.class_names} of {info.image_shape}: give --data-root the copy it "
                "trained on"
            )
        if checkpoint.split_digest(ds.test_x, ds.test_y) != info.test_sha256:
            warnings.warn(
                f"the {info.name} test split found here ({ds.source}) is not the one the run was scored on (other "
                "images or labels): its accuracy is not comparable with the recorded one; give --data-root the copy "
                "the run used",
                FFablateWarning,
                stacklevel=2,
            )
        return ds

    def evaluate(self, data_root: str | None = None, download: bool = False) -> Evaluation:
        """Score the network on the run's own test split as the run's final evaluation did (its loader, its
        batches); on the device, kernels and CPU thread count the run had, the accuracies are the recorded ones."""
        ds = self.test_split(data_root, download)
        info = self.dataset
        loader = common.eval_loader(ds.test_x, ds.test_y, self._model_config, self.device, info.mean, info.std)
        accuracy, per_layer = common.evaluate(self.model, loader)
        return Evaluation(accuracy, per_layer, len(ds.test_y), ds.source, ops.backend(self.device))


def load_run(path: str | Path, *, plugins: Registry | None = None, device: str = "cpu") -> SavedRun:
    """Read the checkpoint at ``path`` (written by ``ffablate train --save``) and rebuild its network on ``device``
    ("cpu" or "cuda"), in eval mode. ``plugins``: where to find the run's plugins (default: the installed ones); each
    must be installed from the package and at the version the run used. Every problem (not a checkpoint, damaged,
    a newer format, a plugin missing or of another version, a run still training) is a CheckpointError that says what
    to do. An unfinished checkpoint (``--save`` writes one after every epoch) is refused rather than loaded as the
    model of its last epoch: its result is not there yet, and a model scored as the run's must be the finished one."""
    saved = checkpoint.read(path)
    path = Path(path).expanduser()
    if checkpoint.unfinished(saved):
        raise CheckpointError(
            f"{path} holds a run still training ({checkpoint.progress_of(saved)} done): resume it with `ffablate train "
            f"--resume {path}`, then load or evaluate it"
        )
    plugins = plugins or registry()
    torch_device = common.resolve_device(device)
    ops.backend(device)  # a kernel setting this device cannot serve fails now, not in the first prediction
    configs = _configs(saved, path)
    # The dataset's plugin is needed only to load the data again (evaluate), not to predict.
    check_plugins(path, saved["plugins"], tuple(k for k in saved["plugins"] if k != "datasets"), plugins)
    model = _rebuilt(saved, configs[1], plugins, path).to(torch_device).eval()
    return SavedRun(path, saved, model, configs, torch_device, plugins)


def resume_run(
    path: str | Path,
    *,
    data_root: str | None = None,
    download: bool = False,
    progress: common.Progress | None = None,
    on_epoch: common.EpochCallback | None = None,
    plugins: Registry | None = None,
    keep: Callable[[Unfinished], None] | None = None,
) -> TrainedRun:
    """Go on with the run whose unfinished checkpoint is at ``path`` (``--save`` writes one after every epoch) and
    return it finished, as ``train.trained_run`` would have without the stop: its config from the checkpoint, its
    network, optimizers, random streams, history, train seconds and images counted so far restored. ``keep`` is given
    the run after every epoch (``checkpoint.EpochWriter(path)`` goes on writing to the same file); the finished
    checkpoint is the caller's to write (``checkpoint.save(checkpoint.contents(run), path)``).

    Refused, each with a CheckpointError saying what to do: a finished checkpoint, another ffablate version, a plugin
    missing or of another version (as ``load_run``), data that are not the run's. Another commit of the same version
    is a warning: the rest of the run trains with other code."""
    saved = checkpoint.read(path)
    path = Path(path).expanduser()
    if not checkpoint.unfinished(saved):
        raise CheckpointError(
            f"{path} holds a finished run: there is nothing to resume; score it with `ffablate evaluate {path}` (or "
            "ffablate.load_run)"
        )
    plugins = plugins or registry()
    check_same_code(saved, path)
    check_plugins(path, saved["plugins"], tuple(saved["plugins"]), plugins)
    config, _ = _configs(saved, path)
    if config.device == "cuda" and not torch.cuda.is_available():
        # --device is the run's own, not an option here: say where it can go on instead of "use --device cpu".
        raise CheckpointError(f"{path} was training on CUDA, and no CUDA device is visible here: resume it on one")
    try:
        data = common.prepare_data(config, common.resolve_device(config.device), data_root, download, plugins)
    except DataNotFound as exc:
        source = saved["training"].get("data_source")
        if not source or type(exc) is not DataNotFound:
            raise
        raise DataNotFound(
            f"{exc}; the run read it from {source}: give --data-root (data_root) the folder that holds it"
        ) from None
    check_same_data(saved, path, config.dataset, data)
    threads = checkpoint.thread_change(saved)
    if threads:
        warnings.warn(
            f"{path} trained at {checkpoint.cpu_threads(threads[0])} so far and this process has {threads[1]}: the "
            "rest of the run rounds otherwise, so it ends as the uninterrupted run would within noise, not bit for "
            f"bit; resume it with OMP_NUM_THREADS={threads[0]} for that",
            FFablateWarning,
            stacklevel=2,
        )
    state = checkpoint.training_state(saved)
    return trained_run(
        config, data=data, plugins=plugins, progress=progress, on_epoch=on_epoch, resume=state, keep=keep
    )


def check_same_data(saved: dict[str, Any], path: Path, dataset: str, data: common.RunData) -> None:
    """The unfinished checkpoint ``saved`` trained on the ``dataset`` images loaded into ``data``: a resume on others
    would go on with another run's data."""
    found = checkpoint.data_record(dataset, data)
    changed = [key for key, value in saved["data"].items() if found.get(key) != value]
    # The record hashes only the test split; a copy whose training images differ would train on silently. (A
    # checkpoint written before ffablate recorded this digest has none to compare.)
    digest = saved["training"].get("train_sha256")
    if digest and checkpoint.training_digest(data.dataset) != digest:
        changed.append("train_sha256")
    if changed:
        raise CheckpointError(
            f"the {dataset} data found here ({data.dataset.source}) are not the ones {path} trained on (their "
            f"{changed[0]} differs): give --data-root the copy it trained on"
        )


def check_same_code(saved: dict[str, Any], path: Path) -> None:
    """A run goes on with the ffablate version it began with: another one may train (and record) otherwise."""
    began = saved["ffablate"]
    if began.get("version") != __version__:
        raise CheckpointError(
            f"{path} was trained so far with ffablate {began.get('version')}, this is ffablate {__version__}: resume "
            f"it with {_made_by(saved)}, or train again"
        )
    commit = source_revision()
    if began.get("commit") and commit and began["commit"] != commit:
        warnings.warn(
            f"{path} was trained so far with ffablate at commit {began['commit']}, this is commit {commit}: the rest "
            "of the run trains with this code, and its record names only this commit",
            FFablateWarning,
            stacklevel=3,
        )


def dataset_info(data: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(
        name=data["dataset"],
        num_classes=data["num_classes"],
        class_names=list(data["class_names"]),
        image_shape=tuple(data["image_shape"]),
        mean=data["mean"],
        std=data["std"],
        test_images=data["test_images"],
        test_sha256=data["test_sha256"],
    )


def _configs(saved: dict[str, Any], path: Path) -> tuple[RunConfig, RunConfig]:
    """The run's config as recorded, and the same with every plugin parameter it used, defaults included, which the
    network and data are rebuilt with: a default changed since cannot change them."""
    try:
        config = RunConfig().with_updates(saved["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"{path} records a config this ffablate cannot read ({exc}); load it with {_made_by(saved)}"
        ) from None
    params = {kind: dict(values) for kind, values in saved["plugin_params"].items()}
    return config, dataclasses.replace(config, plugin_params=params)


def _made_by(saved: dict[str, Any]) -> str:
    return f"ffablate {saved['ffablate'].get('version')} (commit {saved['ffablate'].get('commit') or 'unknown'})"


def _rebuilt(saved: dict[str, Any], config: RunConfig, plugins: Registry, path: Path) -> nn.Module:
    """The run's network with its saved state."""
    from ffablate.train.bp import BPNet
    from ffablate.train.ff import FFNet

    info = dataset_info(saved["data"])
    net_class = FFNet if config.method in FF_METHODS else BPNet
    # Building draws initial weights, which the saved state replaces: the caller's random stream is left as it was.
    try:
        with torch.random.fork_rng(devices=[]):
            net = net_class(config, info.image_shape, info.num_classes, plugins)
    except ConfigError as exc:  # the recorded config and plugin parameters, refused here: not the caller's mistake
        raise CheckpointError(
            f"{path} does not build with this ffablate {__version__} and the plugins installed here ({exc}); load it "
            f"with {_made_by(saved)}, which saved it, and the plugins it was trained with"
        ) from None
    state, own = saved["model"]["state_dict"], net.state_dict()
    problems = (
        [f"no saved {key!r}" for key in own if key not in state]
        + [f"a saved {key!r} it has no place for" for key in state if key not in own]
        + [
            f"{key!r} of shape {tuple(state[key].shape)}, not {tuple(own[key].shape)}"
            for key in own
            if key in state and state[key].shape != own[key].shape
        ]
    )
    if problems:
        raise CheckpointError(
            f"{path} does not fit the network this ffablate {__version__} builds from its config ({problems[0]}); "
            f"load it with {_made_by(saved)}, which saved it"
        )
    net.load_state_dict(state)
    return net


def check_plugins(path: Path, record: dict[str, dict[str, Any]], kinds: tuple[str, ...], plugins: Registry) -> None:
    """Each of the run's ``kinds`` plugins is installed here from the package, and at the version, the run used:
    another version's code may compute something else from the same weights. A module without a package version
    whose source changed since is a warning (nothing else can say which code it was)."""
    for kind in kinds:
        name, package, version = record[kind]["name"], record[kind]["package"], record[kind]["version"]
        trained = f"{path} was trained with the {kind} plugin {name!r} from {_origin(package, version)}"
        try:
            plugin = plugins.get(kind, name)
        except UnknownPlugin:
            raise CheckpointError(
                f"{trained}, which is not installed here: {_install_hint(package, version)}"
            ) from None
        installed = __version__ if plugin.source == "ffablate" else package_version(plugin.source)
        # A built-in's version is ffablate's: whether the network still fits is checked on its state.
        if plugin.source != package or (package != "ffablate" and installed != version):
            raise CheckpointError(
                f"{trained}, but the installed one is from {_origin(plugin.source, installed)}: "
                f"{_install_hint(package, version)} to use the model as it was trained"
            )
        # A module has no version to compare: its source file tells whether it was edited since.
        digest = record[kind].get("source_sha256")
        if digest and checkpoint.source_digest(plugin) != digest:
            warnings.warn(
                f"{trained}, whose source has changed since: the model may compute something else with it, and its "
                "accuracy differ from the recorded one; restore the module as it was to use the model as it was "
                "trained",
                FFablateWarning,
                stacklevel=3,
            )


def _origin(package: str, version: str | None) -> str:
    if package == "ffablate":
        return f"ffablate {version} (built-in)"
    return f"package {package} {version}" if version else f"module {package} (no package version)"


def _install_hint(package: str, version: str | None) -> str:
    if package == "ffablate":
        return f"use ffablate {version}, which has it"
    if version:
        return f"install it (`pip install {package}=={version}`)"
    return f"name its module {package} in FFABLATE_PLUGINS (or pass load_run a registry that has it)"
