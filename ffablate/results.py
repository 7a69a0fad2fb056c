"""From a study's trials to per-configuration rows (mean ± CI over seeds, gap to the BP baseline ± Welch CI,
and ± paired CI over the seeds both ran) and to the one-sentence answer of the study's question. Used by
the closing table of ``ffablate study`` and by ``ffablate report``; it only reads the storage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ffablate import jsontext
from ffablate.stats import Estimate, contrast_ci, fmt, fmt_number, mean_ci, paired_ci, welch_ci


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
    # (epochs x training images) / train_seconds, for every method: an image counts once per epoch, however
    # many greedy phases pass it again, so a slower run never shows a higher rate.
    images_per_second: list[float] = field(default_factory=list)
    peak_memory: list[float] = field(default_factory=list)
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    per_layer: list[list[float]] = field(default_factory=list)
    pruned: int = 0
    duplicates: int = 0  # completed reruns of a (configuration, seed) already counted
    failed: list[str] = field(default_factory=list)
    # Failures a rerun retries (broken data, a dead process) whose point has no finished trial yet, with its seed.
    retried: list[tuple[int, str]] = field(default_factory=list)
    running: set[int] = field(default_factory=set)  # seeds a worker is running now, with no finished trial
    planned: int = 0  # the seeds the budget runs this configuration on
    accuracy: Estimate = Estimate(math.nan, math.nan, 0)
    val: Estimate = Estimate(math.nan, math.nan, 0)
    gap: Estimate = Estimate(math.nan, math.nan, 0)  # FF - BP, Welch: the primary interval
    # FF - BP over per-seed differences, only where both ran the same seeds (which share initialisation and
    # data order): the design's own test, narrower than Welch's when the two sides' seeds correlate.
    gap_paired: Estimate = Estimate(math.nan, math.nan, 0)
    base: Row | None = field(default=None, repr=False)  # the baseline row the gaps are taken against
    # How that baseline was chosen when several levels of it ran ([baseline] levels), e.g. "the best of 5 levels on
    # validation"; on a baseline row: that it was the one chosen.
    base_choice: str = ""

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def baseline(self) -> str:
        return self.base.label if self.base else ""

    @property
    def gap_decisive(self) -> bool:
        """Whether the gap backs a direction word: both sides completed every planned seed (a failed or pruned seed
        is a result the gap leaves out, a diverged or weak run, so the survivors' gap leans toward the side that
        lost it), its Welch interval does, and its paired one, where both sides ran shared seeds, excludes zero on
        the same side (a negative correlation between the sides' seeds makes it the wider; over a few shared seeds
        of many it can point the other way)."""
        if not (self.complete and self.base is not None and self.base.complete):
            return False
        return self.gap.decisive and (not self.gap_paired.has_ci or self.gap_paired.backs(self.gap))

    @property
    def baseline_n(self) -> int:
        return self.base.n if self.base else 0

    @property
    def complete(self) -> bool:
        """Every planned seed completed. Where one was pruned or failed, the survivors are a biased sample (the
        median pruner stops a configuration's weak seeds and keeps its strong ones), so the row's mean is too."""
        return self.n >= self.planned

    @property
    def n_of_planned(self) -> str:
        """The completed seeds as the table prints them: "3", or "2 of 3" where a planned seed is missing."""
        return str(self.n) if self.complete else f"{self.n} of {self.planned}"

    def missing(self) -> str:
        """Why the row has fewer seeds than planned: "2 pruned, 1 failed, 1 failed (a rerun retries it), 1 running"."""
        # A point killed twice leaves two failed trials for one seed still to rerun; one being rerun is running.
        retried = len({seed for seed, _ in self.retried} - self.running)
        waiting = self.planned - self.n - self.pruned - len(self.failed) - retried - len(self.running)
        counts = (
            (self.pruned, "pruned"),
            (len(self.failed), "failed"),
            (retried, "failed (a rerun retries it)"),
            (len(self.running), "running"),
            (waiting, "not run yet"),
        )
        return ", ".join(f"{count} {what}" for count, what in counts if count > 0)

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
            "planned_seeds": self.planned,
            "complete": self.complete,
            "gap_mean": self.gap.mean,
            "gap_ci95": self.gap.half_width,
            "gap_paired_mean": self.gap_paired.mean,
            "gap_paired_ci95": self.gap_paired.half_width,
            "gap_paired_n": self.gap_paired.n,
            "baseline": self.baseline,
            "baseline_n": self.baseline_n,
            "baseline_choice": self.base_choice or None,
            "pruned": self.pruned,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "retried": [{"seed": seed, "reason": reason} for seed, reason in self.retried],
            "train_seconds_mean": _mean(self.train_seconds),
            "images_per_second_mean": _mean(self.images_per_second),
            "peak_memory_mb_mean": _mean(self.peak_memory) / 2**20,
        }


# The reason a failed trial shows when it recorded none: ffablate records one for every exception it catches, so
# a trial without one was failed from outside (a resume's stale check, Optuna's heartbeat) after its worker died.
NO_REASON = "no reason recorded (the worker died: killed or crashed)"
# A trial that found its place taken (a full grid or search, a baseline point another worker had): no result and
# no failure; tables, reports and failure lists leave it out.
SURPLUS = "surplus"


@dataclass(frozen=True)
class FailedTrial:
    """One FAIL trial, whatever became of its point; the report lists every one."""

    number: int
    label: str  # "" when the trial died before it recorded its configuration
    seed: int | None
    reason: str
    # "permanent": a rerun would fail the same way; "retry": a rerun runs its point again; "rerun": its point has
    # finished in another trial since (or before, where two hosts shared it), which is the one counted;
    # "replaced": a search's FF trial, whose sampled point no rerun runs again; "unknown": it died before it
    # recorded which point it was.
    fate: str


@dataclass
class Summary:
    name: str
    meta: dict[str, Any]
    rows: list[Row]
    n_trials: int
    states: dict[str, int]
    failures: list[FailedTrial] = field(default_factory=list)  # every FAIL trial, in trial order
    not_started: list[str] = field(default_factory=list)  # a grid's configurations with no trial yet, spec order
    # The software the completed trials ran under, each distinct set with its trial count, first seen first: a
    # study resumed after an upgrade holds more than one.
    versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ff(self) -> list[Row]:
        return [r for r in self.rows if r.role == "ff"]

    @property
    def untuned(self) -> str:
        """The searched settings the baseline ran at their base value (``[baseline] untuned``), e.g. "lr=0.003";
        "" when there are none."""
        return ", ".join((self.meta.get("baseline_untuned") or {}).values())

    def axis_levels(self) -> dict[str, list[Any]]:
        """Each axis of the study with the levels its FF rows run, in the spec's order (levels it does not list
        last). Read from the rows, not the spec alone: a budget runs a subset of the levels, the groups of one spec
        give an axis different levels (k-sweep), and a group may fix an axis key in its settings (goodness's
        class-wise group)."""
        levels: dict[str, list[Any]] = {}
        for axis, listed in self.meta.get("axes", {}).items():
            ran = {str(r.overrides[axis]): r.overrides[axis] for r in self.ff if axis in r.overrides}
            order = [str(x) for x in listed] + [key for key in ran if key not in map(str, listed)]
            levels[axis] = [ran[key] for key in order if key in ran]
        return levels

    @property
    def baseline_method(self) -> str:
        """The baseline method every gap is taken to: the spec's first (``[baseline] methods``)."""
        return (self.meta.get("baseline_methods") or ["bp-deepsup"])[0]

    @property
    def baselines(self) -> list[Row]:
        return [r for r in self.rows if r.role == "baseline"]

    @property
    def selected_on_validation(self) -> bool:
        """True when every scored FF row is ranked by validation accuracy (the budget held images out)."""
        scored = [r for r in self.ff if r.n]
        return bool(scored) and all(r.has_val for r in scored)

    def dataset_of(self, row: Row) -> str:
        """How a bp-gap answer or plot names a row: its group, its dataset, or the study's one dataset (a study of
        one dataset names it in its shared settings, not in its rows)."""
        shared = self.meta.get("base", {}).get("dataset")
        return row.group or str(row.overrides.get("dataset") or shared or row.label)

    @property
    def planned_val_images(self) -> int:
        """The validation images the study's shared settings hold out: what it will rank on before any FF trial
        has a score to show it."""
        return int(self.meta.get("base", {}).get("val_images", 0))

    def ranked(self) -> list[Row]:
        """Scored FF rows, best first: the rows that completed every planned seed, then the incomplete ones (whose
        surviving seeds are a biased sample, see ``Row.complete``), each part by validation accuracy when all
        rows have it, else by test accuracy."""
        on_val = self.selected_on_validation
        return sorted(
            (r for r in self.ff if r.n), key=lambda r: (not r.complete, -(r.val if on_val else r.accuracy).mean)
        )

    @property
    def ranking_split(self) -> str:
        """The split ``ranked`` orders the FF rows by: "validation" or "test"."""
        return "validation" if self.selected_on_validation else "test"

    def ranking_values(self, row: Row) -> list[float]:
        """``row``'s per-seed accuracies on the ranking split."""
        return row.val_accuracies if self.selected_on_validation else row.accuracies

    def best(self) -> Row | None:
        """The best complete row; the best incomplete one only when no row completed every seed."""
        ranked = self.ranked()
        return ranked[0] if ranked else None


def selection_key(record: dict[str, Any]) -> str:
    """The accuracy a trial is ranked and pruned by: ``val_accuracy`` when its run held out a validation split,
    else ``test_accuracy``."""
    return "val_accuracy" if record.get("val_accuracy") is not None else "test_accuracy"


def selection_score(record: dict[str, Any]) -> float:
    return float(record[selection_key(record)])


def fail_reason(t: FrozenTrial) -> str:
    return str(t.user_attrs.get("fail_reason") or NO_REASON)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# A study's seed list is the one it was made with ("seeds"), then one user attr per list a run grew it to:
# "seeds+[0, 1, 2]" -> the spec file that run read. A growth writes a key of its own and never overwrites one, so two
# runs growing a study at once cannot shrink what the other wrote (Optuna's storage has no compare-and-swap).
GROWN = "seeds+"


def seed_lists(attrs: dict[str, Any]) -> list[list[int]]:
    """A study's seed lists: the one it was made with, then each a run grew it to; shortest first."""
    lists = [attrs["seeds"]] if isinstance(attrs.get("seeds"), list) else []
    lists += [json.loads(key[len(GROWN) :]) for key in attrs if key.startswith(GROWN)]
    return sorted(lists, key=len)


def planned_seeds(attrs: dict[str, Any]) -> list[int]:
    """The seeds a study runs now: its longest seed list, then the seeds of any list that is not a prefix of it
    (two runs that added different seeds at once: ``forked_seeds``)."""
    lists = seed_lists(attrs)
    seeds = list(lists[-1]) if lists else []
    for more in lists:
        seeds += [s for s in more if s not in seeds]
    return seeds


def forked_seeds(attrs: dict[str, Any]) -> bool:
    """Whether two runs grew the study to different seed lists at once, neither a prefix of the other."""
    lists = seed_lists(attrs)
    return any(lists[-1][: len(short)] != short for short in lists)


def summarize(study: optuna.Study) -> Summary:
    """Group the study's trials by configuration; failed and pruned trials are counted, not averaged."""
    rows: dict[str, Row] = {}
    order = list(study.user_attrs.get("cells", []))
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    states: dict[str, int] = defaultdict(int)
    finished = {(t.user_attrs.get("cell"), t.user_attrs.get("seed")) for t in trials if _finished(t)}
    search = study.user_attrs.get("sampler") == "tpe"
    # Running in the storage, but their worker on this host is gone: failed to every count here, as the next run
    # marks them.
    dead = {t.number for t in trials if t.state == TrialState.RUNNING and died(t)}
    failures = [_failure(t, finished, search) for t in trials if t.state == TrialState.FAIL or t.number in dead]
    for t in trials:
        states["FAIL" if t.number in dead else t.state.name] += 1
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
        unfinished = (label, t.user_attrs.get("seed")) not in finished
        if t.state == TrialState.FAIL and not _finished(t) and unfinished:
            row.retried.append((int(t.user_attrs.get("seed", -1)), fail_reason(t)))
        if t.state == TrialState.RUNNING and unfinished:
            if t.number in dead:
                row.retried.append((int(t.user_attrs.get("seed", -1)), STALE))
            else:
                row.running.add(int(t.user_attrs.get("seed", -1)))
    ordered = sorted(
        rows.values(),
        key=lambda r: (
            r.role != "baseline",
            order.index(r.label) if r.label in order else len(order),
            r.label,
        ),
    )
    # Studies stored without their seed list (hand-made ones) plan the seeds their trials name.
    seeds = planned_seeds(study.user_attrs) or {t.user_attrs.get("seed") for t in trials if "cell" in t.user_attrs}
    tpe = study.user_attrs.get("sampler") == "tpe"
    for row in ordered:
        # A TPE trial is a configuration of its own, run on the budget's first seed only.
        row.planned = 1 if tpe and row.role == "ff" else len(seeds)
        row.accuracy = mean_ci(row.accuracies)
        if row.has_val:
            row.val = mean_ci(row.val_accuracies)
    methods = study.user_attrs.get("baseline_methods", ["bp-deepsup"])
    by_match: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in ordered:
        if r.role == "baseline":
            by_match[r.match, r.method].append(r)
    compared = {key: _tuned_baseline(group) for key, group in by_match.items()}  # one choice per match group
    for row in ordered:
        if row.role != "ff":
            continue
        base = compared.get((row.match, methods[0] if methods else "bp-deepsup"))
        if base is not None:
            row.base_choice = base.base_choice  # "" unless several levels ran
        if base is not None and base.n and row.n:
            row.gap, row.base = welch_ci(row.accuracies, base.accuracies), base
            # Paired over the seeds both ran (a seed one side lost drops out of the pairs, not the whole interval).
            base_by_seed = dict(zip(base.seeds, base.accuracies, strict=True))
            shared = [
                (acc, base_by_seed[seed])
                for seed, acc in zip(row.seeds, row.accuracies, strict=True)
                if seed in base_by_seed
            ]
            if len(shared) >= 2:
                row.gap_paired = paired_ci([a for a, _ in shared], [b for _, b in shared])
    meta = dict(study.user_attrs)
    if search and meta.get("baseline_untuned") is None and all(len(group) == 1 for group in by_match.values()):
        meta["baseline_untuned"] = _untuned_from_trials(trials, meta)
    not_started = [] if search else [label for label in order if label not in rows]
    summary = Summary(study.study_name, meta, ordered, len(trials), dict(states), failures, not_started)
    summary.versions = _versions(trials)
    return summary


def _versions(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    plugins: dict[str, set[str]] = defaultdict(set)
    for t in trials:
        if t.state == TrialState.COMPLETE and "versions" in t.user_attrs:
            device = t.user_attrs.get("config", {}).get("device")
            key = json.dumps({"versions": t.user_attrs["versions"], "device": device}, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
            # Plugins from outside ffablate, by package and version: two versions of one plugin both show.
            plugins[key] |= set((t.user_attrs.get("plugin_sources") or {}).values())
    return [{**json.loads(key), "plugins": sorted(plugins[key]), "trials": n} for key, n in counts.items()]


def versions_line(summary: Summary) -> str:
    """One line naming the software and device the completed trials ran on ("" when none recorded it). The CUDA
    version is the one torch was built for, which says nothing of whether a GPU ran them: the device does."""
    parts = []
    for entry in summary.versions:
        v = entry["versions"]
        commit = f" ({v['ffablate_commit']})" if v.get("ffablate_commit") else ""
        built = f" built for CUDA {v['cuda']}" if v.get("cuda") not in (None, "None") else " without CUDA"
        plural = "s" if entry["trials"] != 1 else ""
        plugins = f", plugins {', '.join(entry['plugins'])}" if entry.get("plugins") else ""
        parts.append(
            f"ffablate {v.get('ffablate')}{commit}, torch {v.get('torch')}{built}, Python {v.get('python')}{plugins}, "
            f"on {entry.get('device') or 'an unrecorded device'}: {entry['trials']} completed trial{plural}"
        )
    return "; ".join(parts)


def _untuned_from_trials(trials: list[FrozenTrial], meta: dict[str, Any]) -> dict[str, str]:
    """What a search stored before session 11 ran its baseline at: every setting its FF trials sampled from its
    [space] that the baseline shares, at the base value (such studies recorded nothing, and their baseline had no
    levels). A sampled [axes] level has a baseline of its own."""
    from ffablate.spec import _is_ff_only, at_base

    params = {k for t in trials if t.user_attrs.get("role") == "ff" for k in t.params} - {"cell", "seed"}
    keys = sorted({_setting(param) for param in params} - set(meta.get("axes") or {}))
    return {key: at_base(key, meta.get("base") or {}) for key in keys if not _is_ff_only(key)}


def _setting(param: str) -> str:
    """The setting a search's trial parameter samples: a plugin's is stored as "kind:plugin.param" (one
    distribution per plugin) and sets "kind.param"; any other is the setting's own key. A plugin's name may hold a
    dot, a parameter's (a Python identifier) cannot."""
    if ":" not in param:
        return param
    kind, rest = param.split(":", 1)
    return f"{kind}.{rest.rsplit('.', 1)[-1]}"


def _tuned_baseline(levels: list[Row]) -> Row | None:
    """The baseline an FF row is compared with: the one row, or of several levels ([baseline] levels) the one with
    the best mean on validation, where every level with results has it, else on test. Complete levels are chosen
    from first (an incomplete level's surviving seeds are a biased sample); ``base_choice`` says how it was chosen,
    and names a better-scoring incomplete level and any tie."""
    scored = [r for r in levels if r.n]
    if len(levels) < 2 or not scored:
        return levels[0] if levels else None
    on_val = all(r.has_val for r in scored)
    split = "validation" if on_val else "test"

    def score(r: Row) -> float:
        return (r.val if on_val else r.accuracy).mean

    complete = [r for r in scored if r.complete]
    pool = complete or scored
    best = max(pool, key=score)  # the first in spec order among equals
    if complete and len(complete) < len(levels):
        choice = f"the best on {split} of the complete levels ({len(complete)} of {len(levels)})"
    elif complete:
        choice = f"the best of {len(levels)} levels on {split}"
    else:
        choice = f"the best on {split} of {len(levels)} levels, none of them complete"
    tied = [r.label for r in pool if r is not best and score(r) == score(best)]
    if tied:
        choice += f", tied with {', '.join(tied)} (the spec's order picked it)"
    higher = [r for r in scored if not r.complete and score(r) > score(best)]
    if higher and complete:
        choice += "; higher but incomplete: " + ", ".join(f"{r.label} ({r.missing()})" for r in higher)
    # A best level at the end of a numeric range of three or more leaves the baseline's own optimum unbracketed.
    for key, value in best.overrides.items():
        values = sorted({r.overrides.get(key) for r in levels}, key=str)
        numeric = sorted(x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool))
        if len(numeric) >= 3 and len(numeric) == len(values) and value in (numeric[0], numeric[-1]):
            end = "highest" if value == numeric[-1] else "lowest"
            choice += f"; it is the {end} {key} level, so one beyond it may score higher"
    best.base_choice = choice
    return best


STALE = "stale: its process died; rerun"  # the fail reason of a trial whose worker died


# A live trial names its worker within milliseconds of starting; one that never did was orphaned in between.
ORPHANED_AFTER_S = 120


def died(t: FrozenTrial) -> bool:
    """A running trial whose worker on this host no longer exists. Other hosts' trials are left to Optuna's
    heartbeat: they may still be running there. A trial that never named a worker is dead once it is
    ``ORPHANED_AFTER_S`` old: an interrupt inside Optuna's ``ask()`` left it with no worker and no heartbeat,
    and it held its point (or its place in a search's trial count) for good."""
    worker = t.user_attrs.get("worker")
    if worker is None:
        started = t.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > ORPHANED_AFTER_S
    return worker.get("host") == socket.gethostname() and not _alive(int(worker.get("pid", -1)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failure(t: FrozenTrial, finished: set[tuple[Any, Any]], search: bool) -> FailedTrial:
    # A worker killed between sampling its point and recording its attributes left the point in its params only
    # (a grid trial stored before seeds could be added: the sampler now records the point as it claims it).
    label = t.user_attrs.get("cell", t.params.get("cell"))
    seed = t.user_attrs.get("seed", t.params.get("seed"))
    if _finished(t):
        fate = "permanent"
    elif label is None or seed is None:
        fate = "unknown"
    elif (label, seed) in finished:
        fate = "rerun"
    elif search and t.user_attrs.get("role") == "ff":
        fate = "replaced"  # a search's FF point is its own trial's sample: no rerun draws it again
    else:
        fate = "retry"
    reason = STALE if t.state == TrialState.RUNNING else fail_reason(t)
    return FailedTrial(t.number, label or "", None if seed is None else int(seed), reason, fate)


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
        # Rows report test accuracy. The trial's value is what Optuna ranked it by (validation accuracy when there is
        # one), so it cannot stand in for a missing test accuracy (a hand-made or damaged trial).
        test = metrics.get("test_accuracy")
        if not isinstance(test, (int, float)) or not math.isfinite(test):
            row.failed.append(f"completed without a test accuracy ({test!r})")
            return
        val = metrics.get("val_accuracy")
        if val is not None and not (isinstance(val, (int, float)) and math.isfinite(val)):
            # A NaN would sort first among the rows ranked on validation and become the study's recipe.
            row.failed.append(f"completed with a validation accuracy of {val!r}")
            return
        row.accuracies.append(float(test))
        if val is not None:
            row.val_accuracies.append(float(val))
        row.seeds.append(seed)
        row.train_seconds.append(float(metrics.get("train_seconds", math.nan)))
        row.images_per_second.append(float(metrics.get("images_per_second", math.nan)))
        row.peak_memory.append(float(metrics.get("peak_memory_bytes", math.nan)))
        row.per_layer.append(list(metrics.get("per_layer_accuracy", [])))
        row.histories.append(list(t.user_attrs.get("history", [])))
    elif t.state == TrialState.PRUNED:
        row.pruned += 1
    elif t.state == TrialState.FAIL and t.user_attrs.get("fail_permanent"):
        row.failed.append(fail_reason(t))


TABLE_TOP = 15  # a search's table shows its best FF configurations only


def table_cut(summary: Summary, top: int | None = TABLE_TOP) -> str:
    """The line under a table that ``table_rows(summary, top)`` cut short ("" when it shows every row)."""
    ff = [r for r in summary.ff if r.n]
    if summary.meta.get("sampler") != "tpe" or not top or len(ff) <= top:
        return ""
    return (
        f"The table shows the best {top} of {len(ff)} FF configurations by {summary.ranking_split} accuracy; "
        "`--json` lists them all."
    )


def table_rows(summary: Summary, top: int | None = None) -> list[list[str]]:
    """The closing table: configuration, n (completed of planned seeds), test accuracy % mean ± 95% CI, gap to BP
    pp ± 95% Welch CI with both sides' seed counts, the same gap ± 95% paired CI over the seeds FF and BP both ran
    (at least two; the count is shown when it is fewer than either side's), validation accuracy % mean ± 95% CI
    ("-" without a split, "–" before a seed finished), train seconds, notes. A TPE study's ``top`` FF rows are the
    best ``top`` by the study's ranking (``Summary.ranked``)."""
    rows = summary.rows
    if summary.meta.get("sampler") == "tpe" and top:
        rows = summary.baselines + summary.ranked()[:top]
    out = []
    for r in rows:
        notes = []
        if not r.complete:
            ranked = "; ranked after the complete rows" if r.role == "ff" and r.n else ""
            notes.append(f"incomplete: {r.missing()}{ranked}")
        if r.duplicates:
            notes.append(f"{r.duplicates} duplicate seed run(s) not counted")
        if r.failed:
            notes.append(f"failed: {r.failed[0][:60]}")
        if r.retried:
            notes.append(f"to rerun: {r.retried[0][1][:60]}")
        if r.role == "baseline" and summary.untuned:
            notes.append(f"untuned: {summary.untuned} (FF searched it)")
        if r.role == "baseline" and r.base_choice:
            notes.append(f"gaps are to this one: {r.base_choice}")
        if r.role != "ff":
            gap, paired = "(baseline)", "(baseline)"
        elif r.base is None:
            gap, paired = "–", "–"
        else:
            gap, paired = f"{fmt(r.gap, signed=True)} (n={r.n} vs {r.baseline_n})", fmt(r.gap_paired, signed=True)
            if r.gap_paired.n and r.gap_paired.n < max(r.n, r.baseline_n):
                paired += f" ({r.gap_paired.n} shared seeds)"
        val = fmt(r.val) if r.has_val else "-" if r.n else "–"
        seconds = f"{_mean(r.train_seconds):.1f}" if r.train_seconds else "–"
        out.append([r.label, r.n_of_planned, fmt(r.accuracy), gap, paired, val, seconds, "; ".join(notes)])
    return out


TABLE_COLUMNS = [
    "configuration",
    "n",
    "test acc % (95% CI)",
    "gap to BP pp (95% Welch CI)",
    "paired gap pp (95% CI)",
    "val acc % (95% CI)",
    "train s",
    "notes",
]


# ----------------------------------------------------------------------------------------------------
# Answers: one sentence computed from the numbers. A direction word ("ahead", "behind", "widens") is written
# only where a 95% interval backs it (``Estimate.decisive``; for an FF−BP gap ``Row.gap_decisive``: Welch and, over
# shared seeds, paired); every gap carries its seed counts.


def _seeds(n_a: int, n_b: int) -> str:
    return "one seed each" if n_a == n_b == 1 else f"n={n_a} vs {n_b}"


def _pp(e: Estimate, n_a: int, n_b: int) -> str:
    """A difference in pp with its interval and both sides' seed counts, or the word that it has no interval."""
    if not e.has_ci:
        mean = fmt_number(e.mean, signed=True) if math.isfinite(e.mean) else "–"  # no baseline yet: no mean either
        return f"{mean} pp from {_seeds(n_a, n_b)}: no interval"
    return f"{fmt(e, signed=True, unit=' pp')}, {_seeds(n_a, n_b)}"


def _no_completed_trial(summary: Summary, name: Callable[[Row], str] = lambda r: r.label) -> str:
    """The FF configurations with trials but none completed (all failed, pruned or running), each as ``name`` calls
    it, as an answer's clause ("; no completed trial for X, Y"). Every answer names them: a configuration that
    diverged on every seed is a result, not an absence."""
    empty = [name(r) for r in summary.ff if not r.n]
    if empty and summary.meta.get("sampler") == "tpe":  # a search's pruned draws are routine, and many: a count
        return f"; {len(empty)} of {len(summary.ff)} searched configurations have no completed trial"
    return f"; no completed trial for {', '.join(empty)}" if empty else ""


def _unresolved(e: Estimate) -> str:
    """The words for a difference picked as the largest (best − worst, an axis's levels) whose interval reaches zero."""
    return ", not resolved from zero" if e.has_ci and not e.excludes_zero() else ""


def _missing_seeds(row: Row) -> str:
    """The planned seeds an FF row and its baseline lack, "FF n=2 of 3: 1 failed" ("" when neither lacks one): the
    gap is over the survivors, so it backs no direction word (``Row.gap_decisive``) and the answer says why."""
    sides = (("FF", row), ("BP", row.base))
    return "; ".join(f"{side} n={r.n_of_planned}: {r.missing()}" for side, r in sides if r and not r.complete)


def _gap(row: Row) -> str:
    """An FF row's gap to its baseline as ``_pp`` words it, with the seeds either side lacks."""
    missing = _missing_seeds(row)
    return _pp(row.gap, row.n, row.baseline_n) + (f" ({missing})" if missing else "")


def _paired(row: Row) -> str:
    if not row.gap_paired.has_ci:
        return ""
    return f", paired over {row.gap_paired.n} seeds {fmt(row.gap_paired, signed=True, unit=' pp')}"


def _versus_baseline(row: Row) -> str:
    """How an FF row stands against its baseline, in words its Welch interval backs; the paired interval
    follows where both ran the same seeds, and how the baseline was chosen where several levels of it ran."""
    gap = f"FF−BP {_pp(row.gap, row.n, row.baseline_n)}"
    if row.gap_paired.has_ci:
        gap += f"; paired over the {row.gap_paired.n} shared seeds {fmt(row.gap_paired, signed=True, unit=' pp')}"
    choice = f" ({row.baseline} is {row.base_choice})" if row.base_choice else ""
    if row.gap_decisive:
        return f"it is {'ahead of' if row.gap.mean > 0 else 'behind'} {row.baseline} ({gap}){choice}"
    missing = _missing_seeds(row)
    if missing:  # the survivors' interval may exclude zero, or reach it, but it is not the planned seeds'
        return f"against {row.baseline}: {gap}, no direction claimed with seeds missing ({missing}){choice}"
    if row.gap.has_ci and not row.gap.no_spread:
        return f"it is not distinguishable from {row.baseline} ({gap}){choice}"
    return f"against {row.baseline}: {gap}, no direction claimed{choice}"


def answer(summary: Summary) -> str:
    analysis = summary.meta.get("analysis", "ablation")
    if not any(r.n for r in summary.ff):
        # "yet" only where a trial may still complete: a configuration failed or pruned on every seed is done.
        pending = summary.not_started or any(
            r.running or r.retried or r.pruned + len(r.failed) < r.planned for r in summary.ff
        )
        yet = " yet" if pending or not summary.ff else ""
        return (
            f"No FF configuration has a completed trial{yet}, so the question has no answer from this study"
            f"{_no_completed_trial(summary)}."
        )
    try:
        text = {
            "k-sweep": _answer_k_sweep,
            "label-hierarchy": _answer_hierarchy,
            "bp-gap": _answer_bp_gap,
        }.get(analysis, _answer_ablation)(summary)
    except Exception as exc:  # an answer must never break a report; say what is missing instead
        return f"No one-sentence answer could be computed ({type(exc).__name__}: {exc})."
    if summary.not_started:
        planned = len(summary.not_started) + len(summary.rows)
        text += (
            f" (From a study not yet finished: {len(summary.not_started)} of its {planned} configurations have no "
            "trial yet.)"
        )
    return text


def _answer_ablation(summary: Summary) -> str:
    ranked = summary.ranked()
    best = ranked[0]
    # The rows the best was chosen among: complete rows are not compared with pruned survivors.
    pool = [r for r in ranked if r.complete == best.complete]
    worst = pool[-1]
    if summary.selected_on_validation:
        chosen = f"chosen on validation accuracy ({fmt(best.val, unit='%')})"
    else:
        some = "not every" if any(r.has_val for r in ranked) else "no"
        chosen = f"chosen on the test images themselves ({some} configuration has a validation split, so optimistic)"
    if not best.complete:
        chosen += f", chosen among incomplete rows: n={best.n} of {best.planned} ({best.missing()})"
    # Rows with the very same per-seed scores (e.g. sum-from-k with k=1 over two blocks is `last`): the order
    # between them is the spec's, not a measurement.
    scores = {r.label: dict(zip(r.seeds, summary.ranking_values(r), strict=False)) for r in ranked}
    tied = [r.label for r in ranked[1:] if r.complete == best.complete and scores[r.label] == scores[best.label]]
    if tied:
        chosen += f", tied seed for seed with {', '.join(tied)}"
    text = (
        f"Best FF configuration is {best.label} at {fmt(best.accuracy, unit='%')} test accuracy (n={best.n}), {chosen}"
    )
    # A configuration with trials but none completed (all failed, pruned or running) is in no ranking: say so, as a
    # configuration that diverged on every seed is a result, not an absence.
    text += _no_completed_trial(summary)
    # Both differences are on the split that ranks the rows: "best − worst" on test after choosing on validation
    # can come out negative, and an axis ranked on test can contradict the importance, which is on validation.
    split = summary.ranking_split
    if worst is not best:
        gap = welch_ci(summary.ranking_values(best), summary.ranking_values(worst))
        text += f"; best − worst ({worst.label}) on {split} accuracy, which ranks them, {_pp(gap, best.n, worst.n)}"
        text += _unresolved(gap)
    axis = most_influential_axis(summary)
    if axis:
        text += f"; {axis.describe(split)}"
    elif uncompared := _axis_spans(summary)[1]:
        text += f"; {', '.join(uncompared)} could not be compared (no combination completed all its levels)"
    if best.baseline:
        text += f"; {_versus_baseline(best)}"
        if len(pool) > 1:
            # Validation and test accuracy of one trained network move together across seeds, so the seeds that
            # lifted the winner's validation score lift its test score and gap too, whichever split ranked it.
            text += (
                f", though it was picked as the best of {len(pool)} configurations on these seeds, so its gap is "
                "optimistic: confirm it on fresh seeds"
            )
        if summary.untuned:
            text += f"; the baseline ran at {summary.untuned}, which FF searched, so the comparison favours FF"
    return text + "."


@dataclass(frozen=True)
class AxisSpan:
    """How far apart an axis's best and worst levels are: ``high`` − ``low`` on the ranking split, each level
    averaged over the same ``cells`` combinations of the other axes, with a Welch-Satterthwaite interval."""

    axis: str
    high: str
    low: str
    difference: Estimate
    cells: int
    uncompared: tuple[str, ...] = ()  # axes (in a group) with no combination that completed every level
    group: str = ""  # the spec group the levels were compared in ("" for a spec without groups)

    def describe(self, split: str) -> str:
        d = self.difference
        if d.has_ci:
            size = f"{fmt(d, signed=True, unit=' pp')}, n≥{d.n} seeds a cell{_unresolved(d)}"
        else:
            size = f"{fmt_number(d.mean, signed=True)} pp from one seed a cell: no interval"
        where = f"{self.cells} combination{'s' if self.cells != 1 else ''} of the other axes"
        within = f" in group {self.group}" if self.group else ""
        text = (
            f"the {self.axis} axis has the widest spread of level means on {split} accuracy ({self.high} − "
            f"{self.low}{within} {size}, over {where} that ran every {self.axis} level)"
        )
        if self.uncompared:
            names = ", ".join(self.uncompared)
            text += f" of the axes that could be compared ({names}: no combination completed all its levels)"
        return text


def most_influential_axis(summary: Summary) -> AxisSpan | None:
    """The axis whose best and worst levels lie furthest apart on the ranking split (by point estimate: the span
    says when its interval reaches zero), within a group of the spec (groups may run an axis at other levels, or
    fix it); None when no axis's levels differ. The span names the axes that could not be compared, since one of
    them may be the one that moves accuracy most. The levels are picked after looking, so the interval is not a
    test of the axis."""
    spans, uncompared = _axis_spans(summary)
    if not spans:
        return None
    best = max(spans, key=lambda s: s.difference.mean)
    return dataclasses.replace(best, uncompared=uncompared)


def _axis_spans(summary: Summary) -> tuple[list[AxisSpan], tuple[str, ...]]:
    """Each axis's span of level means per group where its levels differ, and the axes (by group) not compared.
    Each level is averaged over the same combinations of the other axes: those that ran every level the group runs
    with complete rows (a pruned row's surviving seeds are a biased sample, and a level averaged over other cells
    than its rivals' would mix in those cells' effects). An axis of which some group has no such combination (a
    level whose trials all failed leaves none) is not compared there."""
    spans, uncompared = [], []
    for axis in summary.axis_levels():
        in_group: dict[str, set[str]] = defaultdict(set)  # every level a group runs, its failed ones too
        for r in summary.ff:
            if axis in r.overrides:
                in_group[r.group].add(str(r.overrides[axis]))
        for group, levels in in_group.items():
            if len(levels) < 2:  # a group that fixes the axis (goodness's class-wise group) compares nothing
                continue
            by_rest: dict[str, dict[str, Row]] = defaultdict(dict)
            for r in summary.ff:
                if r.group == group and axis in r.overrides and r.n and r.complete:
                    rest = json.dumps({k: str(v) for k, v in r.overrides.items() if k != axis}, sort_keys=True)
                    by_rest[rest][str(r.overrides[axis])] = r
            balanced = [cells for cells in by_rest.values() if levels <= set(cells)]
            if not balanced:
                uncompared.append(f"{axis} in group {group}" if group else axis)
                continue
            span = _span(summary, axis, sorted(levels), balanced, group)
            if span is not None:
                spans.append(span)
    return spans, tuple(dict.fromkeys(uncompared))


def _span(summary: Summary, axis: str, levels: list[str], cells: list[dict[str, Row]], group: str) -> AxisSpan | None:
    """Best − worst of ``levels``, each averaged over ``cells``; None when every level is alike."""
    m = len(cells)
    means = {level: sum(statistics.fmean(summary.ranking_values(c[level])) for c in cells) / m for level in levels}
    high, low = max(levels, key=means.__getitem__), min(levels, key=means.__getitem__)
    if means[high] == means[low]:
        return None
    terms = [(1 / m, summary.ranking_values(c[high])) for c in cells]
    terms += [(-1 / m, summary.ranking_values(c[low])) for c in cells]
    return AxisSpan(axis, high, low, contrast_ci(terms), m, group=group)


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
        rows = [(k, r, r.base) for k, r in points if r.base is not None]
        if not rows:
            continue
        (k0, r0, b0), (k1, r1, b1) = rows[0], rows[-1]
        text = f"{group}: FF−BP gap {_gap(r0)} at K={k0}"
        if r1 is not r0:
            text += f" → {_gap(r1)} at K={k1}"
        side = f"FF {'ahead' if r1.gap.mean > 0 else 'behind'}" if r1.gap_decisive else "no direction claimed"
        text += f" ({side} at K={k1}"
        if r1 is not r0:
            text += f"; {_trend(r0, b0, r1, b1)}"
        parts.append(text + ")")
    if not parts:
        return f"No K has both FF and BP results yet{_no_completed_trial(summary)}."
    return "; ".join(parts) + _no_completed_trial(summary) + "."


def _trend(r0: Row, b0: Row, r1: Row, b1: Row) -> str:
    """How the FF−BP gap moves from FF row ``r0`` (baseline ``b0``, the smallest K) to ``r1`` (``b1``, the
    largest), worded only as far as the intervals of its change back: Welch-Satterthwaite over the four samples,
    and where at least two seeds ran all four, the interval of the per-seed change too (a seed shares initialisation
    and data order across K, so the four runs of a seed may correlate either way)."""
    change = contrast_ci([(1.0, r1.accuracies), (-1.0, b1.accuracies), (-1.0, r0.accuracies), (1.0, b0.accuracies)])
    paired = _paired_change(r1, b1, r0, b0)
    seeds = min(r0.n, r1.n, b0.n, b1.n)
    if not change.has_ci:
        number = fmt_number(change.mean, signed=True)
        return f"change with K {number} pp with n={seeds} on a side: no interval, no trend claimed"
    moved = f"change {fmt(change, signed=True, unit=' pp')}, n≥{seeds} per side"
    if paired.has_ci:
        moved += f"; paired over {paired.n} seeds {fmt(paired, signed=True, unit=' pp')}"
    if not all(r.complete for r in (r0, b0, r1, b1)):  # the ends' gaps name what is missing
        return f"no trend claimed with seeds missing: {moved}"
    if not change.decisive or (paired.has_ci and not paired.backs(change)):
        return f"no change with K resolved: {moved}"
    if r0.gap_decisive and r1.gap_decisive and (r0.gap.mean > 0) == (r1.gap.mean > 0):
        return f"the gap {'widens' if abs(r1.gap.mean) > abs(r0.gap.mean) else 'narrows'} with K: {moved}"
    return f"the gap moves in {'FF' if change.mean > 0 else 'BP'}'s favour with K: {moved}"


def _answer_hierarchy(summary: Summary) -> str:
    parts = []
    by_group: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in summary.ff:
        if r.n:
            by_group[r.group or str(r.overrides.get("dataset", ""))][str(r.overrides.get("labels", "fine"))] = r
    for group, rows in by_group.items():
        items = [f"{lab} labels {_gap(r)} (FF {fmt(r.accuracy, unit='%')})" for lab, r in sorted(rows.items())]
        text = f"{group}: FF−BP gap with " + ", with ".join(items)
        if "coarse" in rows and "fine" in rows:
            text += "; " + _coarse_minus_fine(rows["coarse"], rows["fine"])
        parts.append(text)
    notes = summary.meta.get("notes", [])
    return "; ".join(parts) + _no_completed_trial(summary) + (f" ({'; '.join(notes)})" if notes else "") + "."


def _paired_change(ff1: Row, bp1: Row, ff0: Row, bp0: Row) -> Estimate:
    """(FF1 − BP1) − (FF0 − BP0) seed by seed over the seeds all four rows ran, with its t-interval: one seed gives
    all four runs the same initialisation, data order and (where the data are the same images) images."""
    runs = [dict(zip(r.seeds, r.accuracies, strict=True)) for r in (ff1, bp1, ff0, bp0)]
    shared = sorted(set.intersection(*(set(run) for run in runs)))
    a, b, c, d = runs
    return mean_ci([(a[s] - b[s]) - (c[s] - d[s]) for s in shared])


def _coarse_minus_fine(coarse: Row, fine: Row) -> str:
    """The study's question in one number: how the FF−BP gap moves from fine to coarse labels, paired by seed
    (one seed gives the same images, order and initialisation to all four runs) over the seeds all four ran."""
    if coarse.base is None or fine.base is None:
        return "coarse − fine: no baseline yet"
    change = _paired_change(coarse, coarse.base, fine, fine.base)
    if not change.has_ci:
        number = f" {fmt_number(change.mean, signed=True)} pp from" if math.isfinite(change.mean) else ":"
        seeds = f"{change.n} seed{'s' if change.n != 1 else ''}"
        return f"coarse − fine gap{number} {seeds} that all four runs share: no interval, no direction claimed"
    moved = f"coarse − fine gap {fmt(change, signed=True, unit=' pp')}, paired over {change.n} seeds"
    if not change.decisive:
        return f"{moved}: no difference resolved"
    if not all(r.complete for r in (coarse, coarse.base, fine, fine.base)):  # the gaps above name what is missing
        return f"{moved}: no direction claimed with seeds missing"
    return f"{moved}: coarse labels move the gap in {'FF' if change.mean > 0 else 'BP'}'s favour"


def _answer_bp_gap(summary: Summary) -> str:
    rows = [r for r in summary.ff if r.n and math.isfinite(r.gap.mean)]
    no_bp = [summary.dataset_of(r) for r in summary.ff if r.n and not math.isfinite(r.gap.mean)]
    absent = _no_completed_trial(summary, summary.dataset_of)
    if no_bp:
        absent += f"; no BP result yet for {', '.join(no_bp)}"
    if not rows:
        return f"No dataset has both FF and BP results yet{absent}."
    # Only a gap whose interval, over every planned seed, excludes zero counts; the rest are undecided, whatever sign.
    behind = sum(r.gap_decisive and r.gap.mean < 0 for r in rows)
    ahead = sum(r.gap_decisive and r.gap.mean > 0 for r in rows)
    items = "; ".join(f"{summary.dataset_of(r)} {_gap(r)}{_paired(r)}" for r in rows)
    undecided = len(rows) - behind - ahead
    why = (
        " (no 95% interval, a Welch or paired one that spans zero, no spread across seeds, or seeds missing on a side)"
        if undecided
        else ""
    )
    return (
        f"FF trails {summary.baseline_method} on {behind} of {len(rows)} datasets and leads on {ahead}; "
        f"{undecided} undecided{why} (FF−BP: {items}){absent}."
    )


def to_json(summary: Summary) -> str:
    """The summary as strict JSON (``ffablate.jsontext``): a mean or CI that does not exist (no seed, or one) is
    null, not NaN, which JSON has no word for."""
    payload = {
        "study": summary.name,
        "meta": summary.meta,  # its "axes" are the levels the spec lists, for every budget
        "axis_levels": summary.axis_levels(),  # the levels this study's FF rows ran, per axis
        "answer": answer(summary),
        "states": summary.states,
        "rows": [r.to_dict() for r in summary.rows],
        "failed_trials": [vars(f) for f in summary.failures],
        "not_started": summary.not_started,
        "versions": summary.versions,
    }
    return jsontext.dumps(payload)
