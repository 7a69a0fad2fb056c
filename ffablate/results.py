"""From a study's trials to per-configuration rows (mean ± CI over seeds, gap to the BP baseline ± Welch CI)
and to the one-sentence answer of the study's question. Used by the closing table of ``ffablate study`` and by
``ffablate report``; it only reads the storage.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ffablate.stats import Estimate, fmt, mean_ci, welch_ci


@dataclass
class Row:
    label: str
    role: str
    group: str
    method: str
    overrides: dict[str, Any]
    match: str
    accuracies: list[float] = field(default_factory=list)  # test accuracy per seed
    val_accuracies: list[float] = field(default_factory=list)  # per seed, when the budget held images out
    seeds: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    peak_memory: list[float] = field(default_factory=list)
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    per_layer: list[list[float]] = field(default_factory=list)
    pruned: int = 0
    duplicates: int = 0  # completed reruns of a (configuration, seed) already counted
    failed: list[str] = field(default_factory=list)
    # Failures a rerun retries (broken data, a dead process) whose point has no finished trial yet, with its seed.
    retried: list[tuple[int, str]] = field(default_factory=list)
    accuracy: Estimate = Estimate(math.nan, math.nan, 0)
    val: Estimate = Estimate(math.nan, math.nan, 0)
    gap: Estimate = Estimate(math.nan, math.nan, 0)
    baseline: str = ""

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def has_val(self) -> bool:
        return bool(self.n) and len(self.val_accuracies) == self.n

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "role": self.role,
            "group": self.group,
            "method": self.method,
            "overrides": self.overrides,
            "n": self.n,
            "seeds": self.seeds,
            "accuracy_mean": self.accuracy.mean,
            "accuracy_ci95": self.accuracy.half_width,
            "val_accuracy_mean": self.val.mean,
            "val_accuracy_ci95": self.val.half_width,
            "gap_mean": self.gap.mean,
            "gap_ci95": self.gap.half_width,
            "baseline": self.baseline,
            "pruned": self.pruned,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "retried": [{"seed": seed, "reason": reason} for seed, reason in self.retried],
            "train_seconds_mean": _mean(self.train_seconds),
            "images_per_second_mean": _mean(self.images_per_second),
            "peak_memory_mb_mean": _mean(self.peak_memory) / 2**20,
        }


@dataclass
class Summary:
    name: str
    meta: dict[str, Any]
    rows: list[Row]
    n_trials: int
    states: dict[str, int]

    @property
    def ff(self) -> list[Row]:
        return [r for r in self.rows if r.role == "ff"]

    @property
    def baselines(self) -> list[Row]:
        return [r for r in self.rows if r.role == "baseline"]

    @property
    def selected_on_validation(self) -> bool:
        """True when every scored FF row is ranked by validation accuracy (the budget held images out)."""
        scored = [r for r in self.ff if r.n]
        return bool(scored) and all(r.has_val for r in scored)

    @property
    def planned_val_images(self) -> int:
        """The validation images the study's shared settings hold out: what it will rank on before any FF trial
        has a score to show it."""
        return int(self.meta.get("base", {}).get("val_images", 0))

    def ranked(self) -> list[Row]:
        """Scored FF rows, best first: by validation accuracy when all have it, else by test accuracy."""
        on_val = self.selected_on_validation
        return sorted((r for r in self.ff if r.n), key=lambda r: -(r.val if on_val else r.accuracy).mean)

    def best(self) -> Row | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None


def selection_key(record: dict[str, Any]) -> str:
    """The accuracy a trial is ranked and pruned by: ``val_accuracy`` when its run held out a validation split,
    else ``test_accuracy``."""
    return "val_accuracy" if record.get("val_accuracy") is not None else "test_accuracy"


def selection_score(record: dict[str, Any]) -> float:
    return float(record[selection_key(record)])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(study: optuna.Study) -> Summary:
    """Group the study's trials by configuration; failed and pruned trials are counted, not averaged."""
    rows: dict[str, Row] = {}
    order = list(study.user_attrs.get("cells", []))
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = defaultdict(int)
    finished = {(t.user_attrs.get("cell"), t.user_attrs.get("seed")) for t in trials if _finished(t)}
    for t in trials:
        states[t.state.name] += 1
        label = t.user_attrs.get("cell")
        if label is None:
            continue
        row = rows.get(label)
        if row is None:
            overrides = dict(t.user_attrs.get("overrides", {}))
            row = rows[label] = Row(
                label,
                t.user_attrs.get("role", "ff"),
                t.user_attrs.get("group", ""),
                str(overrides.get("method", "ff")),
                overrides,
                t.user_attrs.get("match", "{}"),
            )
        _add(row, t)
        if t.state == TrialState.FAIL and not _finished(t) and (label, t.user_attrs.get("seed")) not in finished:
            row.retried.append((int(t.user_attrs.get("seed", -1)), str(t.user_attrs.get("fail_reason", "failed"))))
    ordered = sorted(
        rows.values(),
        key=lambda r: (
            r.role != "baseline",
            order.index(r.label) if r.label in order else len(order),
            r.label,
        ),
    )
    for row in ordered:
        row.accuracy = mean_ci(row.accuracies)
        if row.has_val:
            row.val = mean_ci(row.val_accuracies)
    methods = study.user_attrs.get("baseline_methods", ["bp-deepsup"])
    by_match = {(r.match, r.method): r for r in ordered if r.role == "baseline"}
    for row in ordered:
        if row.role != "ff":
            continue
        base = by_match.get((row.match, methods[0] if methods else "bp-deepsup"))
        if base is not None and base.n and row.n:
            row.gap, row.baseline = welch_ci(row.accuracies, base.accuracies), base.label
    return Summary(study.study_name, dict(study.user_attrs), ordered, len(trials), dict(states))


def _finished(t: FrozenTrial) -> bool:
    """Done for good, as ``study.is_done`` decides (not imported: the study module imports this one)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and bool(t.user_attrs.get("fail_permanent"))


def _add(row: Row, t: FrozenTrial) -> None:
    if t.state == TrialState.COMPLETE:
        seed = int(t.user_attrs.get("seed", -1))
        if seed in row.seeds:
            # Two hosts sharing a storage can both take the last free grid point; a seed counted twice would
            # narrow the CI with a repeated, not an independent, measurement. Trials arrive in number order,
            # so the first completed run is the one kept.
            row.duplicates += 1
            return
        metrics = t.user_attrs.get("metrics", {})
        # The trial's value is what Optuna ranked it by (validation accuracy when there is one); rows report test.
        test = metrics.get("test_accuracy")
        row.accuracies.append(float(t.value if test is None else test))
        if metrics.get("val_accuracy") is not None:
            row.val_accuracies.append(float(metrics["val_accuracy"]))
        row.seeds.append(seed)
        row.train_seconds.append(float(metrics.get("train_seconds", math.nan)))
        row.images_per_second.append(float(metrics.get("images_per_second", math.nan)))
        row.peak_memory.append(float(metrics.get("peak_memory_bytes", math.nan)))
        row.per_layer.append(list(metrics.get("per_layer_accuracy", [])))
        row.histories.append(list(t.user_attrs.get("history", [])))
    elif t.state == TrialState.PRUNED:
        row.pruned += 1
    elif t.state == TrialState.FAIL and t.user_attrs.get("fail_permanent"):
        row.failed.append(str(t.user_attrs.get("fail_reason", "failed")))


def table_rows(summary: Summary, top: int | None = None) -> list[list[str]]:
    """The closing table: configuration, n, test accuracy % mean ± 95% CI, gap to BP pp ± 95% Welch CI,
    validation accuracy % mean ± 95% CI ("-" without a split), train seconds, notes. A TPE study's ``top`` FF
    rows are the best ``top`` by the study's ranking (``Summary.ranked``)."""
    rows = summary.rows
    if summary.meta.get("sampler") == "tpe" and top:
        rows = summary.baselines + summary.ranked()[:top]
    out = []
    for r in rows:
        notes = []
        if r.pruned:
            notes.append(f"{r.pruned} pruned")
        if r.duplicates:
            notes.append(f"{r.duplicates} duplicate seed run(s) not counted")
        if r.failed:
            notes.append(f"{len(r.failed)} failed: {r.failed[0][:60]}")
        if r.retried:
            notes.append(f"{len(r.retried)} failed, to rerun: {r.retried[0][1][:60]}")
        gap = fmt(r.gap, signed=True) if r.role == "ff" else "(baseline)"
        val = fmt(r.val) if r.has_val else "-"
        out.append([r.label, str(r.n), fmt(r.accuracy), gap, val, f"{_mean(r.train_seconds):.1f}", "; ".join(notes)])
    return out


TABLE_COLUMNS = [
    "configuration",
    "n",
    "test acc % (95% CI)",
    "gap to BP pp (95% CI)",
    "val acc % (95% CI)",
    "train s",
    "notes",
]


# ----------------------------------------------------------------------------------------------------
# Answers: one sentence computed from the numbers


def _pp(e: Estimate) -> str:
    return fmt(e, signed=True) + " pp"


def _direction(e: Estimate) -> str:
    if e.mean == 0:
        return "level with"
    if not e.has_ci:
        return "ahead of" if e.mean > 0 else "behind"
    if e.excludes_zero():
        return "ahead of" if e.mean > 0 else "behind"
    return "not distinguishable from"


def answer(summary: Summary) -> str:
    analysis = summary.meta.get("analysis", "ablation")
    if not any(r.n for r in summary.ff):
        return "No FF configuration has a completed trial yet, so the question has no answer from this study."
    try:
        return {
            "k-sweep": _answer_k_sweep,
            "label-hierarchy": _answer_hierarchy,
            "bp-gap": _answer_bp_gap,
        }.get(analysis, _answer_ablation)(summary)
    except Exception as exc:  # an answer must never break a report; say what is missing instead
        return f"No one-sentence answer could be computed ({type(exc).__name__}: {exc})."


def _answer_ablation(summary: Summary) -> str:
    ranked = summary.ranked()
    best, worst = ranked[0], ranked[-1]
    chosen = (
        f"chosen on validation accuracy ({fmt(best.val)}%)"
        if summary.selected_on_validation
        else "chosen on the test images themselves (not every configuration has a validation split, so optimistic)"
    )
    text = (
        f"Best FF configuration is {best.label} at {fmt(best.accuracy)}% test accuracy (n={best.n}), {chosen}, "
        f"{fmt(welch_ci(best.accuracies, worst.accuracies), signed=True)} pp over the worst ({worst.label})"
    )
    axis = most_influential_axis(summary)
    if axis:
        text += f"; the {axis[0]} axis moves mean test accuracy most ({axis[1] * 100:.1f} pp between its levels)"
    if best.baseline:
        text += f"; it is {_direction(best.gap)} {best.baseline} (FF−BP {_pp(best.gap)})"
    return text + "."


def most_influential_axis(summary: Summary) -> tuple[str, float] | None:
    """The axis whose level means (averaged over the other axes) span the widest range."""
    axes = [a for a, values in summary.meta.get("axes", {}).items() if len(values) > 1]
    spans = []
    for axis in axes:
        levels: dict[str, list[float]] = defaultdict(list)
        for r in summary.ff:
            if r.n and axis in r.overrides:
                levels[str(r.overrides[axis])].append(r.accuracy.mean)
        means = [sum(v) / len(v) for v in levels.values()]
        if len(means) > 1:
            spans.append((axis, max(means) - min(means)))
    return max(spans, key=lambda s: s[1]) if spans else None


def k_sweep_series(summary: Summary) -> dict[str, list[tuple[int, Row]]]:
    """Per group (synthetic, each real dataset): (K, FF row) sorted by K; the row carries the gap to BP."""
    series: dict[str, list[tuple[int, Row]]] = defaultdict(list)
    for r in summary.ff:
        if r.n and "classes" in r.overrides:
            series[r.group or str(r.overrides.get("dataset", ""))].append((int(r.overrides["classes"]), r))
    return {g: sorted(v, key=lambda kv: kv[0]) for g, v in series.items()}


def _answer_k_sweep(summary: Summary) -> str:
    parts = []
    for group, points in k_sweep_series(summary).items():
        gaps = [(k, r.gap) for k, r in points if math.isfinite(r.gap.mean)]
        if not gaps:
            continue
        (k0, g0), (k1, g1) = gaps[0], gaps[-1]
        trend = "widens" if abs(g1.mean) > abs(g0.mean) else "narrows"
        sign = "FF ahead" if g1.mean > 0 else "FF behind"
        parts.append(f"{group}: FF−BP gap {_pp(g0)} at K={k0} → {_pp(g1)} at K={k1} ({sign}, {trend} with K)")
    if not parts:
        return "No K has both FF and BP results yet."
    return "; ".join(parts) + "."


def _answer_hierarchy(summary: Summary) -> str:
    parts = []
    by_group: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in summary.ff:
        if r.n:
            by_group[r.group or str(r.overrides.get("dataset", ""))][str(r.overrides.get("labels", "fine"))] = r
    for group, rows in by_group.items():
        items = [f"{lab} labels {_pp(r.gap)} (FF {fmt(r.accuracy)}%)" for lab, r in sorted(rows.items())]
        parts.append(f"{group}: FF−BP gap with " + ", with ".join(items))
    notes = summary.meta.get("notes", [])
    return "; ".join(parts) + (f" ({'; '.join(notes)})" if notes else "") + "."


def _answer_bp_gap(summary: Summary) -> str:
    rows = [r for r in summary.ff if r.n and math.isfinite(r.gap.mean)]
    if not rows:
        return "No dataset has both FF and BP results yet."
    behind = sum(r.gap.mean < 0 for r in rows)
    items = ", ".join(f"{r.group or r.overrides.get('dataset', r.label)} {_pp(r.gap)}" for r in rows)
    return f"FF trails BP-DeepSup on {behind} of {len(rows)} datasets (FF−BP: {items})."


def to_json(summary: Summary) -> str:
    """The summary as strict JSON: a mean or CI that does not exist (no seed, or one) is null, not NaN, which
    JSON has no word for."""
    payload = {
        "study": summary.name,
        "meta": summary.meta,
        "answer": answer(summary),
        "states": summary.states,
        "rows": [r.to_dict() for r in summary.rows],
    }
    return json.dumps(_finite(payload), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
