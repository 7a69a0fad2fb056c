"""Built-in datasets: where each one's bytes come from and how they become uint8 (N, C, H, W) tensors.

Every factory is ``factory(roots, download, **params) -> ImageDataset`` (see ``ffablate.hookspecs``).
It looks in ``roots`` (the user's data root, torchvision layouts), then in the installed offline packages,
then downloads with torchvision when ``download`` is set, and otherwise raises ``DataNotFound`` naming all
the ways to get the data. Each factory also carries ``factory.locate(roots) -> (where_found | None, how)``
for ``ffablate data list``.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ffablate import hookimpl
from ffablate.data import (
    DATA_ENV,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_COARSE,
    FASHION_MNIST_FINE_TO_COARSE,
    IDX_FILES,
    ImageDataset,
    MalformedFile,
    cannot_read,
    idx_folder_complete,
    load_idx_split,
    missing_message,
    offline_dirs,
    offline_hint,
    teacher_student,
    with_hierarchy,
)
from ffablate.errors import ConfigError, DataError, DataNotFound, ParameterNeeded

# Called as locate(roots, **params): a locator that names parameters (imagefolder's path) gets a run's values of them.
Locate = Callable[..., tuple[str | None, str]]
DIGIT_NAMES = [str(d) for d in range(10)]


def _check_roots(roots: list[Path]) -> None:
    """A data root that is a file holds no dataset folder: every look-up in it would fail, and the dataset would
    come from an offline package instead, as if the root had not been given."""
    for root in roots:
        if root.is_file():
            raise DataError(f"--data-root {root} is a file; give a folder (or fix ${DATA_ENV}, if it came from there)")


def _with_locator(locate: Locate) -> Callable[[Callable[..., ImageDataset]], Callable[..., ImageDataset]]:
    """Attach ``locate`` as ``factory.locate``; both refuse a data root that is a file."""

    def attach(factory: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        @functools.wraps(factory)  # keeps the signature: the registry reads the parameters from it
        def checked(roots: list[Path], download: bool, **params: Any) -> ImageDataset:
            _check_roots(roots)
            return factory(roots, download, **params)

        @functools.wraps(locate)  # keeps the signature: list_datasets passes only the parameters it names
        def checked_locate(roots: list[Path], **params: Any) -> tuple[str | None, str]:
            _check_roots(roots)
            return locate(roots, **params)

        checked.locate = checked_locate  # type: ignore[attr-defined]
        return checked

    return attach


def _dataset(
    name: str, arrays: dict[str, np.ndarray], class_names: list[str], flips: bool, source: str
) -> ImageDataset:
    """Wrap numpy arrays (images already (N, C, H, W) uint8) as an ImageDataset of torch tensors."""
    return ImageDataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(arrays["train_x"], dtype=np.uint8)),
        train_y=torch.from_numpy(np.asarray(arrays["train_y"]).astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(arrays["test_x"], dtype=np.uint8)),
        test_y=torch.from_numpy(np.asarray(arrays["test_y"]).astype(np.int64)),
        num_classes=len(class_names),
        class_names=class_names,
        flips=flips,
        source=source,
    )


def _download(name: str, fetch: Callable[[Path], None], root: Path) -> None:
    """Run a torchvision download into ``root``; a network failure becomes one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot download {name!r}: --data-root {root} must be a writable folder ({exc.strerror}); give another"
        ) from None
    if not os.access(root, os.W_OK):
        raise DataError(
            f"cannot download {name!r}: --data-root {root} must be a writable folder (it is read-only); give another"
        )
    try:
        fetch(root)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... depending on the failure
        # torchvision puts the reason on the lines after "Error downloading x.gz:": keep them, on one line.
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataNotFound(
            f"downloading {name!r} into {root} failed ({reason}); put the files there by hand (docs/data.md lists "
            "where each dataset's files go) or see `ffablate data list`"
        ) from None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path, first: int = 0) -> None:
    """Every 0-based label must name a class; ``first`` is what the file stores for class 0, so the message quotes
    the file's own value. A stray label would otherwise surface much later as a bincount or index error."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise MalformedFile(
            f"{path}: label {int(bad[0]) + first} is outside {first}..{num_classes - 1 + first}; "
            "delete it and fetch it again"
        )


# ----------------------------------------------------------------------------------------------------
# MNIST family (IDX files)

_IDX_LIST = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())


def _idx_candidates(roots: list[Path], folder: str) -> list[Path]:
    # torchvision's layout first (<root>/MNIST/raw), then the files directly in <root>/MNIST.
    return [c for root in roots for c in (root / folder / "raw", root / folder)]


def _find_idx(name: str, roots: list[Path], folder: str) -> Path | None:
    for candidate in [*_idx_candidates(roots, folder), *offline_dirs(name)]:
        if idx_folder_complete(candidate):
            return candidate
    return None


def _idx_locator(name: str, folder: str) -> Locate:
    def locate(roots: list[Path]) -> tuple[str | None, str]:
        found = _find_idx(name, roots, folder)
        how = missing_message(name, f"{_IDX_LIST} under {roots[0] / folder / 'raw'}", offline_hint(name))
        return (str(found) if found else None), how

    return locate


def _load_idx_dataset(
    name: str,
    folder: str,
    tv_class: str,
    roots: list[Path],
    download: bool,
    class_names: list[str],
    flips: bool,
) -> ImageDataset:
    found = _find_idx(name, roots, folder)
    if found is None and download:

        def fetch(root: Path) -> None:
            import torchvision.datasets as tvd

            for train in (True, False):
                getattr(tvd, tv_class)(str(root), train=train, download=True)

        _download(name, fetch, roots[0])
        found = _find_idx(name, roots, folder)
    if found is None:
        raise DataNotFound(_idx_locator(name, folder)(roots)[1])
    arrays = load_idx_split(found, name)
    for key in ("train_x", "test_x"):
        arrays[key] = arrays[key][:, None]  # (N, H, W) -> (N, 1, H, W)
    return _dataset(name, arrays, class_names, flips, str(found))


@_with_locator(_idx_locator("fashion-mnist", "FashionMNIST"))
def load_fashion_mnist(roots: list[Path], download: bool) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey clothes; coarse labels tops/footwear/other."""
    ds = _load_idx_dataset(
        "fashion-mnist", "FashionMNIST", "FashionMNIST", roots, download, FASHION_MNIST_CLASSES, True
    )
    return with_hierarchy(ds, FASHION_MNIST_FINE_TO_COARSE, FASHION_MNIST_COARSE)


@_with_locator(_idx_locator("mnist", "MNIST"))
def load_mnist(roots: list[Path], download: bool) -> ImageDataset:
    """MNIST (LeCun et al. 1998): 60k/10k 28x28 handwritten digits. Flips change digits, so none."""
    return _load_idx_dataset("mnist", "MNIST", "MNIST", roots, download, DIGIT_NAMES, False)


# ----------------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits


def _locate_digits(roots: list[Path]) -> tuple[str | None, str]:
    spec = importlib.util.find_spec("sklearn")
    how = "pip install scikit-learn (the digits ship inside it)"
    if spec is None or not spec.submodule_search_locations:
        return None, how
    return str(Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"), how


@_with_locator(_locate_digits)
def load_digits(roots: list[Path], download: bool, n_test: int = 360, split_seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (UCI optdigits), split by a seeded permutation (1,437 / 360)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataNotFound("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    if not 0 < n_test < len(bunch.target):
        raise ConfigError(f"digits: n_test={n_test} must be between 1 and {len(bunch.target) - 1}")
    # Pixel values are counts 0..16; scale to the 0..255 range every other dataset uses.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed)).numpy()
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    arrays = {
        "train_x": images[train],
        "train_y": bunch.target[train],
        "test_x": images[test],
        "test_y": bunch.target[test],
    }
    ds = _dataset("digits", arrays, DIGIT_NAMES, False, _locate_digits(roots)[0] or "scikit-learn")
    # No crops: a 2 px shift of an 8 px image cost FF 1.8 pp (95% CI 1.1-2.5) and BP-DeepSup 0.6 pp (-0.4-1.6) of
    # test accuracy, paired over 5 seeds of the default recipe (docs/benchmarks.md, session 10).
    ds.crops = False
    return ds


# ----------------------------------------------------------------------------------------------------
# Teacher-student


@_with_locator(lambda roots: ("generated", "generated on the fly"))
def load_teacher_student(
    roots: list[Path],
    download: bool,
    k: int = 10,
    n_train: int = 10000,
    n_test: int = 2000,
    size: int = 16,
    channels: int = 1,
    teacher_seed: int = 0,
) -> ImageDataset:
    """Synthetic images labelled by a fixed random conv teacher into k balanced classes.

    ``load_dataset(classes=K)`` sets k. Deterministic per teacher_seed (teacher weights and images).
    """
    return teacher_student(k, n_train, n_test, size, channels, teacher_seed)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)


def _unpickle(path: Path, keys: list[str]) -> dict[str, Any]:
    """The dict pickled in ``path``, which must hold ``keys``."""
    # The same trust model as torchvision: files in the user's own data root are unpickled.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except OSError as exc:
        raise cannot_read(path, exc) from None
    except Exception as exc:  # a damaged pickle fails in many ways: unknown opcodes, modules, classes, sizes
        raise MalformedFile(
            f"{path}: not a CIFAR pickle ({type(exc).__name__}: {exc}); delete it and fetch it again"
        ) from None
    if not isinstance(obj, dict):
        raise MalformedFile(f"{path}: holds a {type(obj).__name__}, not a CIFAR dict; delete it and fetch it again")
    missing = [key for key in keys if key not in obj]
    if missing:
        raise MalformedFile(f"{path}: no {missing[0]!r} entry, not a CIFAR file; delete it and fetch it again")
    return obj


def _cifar_array(batch: dict[str, Any], key: str, dtype: type, path: Path) -> np.ndarray:
    """``batch[key]`` as ``dtype``: uint8 pixels as they are, labels of any integer type. A cast would have read
    int64 pixels modulo 256 and float labels truncated, as plausible data."""
    try:
        array = np.asarray(batch[key])
    except (TypeError, ValueError, OverflowError):
        array = None
    fits = array is not None and (array.dtype == dtype if dtype == np.uint8 else np.issubdtype(array.dtype, np.integer))
    if not fits:
        raise MalformedFile(f"{path}: {key!r} is not an array of {np.dtype(dtype).name}; delete it and fetch it again")
    return array.astype(dtype, copy=False)


def _cifar_batch(path: Path, label_keys: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images (N, 3, 32, 32) and, per key of ``label_keys``, N labels in 0..num_classes-1."""
    batch = _unpickle(path, ["data", *label_keys])
    data = _cifar_array(batch, "data", np.uint8, path)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise MalformedFile(f"{path}: expected 'data' of shape (N, 3072), got {data.shape}; fetch it again")
    labels = {}
    for key, num_classes in label_keys.items():
        y = _cifar_array(batch, key, np.int64, path)
        # A count that differs from the images' would pair every later image with the wrong label.
        if y.shape != (len(data),):
            raise MalformedFile(
                f"{path}: {len(data)} images but {key!r} holds {y.size} labels; delete it and fetch it again"
            )
        _check_labels(y, num_classes, path)
        labels[key] = y
    return data.reshape(-1, 3, 32, 32), labels


def _check_name_count(meta: Path, key: str, names: list[Any], expected: int) -> None:
    """The class count comes from the meta file: a wrong count would build a model of that many classes, or blame
    a good batch for labels outside the range."""
    if len(names) != expected:
        raise MalformedFile(f"{meta}: {len(names)} {key}, expected {expected}; delete it and fetch it again")


def _folder_locator(name: str, rel: str, files: list[str], what: str) -> Locate:
    """Found: the first ``root / rel`` that holds every one of ``files``. A folder that lacks some is not found,
    so ``--download`` repairs it and ``data list`` does not call it available; its message names what it lacks."""

    def locate(roots: list[Path]) -> tuple[str | None, str]:
        incomplete = []
        for folder in (root / rel for root in roots if (root / rel).is_dir()):
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return str(folder), f"found in {folder}"
            incomplete.append(f"{folder} lacks {', '.join(missing)}")
        if incomplete:
            return None, f"dataset {name!r} incomplete: {incomplete[0]}; put them there, or pass --download"
        return None, missing_message(name, f"{what} under {roots[0] / rel}", None)

    return locate


_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_CIFAR100_FILES = ["train", "test", "meta"]


def _resolve_folder(
    name: str, locate: Locate, roots: list[Path], download: bool, fetch: Callable[[Path], None]
) -> Path:
    found, how = locate(roots)
    if found is None and download:
        _download(name, fetch, roots[0])
        found, how = locate(roots)
    if found is None:
        raise DataNotFound(how)
    return Path(found)


def _tv_fetch(cls: str, **splits: Any) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        import torchvision.datasets as tvd

        for kwargs in splits.values():
            getattr(tvd, cls)(str(root), download=True, **kwargs)

    return fetch


_locate_cifar10 = _folder_locator(
    "cifar10", "cifar-10-batches-py", _CIFAR10_FILES, "data_batch_1..5, test_batch, batches.meta"
)


@_with_locator(_locate_cifar10)
def load_cifar10(roots: list[Path], download: bool) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 colour images, 10 classes."""
    fetch = _tv_fetch("CIFAR10", train={"train": True}, test={"train": False})
    folder = _resolve_folder("cifar10", _locate_cifar10, roots, download, fetch)
    names = list(_unpickle(folder / "batches.meta", ["label_names"])["label_names"])
    _check_name_count(folder / "batches.meta", "label_names", names, 10)
    classes = {"labels": len(names)}
    train = [_cifar_batch(folder / f"data_batch_{i}", classes) for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch", classes)
    arrays = {
        "train_x": np.concatenate([x for x, _ in train]),
        "train_y": np.concatenate([y["labels"] for _, y in train]),
        "test_x": test_x,
        "test_y": test_y["labels"],
    }
    return _dataset("cifar10", arrays, names, True, str(folder))


_locate_cifar100 = _folder_locator("cifar100", "cifar-100-python", _CIFAR100_FILES, "train, test, meta")


@_with_locator(_locate_cifar100)
def load_cifar100(roots: list[Path], download: bool) -> ImageDataset:
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 colour images, 100 fine classes in 20 superclasses."""
    fetch = _tv_fetch("CIFAR100", train={"train": True}, test={"train": False})
    folder = _resolve_folder("cifar100", _locate_cifar100, roots, download, fetch)
    meta = _unpickle(folder / "meta", ["fine_label_names", "coarse_label_names"])
    fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    _check_name_count(folder / "meta", "fine_label_names", fine_names, 100)
    _check_name_count(folder / "meta", "coarse_label_names", coarse_names, 20)
    classes = {"fine_labels": len(fine_names), "coarse_labels": len(coarse_names)}
    (train_x, train_y), (test_x, test_y) = (_cifar_batch(folder / f, classes) for f in ("train", "test"))
    arrays = {"train_x": train_x, "train_y": train_y["fine_labels"], "test_x": test_x, "test_y": test_y["fine_labels"]}
    ds = _dataset("cifar100", arrays, fine_names, True, str(folder))
    ds.coarse_train_y = torch.from_numpy(train_y["coarse_labels"])
    ds.coarse_test_y = torch.from_numpy(test_y["coarse_labels"])
    ds.coarse_names = coarse_names
    return ds


# ----------------------------------------------------------------------------------------------------
# SVHN (MATLAB files)


def _svhn_folder(roots: list[Path]) -> Path | None:
    # torchvision puts the .mat files directly in the root; a root/svhn folder is accepted as well.
    for root in roots:
        for folder in (root, root / "svhn"):
            if (folder / "train_32x32.mat").is_file() and (folder / "test_32x32.mat").is_file():
                return folder
    return None


def _locate_svhn(roots: list[Path]) -> tuple[str | None, str]:
    found = _svhn_folder(roots)
    return (str(found) if found else None), missing_message(
        "svhn", f"train_32x32.mat and test_32x32.mat in {roots[0]}", None
    )


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataNotFound("dataset 'svhn' reads MATLAB files with scipy: pip install scipy") from None
    try:
        mat = loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except OSError as exc:  # from opening it: scipy reports damaged bytes with other exceptions
        raise cannot_read(path, exc) from None
    except NotImplementedError:
        # scipy's own message points to h5py, but SVHN ships v5 files: this one is not the real download.
        raise MalformedFile(
            f"{path}: a MATLAB v7.3 (HDF5) file, not SVHN's v5 .mat; delete it and fetch it again"
        ) from None
    except Exception as exc:  # damaged .mat files fail in many ways (MatReadError, TypeError, IndexError, ...)
        raise MalformedFile(
            f"{path}: not an SVHN .mat file ({type(exc).__name__}: {exc}); delete it and fetch it again"
        ) from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or len(y) == 0 or x.dtype != np.uint8:
        raise MalformedFile(
            f"{path}: X is {x.dtype} of shape {x.shape}, expected uint8 (32, 32, 3, N) with N >= 1; fetch it again"
        )
    if not np.issubdtype(y.dtype, np.integer):  # a cast would have truncated 1.5 to the digit 1
        raise MalformedFile(f"{path}: y is {y.dtype}, expected integer labels 1..10; fetch it again")
    y = y.astype(np.int64)
    _check_labels(y - 1, 10, path, first=1)
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return np.transpose(x, (3, 2, 0, 1)), y  # (H, W, C, N) -> (N, C, H, W)


@_with_locator(_locate_svhn)
def load_svhn(roots: list[Path], download: bool) -> ImageDataset:
    """SVHN (Netzer et al. 2011): 73,257/26,032 32x32 house-number digits (the 'extra' split is not used)."""
    found = _svhn_folder(roots)
    if found is None and download:
        _download("svhn", _tv_fetch("SVHN", train={"split": "train"}, test={"split": "test"}), roots[0])
        found = _svhn_folder(roots)
    if found is None:
        raise DataNotFound(_locate_svhn(roots)[1])
    train_x, train_y = _read_svhn(found / "train_32x32.mat")
    test_x, test_y = _read_svhn(found / "test_32x32.mat")
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return _dataset("svhn", arrays, DIGIT_NAMES, False, str(found))


# ----------------------------------------------------------------------------------------------------
# STL-10 (raw binary)

_STL_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
_STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_locate_stl10 = _folder_locator("stl10", "stl10_binary", _STL_FILES, ", ".join(_STL_FILES))


def _read_stl(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x_file, y_file = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    try:
        x = np.fromfile(x_file, dtype=np.uint8)
        y = np.fromfile(y_file, dtype=np.uint8).astype(np.int64) - 1  # labels are 1..10
    except OSError as exc:
        raise cannot_read(exc.filename or folder, exc) from None
    image_bytes = 3 * 96 * 96
    # Each message names the file at fault: the one that is empty or holds part of an image; both when they
    # disagree, since either may be the short one.
    if len(y) == 0:
        raise MalformedFile(f"{y_file} holds no labels; delete it and fetch it again")
    if x.size % image_bytes:
        raise MalformedFile(f"{x_file} holds {x.size} bytes, not whole 3x96x96 images; delete it and fetch it again")
    if x.size != len(y) * image_bytes:
        raise MalformedFile(
            f"{x_file} holds {x.size // image_bytes} images but {y_file} holds {len(y)} labels; "
            "delete both and fetch them again"
        )
    _check_labels(y, num_classes, y_file, first=1)
    # Stored column-major per channel: transpose to (N, C, H, W) rows-first.
    return x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), y


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 500) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) images to size x size, back to uint8; ``chunk`` images at
    a time, so the float copies stay small (STL-10's 8,000 test images at once took about 1.2 GiB)."""
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].float()
        resized = torch.nn.functional.interpolate(part, size=(size, size), mode="bilinear", antialias=True)
        out[start : start + chunk] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


@_with_locator(_locate_stl10)
def load_stl10(roots: list[Path], download: bool, size: int = 96) -> ImageDataset:
    """STL-10 (Coates et al. 2011): the 5k/8k labelled 96x96 images, 10 classes; ``size`` resizes."""
    if size < 1:
        raise ConfigError(f"stl10: size={size}; give a positive image side in pixels (96 keeps the originals)")
    fetch = _tv_fetch("STL10", train={"split": "train"}, test={"split": "test"})
    folder = _resolve_folder("stl10", _locate_stl10, roots, download, fetch)
    names = _stl_names(folder / "class_names.txt")
    (train_x, train_y), (test_x, test_y) = (_read_stl(folder, split, len(names)) for split in ("train", "test"))
    ds = _dataset(
        "stl10",
        {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y},
        names,
        True,
        str(folder),
    )
    if size != 96:
        ds.train_x, ds.test_x = resize_uint8(ds.train_x, size), resize_uint8(ds.test_x, size)
    return ds


# ----------------------------------------------------------------------------------------------------
# Image folders

# torchvision's ImageFolder list, so that a folder it reads gives the same images here.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_SUFFIX_LIST = ", ".join(suffix[1:] for suffix in _IMAGE_SUFFIXES)


def _imagefolder_candidates(roots: list[Path], path: str) -> list[Path]:
    # Expanded first: "~/pets" is absolute once expanded, not a folder named "~" under the data root.
    expanded = Path(path).expanduser()
    return [expanded] if expanded.is_absolute() else [root / expanded for root in roots]


def _imagefolder_dir(roots: list[Path], path: str) -> Path | None:
    candidates = _imagefolder_candidates(roots, path)
    return next((c for c in candidates if (c / "train").is_dir() and (c / "test").is_dir()), None)


def _locate_imagefolder(roots: list[Path], path: str = "") -> tuple[str | None, str]:
    if not path:
        raise ParameterNeeded(
            "datasets.path",
            "dataset 'imagefolder' needs its path: --set datasets.path=DIR (DIR/train/<class>/*.png, "
            "DIR/test/<class>/*.png)",
        )
    found = _imagefolder_dir(roots, path)
    how = missing_message(
        "imagefolder",
        f"train/<class>/*.png and test/<class>/*.png under {_imagefolder_candidates(roots, path)[0]}",
        None,
        download=False,
    )
    return (str(found) if found else None), how


def _stl_names(names_file: Path) -> list[str]:
    """STL-10's ten class names, one per line as the real file has them (a name may hold spaces); the built-in
    list when the file is absent."""
    if not names_file.is_file():
        return _STL_CLASSES
    try:
        names = [n.strip() for n in names_file.read_text(encoding="utf-8").splitlines() if n.strip()]
    except OSError as exc:
        raise cannot_read(names_file, exc) from None
    except UnicodeDecodeError as exc:
        raise MalformedFile(f"{names_file}: cannot read it ({exc}); delete it and fetch it again") from None
    if len(names) != len(_STL_CLASSES):
        raise MalformedFile(
            f"{names_file}: {len(names)} class names, STL-10 has {len(_STL_CLASSES)}; delete it and fetch it again"
        )
    return names


# At size=0 the images keep their own size, and the models' first layer grows with it: a folder of 1500x1500
# photos asked for gigabytes of weights and activations and died of MemoryError. 256x256 is well above every
# built-in dataset's images (STL-10's are 96x96).
MAX_NATIVE_PIXELS = 256 * 256


def _to_8bit(img: Any, file: Path) -> Any:
    """``img`` in a mode that ``convert`` maps to 8 bits faithfully: Pillow clips 16-bit and 32-bit values to 255
    there, so a 16-bit PNG became a constant white image."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        # The top byte: 0..65535 -> 0..255, as torchvision's uint16 -> uint8 conversion does.
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        # 32-bit integers and floats come in no one range (0..1, 0..65535, raw sensor counts): any scale is a guess.
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(f"{file}: {kind} pixels (mode {img.mode}) have no one 8-bit scale; convert it to 8-bit first")
    return img


def _read_image(file: Path, mode: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        encoded = file.read_bytes()  # read here, so an unreadable file is not blamed on its bytes
    except OSError as exc:
        raise cannot_read(file, exc) from None
    try:
        with warnings.catch_warnings():
            # Pillow only warns, on two lines, of a size between MAX_IMAGE_PIXELS and twice that: refused like larger.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(encoded)) as img:
                if not size and img.width * img.height > MAX_NATIVE_PIXELS:
                    raise ConfigError(
                        f"imagefolder: {file} is {img.width}x{img.height}, over the {MAX_NATIVE_PIXELS:,} pixels "
                        "an image may keep at size=0; resize them with --set datasets.size=N (e.g. 64)"
                    )
                img = _to_8bit(img, file).convert(mode)
                if size:
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
    # Not only OSError: a damaged header can claim billions of pixels (DecompressionBombError), or break the
    # format's own parser (ValueError, SyntaxError).
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MalformedFile(f"{file}: cannot read the image ({exc}); remove or replace it") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _unreadable_folder(exc: OSError) -> NoReturn:
    """``os.walk``'s onerror: left to itself it skips a folder it cannot list, and a class loses its images."""
    raise DataError(f"cannot read folder {exc.filename} ({exc.strerror or exc}); fix its permissions")


def _class_folders(split: Path) -> list[str]:
    """The class sub-folders of a split, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) are no class."""
    try:
        return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        _unreadable_folder(exc)


def _images_in(folder: Path) -> list[Path]:
    """The images of a class folder, in sub-folders too, in torchvision's order (folder by folder, as sorted
    ``os.walk`` tuples, each folder's files sorted); hidden files and folders are left out.

    Each folder is read once, by its first path in a walk of sorted names: a link back up (``ln -s . loop``) read
    its images again at every level, 40 times over, and a link to a folder already read read them twice."""
    seen: set[tuple[int, int]] = set()
    listed = []
    for root, dirs, files in os.walk(folder, onerror=_unreadable_folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        listed.append((root, sorted(f for f in files if Path(f).suffix.lower() in _IMAGE_SUFFIXES and f[0] != ".")))
    return [Path(root, f) for root, files in sorted(listed) for f in files]


def _read_split(files: dict[str, list[Path]], mode: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``files`` (class -> its images, in label order) and their labels."""
    paths = [f for class_files in files.values() for f in class_files]
    images = [_read_image(f, mode, size) for f in paths]
    labels = [label for label, class_files in enumerate(files.values()) for _ in class_files]
    odd = next((i for i, im in enumerate(images) if im.shape != images[0].shape), None)
    if odd is not None:
        (h0, w0), (h, w) = images[0].shape[1:], images[odd].shape[1:]
        raise ConfigError(
            f"imagefolder: {paths[odd]} is {w}x{h}, {paths[0]} {w0}x{h0}; resize them all with --set datasets.size=N"
        )
    return np.stack(images), np.asarray(labels)


def _check_no_shared_images(train: dict[str, list[Path]], test: dict[str, list[Path]]) -> None:
    """A test image that is a training image (``ln -s train test``, or links to the same files) measures memory,
    not generalisation, and looks like a fine result."""
    trained = {os.path.realpath(f): f for files in train.values() for f in files}
    for f in (f for files in test.values() for f in files):
        same = trained.get(os.path.realpath(f))
        if same is not None:
            raise DataError(
                f"dataset 'imagefolder': test image {f} is the training image {same}; give test/ its own images"
            )


@_with_locator(_locate_imagefolder)
def load_imagefolder(
    roots: list[Path], download: bool, path: str = "", size: int = 0, channels: int = 3
) -> ImageDataset:
    """Your own images: <data root>/<path>/{train,test}/<class>/*.png|jpg|..., classes in sorted order; ``size``
    resizes to size x size, ``channels`` is 1 (grey) or 3 (RGB). Flips are assumed label-preserving."""
    if channels not in (1, 3):
        raise ConfigError(f"imagefolder: channels={channels}; use 1 (grey) or 3 (RGB)")
    if size < 0:
        raise ConfigError(f"imagefolder: size={size}; give a positive image side in pixels (0 keeps their own size)")
    found, how = _locate_imagefolder(roots, path)
    if found is None:
        raise DataNotFound(how)
    folder = Path(found)
    classes = _class_folders(folder / "train")
    train_files = {c: _images_in(folder / "train" / c) for c in classes}
    empty = [c for c in classes if not train_files[c]]
    if empty:
        # torchvision's ImageFolder refuses these too: an empty class is a logit no image can train.
        raise DataError(
            f"dataset 'imagefolder': class folder {folder / 'train' / empty[0]} holds no images ({_SUFFIX_LIST}); "
            "add its images or remove it"
        )
    if len(classes) < 2:
        # One class is learnt perfectly by answering it always: a 100% accuracy that measures nothing.
        raise DataError(
            f"dataset 'imagefolder': {folder / 'train'} has {len(classes)} class folder(s); "
            "give it at least 2 (one sub-folder of images per class)"
        )
    # The classes come from train/: a test class without one would silently lose its test images.
    test_classes = _class_folders(folder / "test")
    untrained = [c for c in test_classes if c not in classes]
    if untrained:
        raise DataError(
            f"dataset 'imagefolder': test class {untrained[0]!r} has no folder in {folder / 'train'}; "
            f"add its training images there or remove {folder / 'test' / untrained[0]}"
        )
    # And a trained class without test images would leave the test accuracy over fewer classes than were trained.
    test_files = {c: _images_in(folder / "test" / c) if c in test_classes else [] for c in classes}
    untested = [c for c in classes if not test_files[c]]
    if untested:
        raise DataError(
            f"dataset 'imagefolder': class {untested[0]!r} has no images in {folder / 'test' / untested[0]} "
            f"({_SUFFIX_LIST}); add its test images there or remove {folder / 'train' / untested[0]}"
        )
    _check_no_shared_images(train_files, test_files)
    mode = "L" if channels == 1 else "RGB"
    train_x, train_y = _read_split(train_files, mode, size)
    test_x, test_y = _read_split(test_files, mode, size)
    if test_x.shape[1:] != train_x.shape[1:]:
        raise ConfigError(
            f"imagefolder: test images are {test_x.shape[3]}x{test_x.shape[2]}, training ones "
            f"{train_x.shape[3]}x{train_x.shape[2]}; resize both with --set datasets.size=N"
        )
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return _dataset("imagefolder", arrays, classes, True, str(folder))


@hookimpl
def ffablate_register_datasets(register: Callable[..., None]) -> None:
    register("fashion-mnist", load_fashion_mnist, "Zalando's 28x28 clothing images, 10 classes (coarse: 3)")
    register("mnist", load_mnist, "LeCun's 28x28 handwritten digits, 10 classes")
    register("digits", load_digits, "scikit-learn's 1,797 8x8 digits, 10 classes (1,437/360 split)")
    register(
        "teacher-student",
        load_teacher_student,
        "synthetic images labelled by a fixed random conv teacher into k balanced classes",
    )
    register("cifar10", load_cifar10, "32x32 colour images, 10 classes (torchvision layout)")
    register("cifar100", load_cifar100, "32x32 colour images, 100 fine / 20 coarse classes (torchvision layout)")
    register("svhn", load_svhn, "32x32 street-view house-number digits, 10 classes (.mat files)")
    register("stl10", load_stl10, "96x96 colour images, 10 classes, labelled splits (stl10_binary)")
    register("imagefolder", load_imagefolder, "your images: <path>/{train,test}/<class>/*.png|jpg|...")
