"""Studies end to end on tiny data with a real SQLite Optuna storage: trials, baselines, resumption."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ffablate import hookimpl, results
from ffablate import spec as specs
from ffablate import study as studies
from ffablate.cli import main
from ffablate.errors import CheckpointError, ConfigError, FFablateError
from ffablate.plugins import add_plugin, registry, remove_plugin
from ffablate.report import write_report
from ffablate.stats import Estimate, contrast_ci, fmt, mean_ci, paired_ci, t_quantile, welch_ci
from ffablate.train import run as train_run
from ffablate.train.ff import FFTrainer

TINY_BUDGET = """
[budgets.smoke]
limit_train = 300
limit_test = 300
val_images = 200
epochs = 1
batch_size = 50
channels = "10,10"
strides = "2,2"
seeds = {seeds}
[budgets.quick]
epochs = 1
[budgets.full]
epochs = 1
"""


def write_spec(tmp_path: Path, body: str, seeds: int | str = 2, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(body + TINY_BUDGET.format(seeds=seeds))
    return path


GRID = """
question = "Does the temperature schedule matter on a tiny Fashion-MNIST subset?"
[base]
dataset = "fashion-mnist"
[axes]
temperature = ["constant", "cosine"]
"""


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One smoke study run to completion through the CLI: 2 FF configurations + 1 baseline, 2 seeds each."""
    tmp_path = tmp_path_factory.mktemp("study")
    path = write_spec(tmp_path, GRID)
    url = storage_url(tmp_path)
    rc = main(["study", str(path), "--budget", "smoke", "--storage", url])
    assert rc == 0
    return tmp_path, url, "tiny-smoke"


def test_smoke_study_runs_every_grid_point_and_baseline_once(finished):
    _, url, name = finished
    trials = trials_of(url, name)
    points = [studies.point_of(t) for t in trials]
    assert len(points) == len(set(points)) == 6  # (2 FF + 1 BP) x 2 seeds
    assert all(t.state == TrialState.COMPLETE for t in trials)
    roles = sorted(t.user_attrs["role"] for t in trials)
    assert roles == ["baseline"] * 2 + ["ff"] * 4
    t = trials[0]
    for key in ("config", "seed", "metrics", "history", "kernel_backend", "versions", "cpu_threads", "data_source"):
        assert key in t.user_attrs
    norm = registry().get("norm", t.user_attrs["config"]["norm"])
    assert t.user_attrs["plugin_params"]["norm"] == norm.params  # the defaults, which the config leaves out
    assert t.user_attrs["plugin_sources"] == {}  # built-ins only: ffablate's version covers them
    for key in (
        "test_accuracy",
        "per_layer_accuracy",
        "train_seconds",
        "images_per_second",
        "peak_memory_bytes",
    ):
        assert key in t.user_attrs["metrics"]
    assert t.user_attrs["config"]["seed"] == t.user_attrs["seed"]
    # Optuna ranks (and would prune) on the 200 held-out training images; the rows report test accuracy.
    for t in trials:
        assert t.value == t.user_attrs["metrics"]["val_accuracy"] and t.user_attrs["config"]["val_images"] == 200
    summary = results.summarize(optuna.load_study(study_name=name, storage=url))
    tests = sorted(t.user_attrs["metrics"]["test_accuracy"] for t in trials)
    assert sorted(a for r in summary.rows for a in r.accuracies) == tests and summary.selected_on_validation
    assert all(t.user_attrs["config"]["method"] == "bp-deepsup" for t in trials if t.user_attrs["role"] == "baseline")


def test_rerunning_a_finished_study_runs_nothing(finished, capsys):
    tmp_path, url, name = finished
    before = [(t.number, t.value) for t in trials_of(url, name)]
    assert main(["study", str(tmp_path / "tiny.toml"), "--budget", "smoke", "--storage", url, "--json"]) == 0
    assert [(t.number, t.value) for t in trials_of(url, name)] == before
    out = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in out["rows"]}
    assert rows["temperature=constant"]["n"] == 2
    gap = rows["temperature=constant"]["gap_ci95"]  # two seeds each side: an interval, never null (NaN)
    assert isinstance(gap, float) and math.isfinite(gap) and gap > 0
    # As a table the rerun says that it trained nothing (it printed the stored table as if it had run).
    assert main(["study", str(tmp_path / "tiny.toml"), "--budget", "smoke", "--storage", url]) == 0
    assert "nothing left to run here: the study is finished and the table is its stored one" in capsys.readouterr().out


def test_resuming_a_finished_study_checks_and_loads_nothing(finished, monkeypatch):
    tmp_path, url, _ = finished
    monkeypatch.setattr(studies, "preflight", lambda *a: pytest.fail("a finished study has nothing to check"))
    assert main(["study", str(tmp_path / "tiny.toml"), "--budget", "smoke", "--storage", url]) == 0


def _plan_of(capsys, *argv: str) -> dict:
    assert main(["study", *argv, "--plan", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_says_what_a_study_would_run_and_trains_loads_and_makes_nothing(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ffablate.train.trained_run", lambda *a, **k: pytest.fail("--plan must not train"))
    monkeypatch.setattr(studies, "preflight", lambda *a: pytest.fail("--plan must not check runs"))
    monkeypatch.setattr(studies.DataCache, "get", lambda *a: pytest.fail("--plan must not load data"))
    stored, url, name = finished
    spec = str(stored / "tiny.toml")
    plan = _plan_of(capsys, spec, "--budget", "smoke", "--storage", url)
    assert (plan["study"], plan["stored"], plan["trials"], plan["left"], plan["refused"]) == (name, True, 6, 0, None)
    rows = {
        row["configuration"]: (row["method"], row["planned"], row["done"], row["running"])
        for row in plan["configurations"]
    }
    assert rows == {
        "bp-deepsup": ("bp-deepsup", 2, 2, 0),
        "temperature=constant": ("ff", 2, 2, 0),
        "temperature=cosine": ("ff", 2, 2, 0),
    }
    # A budget that adds a seed: one trial left per configuration, which a run would go on with.
    grown = write_spec(tmp_path, GRID, seeds=3)
    plan = _plan_of(capsys, str(grown), "--budget", "smoke", "--storage", url)
    assert (plan["trials"], plan["left"], plan["refused"], plan["seeds"]) == (9, 3, None, [0, 1, 2])
    # One trial of each configuration left, each at the mean wall time of its configuration's two stored ones.
    means = [row["mean_seconds"] for row in plan["configurations"]]
    assert all(mean > 0 for mean in means) and plan["left_seconds"] == pytest.approx(sum(means))
    # Another plan under the same name: the error a run would stop with, instead of the count.
    other = write_spec(tmp_path, GRID.replace('"cosine"', '"linear"'), name="other")
    argv = ["study", str(other), "--budget", "smoke", "--storage", url, "--study-name", name, "--plan", "--json"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (json.loads(out)["left"], json.loads(out)["left_seconds"]) == (None, None)
    assert err.startswith(f"ffablate: error: a run would stop here: study {name!r} in this storage was made from a")
    # No storage yet: every trial is to run, and the file is not made (nor the checkpoint folder).
    fresh = tmp_path / "fresh.db"
    plan = _plan_of(
        capsys, spec, "--budget", "smoke", "--storage", f"sqlite:///{fresh}", "--checkpoints", str(tmp_path / "ck")
    )
    assert (plan["stored"], plan["left"], plan["left_seconds"]) == (False, 6, None)
    assert {row["done"] for row in plan["configurations"]} == {0}
    assert not fresh.exists() and not (tmp_path / "ck").exists()
    assert main(["study", spec, "--budget", "smoke", "--storage", f"sqlite:///{fresh}", "--plan"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("nothing stored yet: all 6 trials to run")
    # What a run would stop at before training is said, but nothing made: a storage folder that is not there.
    assert main(["study", spec, "--budget", "smoke", "--storage", f"sqlite:///{tmp_path}/nowhere/s.db", "--plan"]) == 2
    assert f"the folder {tmp_path}/nowhere does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_a_search_counts_the_baselines_a_run_would_enqueue_as_left(tmp_path):
    # Its FF budget spent and a baseline failed for a reason a rerun may not repeat: the study counted as finished,
    # and a rerun never ran that baseline again.
    from optuna.distributions import FloatDistribution

    plan = specs.load(str(write_tpe_spec(tmp_path, 'lr = {type = "float", low = 0.001, high = 0.01}'))).plan("smoke")
    (ff,) = [c for c in plan.cells if c.role == "ff"]
    (bp,) = [c for c in plan.cells if c.role == "baseline"]
    study = optuna.create_study(direction="maximize")
    for _ in range(plan.budget.n_trials):
        attrs = {"role": "ff", "cell": ff.label, "seed": 0}
        dist = {"lr": FloatDistribution(0.001, 0.01)}
        study.add_trial(create_trial(value=0.5, params={"lr": 0.005}, distributions=dist, user_attrs=attrs))
    attrs = {"role": "baseline", "cell": bp.label, "seed": 0, "fail_reason": "the data server was down"}
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
    assert studies.remaining(study, plan) == 1
    studies.enqueue_baselines(study, plan)
    assert studies.remaining(study, plan) == 1  # the same trial, now waiting


def test_plan_of_a_search_times_its_trials_not_started(tmp_path, monkeypatch):
    import datetime

    from optuna.distributions import FloatDistribution

    plan = specs.load(str(write_tpe_spec(tmp_path, 'lr = {type = "float", low = 0.001, high = 0.01}'))).plan("smoke")
    (ff,) = [c for c in plan.cells if c.role == "ff"]
    (bp,) = [c for c in plan.cells if c.role == "baseline"]
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("ffablate_spec", "tiny")
    start = datetime.datetime(2026, 11, 28, 12, 0, 0)

    def add(role: str, cell: str, seconds: int) -> None:
        trial = create_trial(
            value=0.5,
            params={"lr": 0.005} if role == "ff" else {},
            distributions={"lr": FloatDistribution(0.001, 0.01)} if role == "ff" else {},
            user_attrs={"role": role, "cell": cell, "seed": 0},
        )
        trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(seconds=seconds)
        study.add_trial(trial)

    add("ff", ff.label, 10)  # one of the budget's 2 FF trials done; the baseline not yet run
    monkeypatch.setattr(studies, "_stored_study", lambda url, name: study)
    got = studies.planned(plan, None, "tiny-smoke")
    rows = {row["configuration"]: (row["planned"], row["done"], row["mean_seconds"]) for row in got["configurations"]}
    assert rows == {ff.label: (None, 1, 10.0), bp.label: (1, 0, None)}
    # One FF trial and the baseline to enqueue left, each at the one completed trial's pace.
    assert (got["left"], got["left_seconds"]) == (2, 20.0)


PRUNED = """
question = "Is a median pruner fair to the greedy schedule?"
[base]
dataset = "fashion-mnist"
[axes]
schedule = ["simultaneous", "greedy"]
[baseline]
methods = []
[pruner]
type = "median"
n_startup_trials = 1
n_warmup_steps = 0
"""


def test_pruning_reads_validation_and_leaves_greedy_trials_alone(tmp_path):
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, PRUNED)
    path.write_text(path.read_text().replace("epochs = 1\nbatch_size = 50", "epochs = 2\nbatch_size = 50", 1))
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    trials = trials_of(url, "tiny-smoke")
    assert len(trials) == 4
    for t in trials:
        steps = t.intermediate_values
        if t.user_attrs["overrides"]["schedule"] == "greedy":
            # Never reported, so never pruned and never part of the median the others face.
            assert steps == {} and t.state == TrialState.COMPLETE
        else:
            records = t.user_attrs.get("history") or t.user_attrs["history_at_prune"]
            assert steps == {r["epoch"]: r["val_accuracy"] for r in records} and steps


GAP = """
question = "How far is the recipe from BP-DeepSup?"
analysis = "bp-gap"
[base]
dataset = "fashion-mnist"
"""


def test_recipe_from_a_stored_study_runs_its_winner(finished, capsys):
    tmp_path, url, name = finished
    best = results.summarize(optuna.load_study(study_name=name, storage=url)).best()
    gap = write_spec(tmp_path, GAP, seeds=1, name="gap")
    assert main(["study", str(gap), "--budget", "smoke", "--storage", url, "--recipe-from", "tiny"]) == 0
    study = optuna.load_study(study_name="gap-smoke@tiny-smoke", storage=url)
    configs = {t.user_attrs["role"]: t.user_attrs["config"] for t in study.trials}
    assert set(configs) == {"ff", "baseline"}
    # The winner's FF keys reach FF and the baseline alike (the baseline shares the backbone and its norm).
    assert configs["ff"]["temperature"] == best.overrides["temperature"]
    assert f"FF recipe from study tiny-smoke: temperature={best.overrides['temperature']}" in study.user_attrs["notes"]
    capsys.readouterr()
    assert main(["study", str(gap), "--budget", "smoke", "--storage", url, "--recipe-from", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study 'nothing'" in err[0]


def test_recipe_is_the_sources_shared_ff_settings_plus_the_winners_own(tmp_path):
    url = storage_url(tmp_path)
    source = optuna.create_study(storage=url, study_name="src-quick", direction="maximize")
    shared = {"negatives": "random-label", "loss": "softplus-threshold", "dataset": "mnist", "limit_train": 100}
    source.set_user_attr("base", shared)
    for goodness, value in (("meansq", 0.7), ("sumsq", 0.6)):
        attrs = {
            "cell": f"goodness={goodness}",
            "role": "ff",
            "seed": 0,
            "overrides": {"goodness": goodness, "method": "ff"},
            "metrics": {"test_accuracy": value},
        }
        source.add_trial(create_trial(value=value, params={}, distributions={}, user_attrs=attrs))
    recipe, name = studies.winning_recipe(url, "src")
    assert name == "src-quick"
    # Data and budget keys stay the target spec's own.
    assert recipe == {"negatives": "random-label", "loss": "softplus-threshold", "goodness": "meansq"}


def test_recipe_comes_from_a_configuration_that_completed_every_seed(tmp_path):
    # "sumsq" scored best on its one seed, but the median pruner stopped its other two: a survivor, not a winner.
    url = storage_url(tmp_path)
    source = optuna.create_study(storage=url, study_name="src-quick", direction="maximize")
    source.set_user_attr("seeds", [0, 1, 2])
    for goodness, values in (("meansq", [0.7, 0.71, 0.69]), ("sumsq", [0.8, None, None])):
        for seed, value in enumerate(values):
            attrs = {
                "cell": f"goodness={goodness}",
                "role": "ff",
                "seed": seed,
                "overrides": {"goodness": goodness, "method": "ff"},
                "metrics": {"test_accuracy": value},
            }
            state = TrialState.COMPLETE if value is not None else TrialState.PRUNED
            source.add_trial(create_trial(state=state, value=value, params={}, distributions={}, user_attrs=attrs))
    recipe, _ = studies.winning_recipe(url, "src")
    assert recipe == {"goodness": "meansq"}


def test_report_from_existing_storage_runs_no_training(finished, monkeypatch):
    tmp_path, url, name = finished
    import ffablate.train

    monkeypatch.setattr(ffablate.train, "run", lambda *a, **k: pytest.fail("report must not train"))
    before = len(trials_of(url, name))
    out = tmp_path / "report"
    assert main(["report", "tiny", "--storage", url, "--out", str(out)]) == 0  # "tiny" finds tiny-smoke
    assert len(trials_of(url, name)) == before
    text = (out / "report.md").read_text()
    assert "Does the temperature schedule matter" in text and "**Answer.**" in text
    # One axis: no heatmap (it needs two), no K sweep, hierarchy or bp-gap bars; one epoch: no learning curves;
    # four completed FF trials whose temperature varies: an importance plot, linked from the report, not failed.
    assert sorted(p.name for p in out.iterdir()) == ["importance.png", "report.md"]
    assert (out / "importance.png").stat().st_size > 1000 and "](importance.png)" in text
    assert "plot failed" not in text and "Not computed" not in text
    # the table holds the numbers the storage holds
    study = optuna.load_study(study_name=name, storage=url)
    accs = [t.value for t in study.trials if t.user_attrs["cell"] == "temperature=cosine"]
    assert f"{100 * sum(accs) / len(accs):.1f} ± " in text
    assert "bp-deepsup" in text


def test_nan_trial_is_recorded_failed_and_the_study_goes_on(tmp_path):
    path = write_spec(
        tmp_path,
        """
question = "Does a huge learning rate diverge?"
[base]
dataset = "fashion-mnist"
[axes]
lr = [1e30, 0.002]
[baseline]
match = []
""",
        seeds=1,
    )
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    trials = trials_of(url, "tiny-smoke")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["overrides"]["lr"] == 1e30
    assert "TrainingDiverged" in failed[0].user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2  # the other lr and the baseline
    # a diverged point is done: rerunning does not try it again
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    assert len(trials_of(url, "tiny-smoke")) == 3


def _dead_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_killed_study_resumes_without_losing_or_repeating_trials(tmp_path, capsys):
    # A study killed mid-trial leaves that trial RUNNING, with the worker attrs its objective set first. The kill
    # is simulated in-process: no timing decides which trial was in flight.
    path = write_spec(tmp_path, GRID)
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    kept = {t.number: (studies.point_of(t), t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(kept) == 2
    plan = specs.load(str(path)).plan("smoke")
    points = {(c.label, s) for c in plan.cells for s in plan.budget.seeds}
    assert len(points) == 6  # (2 FF + 1 BP) x 2 seeds
    in_flight = sorted(points - {point for point, _ in kept.values()})[0]
    crashed = study.ask()
    worker = {"host": socket.gethostname(), "pid": _dead_pid()}
    for key, value in (("worker", worker), ("role", "ff"), ("cell", in_flight[0]), ("seed", in_flight[1])):
        crashed.set_user_attr(key, value)
    capsys.readouterr()

    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    assert f"marked 1 trial(s) of a dead process as failed (stale); their points run again: {crashed.number}" in (
        " ".join(capsys.readouterr().err.split())
    )
    trials = trials_of(url, "tiny-smoke")
    for number, (point, value) in kept.items():  # completed trials kept as they were
        assert studies.point_of(trials[number]) == point and trials[number].value == value
    stale = trials[crashed.number]
    assert stale.state == TrialState.FAIL and stale.user_attrs["fail_reason"] == "stale: its process died; rerun"
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [crashed.number]
    complete = [studies.point_of(t) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(points)  # every point once: none lost, none repeated
    rerun = [t for t in trials if t.state == TrialState.COMPLETE and studies.point_of(t) == in_flight]
    assert rerun[0].number > crashed.number
    assert len(trials) == 7 and not any(t.state == TrialState.RUNNING for t in trials)
    # A live worker's trial (this process) is not touched.
    running = optuna.load_study(study_name="tiny-smoke", storage=url).ask()
    running.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    assert studies.fail_dead_trials(optuna.load_study(study_name="tiny-smoke", storage=url)) == []


def test_a_resumed_study_says_its_seeds_changed_and_takes_an_edited_question(tmp_path):
    # Other seeds were refused without a word on what changed; an edited question was silently ignored.
    url = storage_url(tmp_path)
    assert studies.run_study(specs.load(str(write_spec(tmp_path, GRID, seeds=1))).plan("smoke"), storage_url=url).ran
    body = GRID.replace("Does the temperature", "Does a temperature")
    run = studies.run_study(specs.load(str(write_spec(tmp_path, body, seeds=1))).plan("smoke"), storage_url=url)
    assert run.ran == 0 and run.study.user_attrs["question"].startswith("Does a temperature")
    with pytest.raises(FFablateError, match=r"runs seeds \[0\] and this budget runs \[1\]; a budget may only add"):
        studies.run_study(specs.load(str(write_spec(tmp_path, body, seeds="[1]"))).plan("smoke"), storage_url=url)
    # A changed shared setting was refused as "a different spec or budget" and no more.
    lr = body.replace('dataset = "fashion-mnist"', 'dataset = "fashion-mnist"\nlr = 0.01')
    with pytest.raises(FFablateError, match=r"its shared settings changed \(lr \(unset\) -> 0.01\); rerun with"):
        studies.run_study(specs.load(str(write_spec(tmp_path, lr, seeds=1))).plan("smoke"), storage_url=url)


def store_as_before_seeds_could_grow(url: str, source: str, name: str) -> None:
    """Copy grid study ``source`` into ``name`` as ffablate stored grid studies until seeds could be added: each
    trial's point also in Optuna params "cell" and "seed", categorical over the cells and seeds of the time, and
    its claim's grid_id in that grid."""
    made = optuna.load_study(study_name=source, storage=url)
    cells, seeds = made.user_attrs["cells"], made.user_attrs["seeds"]
    grid = studies.ResumableGridSampler(cells, seeds)
    grid_ids = {grid._point(g): g for g in range(len(cells) * len(seeds))}
    dists = {"cell": CategoricalDistribution(cells), "seed": CategoricalDistribution(seeds)}
    old = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for key, value in made.user_attrs.items():
        old.set_user_attr(key, value)
    for t in made.trials:
        cell, seed = studies.point_of(t)
        frozen = create_trial(
            state=t.state,
            value=t.value,
            params={"cell": cell, "seed": seed},
            distributions=dists,
            user_attrs=t.user_attrs,
            system_attrs={"search_space": grid._search_space, "grid_id": grid_ids[cell, seed]},
        )
        old.add_trial(frozen)


@pytest.fixture(scope="module")
def stored_before(tmp_path_factory):
    """A storage file holding study tiny-smoke of 2 seeds as stored before seeds could be added."""
    tmp_path = tmp_path_factory.mktemp("stored-before")
    url = storage_url(tmp_path)
    plan = specs.load(str(write_spec(tmp_path, GRID, seeds=2))).plan("smoke")
    assert studies.run_study(plan, storage_url=url, study_name="made").ran == 6
    store_as_before_seeds_could_grow(url, "made", "tiny-smoke")
    return tmp_path / "studies.db"


@pytest.fixture(scope="module")
def grown(stored_before, tmp_path_factory):
    """The stored study resumed with a third seed: first one trial of it, then the rest. (its storage URL, the grown
    plan, the trials before, the summary after the one trial, the log lines of the first resume)"""
    tmp_path = tmp_path_factory.mktemp("grown")
    (tmp_path / "studies.db").write_bytes(stored_before.read_bytes())
    url = storage_url(tmp_path)
    before = trials_of(url, "tiny-smoke")
    plan = specs.load(str(write_spec(tmp_path, GRID, seeds=3))).plan("smoke")
    lines: list[str] = []
    assert studies.run_study(plan, storage_url=url, n_trials=1, log=lines.append).ran == 1
    partial = results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url))
    assert studies.run_study(plan, storage_url=url).ran == 2
    return url, plan, before, partial, lines


def test_seeds_added_to_a_stored_study_run_only_the_new_points(grown):
    url, plan, before, _, lines = grown
    assert lines == ["seeds [2] added to the study's [0, 1]: its finished trials are kept"]
    assert all(t.params.keys() == {"cell", "seed"} and t.state == TrialState.COMPLETE for t in before)
    trials = trials_of(url, "tiny-smoke")
    kept = [(t.number, t.params, t.value, t.state) for t in trials[: len(before)]]
    assert kept == [(t.number, t.params, t.value, t.state) for t in before]
    new = trials[len(before) :]
    assert sorted(studies.point_of(t) for t in new) == [(c.label, 2) for c in plan.cells]
    # The new trials' point is theirs as user attrs only: Optuna would refuse "seed" choices other than [0, 1].
    assert all(t.state == TrialState.COMPLETE and t.params == {} for t in new)
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    # The study keeps the seeds and fingerprint it was made with; the growth is a key of its own, naming its spec.
    assert study.user_attrs["seeds"] == [0, 1] and study.user_attrs["fingerprint"] == plan.fingerprint([0, 1])
    assert study.user_attrs[results.GROWN + "[0, 1, 2]"] == str(plan.spec.path)
    assert results.planned_seeds(study.user_attrs) == [0, 1, 2]
    assert studies.remaining(study, plan) == studies.points_left(study) == 0
    rows = results.summarize(study).rows
    assert [(r.n, r.planned, sorted(r.seeds)) for r in rows] == [(3, 3, [0, 1, 2])] * 3
    assert studies.run_study(plan, storage_url=url).ran == 0  # the grown study is finished


def test_rows_lack_the_added_seeds_until_they_run(grown):
    partial = grown[3]
    ran, waiting = [r for r in partial.rows if r.n == 3], [r for r in partial.rows if r.n == 2]
    assert len(ran) == 1 and len(waiting) == 2 and ran[0].role == "baseline"  # seed-major: baselines first
    assert all(not r.complete and r.planned == 3 and r.missing() == "1 not run yet" for r in waiting)
    table = {row[0]: row for row in results.table_rows(partial)}
    assert table[waiting[0].label][1] == "2 of 3"
    assert "chosen among incomplete rows: n=2 of 3 (1 not run yet)" in results.answer(partial)


def test_a_study_stored_before_seeds_could_grow_reports_after_growing(grown, tmp_path):
    url = grown[0]
    text = write_report(optuna.load_study(study_name="tiny-smoke", storage=url), tmp_path / "report").read_text()
    assert "seeds [0, 1, 2]; 9 trials (complete 9)." in text
    table = text.split("## Results", 1)[1]
    for label in ("bp-deepsup", "temperature=constant", "temperature=cosine"):
        assert re.search(rf"^\| {re.escape(label)} \| 3 \| ", table, flags=re.M), table
    assert "(n=3 vs 3)" in table and "incomplete" not in table and "## Failed trials" not in text


def test_seeds_can_only_be_added_after_the_stored_ones(grown, tmp_path):
    url = grown[0]
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    attrs, trials = study.user_attrs, len(study.trials)
    lr = GRID.replace('dataset = "fashion-mnist"', 'dataset = "fashion-mnist"\nlr = 0.01')
    for body, seeds, message in (
        (
            GRID,
            2,
            r"runs seeds \[0, 1, 2\] \(grown from \[0, 1\]\) and this budget runs \[0, 1\]; a budget may only "
            r"add seeds after those: give it seeds = \[0, 1, 2\] \(or more after them\), or rerun with "
            r"--study-name NEW$",
        ),
        (GRID, "[1, 0, 2, 3]", r"runs seeds \[0, 1, 2\] \(grown from \[0, 1\]\) and this budget runs \[1, 0, 2, 3\]"),
        # Seeds added with another change: that change is the one named.
        (lr, 4, r"its shared settings changed \(lr \(unset\) -> 0.01\); rerun with --study-name NEW"),
    ):
        plan = specs.load(str(write_spec(tmp_path, body, seeds=seeds))).plan("smoke")
        with pytest.raises(FFablateError, match=message) as refused:
            studies.run_study(plan, storage_url=url)
        assert "\n" not in str(refused.value)
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    assert study.user_attrs == attrs and len(study.trials) == trials


def test_two_runs_adding_the_same_seeds_at_once_run_each_new_point_once(stored_before, tmp_path):
    (tmp_path / "studies.db").write_bytes(stored_before.read_bytes())
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, GRID, seeds=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [sys.executable, "-m", "ffablate.cli", "study", str(path), "--budget", "smoke", "--storage", url]
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    plan = specs.load(str(path)).plan("smoke")
    assert results.planned_seeds(study.user_attrs) == [0, 1, 2, 3]
    kept = [studies.point_of(t) for t in study.trials if not t.user_attrs.get(results.SURPLUS)]
    assert sorted(kept) == sorted((c.label, s) for c in plan.cells for s in range(4))
    assert all(t.state == TrialState.COMPLETE for t in study.trials if not t.user_attrs.get(results.SURPLUS))


def test_a_claim_made_before_the_seeds_grew_holds_its_own_point(tmp_path):
    # A worker started before the seeds grew numbers its claim in the smaller grid, and records the point a moment
    # later: read in the grown grid, its grid_id named another point, which a second worker could take beside it.
    url, cells = storage_url(tmp_path), ["a", "b", "c"]
    study = optuna.create_study(study_name="claims", storage=url)
    before, after = studies.ResumableGridSampler(cells, [0, 1]), studies.ResumableGridSampler(cells, [0, 1, 2])
    grid_id = next(g for g in range(6) if before._point(g) != after._point(g))
    trial = study._storage.create_new_trial(study._study_id)
    study._storage.set_trial_system_attr(trial, "search_space", before._search_space)
    study._storage.set_trial_system_attr(trial, "grid_id", grid_id)
    assert after._taken(study) == {before._point(grid_id)}


def test_seeds_added_to_a_search_run_only_the_new_baselines(tmp_path):
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-2, log = true }')
    url = storage_url(tmp_path)
    study = studies.run_study(specs.load(str(path)).plan("smoke"), storage_url=url).study
    assert len(study.trials) == 3  # the baseline and 2 FF trials
    path.write_text(path.read_text().replace("seeds = 1\n", "seeds = 2\n", 1))
    run = studies.run_study(specs.load(str(path)).plan("smoke"), storage_url=url)
    assert results.planned_seeds(run.study.user_attrs) == [0, 1]
    (new,) = run.study.trials[3:]
    assert new.state == TrialState.COMPLETE and (new.user_attrs["role"], new.user_attrs["seed"]) == ("baseline", 1)
    rows = results.summarize(run.study).rows
    assert [(r.role, r.n, r.planned) for r in rows] == [("baseline", 2, 2), ("ff", 1, 1), ("ff", 1, 1)]


def test_an_interrupt_before_training_stores_why_too(tmp_path, monkeypatch):
    # Outside the training's try, the trial was reported as "no reason recorded (the worker died ...)".
    def interrupted(self, trial):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(studies.Objective, "_choose", interrupted)
    url = storage_url(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        studies.run_study(specs.load(str(write_spec(tmp_path, GRID, seeds=1))).plan("smoke"), storage_url=url)
    (trial,) = trials_of(url, "tiny-smoke")
    assert trial.state == TrialState.FAIL and results.fail_reason(trial) == "interrupted"


def test_a_half_finished_study_names_the_configurations_not_started(tmp_path):
    # Its report chose "the best" among the configurations that had run and did not say others had not.
    plan = specs.load(str(write_spec(tmp_path, GRID.replace('"cosine"]', '"cosine", "linear"]'), seeds=1))).plan(
        "smoke"
    )
    run = studies.run_study(plan, storage_url=storage_url(tmp_path), n_trials=2)  # the baseline, then one FF
    summary = results.summarize(run.study)
    assert [r.label for r in summary.rows] == ["bp-deepsup", "temperature=constant"]
    assert summary.not_started == ["temperature=cosine", "temperature=linear"]
    assert results.answer(summary).endswith(
        "(From a study not yet finished: 2 of its 4 configurations have no trial yet.)"
    )
    stored = json.loads(results.to_json(summary))
    assert stored["not_started"] == summary.not_started
    assert stored["meta"]["axes"]["temperature"] == ["constant", "cosine", "linear"]
    assert stored["axis_levels"] == {"temperature": ["constant"]}
    report = write_report(run.study, tmp_path / "report").read_text()
    assert "Not started yet (2): temperature=cosine, temperature=linear." in report
    # The software its completed trials ran under, which only each trial held before.
    (entry,) = json.loads(results.to_json(summary))["versions"]
    assert entry["trials"] == 2 and entry["versions"]["torch"] == torch.__version__ and entry["device"] == "cpu"
    assert f"Software: ffablate {entry['versions']['ffablate']} (" in report
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
    assert ", on cpu: 2 completed trials." in report and f"torch {torch.__version__} {built}" in report


def test_a_trial_failed_as_stale_while_its_process_was_stopped_is_dropped(tmp_path, monkeypatch):
    # A worker suspended past the heartbeat grace found its trial failed by another run (which reran the point):
    # Optuna's "Cannot tell a FAIL trial." ended it in a traceback, its later trials never run.
    train = studies.Objective._train
    taken: list[int] = []

    def taken_over_once(self, trial, config, role):  # noqa: ANN001, ANN202
        result = train(self, trial, config, role)
        if not taken:
            taken.append(trial.number)
            trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return result

    monkeypatch.setattr(studies.Objective, "_train", taken_over_once)
    plan = specs.load(str(write_spec(tmp_path, GRID, seeds=1))).plan("smoke")
    notes: list[str] = []
    run = studies.run_study(plan, storage_url=storage_url(tmp_path), log=notes.append)
    assert notes == [
        f"note: trial {taken[0]} was failed as stale while this process was stopped (no heartbeat for "
        f"over {studies.GRACE_S} s) and its point went to another run; its result is dropped"
    ]
    states = [t.state for t in run.study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states[taken[0]] == TrialState.FAIL  # the other points ran


@pytest.mark.parametrize("escaping", [KeyboardInterrupt, RuntimeError])
def test_an_exception_from_a_taken_over_trial_still_ends_the_run(tmp_path, monkeypatch, escaping):
    # Optuna raises "Cannot tell a FAIL trial" in place of the objective's own exception: a Ctrl-C (or a bug) on a
    # trial another run had failed was taken for a takeover, and the run went on with signals already ignored.
    def taken_over_then_raises(self, trial, config, role):  # noqa: ANN001, ANN202
        trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        raise escaping("stop here")

    monkeypatch.setattr(studies.Objective, "_train", taken_over_then_raises)
    plan = specs.load(str(write_spec(tmp_path, GRID, seeds=1))).plan("smoke")
    with pytest.raises(escaping):
        studies.run_study(plan, storage_url=storage_url(tmp_path))
    assert len(trials_of(storage_url(tmp_path), "tiny-smoke")) == 1  # no second trial started


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_heartbeat_stopped_on_another_host_is_freed(tmp_path, monkeypatch):
    # It stayed RUNNING for good: Optuna fails stale trials only as a trial starts, and its point counted as
    # taken, so on the last free point none started ("1 running in another worker", run after run).
    monkeypatch.setattr(studies, "HEARTBEAT_S", 1)
    monkeypatch.setattr(studies, "GRACE_S", 1)
    storage = studies.storage_for(storage_url(tmp_path))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    trial.set_user_attr("worker", {"host": "another-host", "pid": 1})
    storage.record_heartbeat(trial._trial_id)
    assert studies.fail_dead_trials(study) == []  # within the grace period it may be running there
    time.sleep(2.5)
    assert studies.fail_dead_trials(study) == [trial.number]
    assert study.trials[0].state == TrialState.FAIL


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_orphaned_before_it_named_its_worker_is_freed(tmp_path, monkeypatch):
    # An interrupt inside Optuna's ask() left a RUNNING trial with no worker and no heartbeat: no run ever failed
    # it, and it held a baseline's point (or a place in a search's trial count) for good.
    study = optuna.create_study(study_name="s", storage=studies.storage_for(storage_url(tmp_path)))
    trial = study.ask()
    assert studies.fail_dead_trials(study) == []  # it may be naming its worker right now
    monkeypatch.setattr(results, "ORPHANED_AFTER_S", -1)
    assert studies.fail_dead_trials(study) == [trial.number]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_two_runs_failing_one_dead_trial_at_once_both_go_on(tmp_path, monkeypatch):
    # The second run's write met a finished trial: UpdateFinishedTrialError, a traceback and exit 1.
    storage = studies.storage_for(storage_url(tmp_path))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2**22 + 12345})  # no such process
    write = storage.set_trial_user_attr

    def the_other_run_got_there_first(trial_id, key, value):  # noqa: ANN001, ANN202
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        write(trial_id, key, value)

    monkeypatch.setattr(storage, "set_trial_user_attr", the_other_run_got_there_first)
    assert studies.fail_dead_trials(study) == [trial.number]  # failed, by the other run
    assert study.trials[0].state == TrialState.FAIL


# ----------------------------------------------------------------------------------------------------
# Spec validation: one line, the key path, exit 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (GRID.replace("[base]", '[base]\nepochs = "two"'), "base.epochs must be an int"),
        (GRID + '[pruner]\ntype = "hyperband"\n', "pruner.type must be one of median, none"),
        (
            GRID.replace('["constant", "cosine"]', '["constant", "warm"]'),
            "axes.temperature names no temperature plugin 'warm' (your own? install its package, or name its module "
            "in FFABLATE_PLUGINS); known:",
        ),
        (
            GRID.replace('["constant", "cosine"]', '["constant", "cosin"]'),
            "axes.temperature names no temperature plugin 'cosin' (did you mean 'cosine'? or your own? install",
        ),
        (GRID.replace("question", "questoin"), "questoin is not a known key (did you mean 'question'?)"),
        (GRID.replace("[axes]", "epoch = 2\n[axes]"), "base.epoch is not a run setting (did you mean 'epochs'?)"),
        (
            GRID.replace('dataset = "fashion-mnist"', 'dataset = "imagenet-9000"'),
            "base.dataset names no dataset 'imagenet-9000' (your own? install its package, or name its module in ",
        ),
        (GRID + '[baseline]\nmethods = ["sgd"]\n', "baseline.methods[0] must be one of"),
        (GRID + '[pruner]\ntype = "median"\nn_startup_trials = -3\n', "pruner.n_startup_trials must be at least 0"),
        (GRID + '[pruner]\ntype = "median"\nn_warmup_steps = -1\n', "pruner.n_warmup_steps must be at least 0"),
        # A misspelt match key matched nothing: every FF cell was compared with one baseline at the defaults.
        (GRID + '[baseline]\nmatch = ["clases"]\n', "baseline.match[0] is not a run setting"),
        (GRID + '[baseline]\nmatch = ["temperature"]\n', "baseline.match[0] names 'temperature', which only FF"),
        (GRID + "[baseline]\nmatch = [3]\n", "baseline.match[0] must be a run setting's name"),
        # A match without the widths FF sweeps compared every width with one baseline at the default width.
        (
            GRID.replace("[axes]", '[axes]\nchannels = ["10,10", "20,20"]') + '[baseline]\nmatch = ["dataset"]\n',
            "baseline.match leaves out 'channels', part of the network FF and its baseline share (backbone, data, "
            'augmentation, epochs), which the FF configurations set; add "channels" to it or leave match out',
        ),
        (
            GRID.replace("[axes]", '[[groups]]\nlabel = "long"\nset = { epochs = 3 }\n[groups.axes]')
            + "[baseline]\nmatch = []\n",
            "baseline.match leaves out 'epochs'",
        ),
        # A list there was a TypeError traceback (unhashable type: 'list').
        (GRID + '[space]\nplugins = [["norm"]]\n', "space.plugins[0] must be a plugin kind"),
        # An unquoted plugin parameter is a TOML table: "base.temperature must be a string" said nothing to do.
        (
            GRID.replace("[axes]", "temperature.t = 0.5\n[axes]"),
            'base.temperature is a table, as TOML reads an unquoted temperature.t = ...: quote the key, "temperature.',
        ),
        (
            GRID.replace('["constant", "cosine"]', '["constant"]\nnegatives.into = ["pixels", "channels"]'),
            'axes.negatives is a table, as TOML reads an unquoted negatives.into = ...: quote the key, "negatives.',
        ),
        (
            GRID + '[space]\ntemperature.start = { type = "float", low = 1.0, high = 2.0 }\n',
            'space.temperature is a table, as TOML reads an unquoted temperature.start = ...: quote the key, "temp',
        ),
        # Next to its plugin's own key, TOML refuses the file ("Cannot overwrite a value"), on the unquoted line.
        (
            GRID.replace("[axes]", "dataset.size = 8\n[axes]"),
            "not valid TOML: Cannot overwrite a value (at line 5, column 17); a plugin parameter's key must be "
            'quoted: "datasets.size" = ...',
        ),
        # A grid ran every point whatever n_trials said.
        (GRID, 'budgets.smoke.n_trials is for sampler = "tpe"; a grid runs every configuration x seed: remove it'),
    ],
)
def test_spec_errors_name_the_key_path(tmp_path, capsys, body, message):
    path = write_spec(tmp_path, body)
    if "n_trials is for" in message:
        path.write_text(path.read_text().replace("seeds = 2\n", "seeds = 2\nn_trials = 3\n", 1))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path}: " in err and message in err


def test_budget_value_of_the_wrong_type(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        GRID + TINY_BUDGET.format(seeds=1).replace("[budgets.quick]\nepochs = 1", "[budgets.quick]\nepochs = 1.5")
    )
    assert main(["study", str(path), "--storage", storage_url(tmp_path)]) == 2
    assert "budgets.quick.epochs must be an int" in capsys.readouterr().err


def test_unknown_study_name_lists_the_known_ones(capsys):
    assert main(["study", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert "temperature-vs-norm" in err and len(err.strip().splitlines()) == 1


def test_changed_spec_refuses_to_mix_into_an_old_study(finished, capsys):
    tmp_path, url, _ = finished
    changed = write_spec(tmp_path, GRID.replace('["constant", "cosine"]', '["constant", "linear"]'), name="tiny2")
    assert main(["study", str(changed), "--budget", "smoke", "--storage", url, "--study-name", "tiny-smoke"]) == 2
    err = capsys.readouterr().err
    assert "different spec" in err and len(err.strip().splitlines()) == 1
    # The configurations that came and went: how a "*" axis shows a plugin installed since.
    assert "its configurations changed, 1 new (e.g. 'temperature=linear') and 1 gone (e.g. 'temperature=cosine')" in err


DOC_SPECS = sorted((Path(__file__).resolve().parent.parent / "docs" / "specs").glob("*.toml"))


@pytest.mark.parametrize("name", [*specs.available_names(), *map(str, DOC_SPECS)])
def test_every_shipped_spec_resolves_at_every_budget(name):
    # The specs in docs/specs too: docs/benchmarks.md gives commands that run them.
    spec = specs.load(name)
    for budget in specs.BUDGETS:
        plan = spec.plan(budget)
        assert plan.cells and plan.budget.seeds
        assert any(c.role == "baseline" for c in plan.cells)


def test_the_spec_format_example_in_the_docs_resolves_at_every_budget(tmp_path):
    docs = (Path(__file__).resolve().parent.parent / "docs" / "studies.md").read_text()
    example = re.search(r"## Spec format\n.*?```toml\n(.*?)```", docs, re.S)
    assert example, "docs/studies.md lost its spec example"
    path = tmp_path / "example.toml"
    path.write_text(example.group(1))
    for budget in specs.BUDGETS:
        assert specs.load(str(path)).plan(budget).cells


def test_ff_plugin_parameters_in_base_are_left_out_of_the_baselines(tmp_path):
    # [base] "goodness.tau" is meant for the FF grid's logsumexp; a baseline's default goodness has no tau.
    ff_base = '"goodness.tau" = 2.0\nnegatives = "random-label"\nloss = "softplus-threshold"\n'
    body = GRID.replace("[axes]", ff_base + "[axes]").replace(
        'temperature = ["constant", "cosine"]', 'goodness = ["logsumexp"]'
    )
    plan = specs.load(str(write_spec(tmp_path, body, seeds=1))).plan("smoke")
    configs = {c.role: plan.config(c.overrides, 0) for c in plan.cells}
    assert configs["ff"].params_of("goodness") == {"tau": 2.0} and configs["ff"].negatives == "random-label"
    assert configs["baseline"].params_of("goodness") == {} and configs["baseline"].negatives == "none"
    assert configs["baseline"].dataset == configs["ff"].dataset == "fashion-mnist"


def test_temperature_vs_norm_is_the_full_grid_with_a_baseline_per_norm():
    plan = specs.load("temperature-vs-norm").plan("quick")
    ff = [c for c in plan.cells if c.role == "ff"]
    baselines = [c for c in plan.cells if c.role == "baseline"]
    # The norm modules are part of the backbone BP trains too: every norm level has its own BP-DeepSup.
    assert len(ff) == 20 and len(baselines) == 4
    assert {c.overrides["norm"] for c in baselines} == {c.overrides["norm"] for c in ff}
    assert {c.match for c in ff} == {c.match for c in baselines}
    assert len(plan.budget.seeds) >= 2


def test_missing_dataset_is_skipped_with_a_note():
    plan = specs.load("label-hierarchy").plan("quick", available=lambda name, params: name != "cifar100")
    assert any("cifar100" in note for note in plan.notes)
    assert all(c.overrides.get("dataset") != "cifar100" for c in plan.cells)


def test_a_coarse_label_subset_plan_does_not_resume_a_study_stored_before_its_images_changed():
    # Coarse subsets are drawn by the fine labels since session 13: a limited label-hierarchy study stored before
    # holds other images for its coarse runs. Its full budget (no subset) and other studies keep their fingerprint.
    fine_only = lambda name, params: name != "cifar100"  # noqa: E731
    quick = specs.load("label-hierarchy").plan("quick", available=fine_only)
    assert quick.code_changes() == {"labels=coarse": specs.COARSE_SUBSETS_CHANGE}
    assert "labels=coarse" not in specs.load("label-hierarchy").plan("full", available=fine_only).code_changes()
    assert specs.load("temperature-vs-norm").plan("quick").code_changes() == {}


def test_a_weight_decay_plan_does_not_resume_a_study_stored_before_decay_left_out_vectors(tmp_path, monkeypatch):
    # Decay reaches only kernels and weight matrices since session 19: a study stored before decayed every
    # parameter, and its resumed seeds would be averaged with the new ones. Plans without decay keep their
    # fingerprint.
    plain = specs.load(str(write_spec(tmp_path, GRID, name="plain"))).plan("smoke")
    decayed = specs.load(str(write_spec(tmp_path, GRID.replace("[axes]", "weight_decay = 0.05\n[axes]")))).plan("smoke")
    assert plain.code_changes() == {}
    assert decayed.code_changes() == {"weight_decay": specs.WEIGHT_DECAY_CHANGE}
    now = decayed.fingerprint()
    monkeypatch.setattr(specs.Plan, "code_changes", lambda self: {})  # the fingerprint as ffablate made it before
    assert decayed.fingerprint() != now


# ----------------------------------------------------------------------------------------------------
# Statistics


def test_t_quantiles_are_exact_also_at_fractional_df():
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, rel=1e-6)  # tan(0.475 pi)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, rel=1e-6)
    assert t_quantile(0.975, 1.2) == pytest.approx(8.6, abs=0.1)  # between df 1 and 2, where Welch lands
    est = mean_ci([0.80, 0.82, 0.84])
    assert est.mean == pytest.approx(0.82) and est.half_width == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)


def test_welch_interval_and_degenerate_cases():
    diff = welch_ci([0.9, 0.92, 0.94], [0.8, 0.8, 0.86])
    assert diff.mean == pytest.approx(0.1)
    # SE = sqrt(0.0004/3 + 0.0012/3) = 0.023094 at Welch's df = 3.2: scipy's ttest_ind(equal_var=False) interval is
    # (0.029036, 0.170964).
    assert diff.half_width == pytest.approx(0.070964, rel=1e-5)
    assert diff.low == pytest.approx(0.029036, rel=1e-4)
    assert diff.excludes_zero()
    assert not mean_ci([0.5]).has_ci and not welch_ci([0.5], [0.4, 0.6]).has_ci
    assert welch_ci([0.5, 0.5], [0.4, 0.4]).half_width == 0
    # A NaN among the values: no interval, as mean_ci and paired_ci give it (Welch raised a ValueError on df=nan).
    nan = welch_ci([0.8, math.nan, 0.9], [0.7, 0.75, 0.72])
    assert not nan.has_ci and not mean_ci([0.8, math.nan]).has_ci and not nan.decisive


def test_an_interval_that_excludes_zero_prints_ends_that_exclude_it():
    # 0.14 ± 0.136 pp is "ahead"; at one digit it printed "+0.1 ± 0.1", an interval reaching zero.
    assert fmt(Estimate(0.0014, 0.00136, 3), signed=True) == "+0.140 ± 0.136"
    assert fmt(Estimate(0.0014, 0.002, 3), signed=True) == "+0.1 ± 0.2"  # holds zero: the usual digit
    assert fmt(Estimate(-0.25, 0.1, 3), signed=True) == "-25.0 ± 10.0"
    # Decisive intervals that printed as touching zero at the old 4-digit cap.
    assert fmt(Estimate(0.01939649, 0.01939641, 3), signed=True) == "+1.93965 ± 1.93964"
    # ... and at the 6-digit cap that followed (a review's fuzz over gaps of k/n test images found 2,062).
    assert fmt(Estimate(0.001, 0.000999999, 3), signed=True) == "+0.1000000 ± 0.0999999"
    # A difference of -1e-16 (FF [.90, .92, .94] against BP [.91, .92, .93]) printed "-0.0", hinting a direction.
    tie = welch_ci([0.90, 0.92, 0.94], [0.91, 0.92, 0.93])
    assert tie.mean < 0 and fmt(tie, signed=True).startswith("0.0 ± ")


def test_a_zero_width_interval_is_worded_not_read_as_a_direction():
    # FF at exactly chance on every seed against BP with no spread either: scipy's Welch interval has width 0 too.
    zero = welch_ci([0.1, 0.1, 0.1], [0.2, 0.2, 0.2])
    assert zero.no_spread and zero.excludes_zero() and not zero.decisive
    assert fmt(zero, signed=True) == "-10.0 ± 0.0 (no spread across seeds)"
    # Equal values whose mean rounds: a width of 1e-17, still no spread.
    assert mean_ci([0.1, 0.1, 0.1]).no_spread and fmt(mean_ci([0.1] * 3)).endswith("(no spread across seeds)")
    spread = welch_ci([0.1, 0.11, 0.1], [0.2, 0.2, 0.21])
    assert spread.decisive and not spread.no_spread and "spread" not in fmt(spread)
    assert not welch_ci([0.1], [0.2, 0.21]).decisive  # no interval at all


def test_paired_and_contrast_intervals_match_scipy():
    from scipy import stats

    ff, bp = [0.81, 0.83, 0.80, 0.84], [0.86, 0.88, 0.85, 0.86]
    paired, expected = paired_ci(ff, bp), stats.ttest_rel(ff, bp).confidence_interval(0.95)
    assert (paired.low, paired.high) == (
        pytest.approx(expected.low, abs=1e-12),
        pytest.approx(expected.high, abs=1e-12),
    )
    assert paired.n == 4 and not paired_ci([0.8], [0.9]).has_ci
    with pytest.raises(ValueError):
        paired_ci([0.8, 0.9], [0.9])
    # Welch is the two-sample contrast; scipy's unequal-variance interval is the reference.
    a, b = [0.81, 0.83, 0.80, 0.84, 0.79], [0.86, 0.87]
    welch, expected = contrast_ci([(1.0, a), (-1.0, b)]), stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert welch == welch_ci(a, b) and welch.low == pytest.approx(expected.low, abs=1e-12)
    # A gap's change between two K: four samples, Welch-Satterthwaite degrees of freedom.
    f1, b1, f0, b0 = [0.5, 0.52], [0.6, 0.63, 0.61], [0.7, 0.71], [0.72, 0.7]
    change = contrast_ci([(1.0, f1), (-1.0, b1), (-1.0, f0), (1.0, b0)])
    parts = [stats.tvar(x) / len(x) for x in (f1, b1, f0, b0)]
    df = sum(parts) ** 2 / sum(p**2 / (len(x) - 1) for p, x in zip(parts, (f1, b1, f0, b0), strict=True))
    assert change.mean == pytest.approx(sum(f1) / 2 - sum(b1) / 3 - sum(f0) / 2 + sum(b0) / 2)
    assert change.half_width == pytest.approx(stats.t.ppf(0.975, df) * sum(parts) ** 0.5, rel=1e-12)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("[-1]", "budgets.smoke.seeds[0] is -1; a seed must be in 0..4294967295"),
        ("[0, 4294967296]", "budgets.smoke.seeds[1] is 4294967296; a seed must be in 0..4294967295"),
        ("4294967296", "budgets.smoke.seeds = 4294967296: give a count from 1 to 1000"),
    ],
)
def test_seeds_numpy_cannot_take_are_spec_errors(tmp_path, capsys, seeds, message):
    path = write_spec(tmp_path, GRID, seeds=seeds)
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err, err


TPE = """
question = "Which learning rate?"
sampler = "tpe"
[base]
dataset = "fashion-mnist"
{base}
[axes]
temperature = ["constant"]
[space]
{space}
[baseline]
untuned = {untuned}
"""


def write_tpe_spec(tmp_path: Path, space: str, base: str = "", untuned: list[str] | None = None) -> Path:
    """A one-configuration TPE spec; ``untuned`` defaults to the searched keys the baseline shares."""
    if untuned is None:
        keys = re.findall(r'^"?([\w.]+)"?\s*=', space, flags=re.M)
        untuned = [k for k in keys if not specs._is_ff_only(k)]
    path = write_spec(tmp_path, TPE.format(base=base, space=space, untuned=json.dumps(untuned)), seeds=1)
    text = path.read_text().replace("seeds = 1\n", "seeds = 1\nn_trials = 2\n")
    for budget in ("quick", "full"):
        text = text.replace(f"[budgets.{budget}]\n", f"[budgets.{budget}]\nn_trials = 2\n")
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("space", "base", "message"),
    [
        ('lr = { type = "categorical", choices = ["a", "b"] }', "", "space.lr.choices[0] must be a number"),
        (
            'lr = { type = "float", low = -1.0, high = 1.0 }',
            "",
            "configuration 'temperature=constant with lr=-1.0 from the search space': lr must be a positive",
        ),
        ('epochs = { type = "float", low = 1.0, high = 1.9 }', "", 'which takes an int: use type = "int"'),
        ('batch_size = { type = "int", low = 0, high = 2 }', "", "batch_size must be at least 1, got 0"),
        ('batch_size = { type = "int", low = 10, high = 50, step = 20 }', "", "space.batch_size.step is not a known"),
        ('channels = { type = "categorical", choices = [[8, 16]] }', "", "space.channels.choices[0] must be a string"),
        ('channels = { type = "int", low = 8, high = 16 }', "", 'use type = "categorical" with choices'),
        ('"fusion.k" = { type = "float", low = 0.0, high = 1.0 }', 'fusion = "sum-from-k"', "'k' takes an integer"),
    ],
)
def test_search_space_values_must_be_ones_the_key_takes(tmp_path, capsys, space, base, message):
    path = write_tpe_spec(tmp_path, space, base)
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: " in err and message in err, err
    assert not (tmp_path / "studies.db").exists()


# Tiny and capped at one trial, so that on a regression the study trains for seconds, not a whole grid.
@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ("batch_size = [5000]", "300 training images after holding out val_images=200 make no full batch of 5000"),
        ("classes = [1]", "classes=1: dataset 'fashion-mnist' has 10 classes"),
        ('channels = ["4,4,4,4,4,4"]\nstrides = ["2"]', "halve 28px images more than 4 times"),
        ('channels = ["4,4"]\nstrides = ["2,2"]', "classwise goodness needs at least one channel per class"),
    ],
)
def test_mistakes_that_show_with_the_data_stop_the_study_before_it_exists(tmp_path, capsys, axes, message):
    path = write_spec(tmp_path, GRID.replace('temperature = ["constant", "cosine"]', axes), seeds=1)
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # One line: the study's banner comes only after the preflight has passed.
    assert len(err) == 1 and err[0].startswith(f"ffablate: error: {path}: budgets.smoke configuration "), err
    assert message in err[0]
    # No study was made under this spec's name, so the fixed spec starts it afresh.
    assert optuna.get_all_study_names(url) == []


def test_the_ends_of_a_search_range_are_built_on_the_data_before_the_study(tmp_path, capsys):
    path = write_tpe_spec(tmp_path, 'batch_size = { type = "int", low = 10, high = 5000 }')
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "with batch_size=5000 from the search space" in err and "no full batch of 5000" in err
    assert optuna.get_all_study_names(url) == []


def test_hints_to_rerun_a_study_keep_its_name_and_spec(tmp_path):
    url = storage_url(tmp_path)
    made = optuna.create_study(storage=url, study_name="mine", direction="maximize")
    made.set_user_attr("ffablate_spec", "goodness")
    made.set_user_attr("budget", "smoke")
    made.set_user_attr("spec_path", str(specs.resolve("goodness")))
    attrs = {"cell": "goodness=classwise", "role": "ff", "seed": 0, "fail_reason": "ChecksumMismatch: bad"}
    made.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs=attrs))
    with pytest.raises(FFablateError) as caught:
        studies.winning_recipe(url, "mine")
    assert f"`ffablate study goodness --budget smoke --storage {url} --study-name mine`" in str(caught.value)


class WeightedLast(torch.nn.Module):
    """A fusion with one parameter, wrong in the way ``mistake`` names."""

    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int], mistake: str = ""):
        super().__init__()
        self.w, self.mistake = torch.nn.Parameter(torch.ones(())), mistake

    def forward(self, scores, features):
        logits = self.w * scores[-1]
        return logits[:, :1] if self.mistake == "one-logit" else logits

    def loss(self, scores, features, labels):
        per_sample = F.cross_entropy(self(scores, features), labels, reduction="none")
        if self.mistake == "per-sample-loss":
            return per_sample
        return per_sample.mean().detach() if self.mistake == "detached-loss" else per_sample.mean()


class WeightedLastPlugin:
    @hookimpl
    def ffablate_register_fusion(self, register):
        register("weighted-last", WeightedLast, "a fusion with a mistake (test plugin)")


def run_weighted_last(tmp_path: Path, extra: str = "") -> tuple[int, str]:
    """Exit code and storage URL of a one-trial smoke study of GRID with the weighted-last fusion (plus ``extra``
    base lines)."""
    body = GRID.replace("[axes]", f'fusion = "weighted-last"\n{extra}[axes]')
    path, url = write_spec(tmp_path, body, seeds=1), storage_url(tmp_path)
    plugin = WeightedLastPlugin()
    add_plugin(plugin)
    try:
        return main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "1"]), url
    finally:
        remove_plugin(plugin)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ("one-logit", r"returned a torch.float32 tensor of shape \(2, 1\) for 2 samples; a fusion must return"),
        ("per-sample-loss", r"returned a torch.float32 tensor of shape \(2,\); a loss must return a 0-dim"),
        ("detached-loss", r"has no gradient: compute it from the fusion's output"),
    ],
)
def test_a_fusion_that_fails_only_in_training_stops_the_study_before_it_exists(tmp_path, capsys, mistake, message):
    code, url = run_weighted_last(tmp_path, f'"fusion.mistake" = "{mistake}"\n')
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fusion plugin 'weighted-last'" in err[0], err
    assert re.search(message, err[0]), err[0]
    assert optuna.get_all_study_names(url) == []


def test_train_meets_a_fusion_with_wrong_logits_before_it_trains(tiny_config, monkeypatch):
    # `ffablate train` found (N, 1) logits at the first evaluation, after an epoch whose work was then lost.
    steps = []
    monkeypatch.setattr(FFTrainer, "train_step", lambda self, *args: steps.append(1) or 0.0)
    config = tiny_config.with_updates({"fusion": "weighted-last", "fusion.mistake": "one-logit"})
    plugin = WeightedLastPlugin()
    add_plugin(plugin)
    try:
        with pytest.raises(ConfigError, match=r"shape \(2, 1\) for 2 samples; a fusion must return"):
            train_run(config)
    finally:
        remove_plugin(plugin)
    assert steps == []


def test_the_preflight_leaves_a_fine_fusion_plugin_to_train(tmp_path):
    code, url = run_weighted_last(tmp_path)
    assert code == 0
    assert [t.state for t in trials_of(url, "tiny-smoke")] == [TrialState.COMPLETE]


PRUNED_LR = """
question = "Is a learning rate of 1e-7 pruned before n_startup_trials FF trials have finished?"
[base]
dataset = "fashion-mnist"
[axes]
lr = [0.002, 1e-7]
[pruner]
type = "median"
n_startup_trials = {startup}
n_warmup_steps = 0
"""


def test_baselines_do_not_count_towards_the_pruners_startup_trials(tmp_path):
    # The baseline runs first and reports nothing; Optuna's MedianPruner counted it, so the second FF trial was
    # pruned with a single FF trial to compare against.
    path = write_spec(tmp_path, PRUNED_LR.format(startup=2), seeds=1)
    path.write_text(path.read_text().replace("epochs = 1\nbatch_size", "epochs = 2\nbatch_size", 1))
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    assert [t.state for t in trials_of(url, "tiny-smoke")] == [TrialState.COMPLETE] * 4  # lr is matched: 2 BP


def test_a_changed_pruner_is_refused_on_resume(tmp_path, capsys):
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, PRUNED_LR.format(startup=2), seeds=1)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "1"]) == 0
    write_spec(tmp_path, PRUNED_LR.format(startup=50), seeds=1)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was made with pruner" in err and "'n_startup_trials': 50" in err


@pytest.mark.parametrize(
    ("space", "untuned", "message"),
    [
        (
            'lr = { type = "float", low = 1e-3, high = 3e-3 }',
            [],
            "space.lr is a setting the BP baseline shares, so FF would be tuned on it and the baseline run at the base "
            'value; tune the baseline too with [baseline] levels = { lr = [...] }, or add untuned = ["lr"]',
        ),
        (
            'plugins = ["norm"]',
            [],
            "space.plugins searches norm, part of the network FF and its baseline share (backbone, data, "
            "augmentation, epochs); sweep its parameters as [axes] keys or fix them in [base]",
        ),
        # Before: accepted with untuned = ["channels"], so the best FF width was compared with BP at the base width.
        (
            'channels = { type = "categorical", choices = ["10,10", "20,20"] }',
            ["channels"],
            "space.channels is part of the network FF and its baseline share (backbone, data, augmentation, epochs), "
            "and a search draws values no baseline ran at; sweep it as an [axes] key",
        ),
        ('epochs = { type = "int", low = 1, high = 2 }', [], "space.epochs is part of the network"),
        ('"norm.eps" = { type = "float", low = 1e-5, high = 1e-3 }', ["norm.eps"], 'space."norm.eps" is part of'),
        ('"temperature.start" = { type = "float", low = 1.0, high = 2.0 }', ["lr"], "baseline.untuned[0] names 'lr'"),
        (
            'lr = { type = "float", low = 1e-3, high = 3e-3 }\n[baseline.levels]\nepochs = [1]',
            ["lr"],
            "baseline.levels.epochs must be a [space] key the baseline shares",
        ),
        (
            'lr = { type = "float", low = 1e-3, high = 3e-3 }\n[baseline.levels]\nlr = [1e-3, 0.001]',
            [],
            "baseline.levels.lr must list distinct values",
        ),
        (
            'lr = { type = "float", low = 1e-3, high = 3e-3 }\n[baseline.levels]\nlr = [true]',
            [],
            "baseline.levels.lr[0] must be a number",
        ),
    ],
)
def test_a_search_over_what_the_baseline_shares_must_say_so(tmp_path, capsys, space, untuned, message):
    # Before session 10 such a search compared tuned FF trials with a baseline at the base value without a word.
    path = write_tpe_spec(tmp_path, space, untuned=untuned)
    path.write_text(path.read_text().replace('temperature = ["constant"]', 'temperature = ["cosine"]'))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err, err


def test_baseline_levels_need_a_search(tmp_path, capsys):
    path = write_spec(tmp_path, GRID + "[baseline]\nlevels = { lr = [0.01] }\n")
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    assert f'{path}: baseline.levels needs sampler = "tpe"' in capsys.readouterr().err
    # A k-sweep's answer and plots take one baseline per K: they would not say which level was chosen.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3 }')
    path.write_text(path.read_text().replace('sampler = "tpe"', 'sampler = "tpe"\nanalysis = "k-sweep"'))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    assert (
        f'{path}: baseline.untuned is for analysis = "search" or "ablation", not \'k-sweep\'' in capsys.readouterr().err
    )


def test_a_search_tunes_its_baseline_on_the_levels_it_names(tmp_path):
    space = 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }'
    path = write_tpe_spec(tmp_path, space, untuned=[])
    path.write_text(path.read_text().replace("untuned = []", "levels = { lr = [0.001, 0.01] }"))
    plan = specs.load(str(path)).plan("smoke")
    baselines = [c for c in plan.cells if c.role == "baseline"]
    assert [(c.label, c.overrides["lr"]) for c in baselines] == [
        ("bp-deepsup lr=0.001", 0.001),
        ("bp-deepsup lr=0.01", 0.01),
    ]
    assert len({c.match for c in plan.cells}) == 1  # both levels are matched to the FF cell
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    summary = results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url))
    chosen = max(summary.baselines, key=lambda r: r.val.mean)
    assert all(r.base is chosen for r in summary.ff if r.n)
    assert chosen.base_choice == "the best of 2 levels on validation"
    assert f"({chosen.label} is the best of 2 levels on validation)" in results.answer(summary)
    (note,) = [row[-1] for row in results.table_rows(summary) if row[0] == chosen.label]
    assert note == "gaps are to this one: the best of 2 levels on validation"


def test_a_search_with_an_untuned_baseline_says_so_in_its_answer_and_table(tmp_path, capsys):
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }', "lr = 0.002")
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    # The banner counted the FF trials alone, as if the baseline's were not part of the run.
    assert "study tiny-smoke (TPE, 2 FF trials + 1 baseline) in " in capsys.readouterr().err
    summary = results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url))
    assert summary.untuned == "lr=0.002"
    assert "; the baseline ran at lr=0.002, which FF searched, so the comparison favours FF." in results.answer(summary)
    (baseline,) = [row for row in results.table_rows(summary) if row[3] == "(baseline)"]
    assert "untuned: lr=0.002 (FF searched it)" in baseline[-1]
    # A search stored before session 10 recorded nothing about it; its trials still say what FF searched.
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    study.set_user_attr("baseline_untuned", None)
    assert results.summarize(study).untuned == "lr=0.002"


def test_a_search_over_a_shared_setting_compares_each_trial_with_that_settings_baseline(tmp_path):
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }')
    path.write_text(path.read_text().replace('temperature = ["constant"]', 'norm = ["decoupled", "none"]'))
    plan = specs.load(str(path)).plan("smoke")
    objective = studies.Objective(plan, "cpu", studies.DataCache(None))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(6):
        _, _, overrides, _, match, _ = objective._sample(study.ask())
        sampled.append(overrides["norm"])
        # Before: every trial took the first level's match, and FF with norm=none was compared with BP on decoupled.
        assert json.loads(match) == {"norm": overrides["norm"]}
    assert set(sampled) == {"decoupled", "none"}


def test_a_search_refuses_groups(tmp_path, capsys):
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }')
    groups = '[[groups]]\nlabel = "a"\naxes = { temperature = ["constant"] }\n[[groups]]\nlabel = "b"\n'
    path.write_text(path.read_text().replace('[axes]\ntemperature = ["constant"]\n', groups))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    assert f'{path}: groups needs sampler = "grid"' in capsys.readouterr().err


def test_a_search_names_what_it_cannot_run(tmp_path, capsys):
    # Its only dataset missing: the first trial crashed with StopIteration, after the study had been made.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }')
    path.write_text(path.read_text().replace('dataset = "fashion-mnist"', 'dataset = "cifar10"'))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    assert "nothing to run at budget smoke: skipped the study: dataset 'cifar10' is not available" in (
        capsys.readouterr().err
    )
    # An FF-only setting is never run by the baseline, so the baseline is not "untuned" on it.
    path = write_tpe_spec(tmp_path, 'plugins = ["temperature"]', untuned=["temperature"])
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    assert "baseline.untuned[0] names 'temperature', which only FF uses" in capsys.readouterr().err


def test_a_search_samples_only_the_levels_its_budget_plans(tmp_path):
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3, log = true }')
    text = path.read_text().replace('temperature = ["constant"]', 'temperature = ["constant", "cosine", "linear"]')
    smoke = 'seeds = 1\nn_trials = 3\naxes = { temperature = ["constant"] }\n'  # the smoke budget's levels
    path.write_text(text.replace("seeds = 1\nn_trials = 2\n", smoke, 1))
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    ff = [t for t in trials_of(url, "tiny-smoke") if t.user_attrs["role"] == "ff"]
    assert len(ff) == 3 and {t.params["temperature"] for t in ff} == {"constant"}


def test_a_study_of_that_name_made_by_other_code_is_left_alone(tmp_path, capsys):
    url = storage_url(tmp_path)
    foreign = optuna.create_study(study_name="plain", storage=url)  # minimizes, as Optuna does by default
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    path = write_spec(tmp_path, GRID, seeds=1)
    args = ["study", str(path), "--budget", "smoke", "--storage", url, "--study-name", "plain"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "study 'plain' in this storage was not made by ffablate (2 trial(s), direction minimize); "
        "rerun with --study-name NEW"
    )
    # Before: ffablate wrote its metadata onto it and added its trials beside the two.
    again = optuna.load_study(study_name="plain", storage=url)
    assert len(again.trials) == 2 and again.user_attrs == {}
    optuna.create_study(study_name="pareto", storage=url, directions=["maximize", "minimize"])  # no trials
    assert main([*args[:-1], "pareto"]) == 2
    assert "study 'pareto' in this storage was not made by ffablate (0 trial(s), direction maximize, minimize)" in (
        capsys.readouterr().err
    )


def test_a_study_runs_from_a_thread_other_than_the_main_one(tmp_path):
    # Python lets only the main thread set a signal handler: installing the SIGTERM one raised there.
    path = write_spec(tmp_path, GRID, seeds=1)
    args = ["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path), "--n-trials", "1"]
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(args)))
    thread.start()
    thread.join()
    assert codes == [0]


OWN_RECIPE = """
question = "How far is this recipe from BP?"
[base]
dataset = "fashion-mnist"
temperature = "cosine"
"temperature.start" = 3.0
[axes]
norm = ["none", "decoupled"]
"""


def test_a_recipe_replaces_the_specs_own_recipe_settings(tmp_path):
    # The winner ran the default temperature (constant, so its recipe has no temperature key): the spec's own
    # cosine, with its start, stayed in the base and ran instead.
    plan = specs.load(str(write_spec(tmp_path, OWN_RECIPE))).plan("smoke")
    laid = plan.with_recipe({"fusion": "last"}, "source-smoke")
    assert "temperature" not in laid.base and "temperature.start" not in laid.base
    assert laid.base["fusion"] == "last" and laid.base["dataset"] == "fashion-mnist"


def test_a_recipe_comes_only_from_a_finished_study_of_that_name(tmp_path):
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, GRID, seeds=1)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "2"]) == 0
    with pytest.raises(FFablateError, match=r"study tiny-smoke is not finished \(1 of its runs are still to do\)"):
        studies.winning_recipe(url, "tiny")
    optuna.create_study(storage=url, study_name="tin-smoke")
    with pytest.raises(FFablateError, match="no study 'ti' in"):  # "ti" is no prefix of tiny-smoke's name
        studies.load_study(url, "ti")
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    recipe, source = studies.winning_recipe(url, "tiny")
    assert source == "tiny-smoke" and recipe["temperature"] in ("constant", "cosine")
    # A study of the spec under a name of its own (--study-name after a refused resume): "tiny" picked tiny-smoke
    # and said nothing of it.
    renamed = optuna.create_study(storage=url, study_name="tiny-lr")
    renamed.set_user_attr("ffablate_spec", "tiny")
    with pytest.raises(FFablateError, match="'tiny' matches several studies in .*: tiny-smoke, tiny-lr; name one"):
        studies.winning_recipe(url, "tiny")
    # A typo gets a hint; only a study spec's name gets the command that makes it ("tinyy" has no spec to run).
    with pytest.raises(FFablateError, match=r"no study 'tinyy' in .*\(did you mean 'tiny-lr'\?\); studies there: "):
        studies.load_study(url, "tinyy")
    with pytest.raises(FFablateError, match=r"\(to make it: `ffablate study temperature-vs-norm --storage"):
        studies.load_study(url, "temperature-vs-norm")


def test_a_read_only_storage_is_a_one_line_error(tmp_path, capsys):
    # The first write (creating the study) failed with a traceback and exit 1.
    db = tmp_path / "studies.db"
    optuna.storages.RDBStorage(f"sqlite:///{db}")  # the schema, so that the storage opens
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    assert main(["study", str(write_spec(tmp_path, GRID, seeds=1)), "--budget", "smoke", "--storage", read_only]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the study's header line, then the error
    assert "Traceback" not in "".join(err) and err[-1].startswith("ffablate: error: the storage refused a write")
    assert "readonly database" in err[-1]


def test_a_worker_leaves_a_point_that_another_live_worker_runs(tmp_path, capsys):
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, GRID, seeds=1)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    plan = specs.load(str(path)).plan("smoke")
    done = {studies.point_of(t) for t in study.trials if studies.is_done(t)}
    ((label, seed),) = [(c.label, s) for c in plan.cells for s in plan.budget.seeds if (c.label, s) not in done]
    held = study.ask()  # another worker, alive on this host, running the last point
    attrs = {"worker": {"host": socket.gethostname(), "pid": os.getpid()}, "role": "ff", "cell": label, "seed": seed}
    for key, value in attrs.items():
        held.set_user_attr(key, value)
    capsys.readouterr()
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "1 trial(s) left (1 running in another worker); rerun the same command to resume" in out
    runs = [t for t in trials_of(url, "tiny-smoke") if studies.point_of(t) == (label, seed)]
    assert [t.state for t in runs] == [TrialState.RUNNING]  # not run a second time beside it
    # A worker that asks anyway (it started as the last point was taken) gets a trial that runs nothing.
    cells = [c.label for c in plan.cells]
    study = optuna.load_study(
        study_name="tiny-smoke", storage=url, sampler=studies.ResumableGridSampler(cells, plan.budget.seeds)
    )
    objective = studies.Objective(plan, "cpu", studies.DataCache(None))
    study.optimize(objective, n_trials=3, catch=(FFablateError,))  # the surplus trial stops the loop
    (extra,) = [t for t in study.trials if t.user_attrs.get(results.SURPLUS)]
    assert extra.state == TrialState.FAIL and "config" not in extra.user_attrs and extra.number == len(study.trials) - 1
    assert not results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url)).failures


def test_a_resumed_search_does_not_replay_its_first_samples(tmp_path):
    # TPESampler(seed=0) in every process drew the same random start again after a resume.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-2, log = true }')
    # n_trials = 16: its first 4 FF samples are TPE's random start, which a new seed-0 sampler would replay.
    path.write_text(path.read_text().replace("seeds = 1\nn_trials = 2\n", "seeds = 1\nn_trials = 16\n", 1))
    url = storage_url(tmp_path)
    for n_trials in ("3", "2"):  # the first run: the baseline, then two FF trials
        assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", n_trials]) == 0
    lrs = [t.params["lr"] for t in trials_of(url, "tiny-smoke") if t.user_attrs["role"] == "ff"]
    assert len(lrs) == 4 and len(set(lrs)) == 4


def _take_points(url: str, cells: list[str], seeds: list[int], start, takes: int) -> None:
    """One grid worker: open the study on a connection of its own, wait for the others, then take points."""
    study = optuna.load_study(study_name="race", storage=url, sampler=studies.ResumableGridSampler(cells, seeds))
    start.wait()
    for _ in range(takes):
        study.ask()


def test_workers_starting_together_take_distinct_grid_points(tmp_path):
    # Four workers that read the free points at one instant all took the first: the hand-out was read, then write.
    import multiprocessing

    url, cells, seeds, workers, takes = storage_url(tmp_path), [f"c{i}" for i in range(6)], [0, 1], 4, 3
    optuna.create_study(study_name="race", storage=url)
    context = multiprocessing.get_context("fork")
    for _ in range(2):
        start = context.Barrier(workers)
        procs = [context.Process(target=_take_points, args=(url, cells, seeds, start, takes)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        grid = studies.ResumableGridSampler(cells, seeds)
        study = optuna.load_study(study_name="race", storage=url, sampler=grid)
        running = study.get_trials(states=(TrialState.RUNNING,))
        taken = [grid._point(t.system_attrs["grid_id"]) for t in running]
        assert len(set(taken)) == len(taken) == len(cells) * len(seeds), sorted(taken)
        extra = study.ask()  # a worker more than the grid has points: it runs nothing
        attrs = study._storage.get_trial_user_attrs(extra._trial_id)
        assert attrs.get(results.SURPLUS) and attrs["worker"]["pid"] == os.getpid()
        study._storage.set_trial_state_values(extra._trial_id, TrialState.FAIL)
        for trial in running:  # failed (a rerun's to retake), so the next round finds the whole grid free
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _open_storage(url: str, start) -> None:
    start.wait()
    studies.storage_for(url)


def open_together(url: str, workers: int = 4) -> list[int | None]:
    """The exit codes of ``workers`` processes that open the storage at ``url`` at the same moment."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    start = context.Barrier(workers)
    procs = [context.Process(target=_open_storage, args=(url, start)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    return [proc.exitcode for proc in procs]


def test_workers_opening_a_new_storage_together_all_open_it(tmp_path):
    # Each worker creates Optuna's tables in a new SQLite file; the slower ones met the faster one's rows.
    for round_ in range(3):
        assert open_together(f"sqlite:///{tmp_path / f'new{round_}.db'}") == [0] * 4


def test_search_workers_started_together_run_its_n_trials_between_them(tmp_path):
    # Each worker fixed its count when it started: two workers on a 4-trial search ran up to 8 FF trials.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-2, log = true }')
    path.write_text(path.read_text().replace("seeds = 1\nn_trials = 2\n", "seeds = 1\nn_trials = 4\n", 1))
    url = storage_url(tmp_path)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    argv = [sys.executable, "-m", "ffablate.cli", "study", str(path), "--budget", "smoke", "--storage", url]
    workers = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()
    trials = trials_of(url, "tiny-smoke")
    ff = [t for t in trials if t.user_attrs.get("role") == "ff"]
    assert len(ff) == 4 and all(t.state == TrialState.COMPLETE for t in ff)
    assert [t.user_attrs["role"] for t in trials if t.state == TrialState.COMPLETE].count("baseline") == 1
    summary = results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url))
    assert not summary.failures  # a trial that found the search full is neither a result nor a failure


def test_a_baseline_enqueued_twice_runs_once(tmp_path):
    # Two search workers starting together each found the baseline missing and each enqueued it.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-2, log = true }')
    url = storage_url(tmp_path)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    (baseline,) = [t for t in study.trials if t.user_attrs["role"] == "baseline"]
    study.enqueue_trial({}, user_attrs={k: baseline.user_attrs[k] for k in ("role", "cell", "seed")})
    assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    complete = [t.user_attrs["role"] for t in trials_of(url, "tiny-smoke") if t.state == TrialState.COMPLETE]
    assert sorted(complete) == ["baseline", "ff", "ff"]
    assert not results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url)).failures


def test_a_locked_storage_says_who_holds_it(tmp_path):
    # "database is locked; check the URL (for sqlite, that its folder exists and is writable ...)" blamed the URL.
    import sqlite3

    db = tmp_path / "studies.db"
    optuna.storages.RDBStorage(f"sqlite:///{db}")
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(FFablateError, match="another process holds it locked; wait for it, or pass another"):
            studies.storage_for(f"sqlite:///{db}?timeout=0.2")  # SQLite's own wait, cut from 5 s
    finally:
        holder.close()


def test_only_a_new_database_waits_out_a_lock():
    from sqlalchemy.exc import IntegrityError, OperationalError

    locked = OperationalError("SELECT 1", {}, Exception("database is locked"))
    assert studies._created_meanwhile(locked, new=True)  # another worker is creating its tables
    assert not studies._created_meanwhile(locked, new=False)  # somebody else's lock: SQLite's own timeout is enough
    half_made = OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
    assert studies._created_meanwhile(half_made, new=False)
    assert studies._created_meanwhile(IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")), new=False)
    refused = OperationalError("connect", {}, Exception("could not connect to server"))
    assert not studies._created_meanwhile(refused, new=True)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize, as a worker does
def test_search_workers_started_together_draw_different_configurations(tmp_path):
    # Each process seeded its sampler with the study's trial count: two started together drew the same lr.
    plan = specs.load(str(write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-2, log = true }')))
    plan = plan.plan("smoke")
    url = storage_url(tmp_path)

    def draws(name: str) -> list[float]:
        first = studies.open_study(plan, studies.storage_for(url), name)
        second = optuna.load_study(study_name=name, storage=url, sampler=studies.tpe_sampler(plan))
        return [worker.ask().suggest_float("lr", 1e-3, 3e-2, log=True) for worker in (first, second)]

    one, again = draws("one"), draws("again")
    assert one[0] != one[1] and one == again  # distinct between workers, the same in a second study


def test_workers_flag_runs_the_study_in_several_processes(tmp_path, capsys):
    url = storage_url(tmp_path)
    path = write_spec(tmp_path, GRID, seeds=2)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ffablate: error: --workers must be at least 1, got 0"
    # 4 trials split 2 + 2: this process stops after its two, the other worker runs the rest.
    argv = ["study", str(path), "--budget", "smoke", "--storage", url, "--workers", "2", "--n-trials", "4"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert "2 workers, " in capsys.readouterr().err and torch.get_num_threads() == threads  # restored
    trials = trials_of(url, "tiny-smoke")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({studies.point_of(t) for t in trials}) == 4
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    # The other 2 of the 6 points, then a finished study: nothing to run, so no other worker starts.
    for runs_workers in (True, False):
        assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--workers", "2"]) == 0
        assert ("2 workers, " in capsys.readouterr().err) == runs_workers
    # (a trial that found its point taken by the other worker ends as surplus, outside the results)
    kept = [t for t in trials_of(url, "tiny-smoke") if not t.user_attrs.get(results.SURPLUS)]
    assert [t.state for t in kept] == [TrialState.COMPLETE] * 6


def _study_process(tmp_path: Path, seeds: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """(an `ffablate study` process whose trials train for seconds, its storage URL)."""
    path = write_spec(tmp_path, GRID.replace("[base]", "[base]\nepochs = 3"), seeds=seeds)
    path.write_text(path.read_text().replace("limit_train = 300", "limit_train = 3000"))
    url = storage_url(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [sys.executable, "-m", "ffablate.cli", "study", str(path), "--budget", "smoke", "--storage", url, *extra]
    # A suite started as a background job (`make test &`) inherits an ignored SIGINT, which the CLI keeps ignored,
    # as a background job should: these tests send Ctrl-C as a terminal would, so the child starts with the default.
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return proc, url


def test_workers_stop_with_the_process_that_started_them(tmp_path):
    # A SIGTERM (a job runner's) ended the first process and left the other worker running the study alone.
    import psutil

    first, url = _study_process(tmp_path, 3, "--workers", "2")
    started = b""
    while b"2 workers" not in started:
        line = first.stderr.readline()
        assert line, "the study ended before it started its workers"
        started += line
    first.terminate()
    first.wait(timeout=60)
    assert first.returncode == 130  # the interrupt path: "finished trials are stored"

    def workers() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if url in " ".join(p.info["cmdline"] or [])]

    _, alive = psutil.wait_procs(workers(), timeout=60)
    assert not alive
    states = {t.state for t in trials_of(url, "tiny-smoke")}
    assert TrialState.RUNNING not in states  # each trial in flight was stored as failed, for a rerun to retry


def test_a_resumed_study_notes_finished_trials_of_another_device():
    study = optuna.create_study(direction="maximize")
    for device in ("cuda", "cuda", "cpu"):
        study.add_trial(create_trial(value=0.5, user_attrs={"config": {"device": device}}))
    notes: list[str] = []
    studies._note_other_devices(study, "cpu", notes.append)
    assert notes == [
        "note: finished trials of this study ran on another device (2 on cuda) than this run (cpu); CUDA trains "
        "under bf16 autocast, so the devices' numbers differ"
    ]
    notes.clear()
    study.add_trial(create_trial(value=0.5, user_attrs={"config": {"device": "cuda"}}))
    studies._note_other_devices(study, "cuda", notes.append)
    assert notes == [notes[0]] and "(1 on cpu)" in notes[0]


def test_a_signal_while_the_workers_fork_is_not_lost():
    # The flaky failure of the test above (rc 0): the SIGTERM's KeyboardInterrupt was raised inside logging's
    # at-fork hook, which Python prints as "Exception ignored" and drops, and the study ran on to its end.
    from ffablate import workers

    fire: list[bool] = []
    os.register_at_fork(after_in_parent=lambda: fire and os.kill(os.getpid(), signal.SIGTERM))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    sigint = signal.getsignal(signal.SIGINT)
    helpers = workers.Workers([["plugins"]], threads=1)
    try:
        fire.append(True)
        with pytest.raises(KeyboardInterrupt):
            helpers.start()
        fire.clear()
        assert len(helpers.procs) == 1  # started, so the CLI's finally can stop it
        assert signal.getsignal(signal.SIGTERM) is interrupt and signal.getsignal(signal.SIGINT) is sigint
    finally:
        fire.clear()
        signal.signal(signal.SIGTERM, previous)
        helpers.stop()


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_terminated_study_stores_why_its_trial_stopped(tmp_path, signals):
    # One process, no workers: a SIGTERM killed it outright (rc -15), and the trial it ran stayed RUNNING with no
    # reason; a Ctrl-C's trial said "the worker died: killed or crashed", though the process had said "interrupted".
    # A second Ctrl-C while the first one's trial was being stored ended in a traceback, rc 1, the trial RUNNING.
    proc, url = _study_process(tmp_path, 1)

    def training() -> bool:  # a trial past its setup, in its training (the study is made after the preflight)
        try:
            trials = trials_of(url, "tiny-smoke")
        except KeyError:
            return False
        return any("config" in t.user_attrs for t in trials if t.state == TrialState.RUNNING)

    deadline = time.monotonic() + 120
    while not training():
        assert proc.poll() is None and time.monotonic() < deadline, "no trial started training"
        time.sleep(0.05)
    for signum in signals:  # the trial has seconds of training left
        proc.send_signal(signum)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1].startswith("ffablate: interrupted; ")
    (stopped,) = [t for t in trials_of(url, "tiny-smoke") if t.state != TrialState.COMPLETE]
    assert stopped.state == TrialState.FAIL and results.fail_reason(stopped) == "interrupted"


def test_an_ignored_sigint_stays_ignored_while_workers_fork():
    from ffablate import workers

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with workers._signals_deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # noted, not acted on
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_first_interrupt_ignores_the_next_ones():
    from ffablate import cli

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            cli._interrupt(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_worker_that_fails_is_reported_with_its_last_line():
    from ffablate import workers

    assert workers.shares(5, 2) == [3, 2] and workers.shares(1, 3) == [1, 0, 0]
    assert workers.shares(None, 2) == [None, None]
    helpers = workers.Workers([["study", "no-such-spec"]], threads=1)
    helpers.start()
    (line,) = helpers.wait()
    assert line.startswith("worker 2 stopped with exit code 2: ffablate: error: ") and "no-such-spec" in line


def test_a_deadline_in_the_past_starts_no_trial_and_no_worker(tmp_path):
    # Workers get the first process's deadline: their own --timeout would start after their own startup.
    plan = specs.load(str(write_spec(tmp_path, GRID, seeds=1))).plan("smoke")
    started = []
    run = studies.run_study(plan, storage_url=storage_url(tmp_path), deadline=time.time() - 1, on_trials=started.append)
    assert run.ran == 0 and started == []


def test_runs_growing_a_study_to_different_seeds_at_once_keep_the_longest(stored_before, tmp_path):
    # Optuna's storage has no compare-and-swap, so a run that checked the study before another grew it writes after
    # it: growing [0, 1] to [0, 1, 2, 3] and, a moment later, to [0, 1, 2] left the seeds [0, 1, 2], and the next
    # resume planned without the seed 3 the other run had trained. Each growth now writes a key of its own.
    (tmp_path / "studies.db").write_bytes(stored_before.read_bytes())
    url = storage_url(tmp_path)
    four, three = (specs.load(str(write_spec(tmp_path, GRID, seeds=n, name=f"s{n}"))).plan("smoke") for n in (4, 3))
    studies.open_study(four, optuna.storages.RDBStorage(url), "tiny-smoke")
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    assert study.user_attrs[results.GROWN + "[0, 1, 2, 3]"] == str(four.spec.path)
    study.set_user_attr(results.GROWN + "[0, 1, 2]", str(three.spec.path))  # the late write of a run that checked first
    assert results.planned_seeds(study.user_attrs) == [0, 1, 2, 3] and studies.points_left(study) == 6
    studies.refuse_another_plan(study, four)  # resumes
    with pytest.raises(FFablateError, match=r"runs seeds \[0, 1, 2, 3\] \(grown from \[0, 1\]\) and this budget"):
        studies.refuse_another_plan(study, three)
    # Its rerun command names the spec that grew it to its latest seeds.
    assert f"ffablate study {tmp_path / 's4.toml'} --budget smoke" in studies.rerun_command(study, None)
    # Two runs adding different seeds at once (neither list a prefix of the other) leave a study of both.
    study.set_user_attr(results.GROWN + "[0, 1, 7]", "elsewhere.toml")
    assert results.forked_seeds(study.user_attrs) and results.planned_seeds(study.user_attrs) == [0, 1, 2, 3, 7]
    with pytest.raises(FFablateError, match=r"runs added different seeds to study 'tiny-smoke' at once"):
        studies.refuse_another_plan(study, four)


def test_a_recipe_study_names_its_source_when_the_sources_winner_changed(finished, tmp_path):
    # Once a source study can grow, its best configuration can change under a --recipe-from study, whose user
    # edited nothing: "restore the spec it was made from" led nowhere.
    (tmp_path / "studies.db").write_bytes(Path(finished[0], "studies.db").read_bytes())
    url = storage_url(tmp_path)
    gap = write_spec(tmp_path, GAP, seeds=1, name="gap-recipe")
    assert main(["study", str(gap), "--budget", "smoke", "--storage", url, "--recipe-from", "tiny"]) == 0
    study = optuna.load_study(study_name="gap-recipe-smoke@tiny-smoke", storage=url)
    used = study.user_attrs["base"]["temperature"]
    other = next(t for t in ("constant", "cosine") if t != used)
    plan = specs.load(str(gap)).plan("smoke").with_recipe({"temperature": other}, "tiny-smoke")
    with pytest.raises(FFablateError, match="best configuration of study 'tiny-smoke' changed since it was made") as e:
        studies.refuse_another_plan(study, plan)
    assert str(e.value).endswith("; rerun with --study-name NEW")


def test_a_run_whose_study_grew_meanwhile_says_which_seeds_resume_it(finished, tmp_path, monkeypatch, capsys):
    # It said "rerun the same command to resume", which the grown study now refuses.
    (tmp_path / "studies.db").write_bytes(Path(finished[0], "studies.db").read_bytes())
    url = storage_url(tmp_path)
    run_study = studies.run_study

    def run_then_grow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        done = run_study(*args, **kwargs)
        done.study.set_user_attr(results.GROWN + "[0, 1, 2]", "other.toml")  # another run added a seed meanwhile
        return done

    monkeypatch.setattr(studies, "run_study", run_then_grow)
    assert main(["study", str(write_spec(tmp_path, GRID)), "--budget", "smoke", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "which now runs seeds [0, 1, 2]: give the budget seeds = [0, 1, 2] to resume it" in out
    assert "rerun the same command" not in out


def _fixed_temperature(default: float):
    """A temperature factory whose default T is ``default``: one version of a user's plugin."""

    class Fixed(torch.nn.Module):
        def __init__(self, t: float = default):
            super().__init__()
            self.t = t

        def forward(self, progress: float, goodness: torch.Tensor) -> torch.Tensor:
            return torch.tensor(self.t)

    return Fixed


class FixedTemperaturePlugin:
    """A user's temperature plugin "fixed", as one installed version declares it."""

    def __init__(self, default: float, space: dict):
        self.default, self.space = default, space

    @hookimpl
    def ffablate_register_temperature(self, register):
        register("fixed", _fixed_temperature(self.default), "T fixed (test plugin)", space=self.space)


class RenamedPackagePlugin(FixedTemperaturePlugin):
    """The same plugin from another source (a plugin moved to another package, or a new version of it)."""


SPACE = {"t": {"type": "float", "low": 0.1, "high": 1.0}}


@pytest.mark.parametrize(
    ("changed", "code", "message"),
    [
        (FixedTemperaturePlugin(0.5, {}), 2, 'plugin \'fixed\' with parameters [{"t": 0.3}], and [{"t": 0.5}] now'),
        (RenamedPackagePlugin(0.3, {}), 2, "RenamedPackagePlugin (no package version) is installed now"),
        # A grid never reads a plugin's declared space: a changed one changes no trial.
        (FixedTemperaturePlugin(0.3, SPACE), 0, ""),
    ],
)
def test_a_study_refuses_to_resume_with_a_changed_user_plugin(tmp_path, capsys, changed, code, message):
    # Before: the resumed seeds ran the new defaults (or version) and were averaged with the old.
    body = GRID.replace('temperature = ["constant", "cosine"]', 'temperature = ["fixed"]')
    path = write_spec(tmp_path, body, seeds=2)
    url = storage_url(tmp_path)
    _run_with(FixedTemperaturePlugin(0.3, {}), ["study", str(path), "--budget", "smoke", "--storage", url], 2, 0)
    capsys.readouterr()
    _run_with(changed, ["study", str(path), "--budget", "smoke", "--storage", url], 2, code)
    err = capsys.readouterr().err.strip().splitlines()
    if code:
        # One line, before the preflight and the banner.
        assert len(err) == 1 and "study 'tiny-smoke' ran temperature plugin" in err[0] and message in err[0], err
        assert "rerun with --study-name NEW (or restore the plugin it ran)" in err[0]
        assert len(trials_of(url, "tiny-smoke")) == 2  # the baseline and one FF trial: nothing ran, nothing was lost
    # Reports name the plugins from outside ffablate that the trials ran, with their source.
    line = results.versions_line(results.summarize(optuna.load_study(study_name="tiny-smoke", storage=url)))
    assert ", plugins fixed from test_study.FixedTemperaturePlugin (no package version), on cpu:" in line


def _run_with(plugin: object, args: list[str], n_trials: int, code: int) -> None:
    """``ffablate`` with ``args`` and ``--n-trials n_trials``, with ``plugin`` installed; asserts the exit code."""
    add_plugin(plugin)
    try:
        assert main([*args, "--n-trials", str(n_trials)]) == code
    finally:
        remove_plugin(plugin)


def test_a_search_refuses_to_resume_when_a_searched_plugins_space_changed(tmp_path, capsys):
    path = write_tpe_spec(tmp_path, 'plugins = ["temperature"]', untuned=[])
    path.write_text(path.read_text().replace('temperature = ["constant"]', 'temperature = ["fixed"]'))
    args = ["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]
    _run_with(FixedTemperaturePlugin(0.3, SPACE), args, 2, 0)
    wider = {"t": {**SPACE["t"], "high": 2.0}}
    _run_with(FixedTemperaturePlugin(0.3, wider), args, 1, 2)
    assert 'ran temperature plugin \'fixed\' with searched space {"t": {"high": 1.0,' in capsys.readouterr().err


def test_a_study_stored_before_plugins_were_recorded_is_checked_by_its_trials_sources(tmp_path, capsys):
    body = GRID.replace('temperature = ["constant", "cosine"]', 'temperature = ["fixed"]')
    url = storage_url(tmp_path)
    args = ["study", str(write_spec(tmp_path, body, seeds=2)), "--budget", "smoke", "--storage", url]
    _run_with(FixedTemperaturePlugin(0.3, {}), args, 2, 0)
    optuna.load_study(study_name="tiny-smoke", storage=url).set_user_attr(studies.PLUGINS, None)  # as stored before
    _run_with(RenamedPackagePlugin(0.3, {}), args, 2, 2)
    assert "RenamedPackagePlugin (no package version) is installed now" in capsys.readouterr().err


def test_a_finished_study_shows_its_table_whatever_plugins_are_installed_now(tmp_path, capsys):
    body = GRID.replace('temperature = ["constant", "cosine"]', 'temperature = ["fixed"]')
    args = ["study", str(write_spec(tmp_path, body, seeds=1)), "--budget", "smoke", "--storage", storage_url(tmp_path)]
    _run_with(FixedTemperaturePlugin(0.3, {}), args, 5, 0)
    capsys.readouterr()
    _run_with(FixedTemperaturePlugin(0.5, {}), args, 5, 0)  # nothing left to run: nothing would be averaged
    assert "temperature=fixed" in capsys.readouterr().out


class LateTemperature(torch.nn.Module):
    """T = 0.3, but 0 once training is past half way until ``fixed``: a mistake the preflight (at progress 0)
    misses. ``fixed`` stands for an edit of the plugin's code that changes no version, default or space."""

    fixed = False

    def forward(self, progress: float, goodness: torch.Tensor) -> torch.Tensor:
        return torch.tensor(0.0 if progress > 0.5 and not self.fixed else 0.3)


class LatePlugin:
    @hookimpl
    def ffablate_register_temperature(self, register):
        register("late", LateTemperature, "T = 0 late in training until fixed (test plugin)")


def test_a_plugin_that_breaks_its_contract_mid_study_stops_it_and_its_point_runs_after_the_fix(
    tmp_path, capsys, monkeypatch
):
    # Before: the point was failed for good, like a diverged run, and the rerun after the fix found nothing to run.
    path = write_spec(tmp_path, GRID.replace('temperature = ["constant", "cosine"]', 'temperature = ["late"]'), seeds=1)
    url, plugin = storage_url(tmp_path), LatePlugin()
    add_plugin(plugin)
    try:
        assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ffablate: error: ") and "temperature plugin 'late'" in err[-1], err
        assert "returned 0.0 at progress" in err[-1], err[-1]
        assert err[-1].endswith("; fix the plugin and rerun: the study goes on where it stopped"), err[-1]
        failed = [t for t in trials_of(url, "tiny-smoke") if t.state == TrialState.FAIL]
        assert len(failed) == 1 and not failed[0].user_attrs.get(studies.PERMANENT)
        monkeypatch.setattr(LateTemperature, "fixed", True)
        assert main(["study", str(path), "--budget", "smoke", "--storage", url]) == 0
    finally:
        remove_plugin(plugin)
    done = {t.user_attrs["cell"] for t in trials_of(url, "tiny-smoke") if t.state == TrialState.COMPLETE}
    assert done == {"temperature=late", "bp-deepsup"}


def test_a_search_over_a_plugin_kind_whose_plugins_declare_no_space_is_refused(tmp_path, capsys):
    # Before: accepted, and the "search" drew nothing for the fusion without a word.
    path = write_tpe_spec(tmp_path, 'plugins = ["fusion"]', untuned=[])
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        f"{path}: space.plugins searches fusion, but no fusion plugin the study runs declares a search space (last;"
        in err
    )


def test_a_search_with_no_baseline_takes_no_baseline_settings(tmp_path, capsys):
    # untuned with methods = [] was accepted, and the answer spoke of a baseline that never ran.
    path = write_tpe_spec(tmp_path, 'lr = { type = "float", low = 1e-3, high = 3e-3 }', untuned=["lr"])
    path.write_text(path.read_text().replace("[baseline]\n", "[baseline]\nmethods = []\n"))
    assert main(["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    message = "baseline.untuned says how a baseline runs, and baseline.methods runs none: leave it out"
    assert err.endswith(f"{path}: {message}")


ONE_POINT = """
question = "Does a trial resumed from its checkpoint end as an uninterrupted one?"
[base]
dataset = "fashion-mnist"
[axes]
temperature = ["constant"]
"""


class _Steps:
    """A study's ``progress``: counts the training steps of its trials, and interrupts the first trial (as Ctrl-C
    would) at the first step after its ``after``-th epoch when ``after`` is given."""

    def __init__(self, after: int | None = None):
        self.after, self.calls = after, 0

    def start(self, total: int) -> None:
        pass

    def trial_started(self, number: int, label: str, seed: int) -> None:
        pass

    def steps(self, done: int, total: int, info: dict[str, float]) -> None:
        self.calls += 1
        if self.after is not None and done == self.after * total // 3 + 1:  # a 3-epoch trial, its checkpoint written
            raise KeyboardInterrupt

    def trial_finished(self, trial: optuna.trial.FrozenTrial) -> None:
        pass


def _three_epochs(tmp_path: Path) -> specs.Plan:
    path = write_spec(tmp_path, ONE_POINT, seeds=1)
    path.write_text(path.read_text().replace("epochs = 1\nbatch_size = 50", "epochs = 3\nbatch_size = 50", 1))
    return specs.load(str(path)).plan("smoke")


def _outcomes(url: str) -> dict[tuple[str, int], tuple]:
    """Each completed point's stored result, timings aside."""
    return {
        studies.point_of(t): (
            t.value,
            t.intermediate_values,
            t.user_attrs["history"],
            {k: t.user_attrs["metrics"][k] for k in ("test_accuracy", "val_accuracy", "per_layer_accuracy")},
        )
        for t in trials_of(url, "tiny-smoke")
        if t.state == TrialState.COMPLETE
    }


def test_a_trial_interrupted_mid_training_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    plan = _three_epochs(tmp_path)
    monkeypatch.setattr(studies, "preflight", lambda *a: None)  # 3 s a run, and the spec is known to be fine
    whole, steps = storage_url(tmp_path / "whole"), _Steps()
    (tmp_path / "whole").mkdir()
    with monkeypatch.context() as patched:  # without a checkpoint folder, nothing is written
        patched.setattr("ffablate.checkpoint.save", lambda *a: pytest.fail("no checkpoint without --checkpoints"))
        studies.run_study(plan, storage_url=whole, progress=steps)

    folder, url, lines = tmp_path / "checkpoints", storage_url(tmp_path), []
    first = _Steps(after=1)
    with pytest.raises(KeyboardInterrupt):
        studies.run_study(plan, storage_url=url, progress=first, checkpoints=str(folder), log=lines.append)
    (kept,) = folder.iterdir()  # the interrupted point's, and nothing else (no partial write)
    assert kept.name.startswith("tiny-smoke-") and kept.suffix == ".pt"
    # Refused before its data are looked at: another point's file under this name, or one of another commit.
    with pytest.raises(CheckpointError, match="holds another study's or another configuration's run"):
        studies.resumable(kept, {"study": "tiny-smoke", "config": {}}, None)
    stored = torch.load(kept, weights_only=True)
    with monkeypatch.context() as patched:
        patched.setattr("ffablate.revision.source_revision", lambda: "another")
        if stored["ffablate"]["commit"]:  # a copy outside git records none, and any commit resumes it
            with pytest.raises(CheckpointError, match=r"at commit \S+, this is commit another"):
                studies.resumable(kept, stored["study"], None)
    # Said to have trained at another thread count (it did not, so the outcome below is still bit for bit): the log
    # says the rest of the trial rounds otherwise.
    threads = torch.get_num_threads()
    stored["training"]["threads"] = threads + 1
    torch.save(stored, kept)
    # A rerun without the folder (here one that trains nothing) says, before it trains, where the epochs are.
    studies.run_study(plan, storage_url=url, n_trials=0, log=lines.append)
    assert lines[-1] == (
        f"note: 1 interrupted trial(s) kept their epochs in {folder.resolve()}, which this run does not use: it trains "
        f"their points from the start; to go on from those epochs, stop it and rerun with --checkpoints "
        f"{folder.resolve()}"
    )
    rest = _Steps()
    studies.run_study(plan, storage_url=url, progress=rest, checkpoints=str(folder), log=lines.append)
    (stopped,) = [t for t in trials_of(url, "tiny-smoke") if t.state != TrialState.COMPLETE]
    assert results.fail_reason(stopped) == "interrupted"
    label, seed = studies.point_of(stopped)
    resumed = f"({label}, seed {seed}) resumes from {kept} after epoch 1 of 3"
    at = f"{threads} CPU thread{'s' * (threads != 1)}"
    rounding = f"(at {at} where it trained at {threads + 1}: within noise of an uninterrupted trial"
    assert any(f"{resumed} {rounding}" in line for line in lines), lines
    assert _outcomes(url) == _outcomes(whole) and len(_outcomes(url)) == 2  # an FF point and its baseline
    # Only the lost steps trained again: the epoch kept was not, and the one step cut short was.
    assert first.calls + rest.calls == steps.calls + 1
    assert list(folder.iterdir()) == []  # a finished trial's file is gone
    assert sum("kept their epochs" in line for line in lines) == 1  # not said by the run that used the folder


def test_a_checkpoint_that_cannot_be_resumed_is_said_and_its_point_trains_from_the_start(tmp_path, monkeypatch):
    plan = _three_epochs(tmp_path)
    monkeypatch.setattr(studies, "preflight", lambda *a: None)
    monkeypatch.setattr(studies.Objective, "_choose", _first_cell)
    cell = plan.cells[0]
    point = {"study": "tiny-smoke", "config": plan.config(cell.overrides, plan.budget.seeds[0], "cpu").to_dict()}
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    damaged = folder / studies.checkpoint_file("tiny-smoke", point)
    damaged.write_bytes(b"PK\x03\x04 cut short")
    lines: list[str] = []
    url = storage_url(tmp_path)
    studies.run_study(plan, storage_url=url, n_trials=1, checkpoints=str(folder), log=lines.append)
    assert any("not resumed, training it from the start" in line and "is damaged" in line for line in lines), lines
    (trial,) = trials_of(url, "tiny-smoke")
    assert trial.state == TrialState.COMPLETE and len(trial.user_attrs["history"]) == 3
    assert list(folder.iterdir()) == []


def _first_cell(self, trial):  # noqa: ANN001, ANN202
    cell = self.plan.cells[0]
    return cell.role, cell.label, cell.overrides, self.plan.budget.seeds[0], cell.match, cell.group


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("file", "--checkpoints {tmp}/file is not a folder"),
        ("missing/checkpoints", "the folder {tmp}/missing does not exist"),
        ("file/checkpoints", "--checkpoints {tmp}/file/checkpoints: {tmp}/file is not a folder"),
        ("/proc/ffablate-checkpoints", "cannot write in it"),
    ],
)
def test_a_checkpoint_folder_that_cannot_hold_checkpoints_fails_before_any_trial(tmp_path, capsys, where, expected):
    (tmp_path / "file").write_text("")
    path = write_spec(tmp_path, ONE_POINT, seeds=1)
    url = storage_url(tmp_path)
    folder = where if where.startswith("/") else str(tmp_path / where)
    assert main(["study", str(path), "--budget", "smoke", "--storage", url, "--checkpoints", folder]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "studies.db").exists()  # not even the storage was opened


@pytest.mark.parametrize(("search", "kept"), [(False, "those running"), (True, "running baselines")])
def test_an_interrupted_study_says_what_its_checkpoint_folder_holds(tmp_path, capsys, monkeypatch, search, kept):
    # A search's sampled trials keep no epochs (a rerun samples new ones): only its baselines' are in the folder.
    path = write_tpe_spec(tmp_path, 'lr = {type = "float", low = 0.001, high = 0.01}') if search else None
    path = path or write_spec(tmp_path, ONE_POINT, seeds=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "run_study", interrupted)
    argv = ["study", str(path), "--budget", "smoke", "--storage", storage_url(tmp_path)]
    assert main([*argv, "--checkpoints", str(tmp_path / "ck")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ffablate: interrupted; finished trials are stored, and the finished epochs of {kept} in {tmp_path / 'ck'}: "
        "rerun the same command (with the same --checkpoints) to resume the study"
    )


def test_workers_keep_their_checkpoints_in_the_same_folder():
    from argparse import Namespace

    from ffablate import workers

    args = Namespace(name="tiny", budget="smoke", study_name=None, n_trials=None, device="cpu", checkpoints="ck")
    args.data_root = args.recipe_from = None
    _, argvs = workers.study_argvs(args, 2)
    assert argvs[0][argvs[0].index("--checkpoints") + 1] == "ck"
