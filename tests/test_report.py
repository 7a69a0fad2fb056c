"""Reports from storages filled with hand-made trials: every plot kind, the numbers in report.md, the answers.

No training runs here: trials are created with known accuracies so the expected means and gaps are exact.
"""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ffablate import results
from ffablate.cli import main
from ffablate.report import write_report


def make_study(url: str, name: str, meta: dict, trials: list[dict]) -> optuna.Study:
    """``trials``: dicts with cell, role, overrides, seed, value (None = failed: the test accuracy), optional
    val (a validation accuracy, which then is the trial's value, as in a study) and group/history."""
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    for key, value in {
        "baseline_methods": ["bp-deepsup"],
        "sampler": "grid",
        "budget": "quick",
        "ffablate_spec": name,
        **meta,
    }.items():
        study.set_user_attr(key, value)
    for t in trials:
        match = {k: v for k, v in t["overrides"].items() if k in ("dataset", "classes", "labels")}
        attrs = {
            "cell": t["cell"],
            "role": t["role"],
            "seed": t["seed"],
            "group": t.get("group", ""),
            "overrides": {**t["overrides"], "method": "bp-deepsup" if t["role"] == "baseline" else "ff"},
            "match": json.dumps(match, sort_keys=True),
            "history": t.get("history", [{"epoch": 0, "loss": 1.0, "test_accuracy": t["value"] or 0.1}]),
            "metrics": {
                "test_accuracy": t["value"],
                "val_accuracy": t.get("val"),
                "train_seconds": 1.0,
                "images_per_second": 100.0,
                "peak_memory_bytes": 2**20,
            },
        }
        params = {"cell": t["cell"], "seed": t["seed"]}
        dists = {
            "cell": CategoricalDistribution(sorted({x["cell"] for x in trials})),
            "seed": CategoricalDistribution([0, 1, 2]),
        }
        if t["value"] is None:
            attrs.update(fail_reason="TrainingDiverged: loss became nan", fail_permanent=True)
            frozen = create_trial(state=TrialState.FAIL, params=params, distributions=dists, user_attrs=attrs)
        else:
            value = t["value"] if t.get("val") is None else t["val"]
            frozen = create_trial(value=value, params=params, distributions=dists, user_attrs=attrs)
        study.add_trial(frozen)
    return study


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'r.db'}"


def test_two_axis_ablation_report_holds_the_numbers(tmp_path, url):
    axes = {"temperature": ["constant", "cosine"], "norm": ["decoupled", "none"]}
    trials = []
    accs = {
        ("constant", "decoupled"): [0.80, 0.82],
        ("constant", "none"): [0.70, 0.72],
        ("cosine", "decoupled"): [0.84, 0.86],
        ("cosine", "none"): [0.60, 0.62],
    }
    for (temp, norm), values in accs.items():
        for seed, v in enumerate(values):
            trials.append(
                {
                    "cell": f"temperature={temp} norm={norm}",
                    "role": "ff",
                    "seed": seed,
                    "value": v,
                    "overrides": {"temperature": temp, "norm": norm},
                }
            )
    trials += [
        {"cell": "bp-deepsup", "role": "baseline", "seed": s, "value": v, "overrides": {}}
        for s, v in enumerate([0.90, 0.92])
    ]
    trials.append(
        {
            "cell": "temperature=cosine norm=none",
            "role": "ff",
            "seed": 2,
            "value": None,
            "overrides": {"temperature": "cosine", "norm": "none"},
        }
    )
    study = make_study(url, "tvn-quick", {"analysis": "ablation", "axes": axes, "question": "Which is best?"}, trials)
    report = write_report(study, tmp_path / "out")
    text = report.read_text()
    assert "**Question.** Which is best?" in text
    assert "temperature=cosine norm=decoupled at 85.0 ± " in text  # the best, computed
    assert "| temperature=cosine norm=decoupled | 2 | 85.0 ± 12.7 | -6.0 ± " in text
    assert "TrainingDiverged" in text and "1 failed" in text
    assert "the norm axis moves mean test accuracy most" in text
    for png in ("heatmap.png", "learning_curves.png", "importance.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    assert "Evaluator:" in text


def test_k_sweep_report_draws_both_gap_curves_and_states_the_trend(tmp_path, url):
    trials = []
    for group, dataset, gaps in (
        ("synthetic", "teacher-student", {2: 0.01, 10: 0.03, 100: 0.08}),
        ("fashion-mnist", "fashion-mnist", {2: -0.01, 10: -0.05}),
    ):
        for k, gap in gaps.items():
            over = {"dataset": dataset, "classes": k}
            for seed in (0, 1):
                bp = 0.7 + 0.01 * seed
                trials.append(
                    {
                        "cell": f"{group} classes={k}",
                        "role": "ff",
                        "group": group,
                        "seed": seed,
                        "value": bp + gap,
                        "overrides": over,
                    }
                )
                trials.append(
                    {
                        "cell": f"bp-deepsup {group} classes={k}",
                        "role": "baseline",
                        "group": group,
                        "seed": seed,
                        "value": bp,
                        "overrides": over,
                    }
                )
    study = make_study(
        url,
        "k-sweep-quick",
        {"analysis": "k-sweep", "axes": {"classes": [2, 10, 100]}, "question": "Gap vs K?"},
        trials,
    )
    text = write_report(study, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "k_sweep_gap.png").stat().st_size > 1000
    answer = results.answer(results.summarize(study))
    assert "synthetic: FF−BP gap +1.0" in answer and "+8.0" in answer and "widens with K" in answer
    assert "fashion-mnist: FF−BP gap -1.0" in answer and "FF behind" in answer
    assert answer in text


def test_label_hierarchy_report_has_coarse_vs_fine_bars_and_notes(tmp_path, url):
    trials = []
    for labels, ff, bp in (("fine", 0.70, 0.80), ("coarse", 0.90, 0.92)):
        over = {"dataset": "fashion-mnist", "labels": labels}
        for seed in (0, 1):
            trials.append(
                {
                    "cell": f"fashion-mnist labels={labels}",
                    "role": "ff",
                    "group": "fashion-mnist",
                    "seed": seed,
                    "value": ff + 0.01 * seed,
                    "overrides": over,
                }
            )
            trials.append(
                {
                    "cell": f"bp-deepsup fashion-mnist labels={labels}",
                    "role": "baseline",
                    "group": "fashion-mnist",
                    "seed": seed,
                    "value": bp + 0.01 * seed,
                    "overrides": over,
                }
            )
    note = "skipped cifar100: dataset 'cifar100' is not available here"
    study = make_study(
        url,
        "label-hierarchy-quick",
        {"analysis": "label-hierarchy", "notes": [note], "axes": {"labels": ["fine", "coarse"]}},
        trials,
    )
    text = write_report(study, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "coarse_vs_fine.png").stat().st_size > 1000
    assert "fine labels -10.0 ± 3.0 pp" in text and "coarse labels -2.0 ± 3.0 pp" in text
    assert note in text


def test_report_cli_finds_the_study_and_fails_in_one_line_when_missing(tmp_path, url, capsys):
    make_study(
        url,
        "fusion-quick",
        {"analysis": "ablation", "axes": {"fusion": ["last", "sum"]}},
        [{"cell": "fusion=last", "role": "ff", "seed": 0, "value": 0.5, "overrides": {"fusion": "last"}}],
    )
    assert main(["report", "fusion", "--storage", url, "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").exists()
    assert main(["report", "nothing-here", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fusion-quick" in err


def test_a_seed_run_twice_is_counted_once(url):
    # Two hosts sharing one storage can both take the last free grid point.
    ff = {"role": "ff", "overrides": {"fusion": "last"}, "cell": "fusion=last"}
    bp = {"role": "baseline", "overrides": {}, "cell": "bp-deepsup"}
    study = make_study(
        url,
        "fusion-quick",
        {"analysis": "ablation", "axes": {"fusion": ["last"]}},
        [{**bp, "seed": 0, "value": 0.5}, {**bp, "seed": 1, "value": 0.6}]
        + [{**ff, "seed": 0, "value": 0.7}, {**ff, "seed": 1, "value": 0.8}, {**ff, "seed": 1, "value": 0.9}],
    )
    summary = results.summarize(study)
    (row,) = summary.ff
    assert row.n == 2 and row.seeds == [0, 1] and row.duplicates == 1
    assert row.accuracy.mean == pytest.approx(0.75)  # the first run of seed 1 is kept
    assert "1 duplicate seed run(s) not counted" in results.table_rows(summary)[-1][-1]


def test_the_best_configuration_is_chosen_on_validation_and_reported_on_test(tmp_path, url):
    # "cosine" has the better test accuracy, "constant" the better validation accuracy: the winner is constant.
    ff = [
        {"cell": f"temperature={name}", "role": "ff", "overrides": {"temperature": name}, "seed": seed, **acc}
        for name, accs in {
            "constant": [{"value": 0.70, "val": 0.80}, {"value": 0.72, "val": 0.82}],
            "cosine": [{"value": 0.90, "val": 0.60}, {"value": 0.92, "val": 0.62}],
        }.items()
        for seed, acc in enumerate(accs)
    ]
    bp = [
        {"cell": "bp-deepsup", "role": "baseline", "overrides": {}, "seed": s, "value": 0.75, "val": 0.7}
        for s in (0, 1)
    ]
    axes = {"temperature": ["constant", "cosine"]}
    study = make_study(url, "tvn-quick", {"analysis": "ablation", "axes": axes}, bp + ff)
    summary = results.summarize(study)
    best = summary.best()
    assert best.label == "temperature=constant" and summary.selected_on_validation
    assert best.accuracy.mean == pytest.approx(0.71) and best.val.mean == pytest.approx(0.81)
    answer = results.answer(summary)
    assert answer.startswith("Best FF configuration is temperature=constant at 71.0 ± ")
    assert "chosen on validation accuracy (81.0 ± " in answer
    row = dict(zip(results.TABLE_COLUMNS, results.table_rows(summary)[1], strict=True))
    assert row["test acc % (95% CI)"].startswith("71.0") and row["val acc % (95% CI)"].startswith("81.0")
    assert study.best_trial.user_attrs["metrics"]["val_accuracy"] == pytest.approx(0.82)  # Optuna ranks by val too
    assert "chosen on validation accuracy" in write_report(study, tmp_path / "out").read_text()


def test_without_a_validation_split_the_answer_says_the_choice_is_optimistic(url):
    ff = {"role": "ff", "overrides": {"fusion": "last"}, "cell": "fusion=last"}
    study = make_study(
        url, "fusion-quick", {"analysis": "ablation", "axes": {"fusion": ["last"]}}, [{**ff, "seed": 0, "value": 0.7}]
    )
    summary = results.summarize(study)
    assert not summary.selected_on_validation and summary.best().val_accuracies == []
    assert "chosen on the test images themselves (not every configuration has a validation split" in results.answer(
        summary
    )
    assert results.table_rows(summary)[0][4] == "-"


def test_json_has_null_where_an_interval_does_not_exist(url):
    # One seed per side: no t-interval and no Welch interval. JSON has no NaN; strict parsers refuse it.
    study = make_study(
        url,
        "fusion-quick",
        {"analysis": "ablation", "axes": {"fusion": ["last"]}},
        [
            {"cell": "bp-deepsup", "role": "baseline", "seed": 0, "value": 0.5, "overrides": {}},
            {"cell": "fusion=last", "role": "ff", "seed": 0, "value": 0.7, "overrides": {"fusion": "last"}},
        ],
    )
    text = results.to_json(results.summarize(study))
    rows = {r["label"]: r for r in json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))["rows"]}
    assert rows["fusion=last"]["accuracy_ci95"] is None and rows["fusion=last"]["gap_ci95"] is None
    assert rows["fusion=last"]["gap_mean"] == pytest.approx(0.2) and rows["bp-deepsup"]["gap_mean"] is None


def test_report_of_a_study_without_ffablate_trials_names_what_to_run(tmp_path, url, capsys):
    make_study(url, "mine", {"ffablate_spec": "fusion", "budget": "smoke"}, [])
    assert main(["report", "mine", "--storage", url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    assert f"study mine has no ffablate trials; run `ffablate study fusion --budget smoke --storage {url} " in err
    assert err.endswith("--study-name mine`")
    # A study Optuna holds that ffablate did not make: its name is no spec to run.
    foreign = optuna.create_study(storage=url, study_name="foreign", direction="maximize")
    foreign.add_trial(create_trial(value=0.5, params={}, distributions={}))
    assert main(["report", "foreign", "--storage", url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    assert "(`ffablate study` did not make it); ffablate studies there: mine" in err
    assert "ffablate study foreign" not in err


def test_report_lists_a_failure_a_rerun_retries_and_the_split_it_will_rank_on(tmp_path, url):
    study = make_study(url, "fusion-smoke", {"analysis": "ablation", "base": {"val_images": 200}}, [])
    attrs = {
        "cell": "bp-deepsup",
        "role": "baseline",
        "seed": 0,
        "overrides": {"method": "bp-deepsup"},
        "fail_reason": "ChecksumMismatch: train-images: MD5 differs; delete it and fetch it again",
    }
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs=attrs))
    text = write_report(study, tmp_path / "out").read_text()
    failed = text.split("## Failed trials", 1)[1]
    assert "- bp-deepsup (seed 0): ChecksumMismatch: train-images: MD5 differs" in failed
    assert "No validation split" not in text and "ranked on validation accuracy (200 held-out" in text
