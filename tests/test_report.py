"""Reports from storages filled with hand-made trials: every plot kind, the numbers in report.md, the answers.

No training runs here: trials are created with known accuracies so the expected means and gaps are exact.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import optuna
import pytest
from matplotlib.container import ErrorbarContainer
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from ffablate import results
from ffablate.cli import main
from ffablate.report import write_report
from ffablate.stats import fmt


def make_study(url: str, name: str, meta: dict, trials: list[dict]) -> optuna.Study:
    """``trials``: dicts with cell, role, overrides, seed, value (None = failed: the test accuracy), optional
    val (a validation accuracy, which then is the trial's value, as in a study), pruned (True: value is the
    accuracy it was pruned at), match (the baseline-matching settings; by default dataset, classes, labels),
    group/history, metrics (stored metrics that replace the ones made from value and val), method (a baseline's, by
    default bp-deepsup) and reason (a failed trial's)."""
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
        match = t.get("match", {k: v for k, v in t["overrides"].items() if k in ("dataset", "classes", "labels")})
        attrs = {
            "cell": t["cell"],
            "role": t["role"],
            "seed": t["seed"],
            "group": t.get("group", ""),
            "overrides": {
                **t["overrides"],
                "method": t.get("method", "bp-deepsup" if t["role"] == "baseline" else "ff"),
            },
            "match": json.dumps(match, sort_keys=True),
            "history": t.get(
                "history",
                [{"epoch": e, "loss": 1 - e / 2, "test_accuracy": (t["value"] or 0.1) - (1 - e) / 20} for e in (0, 1)],
            ),
            "metrics": {
                "test_accuracy": t["value"],
                "val_accuracy": t.get("val"),
                "train_seconds": 1.0,
                "images_per_second": 100.0,
                "peak_memory_bytes": 2**20,
                **t.get("metrics", {}),
            },
        }
        params = {"cell": t["cell"], "seed": t["seed"]}
        dists = {
            "cell": CategoricalDistribution(sorted({x["cell"] for x in trials})),
            "seed": CategoricalDistribution(sorted({0, 1, 2} | {x["seed"] for x in trials})),
        }
        if t.get("pruned"):
            del attrs["metrics"]  # a pruned trial stops before its final scores
            frozen = create_trial(
                state=TrialState.PRUNED,
                params=params,
                distributions=dists,
                user_attrs=attrs,
                intermediate_values={0: t["value"]},
            )
        elif t["value"] is None:
            attrs.update(fail_reason=t.get("reason", "TrainingDiverged: loss became nan"), fail_permanent=True)
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
        ("cosine", "none"): [0.60],  # its seed 1 diverges below
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
            "seed": 1,
            "value": None,
            "overrides": {"temperature": "cosine", "norm": "none"},
        }
    )
    meta = {"analysis": "ablation", "axes": axes, "question": "Which is best?", "seeds": [0, 1]}
    study = make_study(url, "tvn-quick", meta, trials)
    report = write_report(study, tmp_path / "out")
    text = report.read_text()
    assert "**Question.** Which is best?" in text
    assert "temperature=cosine norm=decoupled at 85.0 ± " in text  # the best, computed
    assert (
        "| temperature=cosine norm=decoupled | 2 | 85.0 ± 12.7 | -6.0 ± 6.1 (n=2 vs 2) | -6.0 ± 0.0 (no spread" in text
    )
    assert "| temperature=cosine norm=none | 1 of 2 | 60.0 ± – | -31.0 ± – (n=1 vs 2) | – |" in text
    assert "incomplete: 1 failed; ranked after the complete rows; failed: TrainingDiverged" in text
    assert "the norm axis has the widest spread of level means on test accuracy" in text
    for png in ("heatmap.png", "learning_curves.png", "importance.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    assert "Evaluator:" in text


def test_k_sweep_report_draws_both_gap_curves_and_states_the_trend(tmp_path, url):
    trials = []
    for group, dataset, gaps in (
        ("synthetic", "teacher-student", {2: 0.05, 10: 0.08, 100: 0.15}),
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
    assert "Welch CI, synthetic and real data on one chart" in text
    answer = results.answer(results.summarize(study))
    # Both ends' intervals exclude zero on the same side, and so does the interval of the change: it widens.
    assert "synthetic: FF−BP gap +5.0 ± 3.0 pp, n=2 vs 2 at K=2 → +15.0 ± 3.0 pp, n=2 vs 2 at K=100" in answer
    assert (
        "(FF ahead at K=100; the gap widens with K: change +10.0 ± 2.8 pp, n≥2 per side; paired over 2 seeds +10.0 ± "
        "0.0 pp (no spread across seeds))" in answer
    )
    # K=2's interval spans zero: the change is resolved, but "widens" would claim a side at K=2 too.
    assert "fashion-mnist: FF−BP gap -1.0 ± 3.0 pp, n=2 vs 2 at K=2 → -5.0 ± 3.0 pp, n=2 vs 2 at K=10" in answer
    assert "(FF behind at K=10; the gap moves in BP's favour with K: change -4.0 ± 2.8 pp, n≥2 per side" in answer
    assert answer in text


def test_a_k_trend_whose_per_seed_change_spans_zero_claims_none(url):
    # FF's accuracy at K=2 and at K=100 move against each other across seeds: Welch's change +10.0 ± 6.8 pp excludes
    # zero, the change seed by seed (+16, +10, +4 pp) does not; the trend was worded from Welch alone.
    trials = []
    for k, ff in ((2, [0.49, 0.52, 0.55]), (100, [0.65, 0.62, 0.59])):
        for seed, value in enumerate(ff):
            over = {"dataset": "teacher-student", "classes": k}
            trials += [
                {"cell": f"synthetic classes={k}", "role": "ff", "group": "synthetic", "seed": seed, "value": value}
                | {"overrides": over},
                {"cell": f"bp-deepsup synthetic classes={k}", "role": "baseline", "group": "synthetic"}
                | {"seed": seed, "value": 0.5, "overrides": over},
            ]
    study = make_study(url, "k-sweep-anti", {"analysis": "k-sweep", "axes": {"classes": [2, 100]}}, trials)
    answer = results.answer(results.summarize(study))
    assert "no change with K resolved: change +10.0 ± 6.8 pp, n≥3 per side; paired over 3 seeds +10.0 ± 14.9" in answer


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
    assert "accuracy ± 95% CI (n=2 seeds a bar)" in text


def test_the_coarse_vs_fine_caption_names_the_bar_that_lost_a_seed(tmp_path, url):
    # The caption listed the counts that occur ("n=2, 3 seeds a bar"), which does not say which bar has which.
    trials = [
        {"cell": f"{name}labels={labels}", "role": role, "seed": seed, "value": value + seed / 100}
        | {"group": "fashion-mnist", "overrides": {"dataset": "fashion-mnist", "labels": labels}}
        for labels, ff, bp in (("fine", 0.70, 0.80), ("coarse", 0.90, 0.92))
        for name, role, value in (("bp-deepsup ", "baseline", bp), ("", "ff", ff))
        for seed in (0, 1, 2)
        if (labels, role, seed) != ("coarse", "ff", 2)
    ]
    meta = {"analysis": "label-hierarchy", "axes": {"labels": ["fine", "coarse"]}, "seeds": [0, 1, 2]}
    text = write_report(make_study(url, "label-hierarchy-quick", meta, trials), tmp_path / "out").read_text()
    assert "accuracy ± 95% CI (n=3 seeds a bar; n=2 of 3 at FF coarse)" in text


def test_the_coarse_vs_fine_bars_show_the_baseline_each_gap_is_taken_to(tmp_path, url, figures):
    # With bp as a second baseline method, its rows drew the bars labelled bp-deepsup, while the gaps (and the
    # answer) were taken to bp-deepsup.
    trials = [
        {"cell": f"{name}labels={labels}", "role": role, "seed": seed, "value": value + seed / 100, **extra}
        | {"group": "fashion-mnist", "overrides": {"dataset": "fashion-mnist", "labels": labels}}
        for labels, ff, deepsup, bp in (("fine", 0.70, 0.80, 0.60), ("coarse", 0.90, 0.92, 0.50))
        for name, role, value, extra in (
            ("bp-deepsup ", "baseline", deepsup, {}),
            ("bp ", "baseline", bp, {"method": "bp"}),
            ("", "ff", ff, {}),
        )
        for seed in (0, 1, 2)
    ]
    meta = {
        "analysis": "label-hierarchy",
        "axes": {"labels": ["fine", "coarse"]},
        "baseline_methods": ["bp-deepsup", "bp"],
        # In the plan's order, where each level's bp row comes after its bp-deepsup row.
        "cells": [f"{b}labels={lab}" for lab in ("fine", "coarse") for b in ("bp-deepsup ", "bp ")]
        + ["labels=fine", "labels=coarse"],
    }
    write_report(make_study(url, "label-hierarchy-quick", meta, trials), tmp_path / "out")
    (ff_bars, base_bars) = [c for c in figures["coarse_vs_fine.png"].axes[0].containers if hasattr(c, "patches")]
    assert base_bars.get_label() == "bp-deepsup"
    assert [round(p.get_height(), 1) for p in base_bars.patches] == [93.0, 81.0]  # coarse, fine (sorted)


def test_a_heatmap_of_groups_sharing_both_axes_is_not_drawn(tmp_path, url, figures):
    # Two datasets, each temperature x norm: one grid kept the second group's cells only, under the first's title.
    trials = [
        {"cell": f"{ds} temperature={t} norm={n}", "role": "ff", "group": ds, "seed": seed, "value": value}
        | {"overrides": {"dataset": ds, "temperature": t, "norm": n}, "match": {"dataset": ds, "norm": n}}
        for ds, value in (("mnist", 0.9), ("fashion-mnist", 0.8))
        for t in ("constant", "cosine")
        for n in ("none", "decoupled")
        for seed in (0, 1)
    ]
    axes = {"temperature": ["constant", "cosine"], "norm": ["none", "decoupled"]}
    text = write_report(make_study(url, "two-groups", {"analysis": "ablation", "axes": axes}, trials), tmp_path / "o")
    assert "heatmap.png" not in figures and "heatmap" not in text.read_text()


def test_a_report_keeps_its_rows_whole_and_leaves_no_plot_of_an_earlier_report(tmp_path, url):
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmap.png").write_bytes(b"an earlier study's")  # reports/NAME is shared by studies of one name
    ff = {"last": [{"seed": 0, "value": 0.8}, {"seed": 1, "value": None, "reason": "ValueError: bad\nshape | [2, 4]"}]}
    text = write_report(_ablation(url, ff, [0.85, 0.86], [0, 1]), out).read_text()
    # An exception's second line ended the markdown row (and the list item) it was in.
    assert "failed: ValueError: bad shape \\| [2, 4] |" in text and "(seed 1): ValueError: bad shape | [2, 4]" in text
    assert not (out / "heatmap.png").exists()


def _hierarchy_answer(url: str, name: str, accuracies: dict[tuple[str, str], list[float]]) -> str:
    """The answer of a label-hierarchy study whose (labels, role) runs scored ``accuracies``, seed i at index i."""
    trials = [
        {
            "cell": f"{'bp-deepsup ' if role == 'baseline' else ''}labels={labels}",
            "role": role,
            "seed": seed,
            "value": value,
            "overrides": {"dataset": "fashion-mnist", "labels": labels},
        }
        for (labels, role), values in accuracies.items()
        for seed, value in enumerate(values)
    ]
    return results.answer(results.summarize(make_study(url, name, {"analysis": "label-hierarchy"}, trials)))


def test_label_hierarchy_answer_pairs_the_gap_change_by_seed(url):
    fine = {("fine", "ff"): [0.70, 0.70, 0.70], ("fine", "baseline"): [0.80, 0.82, 0.81]}
    # FF−BP per seed: -10, -12, -11 pp with fine labels, -2 and -13 with coarse ones. Seed 2 has no coarse runs,
    # so the change pairs seeds 0 and 1: +8 and -1 pp, whose interval holds zero.
    coarse = {("coarse", "ff"): [0.90, 0.79], ("coarse", "baseline"): [0.92] * 2}
    answer = _hierarchy_answer(url, "h-quick", {**fine, **coarse})
    half = 12.706 * 9 / 2**0.5 / 2**0.5  # t(0.975, 1) x sd(8, -1) / sqrt(2), in pp
    assert f"coarse − fine gap +3.5 ± {half:.1f} pp, paired over 2 seeds: no difference resolved" in answer
    # +8, +10 and +9.5 pp over three seeds: 9.2 ± 2.6 pp excludes zero.
    coarse = {("coarse", "ff"): [0.90, 0.90, 0.905], ("coarse", "baseline"): [0.92] * 3}
    answer = _hierarchy_answer(url, "h2-quick", {**fine, **coarse})
    assert "paired over 3 seeds: coarse labels move the gap in FF's favour" in answer
    # One shared seed: the number, as other answers give one, with no interval (it gave no number at all).
    coarse = {("coarse", "ff"): [0.90], ("coarse", "baseline"): [0.92]}
    answer = _hierarchy_answer(url, "h3-quick", {**fine, **coarse})
    assert "coarse − fine gap +8.0 pp from 1 seed that all four runs share: no interval, no direction claimed" in answer


def test_answers_name_what_has_no_result_and_claim_nothing_over_missing_seeds(url):
    # The coarse FF run diverged on seed 3: the change over the three seeds all four ran excludes zero, but the
    # survivors' gap leans toward FF. It said "coarse labels move the gap in FF's favour".
    fine = {("fine", "ff"): [0.70] * 4, ("fine", "baseline"): [0.80, 0.82, 0.81, 0.80]}
    coarse = {("coarse", "ff"): [0.90, 0.90, 0.905, None], ("coarse", "baseline"): [0.92] * 4}
    answer = _hierarchy_answer(url, "h4-quick", {**fine, **coarse})
    assert "coarse labels -" in answer and "(FF n=3 of 4: 1 failed)" in answer, answer
    assert "paired over 3 seeds: no direction claimed with seeds missing" in answer, answer
    # A dataset whose FF trials all failed, and one with no BP result: both were left out without a word.
    trials = [
        {"cell": f"{name} {d}", "role": role, "group": d, "seed": s, "value": v, "overrides": {"dataset": d}}
        for d, ff, bp in (
            ("fashion-mnist", [0.90, 0.91], [0.92, 0.93]),
            ("mnist", [None, None], [0.98, 0.99]),
            ("kmnist", [0.80, 0.81], [None, None]),
        )
        for name, role, values in (("ff", "ff", ff), ("bp-deepsup", "baseline", bp))
        for s, v in enumerate(values)
    ]
    answer = results.answer(results.summarize(make_study(url, "gap-quick", {"analysis": "bp-gap"}, trials)))
    assert answer.startswith("FF trails bp-deepsup on 0 of 1 datasets and leads on 0; 1 undecided"), answer
    assert answer.endswith("; no completed trial for mnist; no BP result yet for kmnist."), answer
    # A K whose FF trials all failed: the trend ran from the smallest to the largest K that has a result, silently.
    trials = [
        {"cell": f"{name}classes={k}", "role": role, "seed": s, "value": v, "overrides": {"classes": k}}
        | {"group": "synthetic"}
        for k in (2, 10)
        for s in (0, 1)
        for name, role, v in (("", "ff", None if k == 10 else 0.8 + s / 100), ("bp-deepsup ", "baseline", 0.7))
    ]
    meta = {"analysis": "k-sweep", "axes": {"classes": [2, 10]}}
    answer = results.answer(results.summarize(make_study(url, "k-quick", meta, trials)))
    assert answer.endswith("; no completed trial for classes=10."), answer
    # Every FF configuration diverged on every seed: done, so no "yet", and they are named.
    trials = [
        {"cell": cell, "role": role, "seed": s, "value": v, "overrides": {"temperature": cell.split("=")[-1]}}
        for cell, role, v in (("temperature=a", "ff", None), ("temperature=b", "ff", None), ("bp", "baseline", 0.8))
        for s in (0, 1)
    ]
    answer = results.answer(results.summarize(make_study(url, "all-failed-quick", {"seeds": [0, 1]}, trials)))
    assert answer == (
        "No FF configuration has a completed trial, so the question has no answer from this study; no completed "
        "trial for temperature=a, temperature=b."
    )
    # A search's pruned draws are routine and many: counted, not listed.
    trials = [
        {"cell": f"#{i} lr=0.00{i}", "role": "ff", "seed": 0, "value": 0.8 + i / 100, "pruned": i < 3}
        | {"overrides": {"lr": i / 1000}}
        for i in range(1, 6)
    ]
    meta = {"sampler": "tpe", "analysis": "search", "seeds": [0]}
    answer = results.answer(results.summarize(make_study(url, "search-quick", meta, trials)))
    assert "; 2 of 5 searched configurations have no completed trial" in answer and "#1 lr" not in answer, answer


def test_a_stored_search_counts_as_untuned_only_the_searched_settings_the_baseline_shares():
    # Searches stored before session 11 recorded nothing; a plugin's parameter is stored as "kind:plugin.param".
    params = {
        "norm": "decoupled",
        "lr": 0.002,
        "temperature": "cosine",
        "temperature:cosine.start": 2.0,
        "norm:decoupled.eps": 1e-6,
    }
    dists = {
        "norm": CategoricalDistribution(["decoupled", "none"]),
        "lr": FloatDistribution(1e-3, 3e-3),
        "temperature": CategoricalDistribution(["constant", "cosine"]),
        "temperature:cosine.start": FloatDistribution(0.5, 4.0),
        "norm:decoupled.eps": FloatDistribution(1e-7, 1e-5),
    }
    trial = create_trial(value=0.5, params=params, distributions=dists, user_attrs={"role": "ff"})
    meta = {"base": {"lr": 0.003}, "axes": {"norm": ["decoupled", "none"], "temperature": ["constant", "cosine"]}}
    # Before: "temperature:cosine.start" counted as a setting BP shares, and the answer said BP ran at it; so did
    # the sampled norm axis, each of whose levels has a baseline of its own.
    assert results._untuned_from_trials([trial], meta) == {"lr": "lr=0.003", "norm.eps": "norm.eps at its base value"}
    # A plugin named with a dot: "norm:my.ln.eps" was read as the setting "norm.ln.eps".
    assert results._setting("norm:my.ln.eps") == "norm.eps"


def test_importance_reads_the_levels_the_rows_ran(tmp_path, url):
    # As k-sweep stores them: one axis over groups with different levels, merged into the last group's levels.
    trials = []
    for group, dataset, ks in (("synthetic", "teacher-student", [2, 100]), ("fashion-mnist", "fashion-mnist", [2, 10])):
        for k in ks:
            for seed in (0, 1):
                over = {"dataset": dataset, "classes": k}
                ff = {"cell": f"{group} classes={k}", "role": "ff", "group": group, "seed": seed, "overrides": over}
                trials.append({**ff, "value": 0.6 + 0.01 * seed + k / 1000})
                bp = {**ff, "cell": f"bp-deepsup {group} classes={k}", "role": "baseline"}
                trials.append({**bp, "value": 0.7 + 0.01 * seed})
    study = make_study(url, "k-sweep-quick", {"analysis": "k-sweep", "axes": {"classes": [2, 10]}}, trials)
    assert results.summarize(study).axis_levels() == {"classes": [2, 10, 100]}
    text = write_report(study, tmp_path / "out").read_text()
    # Before: "Not computed (ValueError: '100' not in ('2', '10'))."
    assert "Importances: classes 1.00." in text


def test_one_epoch_studies_draw_no_learning_curves(tmp_path, url):
    # Before: a plot of one dot per row (the smoke budgets train one epoch), captioned as learning curves.
    trials = [
        {"cell": f"fusion={f}", "role": "ff", "seed": s, "value": v, "overrides": {"fusion": f}}
        for f, v in (("last", 0.80), ("sum", 0.82))
        for s in (0, 1)
    ]
    trials += [{"cell": "bp-deepsup", "role": "baseline", "seed": s, "value": 0.85, "overrides": {}} for s in (0, 1)]
    one_epoch = [{**t, "history": [{"epoch": 0, "loss": 1.0, "test_accuracy": t["value"]}]} for t in trials]
    write_report(make_study(url, "fusion-quick", {"analysis": "ablation"}, one_epoch), tmp_path / "one")
    assert not (tmp_path / "one" / "learning_curves.png").exists()
    write_report(make_study(url, "fusion-full", {"analysis": "ablation"}, trials), tmp_path / "two")
    assert (tmp_path / "two" / "learning_curves.png").stat().st_size > 1000


def test_a_greedy_runs_curve_is_drawn_against_passes_not_epochs(tmp_path, url, figures):
    # 2 blocks x 3 epochs recorded as 6 points, drawn on an axis labelled "epoch" beside BP's 3.
    history = [{"epoch": e, "loss": 1.0, "test_accuracy": 0.5 + e / 20} for e in range(6)]
    trials = [
        {"cell": f"schedule={k}", "role": "ff", "seed": 0, "value": 0.8, "overrides": {"schedule": k}, "history": h}
        for k, h in (("greedy", history), ("simultaneous", history[:3]))
    ]
    trials.append({"cell": "bp-deepsup", "role": "baseline", "seed": 0, "value": 0.85, "overrides": {}})
    report = write_report(make_study(url, "schedule-full", {"analysis": "ablation"}, trials), tmp_path / "o")
    assert figures["learning_curves.png"].axes[0].get_xlabel().startswith("pass over the training data (greedy FF")
    assert "per-pass test accuracy" in report.read_text()


def test_a_row_without_results_shows_dashes(url):
    trials = [
        {"cell": "fusion=last", "role": "ff", "seed": 0, "value": 0.80, "overrides": {"fusion": "last"}},
        {"cell": "fusion=sum", "role": "ff", "seed": 0, "value": None, "overrides": {"fusion": "sum"}},  # failed
        {"cell": "bp-deepsup", "role": "baseline", "seed": 0, "value": 0.85, "overrides": {}},
    ]
    summary = results.summarize(make_study(url, "fusion-quick", {"analysis": "ablation"}, trials))
    rows = {row[0]: row for row in results.table_rows(summary)}
    # Before: train s "nan", and "-" (which means "no validation split") for the validation column.
    assert rows["fusion=sum"][5:7] == ["–", "–"]


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


def test_a_report_without_plots_says_so_and_the_cli_names_the_plots_it_wrote(tmp_path, url, capsys):
    # One axis and one epoch (a smoke budget): no heatmap, no learning curves, too few trials for importance. The
    # CLI said "wrote ... and its plots" and the report's Plots section was empty.
    one_epoch = [{"epoch": 0, "test_accuracy": 0.5}]
    ff = {"role": "ff", "overrides": {"fusion": "last"}, "cell": "fusion=last", "history": one_epoch}
    bp = {"role": "baseline", "overrides": {}, "cell": "bp-deepsup", "history": one_epoch}
    meta = {"analysis": "ablation", "axes": {"fusion": ["last"]}}
    make_study(url, "fusion-smoke", meta, [{**bp, "seed": 0, "value": 0.5}, {**ff, "seed": 0, "value": 0.6}])
    assert main(["report", "fusion", "--storage", url, "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md (no plot applies to this study)")
    text = (tmp_path / "o" / "report.md").read_text()
    assert "## Plots\n\nNo plot applies to this study" in text
    assert not list((tmp_path / "o").glob("*.png"))
    # With plots, the line names them.
    two_epochs = [{"epoch": e, "test_accuracy": 0.5} for e in (0, 1)]
    trials = [{**bp, "seed": 0, "value": 0.5, "history": two_epochs}, {**ff, "seed": 0, "value": 0.6}]
    make_study(url, "fusion2-smoke", meta, [trials[0], {**trials[1], "history": two_epochs}])
    assert main(["report", "fusion2", "--storage", url, "--out", str(tmp_path / "o2")]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md and learning_curves.png")
    assert "No plot applies" not in (tmp_path / "o2" / "report.md").read_text()


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
    # None has one: it said "not every configuration has a validation split".
    assert "chosen on the test images themselves (no configuration has a validation split, so optimistic)" in (
        results.answer(summary)
    )
    sum_ = {"role": "ff", "overrides": {"fusion": "sum"}, "cell": "fusion=sum", "seed": 0, "value": 0.6, "val": 0.6}
    mixed = make_study(
        url.replace("r.db", "m.db"), "fusion-quick", {"analysis": "ablation"}, [{**ff, "seed": 0, "value": 0.7}, sum_]
    )
    assert "(not every configuration has a validation split, so optimistic)" in results.answer(results.summarize(mixed))
    row = dict(zip(results.TABLE_COLUMNS, results.table_rows(summary)[0], strict=True))
    assert row["val acc % (95% CI)"] == "-"


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
    assert rows["fusion=last"]["gap_paired_ci95"] is None and rows["fusion=last"]["baseline_n"] == 1
    # No interval, so no direction word: once this read "it is ahead of bp-deepsup".
    answer = json.loads(text)["answer"]
    assert "against bp-deepsup: FF−BP +20.0 pp from one seed each: no interval, no direction claimed" in answer
    assert "ahead" not in answer


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


def _ablation(url: str, ff: dict[str, list[dict]], bp: list[float], seeds: list[int]) -> optuna.Study:
    """An ablation over ``fusion`` with one BP-DeepSup baseline; ``ff`` maps a fusion to its trials' fields."""
    trials = [
        {"cell": "bp-deepsup", "role": "baseline", "overrides": {}, "seed": seed, "value": v, "val": v}
        for seed, v in enumerate(bp)
    ]
    trials += [
        {"cell": f"fusion={name}", "role": "ff", "overrides": {"fusion": name}, **fields}
        for name, runs in ff.items()
        for fields in runs
    ]
    meta = {"analysis": "ablation", "axes": {"fusion": sorted(ff)}, "seeds": seeds}
    return make_study(url, "fusion-full", meta, trials)


def test_a_pruned_survivor_is_ranked_after_every_complete_configuration(tmp_path, url):
    # The median pruner stopped "sum" on its weak seeds 1 and 2; its one surviving seed has the best validation
    # accuracy, but a 1-seed survivor is a biased sample and may not beat "last", which completed every seed.
    last = [{"seed": s, "value": t, "val": v} for s, t, v in ((0, 0.80, 0.80), (1, 0.80, 0.81), (2, 0.79, 0.79))]
    pruned = [{"seed": s, "value": 0.5, "pruned": True} for s in (1, 2)]
    ff = {"last": last, "sum": [{"seed": 0, "value": 0.78, "val": 0.83}, *pruned]}
    study = _ablation(url, ff, [0.85, 0.86, 0.84], [0, 1, 2])
    summary = results.summarize(study)
    assert [r.label for r in summary.ranked()] == ["fusion=last", "fusion=sum"]
    assert summary.best().label == "fusion=last" and not summary.rows[-1].complete
    answer = results.answer(summary)
    assert answer.startswith("Best FF configuration is fusion=last at 79.7 ± 1.4% test accuracy (n=3)")
    assert "incomplete" not in answer
    rows = {r[0]: dict(zip(results.TABLE_COLUMNS, r, strict=True)) for r in results.table_rows(summary)}
    assert rows["fusion=sum"]["n"] == "1 of 3" and rows["fusion=last"]["n"] == "3"
    assert rows["fusion=sum"]["notes"] == "incomplete: 2 pruned; ranked after the complete rows"
    assert rows["fusion=sum"]["gap to BP pp (95% Welch CI)"] == "-7.0 ± – (n=1 vs 3)"
    assert (
        "Rows missing a planned seed are ranked after the complete ones."
        in write_report(study, tmp_path / "o").read_text()
    )
    # With no complete row, the best incomplete one is chosen, and the answer says so.
    ff["last"] = last[:1] + [{"seed": 1, "value": None}]
    study = _ablation(f"sqlite:///{tmp_path / 'none.db'}", ff, [0.85, 0.86, 0.84], [0, 1, 2])
    summary = results.summarize(study)
    assert summary.best().label == "fusion=sum"
    assert "chosen among incomplete rows: n=1 of 3 (2 pruned)" in results.answer(summary)
    assert results.table_rows(summary)[1][-1].startswith("incomplete: 1 failed, 1 not run yet;")
    running = study.ask()  # another worker has taken the last seed
    for key, value in {"cell": "fusion=last", "seed": 2, "role": "ff"}.items():
        running.set_user_attr(key, value)
    assert results.table_rows(results.summarize(study))[1][-1].startswith("incomplete: 1 failed, 1 running;")
    # Its worker, on this host, was killed: the seed is no longer running but waits for a rerun (before session
    # 10 it showed as running until a study run marked it failed).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    row = results.table_rows(results.summarize(study))[1]
    assert row[-1].startswith("incomplete: 1 failed, 1 failed (a rerun retries it);"), row[-1]
    assert "to rerun: stale: its process died; rerun" in row[-1]
    summary = results.summarize(study)  # the header's counts and the failure list agree with the row
    assert "RUNNING" not in summary.states
    assert [(f.label, f.seed, f.reason, f.fate) for f in summary.failures if f.reason == results.STALE] == [
        ("fusion=last", 2, results.STALE, "retry")
    ]


def test_a_gap_without_spread_on_either_side_claims_no_direction(url):
    # FF collapsed to exactly chance on every seed, BP to one class more: Welch's width is 0 (scipy agrees), but
    # three equal numbers per side do not make the gap exact.
    ff = {"last": [{"seed": s, "value": 0.1, "val": 0.1} for s in range(3)]}
    summary = results.summarize(_ablation(url, ff, [0.2, 0.2, 0.2], [0, 1, 2]))
    (row,) = summary.ff
    assert row.gap.no_spread and row.gap.excludes_zero() and not row.gap.decisive
    answer = results.answer(summary)
    assert "at 10.0 ± 0.0% (no spread across seeds) test accuracy (n=3)" in answer
    assert "against bp-deepsup: FF−BP -10.0 ± 0.0 pp (no spread across seeds), n=3 vs 3;" in answer
    assert answer.endswith(", no direction claimed.")
    assert "behind" not in answer
    assert results.table_rows(summary)[1][3] == "-10.0 ± 0.0 (no spread across seeds) (n=3 vs 3)"


def test_a_paired_interval_that_reaches_zero_withholds_the_direction(url):
    # FF [.80, .82, .84] against BP [.78, .76, .74] on the same seeds: Welch +6.0 ± 4.5 pp excludes zero, the paired
    # interval (+6.0 ± 9.9, scipy's ttest_rel) does not; the answer said "ahead" from Welch alone.
    ff = {"last": [{"seed": s, "value": v, "val": v} for s, v in enumerate([0.80, 0.82, 0.84])]}
    summary = results.summarize(_ablation(url, ff, [0.78, 0.76, 0.74], [0, 1, 2]))
    (row,) = summary.ff
    assert row.gap.decisive and not row.gap_paired.excludes_zero() and not row.gap_decisive
    answer = results.answer(summary)
    assert (
        "it is not distinguishable from bp-deepsup (FF−BP +6.0 ± 4.5 pp, n=3 vs 3; paired over the 3 shared seeds"
        in (answer)
    )
    assert "ahead" not in answer


def test_a_paired_interval_on_the_other_side_of_zero_withholds_the_direction(url):
    # FF ran seeds 0-9, BP seeds 0, 1 and 10-17: Welch over all of them says FF leads (+35.7 ± 13.2 pp), the two
    # shared seeds that it trails (-9.5 ± 6.4 pp), and both intervals exclude zero. The answer said "ahead".
    ff_accs = [0.50, 0.53, *[0.90 + 0.01 * i for i in range(8)]]
    bp_accs = dict(zip([0, 1, *range(10, 18)], [0.60, 0.62, *[0.50 - 0.01 * i for i in range(8)]], strict=True))
    trials = [
        {"cell": "fusion=last", "role": "ff", "overrides": {"fusion": "last"}, "seed": s, "value": v}
        for s, v in enumerate(ff_accs)
    ]
    trials += [
        {"cell": "bp-deepsup", "role": "baseline", "overrides": {}, "seed": s, "value": v} for s, v in bp_accs.items()
    ]
    meta = {"analysis": "ablation", "axes": {"fusion": ["last"]}, "seeds": list(range(18))}
    study = make_study(url, "fusion-full", meta, trials)
    (row,) = results.summarize(study).ff
    assert row.gap.decisive and row.gap.mean > 0
    assert row.gap_paired.n == 2 and row.gap_paired.decisive and row.gap_paired.mean < 0
    assert not row.gap_decisive and "ahead" not in results.answer(results.summarize(study))


def test_a_non_finite_validation_accuracy_fails_its_trial_instead_of_ranking_first(url):
    # NaN sorted first among rows ranked on validation accuracy, and would have become the study's recipe. (Optuna
    # refuses a NaN trial value; a hand-made or damaged trial can still store one among its metrics.)
    ff = {
        "last": [{"seed": s, "value": 0.80, "val": 0.80} for s in range(2)],
        "sum": [
            {"seed": s, "value": 0.70, "metrics": {"val_accuracy": bad}} for s, bad in enumerate([math.nan, math.inf])
        ],
    }
    summary = results.summarize(_ablation(url, ff, [0.85, 0.86], [0, 1]))
    assert summary.best().label == "fusion=last"
    (bad,) = [r for r in summary.ff if r.label == "fusion=sum"]
    assert bad.n == 0 and bad.failed == [f"completed with a validation accuracy of {v}" for v in ("nan", "inf")]


def test_the_paired_interval_matches_scipy_and_pairs_by_seed_not_by_order(url):
    from scipy import stats

    ff_by_seed, bp = {0: 0.81, 1: 0.84, 2: 0.80}, [0.86, 0.88, 0.85]
    # FF's trials arrive in another seed order than BP's: pairing by position would pair the wrong runs.
    ff = {"last": [{"seed": s, "value": ff_by_seed[s]} for s in (2, 0, 1)]}
    summary = results.summarize(_ablation(url, ff, bp, [0, 1, 2]))
    (row,) = summary.ff
    expected = stats.ttest_rel([ff_by_seed[s] for s in range(3)], bp).confidence_interval(0.95)
    assert row.gap_paired.low == pytest.approx(expected.low, abs=1e-12)
    assert row.gap_paired.high == pytest.approx(expected.high, abs=1e-12)
    assert row.gap_paired.n == 3 and row.gap.mean == pytest.approx(row.gap_paired.mean)
    assert row.to_dict()["gap_paired_ci95"] == pytest.approx(row.gap_paired.half_width)
    assert row.to_dict()["gap_paired_n"] == 3
    assert results.table_rows(summary)[1][4] == fmt(row.gap_paired, signed=True)
    # Welch stays the primary interval: the direction word follows it, the paired one is shown beside it.
    assert "paired over the 3 shared seeds" in results.answer(summary)
    # FF lost seed 2: the pairs are the two seeds both ran, and the table says so.
    ff = {"last": [{"seed": s, "value": ff_by_seed[s]} for s in (1, 0)]}
    summary = results.summarize(_ablation(url.replace("r.db", "p.db"), ff, bp, [0, 1, 2]))
    (row,) = summary.ff
    expected = stats.ttest_rel([ff_by_seed[0], ff_by_seed[1]], bp[:2]).confidence_interval(0.95)
    assert row.gap_paired.n == 2 and row.gap_paired.low == pytest.approx(expected.low, abs=1e-12)
    assert row.gap_paired.high == pytest.approx(expected.high, abs=1e-12)
    assert results.table_rows(summary)[1][4] == fmt(row.gap_paired, signed=True) + " (2 shared seeds)"
    assert "paired over the 2 shared seeds" in results.answer(summary)
    # One shared seed makes no pairs worth an interval.
    ff = {"last": [{"seed": 0, "value": ff_by_seed[0]}]}
    (row,) = results.summarize(_ablation(url.replace("r.db", "q.db"), ff, bp, [0, 1, 2])).ff
    assert not row.gap_paired.has_ci and row.gap_paired.n == 0


def _bp_gap_study(url: str, gaps: dict[str, list[float]]) -> optuna.Study:
    """A bp-gap study: per dataset, FF accuracies ``bp + gap`` on seeds 0..len-1 against BP at 0.80, 0.81, ..."""
    trials = []
    for dataset, ff in gaps.items():
        over = {"dataset": dataset}
        for seed, gap in enumerate(ff):
            bp = 0.80 + 0.01 * seed
            common = {"group": dataset, "seed": seed, "overrides": over}
            trials.append({"cell": f"ff {dataset}", "role": "ff", "value": bp + gap, **common})
            trials.append({"cell": f"bp-deepsup {dataset}", "role": "baseline", "value": bp, **common})
    return make_study(url, "bp-gap-full", {"analysis": "bp-gap", "seeds": [0, 1, 2]}, trials)


@pytest.fixture
def figures(monkeypatch):
    """The figures a report saves, open for inspection."""
    from ffablate import report

    saved = {}
    monkeypatch.setattr(report, "_save", lambda fig, out, name: saved.setdefault(name, fig) and name)
    yield saved
    report.plt.close("all")  # kept open for inspection, so pyplot holds them until closed (it warns past 20)


def test_bp_gap_counts_only_gaps_whose_interval_excludes_zero(tmp_path, url, figures):
    # fashion-mnist: -5 pp on 3 seeds with some spread, decided. digits: one seed each. mnist: spans zero.
    study = _bp_gap_study(url, {"fashion-mnist": [-0.05, -0.06, -0.04], "digits": [0.012], "mnist": [-0.02, 0.02]})
    answer = results.answer(results.summarize(study))
    assert answer.startswith("FF trails bp-deepsup on 1 of 3 datasets and leads on 0; 2 undecided")
    assert "fashion-mnist -5.0 ± 3.5 pp, n=3 vs 3" in answer
    assert "digits +1.2 pp from one seed each: no interval" in answer
    text = write_report(study, tmp_path / "out").read_text()
    # The plot says which interval and how many seeds stand behind each gap, as the table does.
    # Each count by the dataset it belongs to: "(n=1 vs 1, n=2 vs 2, n=3 vs 3 seeds)" did not say which lost seeds.
    caption = (
        "FF−BP test-accuracy gap per dataset ± 95% Welch CI (seeds: n=1 of 3 vs 1 of 3 at digits, n=3 vs 3 at "
        "fashion-mnist, n=2 of 3 vs 2 of 3 at mnist) (hollow: n=1"
    )
    assert f"![{caption}, no CI)](bp_gap.png)" in text
    (ax,) = figures["bp_gap.png"].axes
    fills = [bar.get_fill() for bar in ax.patches]
    assert sorted(fills) == [False, True, True]  # digits' bar is hollow
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars.lines[2][0].get_segments()) == 2  # error bars only where a CI exists


def test_a_one_dataset_gap_study_names_its_dataset(tmp_path, url, figures):
    # mnist-gap-full keeps its dataset in the shared settings: the answer and the plot said "ff".
    trials = []
    for seed, gap in enumerate([-0.002, -0.003, -0.004]):
        common = {"seed": seed, "overrides": {}}
        trials.append({"cell": "ff", "role": "ff", "value": 0.99 + gap, **common})
        trials.append({"cell": "bp-deepsup", "role": "baseline", "value": 0.99, **common})
    meta = {"analysis": "bp-gap", "seeds": [0, 1, 2], "base": {"dataset": "mnist"}}
    study = make_study(url, "mnist-gap-full", meta, trials)
    assert "(FF−BP: mnist -0.3 ± 0.2 pp, n=3 vs 3, paired over 3 seeds -0.3 ± 0.2 pp)" in results.answer(
        results.summarize(study)
    )
    write_report(study, tmp_path / "out")
    (ax,) = figures["bp_gap.png"].axes
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["mnist"]


def test_a_completed_trial_without_a_test_accuracy_is_no_result(url):
    # Its value (the validation accuracy it was ranked by) was shown as its test accuracy.
    trials = [
        {"cell": "fusion=last", "role": "ff", "seed": s, "value": 0.8, "val": 0.9, "overrides": {"fusion": "last"}}
        for s in (0, 1)
    ]
    trials += [{"cell": "bp-deepsup", "role": "baseline", "seed": s, "value": 0.85, "overrides": {}} for s in (0, 1, 2)]
    study = make_study(url, "fusion-full", {"analysis": "ablation", "seeds": [0, 1, 2]}, trials)
    good = study.trials[1]
    attrs = {**good.user_attrs, "seed": 2, "metrics": {**good.user_attrs["metrics"], "test_accuracy": None}}
    study.add_trial(create_trial(value=0.9, params=good.params, distributions=good.distributions, user_attrs=attrs))
    (row,) = results.summarize(study).ff
    assert row.n == 2 and not row.complete and row.accuracy.mean == pytest.approx(0.8)
    assert row.missing() == "1 failed" and row.failed == ["completed without a test accuracy (None)"]


def test_k_sweep_from_one_seed_claims_no_direction_and_draws_hollow_points(tmp_path, url, figures):
    trials = []
    for k, gap in {2: 0.02, 10: 0.05}.items():
        over = {"dataset": "teacher-student", "classes": k}
        common = {"group": "synthetic", "seed": 0, "overrides": over}
        trials.append({"cell": f"synthetic classes={k}", "role": "ff", "value": 0.7 + gap, **common})
        trials.append({"cell": f"bp-deepsup synthetic classes={k}", "role": "baseline", "value": 0.7, **common})
    study = make_study(url, "k-sweep-quick", {"analysis": "k-sweep", "axes": {"classes": [2, 10]}}, trials)
    answer = results.answer(results.summarize(study))
    assert answer == (
        "synthetic: FF−BP gap +2.0 pp from one seed each: no interval at K=2 → +5.0 pp from one seed each: "
        "no interval at K=10 (no direction claimed at K=10; change with K +3.0 pp with n=1 on a side: no interval, "
        "no trend claimed)."
    )
    assert "(hollow: n=1, no CI)" in write_report(study, tmp_path / "out").read_text()
    (ax,) = figures["k_sweep_gap.png"].axes
    assert ax.get_title() == "FF–BP gap against K"  # one kind of data: no "synthetic vs real"
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in hollow] == [[2, 10]] and not ax.containers  # no error bars


def test_a_gap_without_a_baseline_reads_as_a_dash_not_nan():
    from ffablate.results import _pp
    from ffablate.stats import Estimate

    text = _pp(Estimate(float("nan"), float("nan"), 0), 2, 0)
    assert "nan" not in text and text.startswith("– pp from")


def _temperature_by_norm(url: str, ff: dict[tuple[str, str], dict], bp: dict[str, float]) -> optuna.Study:
    """A one-seed temperature × norm grid whose BP baseline varies with norm (a shared axis), as a spec with
    ``norm`` among its axes makes it; ``ff`` maps (temperature, norm) to a trial's value/val fields, ``bp`` a
    norm to its baseline's accuracy, or "" to one baseline every cell is matched to."""
    trials = [
        {"cell": f"bp-deepsup norm={norm}".removesuffix(" norm="), "role": "baseline", "seed": 0, "value": v}
        | {"val": v, "overrides": {"norm": norm} if norm else {}, "match": {"norm": norm} if norm else {}}
        for norm, v in bp.items()
    ]
    trials += [
        {"cell": f"temperature={temp} norm={norm}", "role": "ff", "seed": 0, **fields}
        | {"overrides": {"temperature": temp, "norm": norm}, "match": {"norm": norm} if "" not in bp else {}}
        for (temp, norm), fields in ff.items()
    ]
    axes = {"temperature": sorted({t for t, _ in ff}), "norm": sorted({n for _, n in ff}, reverse=True)}
    return make_study(url, "hm-smoke", {"analysis": "ablation", "axes": axes, "seeds": [0]}, trials)


def test_the_leading_axis_compares_its_levels_over_the_same_cells_with_an_interval(url):
    # norm moves accuracy by exactly 20 pp under either temperature, but cosine/none lost a seed: averaged over
    # whichever rows were complete, norm's levels spanned 15 pp, printed bare ("15.0 pp between its levels").
    runs = {
        ("constant", "none"): [0.50, 0.52, 0.54],
        ("constant", "decoupled"): [0.30, 0.32, 0.34],
        ("cosine", "none"): [0.60, 0.62],
        ("cosine", "decoupled"): [0.40, 0.42, 0.44],
    }
    trials = [
        {"cell": f"temperature={t} norm={n}", "role": "ff", "seed": seed, "value": v}
        | {"overrides": {"temperature": t, "norm": n}}
        for (t, n), values in runs.items()
        for seed, v in enumerate(values)
    ]
    axes = {"temperature": ["constant", "cosine"], "norm": ["none", "decoupled"]}
    study = make_study(url, "axis", {"analysis": "ablation", "axes": axes, "seeds": [0, 1, 2]}, trials)
    summary = results.summarize(study)
    span = results.most_influential_axis(summary)
    assert (span.axis, span.high, span.low, span.cells) == ("norm", "none", "decoupled", 1)
    from scipy import stats

    a, b = runs[("constant", "none")], runs[("constant", "decoupled")]
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert span.difference.mean == pytest.approx(0.20) and span.difference.low == pytest.approx(expected.low)
    assert (
        "the norm axis has the widest spread of level means on test accuracy (none − decoupled +20.0 ± 4.5 pp, n≥3 "
        "seeds a cell, over 1 combination of the other axes that ran every norm level)" in results.answer(summary)
    )


def _two_axis_study(url: str, name: str, runs: dict, groups: dict | None = None) -> optuna.Study:
    """FF rows of a goodness x loss grid, ``runs`` mapping (goodness, loss) to per-seed test accuracies;
    ``groups`` maps a (goodness, loss) to its group (default "")."""
    trials = [
        {"cell": f"goodness={g} loss={lo}", "role": "ff", "seed": seed, "value": v}
        | {"overrides": {"goodness": g, "loss": lo}, "group": (groups or {}).get((g, lo), "")}
        for (g, lo), values in runs.items()
        for seed, v in enumerate(values)
    ]
    axes = {"goodness": sorted({g for g, _ in runs}), "loss": sorted({lo for _, lo in runs})}
    return make_study(url, name, {"analysis": "ablation", "axes": axes, "seeds": [0, 1, 2]}, trials)


def test_the_leading_axis_skips_groups_that_fix_it_names_axes_it_cannot_compare_and_never_a_tie(url):
    # The goodness spec's class-wise group fixes goodness and loss: its levels joined both axes, no combination
    # held them all, and the answer lost its axis clause.
    runs = {
        ("sumsq", "symba"): [0.30, 0.31, 0.32],
        ("sumsq", "softplus"): [0.31, 0.32, 0.33],
        ("meansq", "symba"): [0.50, 0.51, 0.52],
        ("meansq", "softplus"): [0.51, 0.52, 0.53],
        ("classwise", "classwise-ce"): [0.80, 0.81, 0.82],
    }
    groups = {("classwise", "classwise-ce"): "classwise"}
    span = results.most_influential_axis(results.summarize(_two_axis_study(url, "goodness-quick", runs, groups)))
    assert (span.axis, span.high, span.low, span.cells) == ("goodness", "meansq", "sumsq", 2) and not span.uncompared
    # A loss level lost a seed in every cell: loss cannot be compared, and the answer says so rather than let
    # goodness pass for the axis that moves accuracy most among all.
    pruned = {key: values[:2] if key[1] == "softplus" else values for key, values in runs.items()}
    summary = results.summarize(_two_axis_study(url, "pruned", pruned, groups))
    span = results.most_influential_axis(summary)
    assert (span.axis, span.cells, span.uncompared) == ("goodness", 1, ("loss",))
    assert "of the axes that could be compared (loss: no combination completed all its levels)" in results.answer(
        summary
    )
    # Every level alike (FF collapsed to chance): no level is compared with itself.
    flat = {key: [0.1, 0.1, 0.1] for key in runs}
    assert results.most_influential_axis(results.summarize(_two_axis_study(url, "flat", flat, groups))) is None


def test_the_leading_axis_compares_levels_within_each_group(url):
    # Group one runs goodness {a, b}, group two {b, c}; goodness moves accuracy 60 pp inside each, loss 2 pp.
    # Intersecting the groups' levels left only b: goodness was called uncompared and loss named. A level whose
    # trials all failed (group two's d) was dropped without a word.
    levels = {"one": {"a": 0.2, "b": 0.8}, "two": {"b": 0.8, "c": 0.2, "d": None}}
    trials = [
        {"cell": f"{group} goodness={g} loss={lo}", "role": "ff", "group": group, "seed": seed}
        | {"value": None if base is None else base + d + seed / 100, "overrides": {"goodness": g, "loss": lo}}
        for group, bases in levels.items()
        for g, base in bases.items()
        for lo, d in (("x", 0.0), ("y", 0.02))
        for seed in range(3)
    ]
    axes = {"goodness": ["a", "b", "c", "d"], "loss": ["x", "y"]}
    study = make_study(url, "groups", {"analysis": "ablation", "axes": axes, "seeds": [0, 1, 2]}, trials)
    span = results.most_influential_axis(results.summarize(study))
    assert (span.axis, span.high, span.low, span.group) == ("goodness", "b", "a", "one")
    assert span.difference.mean == pytest.approx(0.6) and span.uncompared == ("goodness in group two",)


def test_a_search_table_cut_to_its_best_rows_says_so(tmp_path, url):
    # 20 sampled configurations, 15 shown: nothing said the other 5 existed.
    trials = [{"cell": "bp-deepsup", "role": "baseline", "overrides": {}, "seed": 0, "value": 0.5}]
    trials += [
        {"cell": f"#{i} lr={i}", "role": "ff", "overrides": {"lr": i}, "seed": 0, "value": 0.3 + i / 100}
        for i in range(20)
    ]
    study = make_study(url, "search-quick", {"analysis": "search", "sampler": "tpe", "seeds": [0]}, trials)
    summary = results.summarize(study)
    assert len(results.table_rows(summary, top=results.TABLE_TOP)) == 16
    note = "The table shows the best 15 of 20 FF configurations by test accuracy; `--json` lists them all."
    assert results.table_cut(summary) == note
    assert note in write_report(study, tmp_path / "out").read_text()
    assert results.table_cut(summary, top=20) == ""


def test_the_heatmap_shows_each_cells_gap_to_its_own_baseline_not_the_first_baseline(tmp_path, url, figures):
    # coupled-bn FF is 3.7 pp above its own baseline; against norm=none's baseline it would look 14.4 pp ahead.
    ff = {
        ("constant", "none"): {"value": 0.150},
        ("constant", "coupled-bn"): {"value": 0.347},
        ("cosine", "none"): {"value": 0.180},
        ("cosine", "coupled-bn"): {"value": 0.357},
    }
    text = write_report(_temperature_by_norm(url, ff, {"none": 0.213, "coupled-bn": 0.320}), tmp_path / "out")
    assert "(n=1 vs 1 seeds)" not in text.read_text()  # each cell says its own (test_the_heatmap_shows_each_cells_n)
    assert "seeds per cell, FF vs BP ('2 of 3': a planned seed missing) ('±–': n=1, no CI)](heatmap.png)" in (
        text.read_text()
    )
    ax = figures["heatmap.png"].axes[0]
    title = ax.get_title()
    assert "2 BP baselines, 21.3–32.0%" in title and "its own" in title
    assert "BP bp-deepsup norm=none" not in title and "BP bp-deepsup:" not in title
    cells = {text.get_text() for text in ax.texts}
    # Each gap with its interval ("± –": one seed a side), as everywhere else; it was a bare "ΔBP -6.3".
    gaps = {"15.0\n±–\nΔBP -6.3 ± –", "34.7\n±–\nΔBP +2.7 ± –", "35.7\n±–\nΔBP +3.7 ± –"}
    assert {f"{gap}\nn=1 vs 1" for gap in gaps} <= cells
    # One baseline for every cell: the title names it, as before.
    figures.clear()
    write_report(_temperature_by_norm(url.replace("r.db", "one.db"), ff, {"": 0.213}), tmp_path / "one")
    ax = figures["heatmap.png"].axes[0]
    assert "(BP bp-deepsup: 21.3 ± –%" in ax.get_title() and "35.7\n±–\nΔBP +14.4 ± –\nn=1 vs 1" in {
        t.get_text() for t in ax.texts
    }


def test_best_minus_worst_and_the_leading_axis_are_measured_on_the_split_that_ranks(tmp_path, url):
    # Validation ranks cosine/none best and constant/decoupled worst, and norm moves it most (20 pp against 2);
    # on test the same best is 15 pp below the worst, and temperature moves it most (15 pp against 0).
    ff = {
        ("constant", "none"): {"val": 0.30, "value": 0.20},
        ("constant", "decoupled"): {"val": 0.10, "value": 0.25},
        ("cosine", "none"): {"val": 0.32, "value": 0.10},
        ("cosine", "decoupled"): {"val": 0.12, "value": 0.05},
    }
    summary = results.summarize(_temperature_by_norm(url, ff, {"none": 0.2, "decoupled": 0.2}))
    answer = results.answer(summary)
    assert answer.startswith("Best FF configuration is temperature=cosine norm=none at 10.0 ± –% test accuracy")
    assert (
        "best − worst (temperature=constant norm=decoupled) on validation accuracy, which ranks them, "
        "+22.0 pp from one seed each: no interval" in answer
    )
    assert (
        "the norm axis has the widest spread of level means on validation accuracy (none − decoupled +20.0 pp from "
        "one seed a cell: no interval, over 2 combinations of the other axes that ran every norm level)" in answer
    )
    assert "-15.0" not in answer and "temperature axis" not in answer
    # Where the evaluator ranks another parameter first, the importance section says why, not silently.
    from ffablate.report import _importance_vs_answer

    assert "The answer names norm because its level means span" in _importance_vs_answer(
        summary, {"temperature": 0.6, "norm": 0.4}
    )
    assert _importance_vs_answer(summary, {"norm": 0.6, "temperature": 0.4}) == ""


def test_the_report_lists_every_failed_trial_with_a_reason_or_the_words_that_none_was_recorded(tmp_path, url):
    bp = {"role": "baseline", "overrides": {}, "cell": "bp-deepsup"}
    ff = {"role": "ff", "overrides": {"goodness": "meansq"}, "cell": "goodness=meansq"}
    study = make_study(
        url,
        "kill-smoke",
        {"analysis": "ablation", "axes": {"goodness": ["meansq"]}, "seeds": [0, 1]},
        [{**bp, "seed": 0, "value": 0.5}, {**ff, "seed": 0, "value": 0.4}, {**ff, "seed": 1, "value": 0.42}],
    )
    dists = {
        "cell": CategoricalDistribution(["bp-deepsup", "goodness=meansq"]),
        "seed": CategoricalDistribution([0, 1, 2]),
    }

    def fail(params: dict, **attrs) -> None:
        # A killed worker's trial: the resume's stale check or Optuna's heartbeat fails it, with no reason.
        dists_ = {k: dists[k] for k in params}
        study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=dists_, user_attrs=attrs))

    fail({"cell": "goodness=meansq", "seed": 1}, **ff, seed=1)  # its point completed in the trial above
    fail({"cell": "bp-deepsup", "seed": 1}, **bp, seed=1)  # not run again yet
    fail({"cell": "goodness=meansq", "seed": 0})  # killed before it recorded its attributes: params only
    fail({})  # killed before it was given a point
    text = write_report(study, tmp_path / "out").read_text()
    assert "7 trials (complete 3, fail 4)" in text
    failed = text.split("## Failed trials", 1)[1].split("## Plots", 1)[0].strip().splitlines()
    none = "no reason recorded (the worker died: killed or crashed)"
    again = "its point finished in another trial, which is the one counted"
    assert failed == [
        f"- goodness=meansq (seed 1): {none} ({again})",
        f"- bp-deepsup (seed 1): {none} (not for good: rerunning the study runs this point again)",
        f"- goodness=meansq (seed 0): {none} ({again})",
        f"- trial 6 (it died before recording its configuration): {none} (no configuration was recorded for it, so "
        "no point waits on it)",
    ]
    assert [f["fate"] for f in json.loads(results.to_json(results.summarize(study)))["failed_trials"]] == [
        "rerun",
        "retry",
        "rerun",
        "unknown",
    ]


def test_rows_with_the_same_scores_seed_for_seed_are_called_tied(url):
    # sum-from-k (k=1) over two blocks is `last`: the first of them in the spec's order was "best", silently.
    trials = []
    for fusion in ("last", "sum-from-k", "sum"):
        for seed, val in enumerate((0.669, 0.655, 0.647)):
            lower = 0.05 if fusion == "sum" else 0.0
            over = {"fusion": fusion}
            trials.append(
                {
                    "cell": f"fusion={fusion}",
                    "role": "ff",
                    "seed": seed,
                    "value": 0.6,
                    "val": val - lower,
                    "overrides": over,
                }
            )
    trials += [
        {"cell": "bp-deepsup", "role": "baseline", "seed": s, "value": 0.7, "val": 0.7, "overrides": {}}
        for s in (0, 1, 2)
    ]
    study = make_study(url, "fusion-full", {"analysis": "ablation", "seeds": [0, 1, 2]}, trials)
    answer = results.answer(results.summarize(study))
    assert "chosen on validation accuracy (65.7 ± 2.8%), tied seed for seed with fusion=sum-from-k;" in answer


def _levels_study(url: str, levels: dict[float, list[tuple[float | None, float | None]]]) -> optuna.Study:
    """FF (fusion=last, 0.80 on seeds 0-2) against BP-DeepSup run at several lr levels ([baseline] levels): per level,
    per seed, (test, validation) accuracy; a test accuracy of None is a failed seed."""
    trials = [
        {"cell": "fusion=last", "role": "ff", "overrides": {"fusion": "last"}, "seed": s, "value": 0.8, "val": 0.8}
        for s in range(3)
    ]
    trials += [
        {"cell": f"bp-deepsup lr={lr}", "role": "baseline", "overrides": {"lr": lr}, "seed": s, "value": t, "val": v}
        for lr, runs in levels.items()
        for s, (t, v) in enumerate(runs)
    ]
    return make_study(url, "levels-quick", {"analysis": "search", "seeds": [0, 1, 2]}, trials)


def test_a_tuned_baseline_is_the_best_complete_level_and_says_how_it_was_chosen(tmp_path):
    # lr=0.01 scores higher on validation, but one of its seeds failed: its survivors are a biased sample, so the
    # gap is to the complete level, and the answer says a better-scoring level was left incomplete.
    complete, broken = [(0.70, 0.70)] * 3, [(0.90, 0.90), (0.90, 0.91), (None, None)]
    summary = results.summarize(_levels_study(f"sqlite:///{tmp_path / 'a.db'}", {0.001: complete, 0.01: broken}))
    (ff,) = summary.ff
    assert ff.baseline == "bp-deepsup lr=0.001" and ff.gap.mean == pytest.approx(0.10)
    choice = (
        "the best on validation of the complete levels (1 of 2); higher but incomplete: bp-deepsup lr=0.01 (1 failed)"
    )
    assert ff.base_choice == choice and ff.to_dict()["baseline_choice"] == choice
    assert f"(bp-deepsup lr=0.001 is {choice})" in results.answer(summary)
    notes = {row[0]: row[-1] for row in results.table_rows(summary)}
    assert notes["bp-deepsup lr=0.001"] == f"gaps are to this one: {choice}"
    # Equal on validation, far apart on test: the tie is named, not hidden behind the spec's order.
    tied = {0.001: [(0.70, 0.85)] * 3, 0.01: [(0.90, 0.85)] * 3}
    (ff,) = results.summarize(_levels_study(f"sqlite:///{tmp_path / 'b.db'}", tied)).ff
    assert (
        ff.base_choice
        == "the best of 2 levels on validation, tied with bp-deepsup lr=0.01 (the spec's order picked it)"
    )
    # A level without a validation split: every level is compared on test.
    no_val = {0.001: [(0.70, 0.95)] * 3, 0.01: [(0.90, None)] * 3}
    (ff,) = results.summarize(_levels_study(f"sqlite:///{tmp_path / 'c.db'}", no_val)).ff
    assert ff.baseline == "bp-deepsup lr=0.01" and ff.base_choice == "the best of 2 levels on test"


def test_a_tuned_baseline_at_the_end_of_its_levels_says_its_optimum_may_lie_beyond(tmp_path):
    levels = {0.001: [(0.70, 0.70)] * 3, 0.01: [(0.75, 0.75)] * 3, 0.1: [(0.78, 0.78)] * 3}
    (ff,) = results.summarize(_levels_study(f"sqlite:///{tmp_path / 'e.db'}", levels)).ff
    assert ff.baseline == "bp-deepsup lr=0.1"
    assert ff.base_choice == (
        "the best of 3 levels on validation; it is the highest lr level, so one beyond it may score higher"
    )
    levels[0.01] = [(0.80, 0.80)] * 3  # bracketed: nothing to add
    (ff,) = results.summarize(_levels_study(f"sqlite:///{tmp_path / 'f.db'}", levels)).ff
    assert ff.baseline == "bp-deepsup lr=0.01" and ff.base_choice == "the best of 3 levels on validation"


def test_the_best_rows_gap_is_called_optimistic_for_its_choice_on_these_seeds(url):
    # Validation and test accuracy of one trained network move together across seeds, so the seeds that lifted the
    # winner's validation score lift its test score and gap too; the answer called it "ahead" as if on fresh seeds.
    ff = {
        "last": [{"seed": s, "value": v, "val": v} for s, v in enumerate([0.90, 0.91, 0.92])],
        "sum": [{"seed": s, "value": v, "val": v} for s, v in enumerate([0.80, 0.82, 0.81])],
    }
    bp = [0.84, 0.845, 0.85]
    answer = results.answer(results.summarize(_ablation(url, ff, bp, [0, 1, 2])))
    assert answer.endswith(
        "; it is ahead of bp-deepsup (FF−BP +6.5 ± 2.1 pp, n=3 vs 3; paired over the 3 shared seeds +6.5 ± 1.2 pp), "
        "though it was picked as the best of 2 configurations on these seeds, so its gap is optimistic: confirm it on "
        "fresh seeds."
    )
    del ff["sum"]  # one configuration: no choice to be optimistic about
    one = results.answer(results.summarize(_ablation(url.replace("r.db", "one.db"), ff, bp, [0, 1, 2])))
    assert one.endswith("+6.5 ± 1.2 pp).") and "optimistic" not in one


def test_a_gap_with_a_failed_seed_claims_no_direction_and_says_what_is_missing(tmp_path, url):
    # FF's seed 2 diverged: a result, which the gap over the two survivors leaves out. The answers said "leads on 1"
    # and "it is ahead of bp-deepsup".
    ff, bp = [0.900, 0.902, None], [0.840, 0.845, 0.850]
    trials = [
        {"cell": f"{name} fashion-mnist", "role": role, "group": "fashion-mnist", "seed": s, "value": v}
        | {"overrides": {"dataset": "fashion-mnist"}}
        for name, role, values in (("ff", "ff", ff), ("bp-deepsup", "baseline", bp))
        for s, v in enumerate(values)
    ]
    study = make_study(url, "bp-gap-full", {"analysis": "bp-gap", "seeds": [0, 1, 2]}, trials)
    answer = results.answer(results.summarize(study))
    assert answer.startswith("FF trails bp-deepsup on 0 of 1 datasets and leads on 0; 1 undecided (")
    assert "or seeds missing on a side" in answer
    assert "fashion-mnist +5.6 ± 1.1 pp, n=2 vs 3 (FF n=2 of 3: 1 failed), paired over 2 seeds +5.9 ± 1.9 pp" in answer
    last = {"last": [{"seed": s, "value": v} for s, v in enumerate(ff)]}
    ablation = results.answer(results.summarize(_ablation(url.replace("r.db", "a.db"), last, bp, [0, 1, 2])))
    assert ablation.endswith(
        "against bp-deepsup: FF−BP +5.6 ± 1.1 pp, n=2 vs 3; paired over the 2 shared seeds +5.9 ± 1.9 pp, no "
        "direction claimed with seeds missing (FF n=2 of 3: 1 failed)."
    )
    # A k-sweep's largest K lost an FF seed: neither its side nor the trend is claimed.
    trials = [
        {"cell": f"{name}synthetic classes={k}", "role": role, "group": "synthetic", "seed": seed, "value": value}
        | {"overrides": {"dataset": "teacher-student", "classes": k}}
        for k, gap in ((2, 0.05), (5, 0.1), (10, 0.15))
        for seed in (0, 1, 2)
        for name, role, value in (
            ("", "ff", None if (k, seed) == (10, 2) else 0.7 + 0.01 * seed + gap),
            ("bp-deepsup ", "baseline", 0.7 + 0.01 * seed),
        )
    ]
    meta = {"analysis": "k-sweep", "axes": {"classes": [2, 5, 10]}, "seeds": [0, 1, 2]}
    study = make_study(url.replace("r.db", "k.db"), "k-sweep-quick", meta, trials)
    answer = results.answer(results.summarize(study))
    assert (
        "→ +14.5 ± 2.5 pp, n=2 vs 3 (FF n=2 of 3: 1 failed) at K=10 (no direction claimed at K=10; no trend claimed "
        "with seeds missing: change +9.5 ± 2.7 pp" in answer
    )
    # The plot's caption says which point lost the seed; it listed "n=2 vs 3, n=3 vs 3 seeds".
    # Synthetic data alone: no "synthetic and real data on one chart".
    caption = "Welch CI (n=3 vs 3 seeds; n=2 of 3 vs 3 at synthetic K=10)](k_sweep_gap.png)"
    assert caption in write_report(study, tmp_path / "out").read_text()


def test_the_widest_spread_of_level_means_says_when_it_is_not_resolved_from_zero(url):
    # goodness b − a is +1.0 pp with an interval across zero: it "moved mean test accuracy most", unqualified.
    runs = {("a", "x"): [0.50, 0.60, 0.55], ("b", "x"): [0.51, 0.58, 0.59]}
    answer = results.answer(results.summarize(_two_axis_study(url, "spread", runs)))
    assert (
        "best − worst (goodness=a loss=x) on test accuracy, which ranks them, +1.0 ± 10.7 pp, n=3 vs 3, not resolved "
        "from zero; the goodness axis has the widest spread of level means on test accuracy (b − a +1.0 ± 10.7 pp, "
        "n≥3 seeds a cell, not resolved from zero, over 1 combination" in answer
    )
    assert "moves" not in answer


def test_the_ablation_answer_names_levels_whose_trials_all_failed(url):
    # readout diverged on every seed: its axis could not be compared and the answer said nothing of either.
    ff = {
        "last": [{"seed": s, "value": v, "val": v} for s, v in enumerate([0.90, 0.91, 0.92])],
        "sum": [{"seed": s, "value": v, "val": v} for s, v in enumerate([0.80, 0.82, 0.81])],
        "readout": [{"seed": s, "value": None} for s in range(3)],
    }
    answer = results.answer(results.summarize(_ablation(url, ff, [0.84, 0.845, 0.85], [0, 1, 2])))
    assert "chosen on validation accuracy (91.0 ± 2.5%); no completed trial for fusion=readout;" in answer
    assert "; fusion could not be compared (no combination completed all its levels);" in answer
    # goodness's levels have equal means (no span) and loss's y failed throughout: loss went unnamed.
    runs = {("a", "x"): [0.5, 0.6, 0.7], ("b", "x"): [0.5, 0.6, 0.7], ("a", "y"): [None] * 3, ("b", "y"): [None] * 3}
    summary = results.summarize(_two_axis_study(url, "flat-failed", runs))
    assert results.most_influential_axis(summary) is None
    answer = results.answer(summary)
    assert "no completed trial for goodness=a loss=y, goodness=b loss=y;" in answer
    assert answer.endswith("; loss could not be compared (no combination completed all its levels).")


def test_the_heatmap_shows_each_cells_n(tmp_path, url, figures):
    # The caption listed the counts that occur ("n=2, 3"); a cell that lost a seed looked like the others, and one
    # whose trials all failed was blank.
    runs = {("a", "x"): [0.50, 0.52, 0.54], ("a", "y"): [0.60, 0.62], ("b", "x"): [None] * 3, ("b", "y"): [0.7] * 3}
    report = write_report(_two_axis_study(url, "cells", runs), tmp_path / "out").read_text()
    assert "n: seeds per cell, FF vs BP ('2 of 3': a planned seed missing)](heatmap.png)" in report
    texts = figures["heatmap.png"].axes[0].texts
    assert {"52.0\n±5.0\nn=3", "61.0\n±12.7\nn=2 of 3", "no result\nn=0 of 3"} <= {t.get_text() for t in texts}
    assert [t.get_color() for t in texts if t.get_text().startswith("no result")] == ["black"]  # not white on white


def test_a_gap_without_spread_is_drawn_hollow_as_the_text_words_it(tmp_path, url, figures):
    # mnist: FF at exactly chance on every seed, BP one class above: width 0, "no spread across seeds" in the text,
    # but a solid bar, as if exact.
    trials = [
        {"cell": f"{name} {dataset}", "role": role, "group": dataset, "seed": s, "value": v}
        | {"overrides": {"dataset": dataset}}
        for dataset, ff, bp in (("mnist", [0.1] * 3, [0.2] * 3), ("fashion-mnist", [0.7, 0.72, 0.71], [0.8, 0.81, 0.8]))
        for name, role, values in (("ff", "ff", ff), ("bp-deepsup", "baseline", bp))
        for s, v in enumerate(values)
    ]
    study = make_study(url, "bp-gap-full", {"analysis": "bp-gap", "seeds": [0, 1, 2]}, trials)
    text = write_report(study, tmp_path / "out").read_text()
    assert "(n=3 vs 3 seeds) (hollow: no spread across seeds)](bp_gap.png)" in text
    (ax,) = figures["bp_gap.png"].axes
    assert [bar.get_fill() for bar in ax.patches] == [True, False]  # fashion-mnist, then mnist
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars.lines[2][0].get_segments()) == 1


def test_a_gap_that_rounds_to_zero_prints_no_sign(url):
    # FF 85.00% against BP 85.04%: "fashion-mnist -0.0 pp from one seed each" read as a direction.
    trials = [
        {"cell": f"{name} fashion-mnist", "role": role, "group": "fashion-mnist", "seed": 0, "value": v}
        | {"overrides": {"dataset": "fashion-mnist"}}
        for name, role, v in (("ff", "ff", 0.85), ("bp-deepsup", "baseline", 0.8504))
    ]
    answer = results.answer(results.summarize(make_study(url, "bp-gap-full", {"analysis": "bp-gap"}, trials)))
    assert "fashion-mnist 0.0 pp from one seed each: no interval" in answer and "-0.0" not in answer
