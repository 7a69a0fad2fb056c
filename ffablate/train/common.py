"""What every trainer shares: seeding, data on the device, the optimizer recipe, timing, memory and results."""

from __future__ import annotations

import contextlib
import math
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ffablate import __version__, ops
from ffablate.config import RunConfig
from ffablate.data import DeviceLoader, ImageDataset, dataset_stats, limit_split, load_dataset
from ffablate.errors import ConfigError, FFablateError, PluginContractError
from ffablate.revision import source_revision

if TYPE_CHECKING:
    from ffablate.plugins import Registry

Progress = Callable[[int, int, dict[str, float]], None]
EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(FFablateError):
    """The loss became NaN or infinite; a study records the trial as failed with this message."""


@dataclass
class RunResult:
    test_accuracy: float
    per_layer_accuracy: list[float]  # on the test split
    train_seconds: float
    images_per_second: float  # (epochs x training images) / train_seconds, for every method and schedule alike
    peak_memory_bytes: int
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    kernel_backend: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    val_accuracy: float | None = None  # on the held-out training images, when the run has val_images
    data_source: str = ""  # where the dataset's bytes came from: a path, or how they were generated
    # CPU results depend on it: one and two threads round the convolutions differently (docs/studies.md).
    cpu_threads: int = 0
    plugin_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # every parameter, defaults included
    # Where each plugin from outside ffablate came from ({kind: "name from package 0.2.0"}): a plugin's code, like
    # its defaults, can change between versions while the run's config names it alike.
    plugin_sources: dict[str, str] = field(default_factory=dict)
    # What the run trained and scored on, after every option: limit_train above the split's size keeps the split,
    # and a dataset whose labels a shift or flip would change (digits, teacher-student) is never augmented.
    images: dict[str, int] = field(default_factory=dict)  # {"train": N, "val": N, "test": N}
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    image_shape: list[int] = field(default_factory=list)  # [C, H, W]
    augmentation: list[str] = field(default_factory=list)  # "crops", "flips": what the training loader applied

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda")
    # An indexed device: some CUDA calls (e.g. set_per_process_memory_fraction) refuse a bare "cuda".
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    dataset: ImageDataset
    train: DeviceLoader
    test: DeviceLoader
    val: DeviceLoader | None = None  # the held-out training images (config.val_images > 0)
    # The loaders' per-channel input normalization (``dataset_stats``; None: 0 and 1), kept for a checkpoint.
    mean: list[float] | None = None
    std: list[float] | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.dataset.train_x.shape[1:])  # type: ignore[return-value]


def load_run_dataset(
    config: RunConfig, data_root: str | None, download: bool, plugins: Registry | None = None
) -> ImageDataset:
    """The run's images as it trains and is scored on them: its dataset (from ``plugins``, else the installed
    plugins), classes, labels and limits applied."""
    ds = load_dataset(
        config.dataset,
        data_root=data_root,
        download=download,
        classes=config.classes,
        labels=config.labels,
        limit_train=config.limit_train,
        val_images=config.val_images,
        seed=config.seed,
        params=config.params_of("datasets"),
        plugins=plugins,
    )
    # The test subset's seed is fixed, not the run's: every run of a study, whatever its seed, is scored on the
    # same images, so FF and BP accuracies stay comparable.
    return limit_split(ds, "test", config.limit_test, seed=0)


EVAL_BATCH = 1000


def eval_loader(
    x: Tensor, y: Tensor, config: RunConfig, device: torch.device, mean: list[float] | None, std: list[float] | None
) -> DeviceLoader:
    """The loader a run scores ``x, y`` with (test or validation split): in order, unaugmented, EVAL_BATCH images a
    batch. ``ffablate evaluate`` scores a checkpoint through it too, so its batches are the run's."""
    return DeviceLoader(
        x, y, batch_size=EVAL_BATCH, shuffle=False, seed=config.seed, augment=False, device=device, mean=mean, std=std
    )


def prepare_data(
    config: RunConfig, device: torch.device, data_root: str | None, download: bool, plugins: Registry | None = None
) -> RunData:
    """Load the dataset once, move it to the device as uint8, and wrap train/test in device loaders."""
    ds = load_run_dataset(config, data_root, download, plugins)
    mean, std = dataset_stats(ds)
    train = DeviceLoader(
        ds.train_x,
        ds.train_y,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        augment=config.augment and (ds.crops or ds.flips),
        pad=None if ds.crops else 0,
        drop_last=True,
        device=device,
        mean=mean,
        std=std,
        flips=ds.flips,
    )
    test = eval_loader(ds.test_x, ds.test_y, config, device, mean, std)
    val = None
    if ds.val_x is not None and ds.val_y is not None:
        val = eval_loader(ds.val_x, ds.val_y, config, device, mean, std)
    if len(train) == 0:
        held = f" after holding out val_images={config.val_images}" if config.val_images else ""
        fix = "lower batch_size or hold out fewer (val_images)" if config.val_images else "lower batch_size"
        raise ConfigError(f"{len(ds.train_y)} training images{held} make no full batch of {config.batch_size}; {fix}")
    return RunData(ds, train, test, val, mean, std)


Evaluate = Callable[[DeviceLoader], tuple[float, list[float]]]


@torch.no_grad()
def evaluate(net: nn.Module, loader: DeviceLoader) -> tuple[float, list[float]]:
    """Accuracy of ``net.predict``'s logits and of each of its per-layer scores (FF: a block's class scores alone;
    BP: each head) on ``loader``'s images, in eval mode (the net's mode is restored). Every trainer's evaluation, and
    ``ffablate evaluate``'s of a checkpoint: one loop, so the two count alike."""
    correct, layer_correct, total = 0, [], 0
    with eval_mode(net):
        for x, y in loader:
            logits, per_layer = net.predict(x)
            correct += int((logits.argmax(1) == y).sum())
            hits = [int((s.argmax(1) == y).sum()) for s in per_layer]
            layer_correct = [a + b for a, b in zip(layer_correct, hits, strict=True)] if layer_correct else hits
            total += y.numel()
    return correct / total, [c / total for c in layer_correct]


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode (batch-norm on its running statistics, which stay as they are), its mode restored after:
    how evaluation, and ``SavedRun.predict``, score whatever mode the caller left the net in."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def epoch_scores(evaluate: Evaluate, data: RunData) -> dict[str, float]:
    """An epoch's accuracy: on the validation split when the run holds one out (what a study prunes on), else on
    the test split. The final evaluation (``finish``) scores both."""
    if data.val is not None:
        return {"val_accuracy": evaluate(data.val)[0]}
    return {"test_accuracy": evaluate(data.test)[0]}


def make_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
    """The one optimizer for FF and BP alike: AdamW, in its fused implementation (one kernel per step for all the
    parameters, on the CPU and CUDA). torch's default (a loop over the parameters on the CPU, a dozen multi-tensor
    launches on CUDA) spends host time that a small, host-bound step feels: 0.2-0.6 ms of a 4-6 ms batch-2 CPU
    step (docs/benchmarks.md, session 16).

    Weight decay shrinks only weight matrices and conv kernels (two or more dims). Biases, norm gains, a learned
    temperature's log T and the fusion's mixing scalars are left alone: decay would pull T toward floor + 1 and the
    fusion toward equal weights, priors no one chose, and FF has such scalars where BP has none."""
    params = list(params)
    groups = [{"params": params}]
    if config.weight_decay:  # two groups are two fused launches: only when decay is on
        kept = [p for p in params if p.dim() < 2]
        groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": kept, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # torch refuses an empty group
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero: the same schedule for every method."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(optimizers: list[torch.optim.Optimizer], config: RunConfig, step: int, total: int) -> None:
    lr = config.lr * lr_factor(step, total)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def checked_losses(
    losses: list[tuple[str, torch.Tensor]],
    temperatures: Sequence[tuple[str, torch.Tensor]] = (),
    builtin_temperatures: bool = False,
) -> list[float]:
    """The values of ``(where, loss)`` pairs, read with one host sync; raises TrainingDiverged naming the first
    that is NaN or infinite, then ``temperature_error`` for the first of the ``(who, T)`` device tensors
    (temperatures, read in the same sync) that ``bad_temperature`` refuses.

    One sync per step, not one per loss: on CUDA every sync drains the launch queue, and FF would pay it for
    each block. Trainers call this after the backward passes and before any optimizer step, so a diverged
    step updates no parameter.
    """
    tensors = [t.detach().float() for _, t in [*losses, *temperatures]]
    values = torch.stack(tensors).tolist()
    for (where, _), value in zip(losses, values[: len(losses)], strict=True):
        if not math.isfinite(value):
            check = ", or check the plugins named" if "plugin" in where else ""
            raise TrainingDiverged(f"loss became {value} at {where}; lower lr{check}")
    for (who, _), t in zip(temperatures, values[len(losses) :], strict=True):
        if bad_temperature(t, tensor=True):
            raise temperature_error(f"{who} returned T = {t}", builtin_temperatures)
    return values[: len(losses)]


def temperature_error(what: str, builtin: bool) -> FFablateError:
    """The error for a refused temperature, ``what`` saying whose and which. A built-in schedule's T leaves the
    positive numbers only as training diverges (a learned log T overflowing to inf), which a rerun repeats: the
    study records it and goes on. Another plugin's is that plugin's mistake, which a study stops on."""
    if builtin:
        return TrainingDiverged(f"{what}: the temperature diverged with training; lower lr")
    return PluginContractError(f"{what}; a temperature must be positive and finite")


def bad_temperature(t: float, tensor: bool) -> bool:
    """Whether a temperature's value is refused: zero, negative or infinite (a negative T trains toward the wrong
    labels, an infinite one not at all). A tensor's NaN passes: an adaptive T follows a diverging goodness there,
    and the diverged loss it makes names the block's plugins (TrainingDiverged, which a study records and goes on
    from); a number's NaN is the plugin's own."""
    return (t <= 0 or t == math.inf) if tensor else not (math.isfinite(t) and t > 0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU (bf16 is slow there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class MemoryMeter:
    """Peak memory of a run's training: CUDA's allocator peak on GPU; on CPU the process's peak RSS.

    Like ``Stopwatch``, it brackets each stretch of training (``with meter:``) and keeps the largest peak of them:
    the evaluations between epochs and at the end run at batch 1000 and would otherwise set the run's peak
    (a 2,000-image test split took FF's reported peak from 768 to 1,725 MiB).

    A study runs many trials in one process, so the CPU peak must be reset per stretch: Linux resets the RSS
    high-water mark (VmHWM) to the current RSS when "5" is written to /proc/self/clear_refs. Where that is impossible
    the process's lifetime peak (ru_maxrss) is all there is, and an earlier, larger run or evaluation shows through.
    """

    def __init__(self, device: torch.device):
        self.device, self._peak = device, 0
        self._resettable = device.type == "cuda" or _reset_rss_peak()

    def __enter__(self) -> MemoryMeter:
        """Start a stretch (not re-entrant: an inner stretch would reset the outer one's peak)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            # What an evaluation freed stays in glibc's heap, and so in RSS, unless handed back first: the reset
            # would then start the next stretch from the evaluation's level (852 vs 767 MiB in a review's run).
            _release_freed_heap()
            _reset_rss_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self._peak = max(self._peak, self._current_peak())

    def peak_bytes(self) -> int:
        """The largest peak of the stretches measured so far."""
        return self._peak

    def carry(self, peak: int) -> None:
        """Count an earlier session's peak (a resumed run's) among this meter's."""
        self._peak = max(self._peak, peak)

    def _current_peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._resettable:
            return _rss_peak_bytes()
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _release_freed_heap() -> None:
    """glibc's malloc_trim(0): give freed heap pages back to the OS (a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _glibc() -> Any:
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_peak_bytes() > 0
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    """VmHWM from /proc/self/status, in bytes (0 when absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Stopwatch:
    """Wall time of training alone (evaluation excluded), synchronized on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.total, self._start = device, 0.0, 0.0

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.total += time.perf_counter() - self._start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class TrainingState:
    """A run after a finished epoch: all that its continuation depends on, so that a run resumed from it (``ffablate
    train --resume``) goes on as if it had never stopped, bit for bit on the CPU.

    The tensors are the trainer's own (its parameters and optimizer moments, on the CPU not even copied): whoever
    keeps a state must write or copy it before training goes on, which keeps a per-epoch checkpoint cheap."""

    epochs_done: int  # finished epochs, every phase's counted: a greedy FF run has epochs x blocks in all
    epochs_total: int
    model: dict[str, Tensor]  # the network's state_dict
    optimizers: dict[str, dict[str, Any]]  # each optimizer's state_dict, by the trainer's name for it
    rng: dict[str, Any]  # ``random_state``: what negatives, augmentation-free plugins and the like draw from
    history: list[dict[str, float]]  # the per-epoch records so far (those on_epoch was there for)
    train_seconds: float  # summed over every session so far
    images: int  # counted as RunResult.images_per_second counts them
    peak_memory_bytes: int  # the largest of every session's


EpochKeeper = Callable[[TrainingState], None]


def random_state(device: torch.device) -> dict[str, Any]:
    """The global random streams a run draws from (torch's CPU and, on CUDA, the device's generator: random-label
    negatives, a plugin's dropout; Python's and NumPy's, which a plugin may use), in the plain types and tensors a
    checkpoint holds. The data order is not among them: the loaders seed each epoch from (seed, epoch)."""
    version, internal, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
    }


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back the streams ``random_state`` took."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )


class Session:
    """The training loop's bookkeeping for one process's stretch of a run: the whole run, or its rest resumed from a
    ``TrainingState``, whose clock, image count, memory peak and history it carries on. After each epoch
    (``end_epoch``) it records the epoch for ``on_epoch`` and hands ``keep`` the state to resume from."""

    def __init__(
        self,
        net: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        device: torch.device,
        epochs_total: int,
        resume: TrainingState | None = None,
    ):
        self.net, self.optimizers, self.device, self.epochs_total = net, optimizers, device, epochs_total
        self.watch, self.memory = Stopwatch(device), MemoryMeter(device)
        self.epochs_done, self.images, self.history = 0, 0, []
        if resume is not None:
            self._restore(resume)

    def _restore(self, state: TrainingState) -> None:
        if state.epochs_total != self.epochs_total or set(state.optimizers) != set(self.optimizers):
            raise ConfigError(
                f"the saved training state ({state.epochs_total} epochs, optimizers {sorted(state.optimizers)}) does "
                f"not fit this run ({self.epochs_total} epochs, optimizers {sorted(self.optimizers)}): resume it with "
                "the config it was saved with"
            )
        self.net.load_state_dict(state.model)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state.optimizers[name])
        set_random_state(state.rng, self.device)
        self.epochs_done, self.images, self.history = state.epochs_done, state.images, list(state.history)
        self.watch.total = state.train_seconds
        self.memory.carry(state.peak_memory_bytes)

    def pending(self, epoch: int) -> bool:
        """Whether the run's ``epoch``-th epoch (counted over every phase) is still to train: a resumed run skips
        the ones it has."""
        return epoch >= self.epochs_done

    def end_epoch(
        self,
        loss: float,
        evaluate: Evaluate,
        data: RunData,
        on_epoch: EpochCallback | None,
        keep: EpochKeeper | None,
    ) -> None:
        """The epoch is done: score it for ``on_epoch``, then let ``keep`` save the state, then call ``on_epoch``
        (a callback that stops the run, a pruned trial or a Ctrl-C, leaves this epoch kept)."""
        self.epochs_done += 1
        record = None
        if on_epoch:
            record = {"epoch": self.epochs_done - 1, "loss": loss, **epoch_scores(evaluate, data)}
            self.history.append(record)
        if keep:
            keep(self.state())
        if record is not None and on_epoch:
            on_epoch(record["epoch"], record)

    def state(self) -> TrainingState:
        """The state to resume from, taken after the epoch's evaluation: an evaluation draws no random number, but
        were one to, the resumed run would still draw what the uninterrupted run does next."""
        return TrainingState(
            epochs_done=self.epochs_done,
            epochs_total=self.epochs_total,
            model=self.net.state_dict(),
            optimizers={name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            rng=random_state(self.device),
            history=list(self.history),
            train_seconds=self.watch.total,
            images=self.images,
            peak_memory_bytes=self.memory.peak_bytes(),
        )

    def finish(self, config: RunConfig, evaluate: Evaluate, data: RunData) -> RunResult:
        return finish(config, evaluate, data, self.watch, self.images, self.memory, self.history, self.epochs_done)


def versions() -> dict[str, str]:
    return {
        "ffablate": __version__,
        "ffablate_commit": source_revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
    }


def finish(
    config: RunConfig,
    evaluate: Evaluate,
    data: RunData,
    watch: Stopwatch,
    images: int,
    memory: MemoryMeter,
    history: list[dict[str, float]],
    epochs_done: int,
) -> RunResult:
    """The run's result: the final evaluation on the test split (and the validation split), timing, memory."""
    accuracy, per_layer = evaluate(data.test)
    val = None
    if data.val is not None:
        # The last epoch's record scored this very model already, if there is one: a run resumed without on_epoch
        # has only the records of the session before, of an earlier model.
        scored = history and history[-1]["epoch"] == epochs_done - 1
        val = history[-1]["val_accuracy"] if scored else evaluate(data.val)[0]
    return RunResult(
        test_accuracy=accuracy,
        val_accuracy=val,
        per_layer_accuracy=per_layer,
        train_seconds=watch.total,
        images_per_second=images / watch.total if watch.total > 0 else 0.0,
        peak_memory_bytes=memory.peak_bytes(),
        config=config.to_dict(),
        history=history,
        kernel_backend=ops.backend(config.device),
        data_source=data.dataset.source,
        versions=versions(),
        cpu_threads=torch.get_num_threads(),
        images={"train": len(data.train.y), "val": len(data.val.y) if data.val else 0, "test": len(data.test.y)},
        num_classes=data.dataset.num_classes,
        class_names=list(data.dataset.class_names),
        image_shape=list(data.dataset.image_shape),
        augmentation=applied_augmentation(data.train),
    )


def applied_augmentation(loader: DeviceLoader) -> list[str]:
    """The augmentations ``loader`` applies: a crop where it pads (prepare_data sets pad 0 where shifts would change
    labels), a flip where flips keep them."""
    if not loader.augment:
        return []
    return [name for name, on in (("crops", loader.pad > 0), ("flips", loader.flips)) if on]
