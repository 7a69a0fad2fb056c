"""`ffablate train --save`, `ffablate.load_run` and `ffablate evaluate`: a saved model scores as its run did."""

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ffablate
from ffablate import checkpoint, hookimpl
from ffablate.cli import main
from ffablate.config import RunConfig
from ffablate.errors import CheckpointError, ConfigError, FFablateWarning
from ffablate.plugins import Registry, make_plugin_manager
from tests.conftest import FFABLATE_ENV

# scikit-learn's 8x8 digits: 400 training images, 200 test images, one epoch of a narrow CNN, in a second or two;
# small, large steps, so that every recipe learns something in that epoch.
DIGITS = [
    *("--dataset", "digits", "--epochs", "1", "--set", "limit_train=400", "--set", "limit_test=200"),
    *("--set", "batch_size=25", "--set", "lr=0.01", "--set", "channels=10,10", "--set", "strides=2,2"),
]
RECIPES = {
    "ff": [],
    # Label embedding (one pass per candidate label), with a learned per-block temperature and a fusion that has
    # state of its own, so that every part of FFNet's state is saved.
    "ff-label": [
        *("--set", "goodness=sumsq", "--set", "negatives=random-label", "--set", "loss=softplus-threshold"),
        *("--set", "temperature=learned", "--set", "fusion=learned-weights"),
    ],
    "bp-deepsup": ["--method", "bp-deepsup"],
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def json_of(argv: list[str]) -> dict:
    """The JSON `ffablate ARGV` prints (exit 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each recipe trained once with --save: {recipe: (checkpoint, the run's JSON)}. Module-scoped, so the
    environment is isolated here as conftest isolates each test's."""
    folder = tmp_path_factory.mktemp("saved")
    runs = {}
    with pytest.MonkeyPatch.context() as env:
        for name in FFABLATE_ENV:
            env.delenv(name, raising=False)
        env.setenv("FFABLATE_DATA", str(tmp_path_factory.mktemp("empty-data-root")))
        for recipe, args in RECIPES.items():
            path = folder / f"{recipe}.pt"
            runs[recipe] = (path, json_of(["train", *DIGITS, *args, "--save", str(path), "--json"]))
    return runs


@pytest.mark.parametrize("recipe", RECIPES)
def test_evaluate_reproduces_the_recorded_accuracy(saved_runs, recipe):
    path, run = saved_runs[recipe]
    assert run["checkpoint"] == str(path)
    scored = json_of(["evaluate", str(path), "--json"])
    assert scored["test_accuracy"] == run["test_accuracy"] == scored["recorded_test_accuracy"]
    assert scored["per_layer_accuracy"] == run["per_layer_accuracy"] == scored["recorded_per_layer_accuracy"]
    assert scored["images"] == run["images"]["test"] == 200
    assert scored["data_source"] == run["data_source"] and scored["kernel_backend"] == run["kernel_backend"]
    # It learned something: a model that predicts one class (accuracy 0.1) would reproduce its accuracy trivially.
    assert run["test_accuracy"] > 0.2


@pytest.mark.parametrize("recipe", RECIPES)
def test_predict_on_raw_test_images_agrees_with_evaluate(saved_runs, recipe):
    path, run = saved_runs[recipe]
    rng = torch.get_rng_state()
    saved = ffablate.load_run(path)
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding drew initial weights from a stream of its own
    assert not saved.model.training and saved.config == RunConfig().with_updates(run["config"])
    assert (saved.dataset.num_classes, saved.dataset.image_shape) == (10, (1, 8, 8))
    ds = saved.test_split()
    assert ds.test_x.dtype == torch.uint8  # what predict takes: the dataset's raw pixels
    predicted = saved.predict(ds.test_x)
    assert predicted.logits.shape == (200, 10) and torch.equal(predicted.labels, predicted.logits.argmax(1))
    assert int((predicted.labels == ds.test_y).sum()) / 200 == run["test_accuracy"]
    per_layer = [int((s.argmax(1) == ds.test_y).sum()) / 200 for s in predicted.per_layer]
    assert per_layer == run["per_layer_accuracy"]
    assert torch.equal(saved.predict(ds.test_x.numpy()).logits, predicted.logits)
    # One image alone is one batch of one: the same scores up to the rounding of another batch size.
    one = saved.predict(ds.test_x[3])
    assert one.logits.shape == (1, 10) and torch.allclose(one.logits[0], predicted.logits[3], rtol=1e-4, atol=1e-4)


def test_predict_refuses_normalized_or_misshapen_images(saved_runs):
    saved = ffablate.load_run(saved_runs["ff"][0])
    with pytest.raises(ConfigError, match=r"raw uint8 images .* got torch.float32"):
        saved.predict(torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"shape \(N, 1, 8, 8\) .* got \(2, 1, 28, 28\)"):
        saved.predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="got a list"):
        saved.predict([[0]])


def test_the_checkpoint_holds_plain_data_and_the_whole_model(saved_runs):
    path, run = saved_runs["ff-label"]
    saved = torch.load(path, weights_only=True)
    assert (saved["format"], saved["format_version"]) == ("ffablate-checkpoint", 1)
    assert saved["ffablate"] == {"version": ffablate.__version__, "commit": run["versions"]["ffablate_commit"]}
    assert saved["config"] == run["config"] and saved["plugin_params"] == run["plugin_params"]
    assert {k: v for k, v in saved["result"].items() if k != "history"} == {
        k: v for k, v in run.items() if k != "checkpoint"
    }
    assert saved["plugins"]["goodness"] == {"name": "sumsq", "package": "ffablate", "version": ffablate.__version__}
    data = saved["data"]
    assert (data["num_classes"], data["image_shape"]) == (10, [1, 8, 8]) and data["class_names"][9] == "9"
    assert data["dtype"] == "uint8" and len(data["mean"]) == len(data["std"]) == 1 and data["test_images"] == 200
    state = saved["model"]["state_dict"]
    for key in ("backbone.blocks.1.0.weight", "backbone.norms.1.bn2d.running_var", "temperatures.1.log_t"):
        assert key in state
    assert "fusion.logits" in state and "fusion.scale" in state
    bp = torch.load(saved_runs["bp-deepsup"][0], weights_only=True)["model"]["state_dict"]
    assert "heads.0.weight" in bp and "heads.1.bias" in bp and "backbone.norms.0.bn2d.running_mean" in bp


class _Goodness:
    @hookimpl
    def ffablate_register_goodness(self, register):
        register("outside", lambda: None, "a plugin from outside ffablate")


def test_an_outside_plugin_is_recorded_with_its_package_and_version():
    plugins = Registry(make_plugin_manager((_Goodness(),)))
    config = RunConfig().with_updates({"goodness": "outside"})
    record = checkpoint.plugin_record(config, plugins, ("goodness", "norm"))
    # No package version to tell a module edited since training: the digest of the file that defines the factory.
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert record["goodness"] == {
        "name": "outside",
        "package": f"{__name__}._Goodness",
        "version": None,
        "source_sha256": digest,
    }
    assert record["norm"]["package"] == "ffablate"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("missing/model.pt", "the folder {tmp}/missing does not exist"),
        (".", "is a folder; give a file in it"),
        ("", "--save is empty"),
    ],
)
def test_a_save_path_that_cannot_be_written_fails_before_training(capsys, monkeypatch, tmp_path, where, expected):
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    path = str(tmp_path / where) if where else ""
    assert main(["train", *DIGITS, "--save", path]) == 2
    assert expected.format(tmp=tmp_path) in one_line_error(capsys)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_no_one_can_write_fails_before_training(capsys, monkeypatch):
    # /proc refuses new files even to root, whom os.access would tell yes.
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    assert main(["train", *DIGITS, "--save", "/proc/model.pt"]) == 2
    assert "cannot write in /proc" in one_line_error(capsys)


def test_a_checkpoint_that_cannot_be_written_is_kept_in_the_temp_folder(capsys, monkeypatch, tmp_path):
    target, aside = tmp_path / "out" / "model.pt", tmp_path / "tmp"
    target.parent.mkdir()
    aside.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(aside))
    write = checkpoint._write_atomically
    writes = []

    def disk_full_after_the_epochs(payload: bytes, path: Path) -> None:
        # The one epoch's resumable checkpoint is written; the disk is full when the finished one comes.
        writes.append(path)
        if path.parent == target.parent and len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(payload, path)

    monkeypatch.setattr(checkpoint, "_write_atomically", disk_full_after_the_epochs)
    assert main(["train", *DIGITS, "--set", "limit_train=100", "--save", str(target), "--json"]) == 2
    captured = capsys.readouterr()
    run = json.loads(captured.out)  # the result is printed before the error
    assert "checkpoint" not in run
    assert checkpoint.unfinished(checkpoint.read(target))  # what the epoch left: resumable, never a half file
    (kept,) = aside.glob("ffablate-*.pt")
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and f"saved in {kept} instead" in err
    assert ffablate.load_run(kept).result["test_accuracy"] == run["test_accuracy"]
    # Every epoch done: resuming it only scores the model, as the run did.
    monkeypatch.setattr(checkpoint, "_write_atomically", write)
    assert json_of(["train", "--resume", str(target), "--json"])["test_accuracy"] == run["test_accuracy"]


def test_an_epoch_checkpoint_that_cannot_be_written_stops_the_run_resumably(capsys, monkeypatch, tmp_path):
    # Training on with no checkpoint would lose every epoch from there to an interruption without a word.
    target, aside = tmp_path / "out" / "model.pt", tmp_path / "tmp"
    target.parent.mkdir()
    aside.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(aside))
    write = checkpoint._write_atomically

    def disk_full_at_target(payload: bytes, path: Path) -> None:
        if path.parent == target.parent:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(payload, path)

    monkeypatch.setattr(checkpoint, "_write_atomically", disk_full_at_target)
    assert main(["train", *DIGITS, "--epochs", "2", "--set", "limit_train=100", "--save", str(target)]) == 2
    (kept,) = aside.glob("ffablate-*.pt")
    err = one_line_error(capsys)
    assert f"saved in {kept} instead: resume the run from it with `ffablate train --resume {kept}`" in err
    assert not target.exists() and checkpoint.progress_of(checkpoint.read(kept)) == "epoch 1 of 2"
    monkeypatch.setattr(checkpoint, "_write_atomically", write)
    assert json_of(["train", "--resume", str(kept), "--json"])["checkpoint"] == str(kept)
    assert not checkpoint.unfinished(checkpoint.read(kept))


def rewritten(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the checkpoint ``source`` at ``target``, ``change``d."""
    saved = torch.load(source, weights_only=True)
    change(saved)
    torch.save(saved, target)
    return target


def foreign_goodness(saved: dict) -> None:
    saved["plugins"]["goodness"] = {"name": "power", "package": "ffablate-power", "version": "0.2.0"}


def other_package(saved: dict) -> None:
    saved["plugins"]["goodness"] = {"name": "classwise", "package": "ffablate-classwise", "version": "1.0"}


def newer_format(saved: dict) -> None:
    saved["format_version"] = checkpoint.FORMAT_VERSION + 1


def fewer_blocks(saved: dict) -> None:
    del saved["model"]["state_dict"]["backbone.blocks.1.0.weight"]


def test_bad_checkpoints_are_one_line_errors(capsys, saved_runs, tmp_path):
    good = saved_runs["ff"][0]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a model\n")
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    code = tmp_path / "code.pt"
    torch.save({"format": "ffablate-checkpoint", "object": Path("x")}, code)
    cases = [
        (tmp_path / "nothing.pt", "no checkpoint at"),
        (tmp_path, "is a folder"),
        (cut, "is damaged (torch cannot read it"),
        (text, "is not an ffablate checkpoint (not a torch file)"),
        (other, "is a torch file but not an ffablate checkpoint"),
        (code, "holds Python objects beyond plain data and tensors"),
        (
            rewritten(good, tmp_path / "plugin.pt", foreign_goodness),
            "trained with the goodness plugin 'power' from package ffablate-power 0.2.0, which is not installed here: "
            "install it (`pip install ffablate-power==0.2.0`)",
        ),
        (
            rewritten(good, tmp_path / "package.pt", other_package),
            f"but the installed one is from ffablate {ffablate.__version__} (built-in): install it (`pip install "
            "ffablate-classwise==1.0`)",
        ),
        (
            rewritten(good, tmp_path / "newer.pt", newer_format),
            f"has checkpoint format {checkpoint.FORMAT_VERSION + 1}, written by ffablate {ffablate.__version__}; this "
            f"ffablate {ffablate.__version__} reads format {checkpoint.FORMAT_VERSION} and older",
        ),
        (rewritten(good, tmp_path / "blocks.pt", fewer_blocks), "no saved 'backbone.blocks.1.0.weight'"),
    ]
    for path, expected in cases:
        assert main(["evaluate", str(path)]) == 2, path
        assert expected in one_line_error(capsys), path
    with pytest.raises(CheckpointError, match="upgrade ffablate"):
        ffablate.load_run(tmp_path / "newer.pt")


def test_a_plugin_of_another_version_is_refused(saved_runs, tmp_path, monkeypatch):
    plugins = Registry(make_plugin_manager((_Goodness(),)))
    source = f"{__name__}._Goodness"

    def outside_goodness(saved: dict) -> None:
        saved["config"]["goodness"] = "outside"
        saved["plugins"]["goodness"] = {"name": "outside", "package": source, "version": "0.2.0"}

    path = rewritten(saved_runs["ff"][0], tmp_path / "outside.pt", outside_goodness)
    monkeypatch.setattr("ffablate.saved.package_version", lambda package: "0.3.0" if package == source else None)
    with pytest.raises(CheckpointError) as refused:
        ffablate.load_run(path, plugins=plugins)
    assert str(refused.value) == (
        f"{path} was trained with the goodness plugin 'outside' from package {source} 0.2.0, but the installed one is "
        f"from package {source} 0.3.0: install it (`pip install {source}==0.2.0`) to use the model as it was trained"
    )


def test_evaluate_prints_a_table(capsys, saved_runs):
    path, run = saved_runs["bp-deepsup"]
    assert main(["evaluate", str(path)]) == 0
    out = capsys.readouterr().out
    recorded = next(line for line in out.splitlines() if "recorded at training" in line)
    assert f"{run['test_accuracy']:.4f}" in recorded
    assert " ".join(f"{a:.3f}" for a in run["per_layer_accuracy"]) in recorded
    assert f"data: {run['data_source']}" in out
    assert "note:" not in out  # scored on the run's own device


def test_evaluate_on_another_device_than_the_run_says_so(capsys, saved_runs):
    path, _ = saved_runs["bp-deepsup"]
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["device"] = "cuda"  # as a GPU run records it; the weights score the same on the CPU
    moved = path.with_name("moved.pt")
    torch.save(checkpoint, moved)
    assert main(["evaluate", str(moved), "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert (fields["device"], fields["recorded_device"]) == ("cpu", "cuda")
    assert main(["evaluate", str(moved)]) == 0
    assert "note: the run was scored on cuda; this is cpu" in capsys.readouterr().out


def test_predict_scores_in_eval_mode_whatever_mode_the_model_is_in(saved_runs):
    # predict scored a model put in training mode (to fine-tune it, say) with the batch's own statistics, and moved
    # its batch-norm running statistics: evaluate then no longer gave the recorded accuracy.
    path, run = saved_runs["bp-deepsup"]
    saved = ffablate.load_run(path)
    images = saved.test_split().test_x
    want = saved.predict(images).logits
    state = {key: value.clone() for key, value in saved.model.state_dict().items()}
    saved.model.train()
    assert torch.equal(saved.predict(images).logits, want)
    assert saved.model.training  # its mode is given back
    assert all(torch.equal(value, state[key]) for key, value in saved.model.state_dict().items())
    assert saved.evaluate().test_accuracy == run["test_accuracy"]


def test_save_through_a_link_writes_the_linked_file(tmp_path):
    # The atomic rename replaced the link itself with a new file: the file it pointed to kept the old model.
    (tmp_path / "models").mkdir()
    linked = tmp_path / "models" / "latest.pt"
    linked.write_bytes(b"an older model")
    link = tmp_path / "model.pt"
    link.symlink_to(linked)
    run = json_of(["train", *DIGITS, "--set", "limit_train=100", "--save", str(link), "--json"])
    assert link.is_symlink() and run["checkpoint"] == str(linked)
    assert ffablate.load_run(link).result["test_accuracy"] == run["test_accuracy"]


def test_a_write_removes_what_a_write_killed_mid_way_left(tmp_path):
    # A kill -9 between the partial file's creation and its rename left a hidden copy of the checkpoint for good.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = checkpoint._host_tag()
    path = tmp_path / "run.pt"
    left = {
        "killed": tmp_path / f".run.pt.{dead.pid}@{host}.0badf00d.tmp",
        "alive": tmp_path / f".run.pt.{os.getpid()}@{host}.0badf00d.tmp",  # a write under way
        "elsewhere": tmp_path / f".run.pt.{dead.pid}@another-host.0badf00d.tmp",  # a shared folder: not ours to judge
        "other file": tmp_path / f".other.pt.{dead.pid}@{host}.0badf00d.tmp",
    }
    for partial in left.values():
        partial.write_bytes(b"half a checkpoint")
    checkpoint.save({"a": torch.ones(2)}, path)
    assert {name for name, partial in left.items() if partial.exists()} == {"alive", "elsewhere", "other file"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.pt")) == sorted(
        left[name].name for name in ("alive", "elsewhere")
    )  # and none of its own
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_a_save_name_too_long_for_the_writes_partial_file_fails_before_training(capsys, monkeypatch, tmp_path):
    # The name fits, but the hidden partial file every write goes through is longer: the first epoch's write failed.
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    path = tmp_path / ("m" * 240 + ".pt")
    assert main(["train", *DIGITS, "--save", str(path)]) == 2
    err = one_line_error(capsys)
    assert "the name is too long for this file system once a write's hidden partial file is named" in err
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_pipe_or_device_fails_before_training(capsys, monkeypatch, tmp_path):
    # It was renamed over: a named pipe (or, for root, a device such as /dev/null) became a regular file.
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert main(["train", *DIGITS, "--save", str(pipe)]) == 2
    assert f"--save {pipe} is not a regular file" in one_line_error(capsys)
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_a_recorded_plugin_parameter_the_plugin_no_longer_takes_names_the_checkpoint(capsys, saved_runs, tmp_path):
    # A plugin whose parameter was renamed since (a built-in in a later ffablate, a module in FFABLATE_PLUGINS) said
    # "temperature plugin 'constant' has no parameter 'start'", as if the user had --set it.
    def renamed(saved: dict) -> None:
        saved["plugin_params"]["temperature"] = {"start": 0.3}

    path = rewritten(saved_runs["ff"][0], tmp_path / "renamed.pt", renamed)
    assert main(["evaluate", str(path)]) == 2
    err = one_line_error(capsys)
    assert f"{path} does not build with this ffablate" in err and "has no parameter 'start'" in err
    assert f"load it with ffablate {ffablate.__version__}" in err


def test_evaluate_without_the_runs_data_root_says_where_the_run_read_its_data(capsys, tmp_path):
    # It said only where this ffablate looks by default, and to --download: not that the run's data were elsewhere.
    from tests.test_cli import write_imagefolder

    write_imagefolder(tmp_path / "data" / "pets")
    path = tmp_path / "pets.pt"
    args = ["--dataset", "imagefolder", "--set", "datasets.path=pets", "--data-root", str(tmp_path / "data")]
    train = [
        "train",
        *args,
        "--set",
        "datasets.size=8",
        "--epochs",
        "1",
        "--set",
        "batch_size=4",
        "--set",
        "channels=4,4",
        "--set",
        "strides=2,2",
    ]
    run = json_of([*train, "--save", str(path), "--json"])
    assert (
        json_of(["evaluate", str(path), "--data-root", str(tmp_path / "data"), "--json"])["test_accuracy"]
        == (run["test_accuracy"])
    )
    assert main(["evaluate", str(path)]) == 2
    err = one_line_error(capsys)
    assert "dataset 'imagefolder' not found" in err and f"the run read it from {tmp_path / 'data' / 'pets'}" in err
    # predict takes images at the run's size, and says which size that was and where it came from.
    with pytest.raises(ConfigError, match=r"got \(1, 3, 16, 16\) \(the run's images were 8x8, datasets.size=8"):
        ffablate.load_run(path).predict(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


SCALED_SUM = """
import torch
from torch import nn
from ffablate import hookimpl


class ScaledSum(nn.Module):
    def __init__(self, num_layers, num_classes, feature_dims):
        super().__init__()
        self.w = nn.Parameter(torch.ones(num_layers))

    def forward(self, scores, features):
        return sum(SIGN * w * s for w, s in zip(self.w, scores))

    def loss(self, scores, features, labels):
        return nn.functional.cross_entropy(self(scores, features), labels)


@hookimpl
def ffablate_register_fusion(register):
    register("scaled-sum", ScaledSum, "a weighted sum of the blocks' scores")
"""


def test_a_plugin_module_edited_since_training_is_a_warning(monkeypatch, tmp_path, recwarn):
    # A module named in FFABLATE_PLUGINS has no package version to compare: edited after training (here its
    # fusion's sign flipped), evaluate scored the model with the new code and said nothing.
    import importlib

    from ffablate.plugins import add_plugin, remove_plugin

    source = tmp_path / "save_test_fusion.py"
    source.write_text(SCALED_SUM.replace("SIGN", "1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "save_test_fusion", raising=False)
    module = importlib.import_module("save_test_fusion")
    add_plugin(module)
    try:
        path = tmp_path / "model.pt"
        run = json_of(["train", *DIGITS, "--set", "fusion=scaled-sum", "--save", str(path), "--json"])
        assert json_of(["evaluate", str(path), "--json"])["test_accuracy"] == run["test_accuracy"]
        assert not [w for w in recwarn if "changed since" in str(w.message)]
        source.write_text(SCALED_SUM.replace("SIGN", "-1"))
        importlib.reload(module)
        remove_plugin(module)  # registered again: the registry holds the factories it found
        add_plugin(module)
        with pytest.warns(FFablateWarning, match=r"'scaled-sum' from module save_test_fusion .*changed since"):
            scored = json_of(["evaluate", str(path), "--json"])
        assert scored["test_accuracy"] != run["test_accuracy"]
    finally:
        remove_plugin(module)
        sys.modules.pop("save_test_fusion", None)


# Resuming: a run stopped after an epoch and resumed is the run that never stopped, bit for bit on the CPU.
RESUMED = {
    "ff": [],
    # One phase per block: the stops fall inside the first phase and on the boundary between the two.
    "ff-greedy": ["--set", "schedule=greedy"],
    # Random negatives (torch's global stream), a learned T and fusion weights with an optimizer of their own.
    "ff-label": RECIPES["ff-label"],
    "bp-deepsup": ["--method", "bp-deepsup"],
}


def _config(args: list[str]) -> RunConfig:
    """The RunConfig `ffablate train ARGS` trains."""
    from ffablate.cli import build_parser, run_config_from_args

    return run_config_from_args(build_parser().parse_args(["train", *args]))


class _Stop:
    """An on_epoch that records each epoch and interrupts the run after the epochs in ``after`` (as Ctrl-C would)."""

    def __init__(self, *after: int):
        self.after, self.records = set(after), []

    def __call__(self, epoch: int, record: dict) -> None:
        self.records.append(record)
        if epoch in self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("recipe", RESUMED)
def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit(recipe, tmp_path):
    from ffablate.train import trained_run

    config = _config([*DIGITS, "--epochs", "2", *RESUMED[recipe]])
    whole = trained_run(config, on_epoch=_Stop())
    path = tmp_path / "run.pt"
    writer = checkpoint.EpochWriter(path)
    # Greedy has 4 epochs in all (2 per block): stopped after the first, resumed, stopped again between the phases.
    stops = (0, 1) if recipe == "ff-greedy" else (0,)
    with pytest.raises(KeyboardInterrupt):
        trained_run(config, on_epoch=_Stop(*stops), keep=writer)
    for stop in stops[1:]:
        with pytest.raises(KeyboardInterrupt):
            ffablate.resume_run(path, on_epoch=_Stop(stop), keep=writer)
        assert writer.written == (stop + 1, 4)
    resumed = ffablate.resume_run(path, on_epoch=_Stop(), keep=writer)
    a, b = whole.result, resumed.result
    assert b.test_accuracy == a.test_accuracy and b.per_layer_accuracy == a.per_layer_accuracy
    assert b.history == a.history and len(a.history) == writer.written[1]  # losses and accuracies of every epoch
    state, want = resumed.trainer.net.state_dict(), whole.trainer.net.state_dict()
    assert list(state) == list(want) and all(torch.equal(state[key], want[key]) for key in want)
    assert (b.config, b.plugin_params, b.images) == (a.config, a.plugin_params, a.images)
    assert a.test_accuracy > 0.2  # it learned: a constant prediction would reproduce trivially


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_resumes_where_it_stopped(monkeypatch, tmp_path):
    # Random-label negatives draw from the device's generator, which the checkpoint keeps ("cuda" in its rng).
    from ffablate.train import trained_run

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = _config([*DIGITS, "--epochs", "2", "--device", "cuda", *RECIPES["ff-label"]])
    whole, again = (trained_run(config, on_epoch=_Stop()).result for _ in range(2))
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        trained_run(config, on_epoch=_Stop(0), keep=checkpoint.EpochWriter(path))
    saved = torch.load(path, weights_only=True)
    assert saved["training"]["rng"]["cuda"] is not None
    resumed = ffablate.resume_run(path, on_epoch=_Stop())
    b = resumed.result
    assert next(resumed.trainer.net.parameters()).device.type == "cuda"
    assert len(b.history) == 2 and b.history[0] == saved["training"]["history"][0]
    assert abs(b.test_accuracy - whole.test_accuracy) <= 0.1
    if again.history != whole.history:
        pytest.skip("two uninterrupted runs of one seed differ on this GPU: no bitwise comparison (loose checks held)")
    assert b.history == whole.history and b.test_accuracy == whole.test_accuracy


def test_a_resumed_runs_train_seconds_are_the_sum_over_its_sessions(monkeypatch, tmp_path):
    from ffablate.train import common, trained_run

    # A clock that moves one second a reading: each epoch's stretch of training takes exactly one second.
    clock = iter(range(10**6))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    config = _config([*DIGITS, "--epochs", "3"])
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        trained_run(config, on_epoch=_Stop(0), keep=checkpoint.EpochWriter(path))
    assert checkpoint.read(path)["training"]["train_seconds"] == 1.0
    result = ffablate.resume_run(path).result
    assert result.train_seconds == 3.0  # 1 second before the stop, 2 after it
    assert result.images_per_second == 3 * 400 / 3.0


@contextlib.contextmanager
def _interrupting_bar(at_step: int):
    """`ffablate train`'s progress bar, pressing Ctrl-C at step ``at_step``."""

    def update(done: int, total: int, info: dict) -> None:
        if done == at_step:
            raise KeyboardInterrupt

    yield update


def test_ctrl_c_keeps_the_finished_epochs_and_resume_finishes_the_run(capsys, monkeypatch, tmp_path):
    args = [*DIGITS, "--epochs", "2"]
    whole, path = tmp_path / "whole.pt", tmp_path / "run.pt"
    want = json_of(["train", *args, "--save", str(whole), "--json"])
    monkeypatch.setattr("ffablate.cli.progress_bar", lambda *a, **k: _interrupting_bar(3))
    assert main(["train", *args, "--save", str(path)]) == 130
    assert f"no epoch finished, so {path} was not written: rerun it" in one_line_error(capsys)
    assert not path.exists()
    # 16 steps an epoch: stopped 3 steps into the second.
    monkeypatch.setattr("ffablate.cli.progress_bar", lambda *a, **k: _interrupting_bar(16 + 3))
    assert main(["train", *args, "--save", str(path)]) == 130
    err = one_line_error(capsys)
    assert err == (
        f"ffablate: interrupted; {path} holds the run after epoch 1 of 2 (the steps of epoch 2 are lost): resume it "
        f"with `ffablate train --resume {path}`"
    )
    # Stopped again before the resumed session finished an epoch: the file is as it was.
    monkeypatch.setattr("ffablate.cli.progress_bar", lambda *a, **k: _interrupting_bar(16 + 5))
    assert main(["train", "--resume", str(path)]) == 130
    assert f"{path} holds the run as it was before this session" in one_line_error(capsys)
    monkeypatch.undo()
    run = json_of(["train", "--resume", str(path), "--json"])
    assert run["checkpoint"] == str(path)
    timing = ("train_seconds", "images_per_second", "peak_memory_bytes", "checkpoint")
    assert {k: v for k, v in run.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    # The file is the finished checkpoint now, as --save writes it: the format older ffablates read, no training.
    saved, reference = torch.load(path, weights_only=True), torch.load(whole, weights_only=True)
    assert saved["format_version"] == 1 and "training" not in saved and set(saved) == set(reference)
    state = saved["model"]["state_dict"]
    assert all(torch.equal(state[key], value) for key, value in reference["model"]["state_dict"].items())
    assert json_of(["evaluate", str(path), "--json"])["test_accuracy"] == want["test_accuracy"]


@contextlib.contextmanager
def _terminating_bar(at_step: int):
    """`ffablate train`'s progress bar, sending this process a SIGTERM (a job runner's time limit) at step
    ``at_step``."""

    def update(done: int, total: int, info: dict) -> None:
        if done == at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    yield update


def test_a_sigterm_keeps_the_finished_epochs_as_ctrl_c_does(capsys, monkeypatch, tmp_path):
    # A scheduler's SIGTERM ended the process outright: no word of the checkpoint a resume goes on from.
    path = tmp_path / "run.pt"

    def unhandled(signum: int, frame: object) -> None:  # in place of the default action, which would end pytest
        raise AssertionError("ffablate train left SIGTERM to the handler it found")

    monkeypatch.setattr("ffablate.cli.progress_bar", lambda *a, **k: _terminating_bar(16 + 3))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(["train", *DIGITS, "--epochs", "2", "--save", str(path)]) == 130
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the command's handler is its own only
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert one_line_error(capsys) == (
        f"ffablate: interrupted; {path} holds the run after epoch 1 of 2 (the steps of epoch 2 are lost): resume it "
        f"with `ffablate train --resume {path}`"
    )
    monkeypatch.undo()
    assert json_of(["train", "--resume", str(path), "--json"])["checkpoint"] == str(path)


def test_ctrl_c_while_the_finished_checkpoint_is_written_leaves_the_run_resumable(capsys, monkeypatch, tmp_path):
    # The file still holds the last epoch's checkpoint: "rerun it to train from the start" would throw the run away.
    path, save = tmp_path / "run.pt", checkpoint.save

    def stopped_when_finished(saved: dict, target: Path) -> None:
        if not checkpoint.unfinished(saved):
            raise KeyboardInterrupt
        save(saved, target)

    monkeypatch.setattr(checkpoint, "save", stopped_when_finished)
    assert main(["train", *DIGITS, "--save", str(path)]) == 130
    assert one_line_error(capsys) == (
        f"ffablate: interrupted; {path} holds the run after epoch 1 of 1 (its final scoring was not): resume it with "
        f"`ffablate train --resume {path}`"
    )
    monkeypatch.setattr(checkpoint, "save", save)
    assert json_of(["train", "--resume", str(path), "--json"])["checkpoint"] == str(path)


def test_a_run_resumed_without_on_epoch_scores_its_validation_split_again(tmp_path):
    from ffablate.train import trained_run

    # The history it carries holds the first session's records only: the last of them scored an earlier model.
    config = _config([*DIGITS, "--epochs", "2", "--set", "val_images=100"])
    whole = trained_run(config, on_epoch=_Stop()).result
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        trained_run(config, on_epoch=_Stop(0), keep=checkpoint.EpochWriter(path))
    resumed = ffablate.resume_run(path).result
    assert whole.history[0]["val_accuracy"] != whole.val_accuracy  # else the test could not tell
    assert resumed.val_accuracy == whole.val_accuracy and resumed.test_accuracy == whole.test_accuracy


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A two-epoch FF run on digits stopped after its first epoch."""
    from ffablate.train import trained_run

    path = tmp_path_factory.mktemp("unfinished") / "run.pt"
    with pytest.MonkeyPatch.context() as env:
        for name in FFABLATE_ENV:
            env.delenv(name, raising=False)
        env.setenv("FFABLATE_DATA", str(tmp_path_factory.mktemp("empty-data-root")))
        with contextlib.suppress(KeyboardInterrupt):
            trained_run(_config([*DIGITS, "--epochs", "2"]), on_epoch=_Stop(0), keep=checkpoint.EpochWriter(path))
    return path


def test_an_unfinished_checkpoint_holds_what_resuming_needs(unfinished_run):
    saved = torch.load(unfinished_run, weights_only=True)
    assert saved["format_version"] == 2 and saved["result"] is None
    training = saved["training"]
    assert (training["epochs_done"], training["epochs_total"], training["images"]) == (1, 2, 400)
    assert set(training["optimizers"]) == {"blocks"} and training["optimizers"]["blocks"]["state"]
    assert set(training["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert [record["epoch"] for record in training["history"]] == [0]
    assert "backbone.blocks.1.0.weight" in saved["model"]["state_dict"]


def test_an_unfinished_checkpoint_is_not_evaluated_but_resumed(capsys, unfinished_run):
    assert main(["evaluate", str(unfinished_run)]) == 2
    assert one_line_error(capsys) == (
        f"ffablate: error: {unfinished_run} holds a run still training (epoch 1 of 2 done): resume it with `ffablate "
        f"train --resume {unfinished_run}`, then load or evaluate it"
    )
    with pytest.raises(CheckpointError, match="still training"):
        ffablate.load_run(unfinished_run)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "lr=0.1"], "drop --set"),
        (["--epochs", "2"], "drop --epochs"),
        (["--limit-train", "100"], "drop --limit-train"),
        (["--save", "other.pt"], "drop --save"),
    ],
)
def test_resume_refuses_options_that_set_up_a_run(capsys, monkeypatch, unfinished_run, extra, expected):
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    assert main(["train", "--resume", str(unfinished_run), *extra]) == 2
    err = one_line_error(capsys)
    assert expected in err and "--resume goes on with the run's own settings" in err


def test_resume_mistakes_are_one_line_errors(capsys, monkeypatch, saved_runs, tmp_path):
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model\n")
    finished = saved_runs["ff"][0]
    cases = [
        (tmp_path / "nothing.pt", f"no checkpoint at {tmp_path / 'nothing.pt'}"),
        # Not "the folder does not exist; create it": the checkpoint's path is mistyped.
        (tmp_path / "nowhere" / "run.pt", f"no checkpoint at {tmp_path / 'nowhere' / 'run.pt'}: give a file written"),
        (notes, "is not an ffablate checkpoint (not a torch file)"),
        (tmp_path, "--resume {tmp} is a folder"),
        (
            finished,
            f"{finished} holds a finished run: there is nothing to resume; score it with `ffablate evaluate "
            f"{finished}`",
        ),
    ]
    for path, expected in cases:
        assert main(["train", "--resume", str(path)]) == 2, path
        assert expected.format(tmp=tmp_path) in one_line_error(capsys), path


def test_resume_refuses_another_ffablate_or_other_data(capsys, monkeypatch, unfinished_run, tmp_path):
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: pytest.fail("training must not start"))

    def older(saved: dict) -> None:
        saved["ffablate"]["version"] = "0.0.1"

    def other_test_split(saved: dict) -> None:
        saved["data"]["test_sha256"] = "0" * 64

    path = rewritten(unfinished_run, tmp_path / "older.pt", older)
    assert main(["train", "--resume", str(path)]) == 2
    assert "trained so far with ffablate 0.0.1, this is ffablate" in one_line_error(capsys)
    path = rewritten(unfinished_run, tmp_path / "data.pt", other_test_split)
    assert main(["train", "--resume", str(path)]) == 2
    err = one_line_error(capsys)
    assert "are not the ones" in err and "(their test_sha256 differs): give --data-root the copy it trained on" in err


def test_resume_refuses_training_images_that_are_not_the_runs(capsys, monkeypatch, unfinished_run):
    from ffablate.train import common

    # Another copy of the data whose test split is the run's: only its training images tell it apart.
    load = common.load_run_dataset

    def other_training_labels(*args, **kwargs):
        ds = load(*args, **kwargs)
        return dataclasses.replace(ds, train_y=(ds.train_y + 1) % ds.num_classes)

    monkeypatch.setattr(common, "load_run_dataset", other_training_labels)
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    assert main(["train", "--resume", str(unfinished_run)]) == 2
    assert "(their train_sha256 differs): give --data-root the copy it trained on" in one_line_error(capsys)


def test_a_second_run_into_the_same_checkpoint_is_refused_while_the_first_trains(capsys, monkeypatch, unfinished_run):
    # A job array's shared --save, or a resume started twice: each would replace the other's file epoch by epoch.
    # ffablate.saved first: importing it binds ffablate.train's trained_run, which must still be the real one then.
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    path = unfinished_run.with_name("claimed.pt")
    path.write_bytes(unfinished_run.read_bytes())
    hold = "import sys; from pathlib import Path; from ffablate import checkpoint\n"
    hold += "with checkpoint.claimed(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()"
    first = subprocess.Popen(
        [sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline() == "held\n"
        before = path.read_bytes()
        holder = f"process {first.pid}@{socket.gethostname()}"
        for argv in (["--resume", str(path)], [*DIGITS, "--save", str(path)]):
            assert main(["train", *argv]) == 2
            assert one_line_error(capsys) == (
                f"ffablate: error: {path} is being trained into by another ffablate run ({holder}): wait for it to "
                "end, or give this run another path"
            )
        assert path.read_bytes() == before
    finally:
        first.kill()  # as a kill -9 would: the system releases the lock, though its file stays
        first.wait()
    lock = path.with_name(".claimed.pt.lock")
    assert lock.exists()
    with checkpoint.claimed(path):
        assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o666  # another user of a shared folder can take it in turn
    assert not lock.exists()


def test_a_resume_at_another_thread_count_says_it_is_not_bit_for_bit(monkeypatch, unfinished_run, tmp_path):
    # Another count splits the convolutions' sums otherwise: the run would end near, not at, the uninterrupted one.
    monkeypatch.setattr("ffablate.saved.trained_run", lambda *a, **k: "resumed")
    began = torch.load(unfinished_run, weights_only=True)["training"]["threads"]
    assert began == torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FFablateWarning)  # at its own count, and where a file has no count: silent
        assert ffablate.resume_run(unfinished_run) == "resumed"
        untold = rewritten(unfinished_run, tmp_path / "untold.pt", lambda saved: saved["training"].pop("threads"))
        torch.set_num_threads(began + 1)
        try:
            assert ffablate.resume_run(untold) == "resumed"
            with pytest.warns(FFablateWarning) as told:
                ffablate.resume_run(unfinished_run)
        finally:
            torch.set_num_threads(began)
    at = f"{began} CPU thread{'s' * (began != 1)}"
    assert str(told[0].message) == (
        f"{unfinished_run} trained at {at} so far and this process has {began + 1}: the rest of the "
        f"run rounds otherwise, so it ends as the uninterrupted run would within noise, not bit for bit; resume it "
        f"with OMP_NUM_THREADS={began} for that"
    )


def test_save_refuses_to_replace_a_run_still_training(capsys, monkeypatch, unfinished_run):
    # The command that started the run, rerun where `--resume` was meant, would replace its checkpoint after one epoch.
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("training must not start"))
    before = unfinished_run.read_bytes()
    assert main(["train", *DIGITS, "--epochs", "2", "--save", str(unfinished_run)]) == 2
    assert one_line_error(capsys) == (
        f"ffablate: error: --save {unfinished_run} holds a run still training (epoch 1 of 2 done): go on with it "
        f"with `ffablate train --resume {unfinished_run}`, or delete it (or give another path) to train from the start"
    )
    assert unfinished_run.read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_of_a_cuda_run_without_cuda_says_where_it_can_go_on(capsys, unfinished_run, tmp_path):
    # Not "use --device cpu", which --resume refuses: the run goes on on the device it trained on.
    def on_cuda(saved: dict) -> None:
        saved["config"]["device"] = "cuda"

    path = rewritten(unfinished_run, tmp_path / "cuda.pt", on_cuda)
    assert main(["train", "--resume", str(path)]) == 2
    assert "was training on CUDA, and no CUDA device is visible here: resume it on one" in one_line_error(capsys)
