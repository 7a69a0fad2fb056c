"""``ffablate report``: report.md and PNG plots for a study already in a storage. Nothing is trained here."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines studies run on

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ffablate import results  # noqa: E402
from ffablate.stats import Estimate, fmt  # noqa: E402

# The legend and caption words for a point or bar drawn hollow: its gap or mean rests on one seed on a side, or
# every seed gave the same value (an interval of width 0, which backs no direction either).
NO_CI = "n=1, no CI"
NO_SPREAD = "no spread across seeds"
# Every plot a report can hold: a rerun into the same folder removes them first, so none is left from another study.
PLOTS = ("heatmap.png", "k_sweep_gap.png", "coarse_vs_fine.png", "bp_gap.png", "learning_curves.png", "importance.png")
NO_PLOTS = 'No plot applies to this study (which study gets which plot: docs/studies.md, "Reports").'


def write_report(study: optuna.Study, out: Path) -> Path:
    """Write ``out/report.md`` and its plots; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    summary = results.summarize(study)
    plots: list[tuple[str, str]] = []
    for make in (_heatmap, _k_sweep, _hierarchy, _bp_gap_bars, _learning_curves):
        try:
            made = make(summary, out)
        except Exception as exc:  # one broken plot must not cost the whole report
            made = None
            plots.append(("", f"({make.__name__.strip('_')} plot failed: {type(exc).__name__}: {exc})"))
        if made:
            plots.append(made)
    importance_note = _importance(study, summary, out, plots)
    (out / "report.md").write_text(_markdown(summary, plots, importance_note))
    return out / "report.md"


def _markdown(summary: results.Summary, plots: list[tuple[str, str]], importance_note: str) -> str:
    meta = summary.meta
    lines = [f"# Study `{summary.name}`", ""]
    lines += [f"**Question.** {meta.get('question', '(no question recorded)')}", ""]
    lines += [f"**Answer.** {results.answer(summary)}", ""]
    lines += [
        f"Spec `{meta.get('ffablate_spec', '?')}` at budget `{meta.get('budget', '?')}`, "
        f"sampler {meta.get('sampler', '?')}, seeds {results.planned_seeds(meta) or '?'}; "
        f"{summary.n_trials} trials ({_states(summary)})."
    ]
    base = meta.get("base", {})
    if base:
        lines += ["", "Shared settings: " + ", ".join(f"`{k}={v}`" for k, v in base.items()) + "."]
    for note in meta.get("notes", []):
        lines += ["", f"> Note: {note}"]
    lines += [
        "",
        "## Results",
        "",
        "Mean test accuracy over seeds with its 95% t-interval; n is the completed seeds (of those planned, "
        "where some were pruned, failed, running or not run yet). The gap is FF minus its matched BP baseline in "
        'percentage points with a 95% Welch interval and both sides\' seed counts ("± –" when a side has fewer '
        "than two seeds), and with a 95% paired interval over per-seed differences on the seeds FF and BP both ran "
        "(their count is shown when it is fewer than either side's); "
        '"no spread across seeds" marks an interval of width 0 from identical values. ' + _ranking(summary),
        "",
    ]
    lines += _md_table(results.TABLE_COLUMNS, results.table_rows(summary, top=results.TABLE_TOP))
    if results.table_cut(summary):
        lines += ["", results.table_cut(summary)]
    if summary.not_started:
        lines += ["", f"Not started yet ({len(summary.not_started)}): " + ", ".join(summary.not_started) + "."]
    if summary.versions:
        lines += ["", f"Software: {results.versions_line(summary)}."]
    if summary.failures:
        lines += ["", "## Failed trials", "", *map(_failed_line, summary.failures)]
    lines += ["", "## Plots", ""]
    for path, caption in plots:
        lines += [f"![{caption}]({path})" if path else caption, ""]
    if not plots:  # an empty section read as plots gone missing
        lines += [NO_PLOTS, ""]
    lines += ["## Parameter importance", "", importance_note, ""]
    return "\n".join(lines) + "\n"


# What became of a failed trial's point, after its reason (see ``results.FailedTrial.fate``).
FATES = {
    "permanent": "",
    "retry": " (not for good: rerunning the study runs this point again)",
    "rerun": " (its point finished in another trial, which is the one counted)",
    "replaced": " (a search does not run a point again: later trials sample new ones)",
    # Its point, if it had drawn one, was never recorded as taken: the grid hands it out again.
    "unknown": " (no configuration was recorded for it, so no point waits on it)",
}


def _failed_line(failure: results.FailedTrial) -> str:
    if failure.label:
        who = f"{failure.label} (seed {failure.seed})" if failure.seed is not None else failure.label
    else:
        who = f"trial {failure.number} (it died before recording its configuration)"
    return f"- {who}: {_one_line(failure.reason)}{FATES[failure.fate]}"


def _ranking(summary: results.Summary) -> str:
    # Pruned survivors are a biased sample; the ranking puts them last, and the reader should know.
    partial = any(not r.complete for r in summary.ff if r.n)
    incomplete = " Rows missing a planned seed are ranked after the complete ones." if partial else ""
    if summary.selected_on_validation:
        return (
            "Configurations are ranked on validation accuracy (held-out training images, its own column)." + incomplete
        )
    if summary.planned_val_images and not any(r.n for r in summary.ff):
        return (
            f"Configurations will be ranked on validation accuracy ({summary.planned_val_images} held-out training "
            "images); no FF trial has completed yet."
        )
    return "No validation split: configurations are ranked on the test accuracy shown." + incomplete


def _states(summary: results.Summary) -> str:
    return ", ".join(f"{k.lower()} {v}" for k, v in sorted(summary.states.items()))


def _one_line(text: str) -> str:
    """``text`` on one line: an exception's message can span several, which would end a markdown row or list item."""
    return " ".join(text.split())


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_one_line(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, bbox_inches="tight")  # a long axis label was clipped at the figure's edge
    plt.close(fig)
    return name


def _heatmap(summary: results.Summary, out: Path) -> tuple[str, str] | None:
    """Two-axis ablations: mean FF accuracy per cell, annotated with mean ± CI, the gap to the cell's own
    matched BP baseline and both sides' seed counts; a cell whose every trial failed shows its count alone."""
    # The levels the spec lists that rows ran: a group that fixes an axis key (goodness's class-wise group) would
    # add a row and a column with one cell each.
    listed = {a: {str(x) for x in v} for a, v in summary.meta.get("axes", {}).items()}
    ran = {a: [x for x in v if str(x) in listed[a]] for a, v in summary.axis_levels().items()}
    axes = [(a, v) for a, v in ran.items() if len(v) > 1]
    if len(axes) != 2 or summary.meta.get("sampler") != "grid":
        return None
    (ya, yv), (xa, xv) = axes
    grid = [[math.nan] * len(xv) for _ in yv]
    text = [[""] * len(xv) for _ in yv]
    placed = [r for r in summary.ff if r.overrides.get(ya) in yv and r.overrides.get(xa) in xv]
    if len({(r.overrides[ya], r.overrides[xa]) for r in placed}) < len(placed):
        return None  # groups (e.g. datasets) that share both axes: one grid would show one group's rows only
    cells = [r for r in placed if r.n]
    for r in placed:
        i, j = yv.index(r.overrides[ya]), xv.index(r.overrides[xa])
        # Each cell's own counts: a caption's list of the counts that occur cannot say which cell lost a seed.
        count = f"n={r.n_of_planned}" + (f" vs {r.base.n_of_planned}" if r.base is not None else "")
        if not r.n:
            text[i][j] = f"no result\n{count}"
            continue
        grid[i][j] = r.accuracy.mean * 100
        text[i][j] = fmt(r.accuracy).replace(" ± ", "\n±")
        if r.base is not None:  # a gap with its interval, as everywhere else
            text[i][j] += f"\nΔBP {fmt(r.gap, signed=True)}"
        text[i][j] += f"\n{count}"
    fig, ax = plt.subplots(figsize=(1.6 * len(xv) + 2, 1.2 * len(yv) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xv)), [str(v) for v in xv], rotation=30, ha="right")
    ax.set_yticks(range(len(yv)), [str(v) for v in yv])
    ax.set_xlabel(xa)
    ax.set_ylabel(ya)
    for i in range(len(yv)):
        for j in range(len(xv)):
            # Dark text on the bright end of viridis and on a cell without results (left white), white on the dark end.
            bright = not math.isfinite(grid[i][j]) or image.norm(grid[i][j]) > 0.6
            ax.text(j, i, text[i][j], ha="center", va="center", color="black" if bright else "white", fontsize=8)
    fig.colorbar(image, ax=ax, label="FF test accuracy %")
    ax.set_title(f"{summary.name}: FF accuracy{_heatmap_baselines(cells)}", fontsize=9)
    caption = (
        f"{ya} × {xa} heatmap of FF test accuracy ± 95% CI; ΔBP: gap to its matched baseline ± 95% Welch CI; n: "
        "seeds per cell, FF vs BP ('2 of 3': a planned seed missing)"
    )
    one_seed = any(r.n == 1 or (r.base is not None and r.baseline_n == 1) for r in cells)
    return _save(fig, out, "heatmap.png"), caption + (" ('±–': n=1, no CI)" if one_seed else "")


def _seed_counts(points: Sequence[tuple[str, results.Row]]) -> str:
    """The seed counts behind the gaps a plot shows, FF vs BP: the commonest, then each point with other counts by
    name, " (n=3 vs 3 seeds; n=2 of 3 vs 3 at mnist)", or every point by name where no two share one. A list of the
    counts that occur would not say which point lost a seed."""
    counts = {name: f"n={r.n_of_planned} vs {r.base.n_of_planned}" for name, r in points if r.base is not None}
    if not counts:
        return ""
    common, times = Counter(counts.values()).most_common(1)[0]
    if times == 1 and len(counts) > 1:
        return f" (seeds: {', '.join(f'{count} at {name}' for name, count in counts.items())})"
    others = ", ".join(f"{count} at {name}" for name, count in counts.items() if count != common)
    return f" ({common} seeds" + (f"; {others})" if others else ")")


def _hollow(estimates: Iterable[Estimate]) -> str:
    """The words for the estimates drawn hollow, without an error bar ("" when none is): one without an interval
    (n=1), and one whose interval has width 0, which the text words as no spread and reads no direction from; a
    filled point or bar would pass for an exact value."""
    estimates = list(estimates)
    found = ((NO_CI, any(not e.has_ci for e in estimates)), (NO_SPREAD, any(e.no_spread for e in estimates)))
    shown = [words for words, present in found if present]
    return f"hollow: {', or '.join(shown)}" if shown else ""


def _solid(e: Estimate) -> bool:
    """Drawn filled, with its error bar: an interval exists and has width (``_hollow`` says why others are not)."""
    return e.has_ci and not e.no_spread


def _heatmap_baselines(cells: list[results.Row]) -> str:
    """The title's word on the BP baselines the cells are matched to. Where a shared axis (norm) varies the
    baseline too, one baseline in the title would make the cells matched to another look ahead or behind by the
    difference between baselines; the range is shown instead, and each cell's ΔBP is to its own."""
    bases = list({id(r.base): r.base for r in cells if r.base is not None}.values())
    if not bases:
        return ""
    if len(bases) == 1:
        return f" (BP {bases[0].method}: {fmt(bases[0].accuracy)}%; ΔBP in pp)"
    means = [b.accuracy.mean * 100 for b in bases]
    span = f"{min(means):.1f}–{max(means):.1f}%"
    return f"\n({len(bases)} BP baselines, {span}: each cell's ΔBP is FF minus its own, in pp)"


def _k_sweep(summary: results.Summary, out: Path) -> tuple[str, str] | None:
    series = results.k_sweep_series(summary)
    if summary.meta.get("analysis") != "k-sweep" or not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn: list[Estimate] = []
    synthetic = {group: "synth" in group or "teacher" in group for group in series}
    for group, points in series.items():
        pts = [(k, r.gap) for k, r in points if math.isfinite(r.gap.mean)]
        if not pts:
            continue
        solid = synthetic[group]
        (line,) = ax.plot([k for k, _ in pts], [g.mean * 100 for _, g in pts], "-" if solid else "--", label=group)
        marker, colour = "o" if solid else "s", line.get_color()
        drawn += [g for _, g in pts]
        with_ci = [(k, g) for k, g in pts if _solid(g)]
        if with_ci:
            ax.errorbar(
                [k for k, _ in with_ci],
                [g.mean * 100 for _, g in with_ci],
                yerr=[g.half_width * 100 for _, g in with_ci],
                fmt=marker,
                color=colour,
                capsize=3,
            )
        bare = [(k, g) for k, g in pts if not _solid(g)]
        if bare:
            ax.plot([k for k, _ in bare], [g.mean * 100 for _, g in bare], marker, color=colour, mfc="none")
    hollow = _hollow(drawn)
    if hollow:
        ax.plot([], [], "o", color="grey", mfc="none", label=hollow)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ks = sorted({k for points in series.values() for k, _ in points})
    ax.set_xticks(ks, [str(k) for k in ks])  # the log axis alone labels only 10 and 100
    ax.set_xticks([], minor=True)  # and its minor ticks added "3x10^0" between the Ks
    ax.set_xlabel("number of classes K")
    ax.set_ylabel(f"FF − {summary.baseline_method} test accuracy (pp, 95% Welch CI)")
    both = len(set(synthetic.values())) == 2  # a spec of real data alone (docs/specs/k-sweep-real) has no contrast
    ax.set_title("FF–BP gap against K" + (": synthetic vs real" if both else ""))
    ax.legend(fontsize=8)
    caption = "FF−BP gap against K ± 95% Welch CI" + (", synthetic and real data on one chart" if both else "")
    named = [(f"{group} K={k}", r) for group, points in series.items() for k, r in points]
    return _save(fig, out, "k_sweep_gap.png"), caption + _seed_counts(named) + (f" ({hollow})" if hollow else "")


def _hierarchy(summary: results.Summary, out: Path) -> tuple[str, str] | None:
    if summary.meta.get("analysis") != "label-hierarchy":
        return None
    by_group: dict[str, dict[str, dict[str, results.Row]]] = defaultdict(lambda: defaultdict(dict))
    for r in summary.rows:
        if r.n and "labels" in r.overrides:
            level = by_group[r.group or str(r.overrides.get("dataset", ""))][str(r.overrides["labels"])]
            if r.role == "ff":
                level["ff"] = r
                if r.base is not None and r.base.n:  # the baseline its gap is taken to, whatever else ran
                    level["baseline"] = r.base
            elif r.method == summary.baseline_method and "baseline" not in level:
                level["baseline"] = r  # (a level whose FF rows all failed)
    if not by_group:
        return None
    fig, axes = plt.subplots(1, len(by_group), figsize=(4.5 * len(by_group), 3.8), squeeze=False)
    for ax, (group, levels) in zip(axes[0], by_group.items(), strict=True):
        names = sorted(levels)
        for offset, role, colour in ((-0.2, "ff", "tab:blue"), (0.2, "baseline", "tab:orange")):
            rows = [levels[n].get(role) for n in names]
            _bars(
                ax,
                [i + offset for i in range(len(names))],
                [r.accuracy if r else None for r in rows],
                width=0.4,
                color=colour,
                label="FF" if role == "ff" else summary.baseline_method,
            )
        ax.set_xticks(range(len(names)), [f"{n}" for n in names])
        ax.set_ylabel("test accuracy % (95% CI)")
        ax.set_title(group)
        ax.legend(fontsize=8)
    # Each bar's own count: a list of the counts that occur cannot say which bar lost a seed.
    counts = {
        f"{'FF' if role == 'ff' else summary.baseline_method} {level}" + (f" ({group})" if len(by_group) > 1 else ""): r
        for group, levels in by_group.items()
        for level, roles in levels.items()
        for role, r in roles.items()
    }
    common, _ = Counter(r.n_of_planned for r in counts.values()).most_common(1)[0]
    others = ", ".join(f"n={r.n_of_planned} at {name}" for name, r in counts.items() if r.n_of_planned != common)
    caption = f"coarse vs fine labels: FF and {summary.baseline_method} accuracy ± 95% CI"
    caption += f" (n={common} seeds a bar" + (f"; {others})" if others else ")")
    hollow = _hollow(r.accuracy for r in counts.values())
    return _save(fig, out, "coarse_vs_fine.png"), caption + (f" ({hollow})" if hollow else "")


def _bp_gap_bars(summary: results.Summary, out: Path) -> tuple[str, str] | None:
    if summary.meta.get("analysis") != "bp-gap":
        return None
    rows = [r for r in summary.ff if r.n and math.isfinite(r.gap.mean)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.6))
    _bars(ax, list(range(len(rows))), [r.gap for r in rows], width=0.8, color="tab:blue", label="FF − BP")
    ax.set_xticks(range(len(rows)), [summary.dataset_of(r) for r in rows], rotation=20)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel(f"FF − {summary.baseline_method} test accuracy (pp, 95% Welch CI)")
    hollow = _hollow(r.gap for r in rows)
    if hollow:
        ax.legend(fontsize=8)
    counts = _seed_counts([(summary.dataset_of(r), r) for r in rows])
    caption = "FF−BP test-accuracy gap per dataset ± 95% Welch CI" + counts
    return _save(fig, out, "bp_gap.png"), caption + (f" ({hollow})" if hollow else "")


def _bars(
    ax: Any, xs: Sequence[float], estimates: Sequence[Estimate | None], width: float, color: str, label: str
) -> None:
    """Bars of estimates in percent with their 95% CIs; one without a CI (a single seed) or with a CI of width 0 is
    drawn hollow and without an error bar (``_hollow``)."""
    with_ci = [(x, e) for x, e in zip(xs, estimates, strict=True) if e is not None and _solid(e)]
    bare = [(x, e) for x, e in zip(xs, estimates, strict=True) if e is not None and not _solid(e)]
    styles = [
        (with_ci, {"color": color, "yerr": [e.half_width * 100 for _, e in with_ci], "capsize": 3, "label": label}),
        (bare, {"fill": False, "edgecolor": color, "label": f"{label} ({_hollow(e for _, e in bare)})"}),
    ]
    for points, style in styles:
        if points:
            ax.bar([x for x, _ in points], [e.mean * 100 for _, e in points], width=width, **style)


def _learning_curves(summary: results.Summary, out: Path) -> tuple[str, str] | None:
    rows = [r for r in summary.rows if r.n and any(r.histories)]
    if summary.meta.get("sampler") == "tpe":
        best = [r for r in summary.ranked() if any(r.histories)][:8]
        # Of a baseline tuned over levels, the level the gaps are taken against: five black curves tell nothing apart.
        compared = {id(r.base) for r in summary.ff if r.base is not None}
        rows = [r for r in rows if r.role == "baseline" and (not compared or id(r) in compared)] + best
    # One epoch a row plots a dot each (the smoke budgets): no curve, and the table already has those numbers.
    if not any(len({record["epoch"] for h in r.histories for record in h}) > 1 for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = set()
    for r in rows[:24]:
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for history in r.histories:
            for record in history:
                keys.add(results.selection_key(record))
                by_epoch[int(record["epoch"])].append(record[results.selection_key(record)] * 100)
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        style = dict(ls="--", lw=2, color="black") if r.role == "baseline" else dict(lw=1, alpha=0.8)
        ax.plot([e + 1 for e in epochs], means, marker="o", ms=3, label=r.label, **style)
    # A greedy FF run records each block's phase of E epochs in turn: D x E points, which are no BP epochs.
    base = summary.meta.get("base") or {}
    greedy = any(r.role == "ff" and r.overrides.get("schedule", base.get("schedule")) == "greedy" for r in rows)
    ax.set_xlabel("pass over the training data (greedy FF: the blocks' phases in turn)" if greedy else "epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    split = {frozenset({"val_accuracy"}): "validation", frozenset({"test_accuracy"}): "test"}.get(
        frozenset(keys), "validation (test where none was held out)"
    )
    ax.set_ylabel(f"{split} accuracy % (mean over seeds)")
    ax.set_title("learning curves (dashed: BP baseline)")
    caption = f"per-{'pass' if greedy else 'epoch'} {split} accuracy"
    if len(rows) <= 12:
        ax.legend(fontsize=6)
    else:  # a legend of more would cover the curves
        caption += f" of {min(len(rows), 24)} rows, without a legend (the table has each row's numbers)"
    return _save(fig, out, "learning_curves.png"), caption


# ----------------------------------------------------------------------------------------------------
# Parameter importance


def importance_evaluator() -> tuple[Any, str]:
    """fANOVA when scikit-learn is installed (Optuna's fANOVA fits its forest with sklearn), else PED-ANOVA,
    which needs nothing beyond Optuna."""
    try:
        import sklearn  # noqa: F401

        return optuna.importance.FanovaImportanceEvaluator(
            seed=0
        ), "fANOVA (optuna.importance.FanovaImportanceEvaluator)"
    except ImportError:
        return (
            optuna.importance.PedAnovaImportanceEvaluator(),
            "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)",
        )


def _axis_study(study: optuna.Study, summary: results.Summary) -> optuna.Study | None:
    """An in-memory study whose params are the FF axes (or searched params), one trial per completed FF trial.

    A grid study's own params are ("cell", "seed"); importance over those would say nothing about the axes.
    """
    levels = {a: [str(x) for x in v] for a, v in summary.axis_levels().items() if len(v) > 1}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    copy = optuna.create_study(direction="maximize")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("role") != "ff":
            continue
        if summary.meta.get("sampler") == "tpe":
            params, dists = dict(t.params), dict(t.distributions)
        else:
            overrides = t.user_attrs.get("overrides", {})
            params = {a: str(overrides[a]) for a in levels if a in overrides}
            dists = {a: optuna.distributions.CategoricalDistribution(levels[a]) for a in params}
        if params:
            copy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.value))
    return copy if len(copy.trials) >= 4 else None


def _importance(study: optuna.Study, summary: results.Summary, out: Path, plots: list[tuple[str, str]]) -> str:
    try:
        copy = _axis_study(study, summary)
        if copy is None:
            return "Not computed: fewer than four completed FF trials with varying parameters."
        evaluator, name = importance_evaluator()
        importances = optuna.importance.get_param_importances(copy, evaluator=evaluator)
    except Exception as exc:  # importance is optional; its failure is reported, not raised
        return f"Not computed ({type(exc).__name__}: {exc})."
    if not importances:
        return "Not computed: no parameter varies."
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel(f"importance for {summary.ranking_split} accuracy ({name.split(' ')[0]})")
    plots.append((_save(fig, out, "importance.png"), f"parameter importance for {summary.ranking_split} accuracy"))
    listing = ", ".join(f"{k} {v:.2f}" for k, v in importances.items())
    metric = summary.ranking_split
    note = f"Evaluator: {name}, over the completed FF trials' values ({metric} accuracy). Importances: {listing}."
    return note + _importance_vs_answer(summary, importances)


def _importance_vs_answer(summary: results.Summary, importances: dict[str, float]) -> str:
    """A sentence where the answer's axis with "the widest spread of level means" is not the most important one here:
    both read the same split, but they measure different things, and a silent disagreement reads as an error."""
    axis = results.most_influential_axis(summary)
    top = next(iter(importances))
    if axis is None or axis.axis == top or axis.axis not in importances:
        return ""
    return (
        f" The answer names {axis.axis} because its level means span the widest range; the evaluator ranks {top} "
        "first because it weighs each parameter's share of the variance over all trials (seeds included), so the "
        "two can differ when the axes' effects are close or interact."
    )
