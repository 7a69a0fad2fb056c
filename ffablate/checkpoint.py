"""The checkpoint file of ``ffablate train --save``: what rebuilds a trained network and feeds it data as its run did,
or, while the run is still training, what resumes it.

It holds plain types and tensors only, so ``torch.load(path, weights_only=True)`` reads it and loading runs no code
from the file. A checkpoint is a dict:

- ``format``, ``format_version``: ``"ffablate-checkpoint"``, and 1 for a finished run (its format has not changed
  since format 1, so an older ffablate reads it) or 2 for an unfinished one (``training`` below), which an older
  ffablate refuses, saying to upgrade. This ffablate reads both.
- ``ffablate``: ``{"version", "commit"}`` of the code that trained it (the commit "" for an installed copy).
- ``config``: the resolved run config as the run's JSON records it; ``plugin_params``: every parameter of every
  plugin the run used, defaults included (the network is rebuilt from these, so a changed default cannot move it).
- ``plugins``: ``{kind: {"name", "package", "version"}}`` for each plugin the run used ("ffablate" for built-ins); a
  plugin module without a package version (FFABLATE_PLUGINS) also has ``source_sha256``, its factory's source file's
  SHA-256, which tells a module edited since.
- ``data``: the dataset's name, ``num_classes``, ``class_names``, ``image_shape`` [C, H, W], the raw images' dtype
  (uint8), the per-channel ``mean`` and ``std`` (in [0, 1] units) the loaders normalize with, and the test split's
  size and SHA-256, to tell whether a re-evaluation scores the same images.
- ``model``: ``{"state_dict"}``, the network's complete state on the CPU (FF: blocks, norms, per-block temperature
  modules, fusion; BP: blocks, norms, heads; buffers such as batch-norm running statistics included).
- ``result``: the run's result record (what ``ffablate train --json`` prints, per-epoch history included); None in an
  unfinished checkpoint.
- ``training``, in an unfinished checkpoint only (format 2), which ``--save`` writes after every finished epoch and
  the finished checkpoint replaces at the end: ``epochs_done`` of ``epochs_total`` (every phase's epochs counted: a
  greedy FF run has epochs x blocks), ``optimizers`` (``{name: state_dict}``: FF's ``blocks`` and, with a fusion that
  has parameters, ``fusion``; BP's ``net``), ``rng`` (torch's CPU generator, the CUDA device's on CUDA, Python's and
  NumPy's, as ``train.common.random_state`` takes them), ``history`` (the per-epoch records so far),
  ``train_seconds`` (summed over the sessions so far), ``images``, ``peak_memory_bytes`` (the largest session's),
  ``data_source`` (where the run read its data, for a resume that cannot find them) and ``train_sha256`` (of the
  training and validation images and labels, which a resume must find as they were: ``data`` hashes only the test
  split), and ``threads``, torch's CPU thread count while it trained (``thread_change``). ``model`` then holds the
  network after the last finished epoch.
- ``study``, in a study trial's unfinished checkpoint only (``ffablate study --checkpoints DIR``): ``{"study",
  "config"}``, the study's name and the trial's config as the study resolved it (seed and overrides included),
  which say whose point the file is: a rerun resumes from it only when both are its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import inspect
import io
import os
import pickle
import secrets
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ffablate import __version__
from ffablate.config import RunConfig
from ffablate.errors import CheckpointError, first_line
from ffablate.plugins import Plugin, Registry, package_version
from ffablate.revision import source_revision

if TYPE_CHECKING:
    from ffablate.data import ImageDataset
    from ffablate.train import TrainedRun, TrainingState, Unfinished
    from ffablate.train.common import RunData

FORMAT = "ffablate-checkpoint"
FORMAT_VERSION = 2  # the newest this ffablate reads and writes
FINISHED_VERSION = 1  # a finished run's checkpoint: unchanged since format 1
UNFINISHED_VERSION = 2  # adds ``training``
KEYS = ("format", "format_version", "ffablate", "config", "plugin_params", "plugins", "data", "model", "result")
DATA_KEYS = ("dataset", "num_classes", "class_names", "image_shape", "mean", "std", "test_images", "test_sha256")
TRAINING_KEYS = (
    "epochs_done",
    "epochs_total",
    "optimizers",
    "rng",
    "history",
    "train_seconds",
    "images",
    "peak_memory_bytes",
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
WRITTEN_BY = "a file written by `ffablate train --save`"


def contents(trained: TrainedRun) -> dict[str, Any]:
    """The checkpoint of a finished run."""
    result, trainer = trained.result, trained.trainer
    record = run_record(trainer, trained.plugins, result.config, result.plugin_params, FINISHED_VERSION)
    return {**record, "result": plain(result.to_dict()), "model": {"state_dict": cpu_state(trainer.net.state_dict())}}


def run_record(
    trainer: Any, plugins: Registry, config: dict[str, Any], params: dict[str, dict[str, Any]], version: int
) -> dict[str, Any]:
    """Every part of a checkpoint that its run's training leaves as it is: the format, config, plugins and data."""
    return plain(
        {
            "format": FORMAT,
            "format_version": version,
            "ffablate": {"version": __version__, "commit": source_revision()},
            "config": dict(config),
            "plugin_params": {kind: dict(values) for kind, values in params.items()},
            "plugins": plugin_record(trainer.config, plugins, tuple(params)),
            "data": data_record(trainer.config.dataset, trainer.data),
        }
    )


def data_record(name: str, data: RunData) -> dict[str, Any]:
    """The ``data`` of a checkpoint: the dataset ``name`` as the run loaded it into ``data``."""
    ds = data.dataset
    return plain(
        {
            "dataset": name,
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "image_shape": list(ds.image_shape),
            "dtype": "uint8",
            "mean": data.mean,
            "std": data.std,
            "test_images": len(ds.test_y),
            "test_sha256": split_digest(ds.test_x, ds.test_y),
        }
    )


class EpochWriter:
    """``trained_run``'s ``keep`` for ``--save PATH``: after every finished epoch, the run's unfinished checkpoint
    replaces the file at ``path`` (``save``), from which ``ffablate train --resume PATH`` goes on. What the epoch
    does not change (the config, plugin and data records, with the test split's digest) is made once; each write is
    then the network's and optimizers' tensors. The finished checkpoint (``contents``) is the caller's to write.
    ``extra`` is more keys every write holds (a study trial's ``study``, which names its point)."""

    def __init__(self, path: str | Path, extra: dict[str, Any] | None = None):
        self.path = Path(path)
        self.extra = plain(extra or {})
        self.written: tuple[int, int] | None = None  # (epochs_done, epochs_total) of the last write
        self._record: dict[str, Any] | None = None
        self._train_digest = ""

    def __call__(self, run: Unfinished) -> None:
        if self._record is None:
            record = run_record(run.trainer, run.plugins, run.config, run.plugin_params, UNFINISHED_VERSION)
            self._record = {**record, **self.extra}
            self._train_digest = training_digest(run.trainer.data.dataset)
        state = run.state
        training = {
            "epochs_done": state.epochs_done,
            "epochs_total": state.epochs_total,
            "optimizers": {name: _cpu(optimizer) for name, optimizer in state.optimizers.items()},
            "rng": state.rng,
            "history": plain(state.history),
            "train_seconds": state.train_seconds,
            "images": state.images,
            "peak_memory_bytes": state.peak_memory_bytes,
            # Not resumed from, but told to a resume that cannot find the data: where the run read them.
            "data_source": run.trainer.data.dataset.source,
            "train_sha256": self._train_digest,
            "threads": torch.get_num_threads(),
        }
        model = {"state_dict": cpu_state(state.model)}
        save({**self._record, "result": None, "model": model, "training": training}, self.path)
        self.written = (state.epochs_done, state.epochs_total)


def _cpu(value: Any) -> Any:
    """An optimizer's state_dict with its tensors on the CPU (a CUDA run's moments), its containers as they are."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    return value


def unfinished(saved: dict[str, Any]) -> bool:
    """Whether ``saved`` (``read``'s) is the checkpoint of a run still training, which ``--resume`` goes on with."""
    return saved.get("training") is not None


def progress_of(saved: dict[str, Any]) -> str:
    """ "epoch 3 of 8" for an unfinished checkpoint (every phase's epochs counted)."""
    training = saved["training"]
    return f"epoch {training['epochs_done']} of {training['epochs_total']}"


def thread_change(saved: dict[str, Any]) -> tuple[int, int] | None:
    """(the CPU threads it trained at, this process's) where an unfinished CPU run's count differs here, else None.
    Another count splits the convolutions' sums otherwise, so a run resumed at it rounds differently from then on:
    its accuracy is the uninterrupted run's, within noise, but not its bits. None for a CUDA run, and for a
    checkpoint written before ffablate recorded the count."""
    began, now = saved["training"].get("threads"), torch.get_num_threads()
    if saved["config"].get("device") != "cpu" or not isinstance(began, int) or began == now:
        return None
    return began, now


def cpu_threads(n: int) -> str:
    """ "1 CPU thread", "2 CPU threads": ``thread_change``'s counts in a message."""
    return f"{n} CPU thread{'s' * (n != 1)}"


def training_state(saved: dict[str, Any]) -> TrainingState:
    """The ``TrainingState`` an unfinished checkpoint holds, for ``trained_run(resume=...)``."""
    from ffablate.train import TrainingState

    training = saved["training"]
    return TrainingState(model=saved["model"]["state_dict"], **{key: training[key] for key in TRAINING_KEYS})


def plain(value: Any) -> Any:
    """``value`` in the plain types ``weights_only`` loads, which refuses subclasses: torch's version string as a str,
    a NumPy scalar as a Python number, a tuple as a list, and anything else as its str() (as the run's JSON has it)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (bool, int, float, str):
        return value
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    return str(value)


def plugin_record(config: RunConfig, plugins: Registry, kinds: tuple[str, ...]) -> dict[str, dict[str, str | None]]:
    """``{kind: {"name", "package", "version"}}`` of the run's plugins: built-ins as ffablate's, a plugin module
    without a package with version None and its ``source_sha256`` (``source_digest``) instead."""
    record: dict[str, dict[str, str | None]] = {}
    for kind in kinds:
        plugin = plugins.get(kind, config.plugin_of(kind))
        version = __version__ if plugin.source == "ffablate" else package_version(plugin.source)
        record[kind] = {"name": plugin.name, "package": plugin.source, "version": version}
        if version is None:
            record[kind]["source_sha256"] = source_digest(plugin)
    return record


def source_digest(plugin: Plugin) -> str | None:
    """SHA-256 of the file that defines ``plugin``'s factory: a module's version, where it has no package's. None
    where no file defines it (a factory made in a notebook)."""
    try:
        file = inspect.getsourcefile(plugin.factory)
        return hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else None
    except (TypeError, OSError):
        return None


def split_digest(images: Tensor, labels: Tensor) -> str:
    """SHA-256 of a split's uint8 images and int64 labels."""
    digest = hashlib.sha256()
    _hash_split(digest, images, labels)
    return digest.hexdigest()


def training_digest(ds: ImageDataset) -> str:
    """SHA-256 of the images and labels a run trains on and holds out for validation (``ds`` as the run loaded it)."""
    digest = hashlib.sha256()
    _hash_split(digest, ds.train_x, ds.train_y)
    if ds.val_x is not None and ds.val_y is not None:
        _hash_split(digest, ds.val_x, ds.val_y)
    return digest.hexdigest()


def _hash_split(digest: Any, images: Tensor, labels: Tensor) -> None:
    digest.update(images.cpu().contiguous().numpy().tobytes())
    digest.update(labels.cpu().to(torch.int64).contiguous().numpy().tobytes())


def cpu_state(state: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """A network's state dict on the CPU, its per-module versions kept (``load_state_dict`` reads them)."""
    cpu = OrderedDict((key, value.detach().cpu()) for key, value in state.items())
    cpu._metadata = getattr(state, "_metadata", {})  # type: ignore[attr-defined]
    return cpu


def writable_target(path: str, option: str = "--save") -> Path:
    """``path`` as the file to write a checkpoint to, refused now, before training, where it could not be written: a
    folder, something other than a file (a pipe, a device), a folder that does not exist, or one this process cannot
    create a file in. The folder is tried with a file, not asked (``os.access``), since root is told yes about folders
    it cannot write (read-only mounts, /proc). A link is followed: the file is written where it points (the atomic
    rename would replace the link itself and leave the file it names as it was). ``option`` says where the path was
    given, for the messages."""
    if not path:
        raise CheckpointError(f"{option} is empty: give a file, e.g. {option} model.pt")
    target = Path(path).expanduser()
    if target.is_symlink():
        target = target.resolve()
    if target.is_dir():
        raise CheckpointError(f"{option} {path} is a folder; give a file in it, e.g. {option} {target / 'model.pt'}")
    if target.exists() and not target.is_file():
        raise CheckpointError(
            f"{option} {path} is not a regular file (a pipe, device or socket), which the checkpoint would replace; "
            f"give a file, e.g. {option} model.pt"
        )
    folder = target.parent
    if not folder.is_dir():
        raise CheckpointError(f"{option} {path}: the folder {folder} does not exist; create it or give another path")
    probe = _partial_path(target)  # the very name every write goes through: one too long for the folder fails here
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise CheckpointError(
                f"{option} {path}: the name is too long for this file system once a write's hidden partial file is "
                f"named from it ({len(probe.name)} characters); give a shorter name"
            ) from None
        raise CheckpointError(
            f"{option} {path}: cannot write in {folder} ({exc.strerror or exc}); give a writable folder"
        ) from None
    return target


def writable_folder(path: str, option: str = "--checkpoints", create: bool = True) -> Path:
    """``path`` as the folder to keep checkpoints in, made here if only it is missing, refused now, before anything
    trains, where it could not hold them: not a folder, its parent missing (a typo, not a folder to make a tree
    for), or one this process cannot create a file in (tried with a file, as ``writable_target`` does). With
    ``create`` False a missing folder is not made: its parent is tried instead, and nothing is left behind."""
    if not path:
        raise CheckpointError(f"{option} is empty: give a folder, e.g. {option} checkpoints")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{option} {path} is not a folder; give a folder (it is made if its parent exists)")
    if folder.parent.exists() and not folder.parent.is_dir():  # a file's name mistaken for a folder's
        raise CheckpointError(f"{option} {path}: {folder.parent} is not a folder; give a folder in a folder")
    if not folder.parent.is_dir():
        raise CheckpointError(f"{option} {path}: the folder {folder.parent} does not exist; create it or give another")
    try:
        if create:
            folder.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder if folder.is_dir() else folder.parent, prefix=".ffablate-probe-"):
            pass
    except OSError as exc:
        why = exc.strerror or exc
        raise CheckpointError(f"{option} {path}: cannot write in it ({why}); give a writable folder") from None
    return folder


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold ``path`` for this run while it trains into it, through a lock on a hidden ``.NAME.lock`` beside it
    (``flock``, released by the system even on a kill -9): a second run told to write the same file (a job array's
    shared ``--save``, a resume started twice) is refused at once instead of replacing the first's checkpoint epoch
    by epoch. A file system without locks is written to unguarded, as before."""
    lock_path = path.with_name(f".{path.name}.lock")
    fd = _lock(lock_path, path)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a read-only descriptor: the holder it names is a stale one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)


def _lock(lock_path: Path, path: Path) -> int | None:
    """An open descriptor of ``lock_path`` holding its exclusive lock; None where the file system has no locks."""
    for _ in range(100):  # a file system whose stat and fstat never agree gets no lock, not a hang
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: flock takes a read-only descriptor too
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:
                return None
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{path} is being trained into by another ffablate run (process {holder}): wait for it to end, or "
                "give this run another path"
            ) from None
        except OSError:  # no locks here (some network and FUSE file systems)
            os.close(fd)
            return None
        # The holder before us removes the file on release: a lock on the name's old file guards nothing.
        if _same_file(fd, lock_path):
            with contextlib.suppress(OSError):  # the umask's 0644 would leave the next user of a shared folder out
                os.fchmod(fd, 0o666)
            return fd
        os.close(fd)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees half a file; an old file at ``path`` stays
    whole until the new one is). Where that fails (a full disk), it is kept in the temp folder and a CheckpointError
    names the file: hours of training must not end with nothing. An unfinished run's write stops its training there:
    the error says to resume from the kept file."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    payload = buffer.getvalue()
    try:
        _write_atomically(payload, path)
    except OSError as exc:
        aside = Path(tempfile.gettempdir()) / f"ffablate-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.pt"
        failed = f"cannot write the checkpoint to {path} ({exc.strerror or exc})"
        try:
            _write_atomically(payload, aside)
        except OSError as aside_exc:
            lost = (
                f"the epochs since the last checkpoint in {path}, if one was written, are lost; free some space and "
                f"resume it (`ffablate train --resume {path}`) or train again"
                if unfinished(checkpoint)
                else "the trained model is lost; free some space and train again"
            )
            raise CheckpointError(f"{failed}, nor to {aside} ({aside_exc.strerror or aside_exc}): {lost}") from None
        then = (
            f"resume the run from it with `ffablate train --resume {aside}`"
            if unfinished(checkpoint)
            else "move it where you want it"
        )
        raise CheckpointError(f"{failed}; it is saved in {aside} instead: {then}") from None


def _write_atomically(payload: bytes, path: Path) -> None:
    """``payload`` to a new file beside ``path`` (same folder, so the rename stays on one file system), synced, then
    renamed onto ``path``. The new file gets the mode a plain write would (0666 less the umask)."""
    partial = _partial_path(path)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    _remove_orphans(path)


def _partial_path(path: Path) -> Path:
    """The hidden file a write to ``path`` goes through. Its name says which process on which host wrote it (the
    host by a digest of its name, which may be long), so that a later write can remove it if that process died
    mid-write."""
    return path.with_name(f".{path.name}.{os.getpid()}@{_host_tag()}.{secrets.token_hex(4)}.tmp")


@functools.cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _remove_orphans(path: Path) -> None:
    """Delete the partial files that writes to ``path`` left when their process was killed mid-write (kill -9, the
    machine's memory killer): each is as large as the checkpoint, and hidden. Only this host's, of processes that
    are gone: another host's process (a shared folder) may still be writing its own."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*@*.tmp"):
        writer = partial.name[len(path.name) + 2 : -len(".tmp")].rsplit(".", 1)[0]
        pid, _, on = writer.partition("@")
        if on == _host_tag() and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                partial.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def read(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True``; whatever keeps it from being one of this ffablate's
    is a CheckpointError saying what to do."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}: give {WRITTEN_BY}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder: give the checkpoint file in it") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions") from None
    if magic != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not an ffablate checkpoint (not a torch file): give {WRITTEN_BY}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not an ffablate checkpoint: it holds Python objects beyond plain data and tensors, which "
            f"torch.load(weights_only=True) refuses to run; give {WRITTEN_BY}"
        ) from None
    except Exception as exc:  # torch's reader on a cut or overwritten archive: RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{path} is damaged (torch cannot read it: {first_line(exc)}); copy it again if it was cut short, or "
            "train again with --save"
        ) from None
    return checked(checkpoint, path)


def checked(checkpoint: object, path: Path) -> dict[str, Any]:
    """``checkpoint`` if it is an ffablate checkpoint of a format this ffablate reads."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not an ffablate checkpoint: give {WRITTEN_BY}")
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path} has no valid format version ({version!r}): it is damaged; train again with --save"
        )
    if version > FORMAT_VERSION:
        writer = checkpoint.get("ffablate")
        by = f"ffablate {writer.get('version')}" if isinstance(writer, dict) else "a newer ffablate"
        raise CheckpointError(
            f"{path} has checkpoint format {version}, written by {by}; this ffablate {__version__} reads format "
            f"{FORMAT_VERSION} and older: upgrade ffablate"
        )
    data, model = checkpoint.get("data"), checkpoint.get("model")
    missing = [key for key in KEYS if key not in checkpoint]
    missing += [f"data.{key}" for key in DATA_KEYS if not (isinstance(data, dict) and key in data)]
    missing += [] if isinstance(model, dict) and "state_dict" in model else ["model.state_dict"]
    training = checkpoint.get("training")
    if training is not None:
        missing += [f"training.{key}" for key in TRAINING_KEYS if not (isinstance(training, dict) and key in training)]
    elif checkpoint.get("result") is None:
        missing.append("result")
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete ffablate checkpoint (no {missing[0]!r}); train again with --save"
        )
    return checkpoint
