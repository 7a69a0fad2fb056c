"""Study specs: the TOML files in ``studies/``, validated into a ``Spec``, planned per budget.

Every mistake in a spec is a ``SpecError`` whose one line names the file and the key path
(``studies/x.toml: budgets.quick.epochs must be an int``), so the CLI can print it and exit 2.
The format is documented in docs/studies.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffablate.config import FF_METHODS, MAX_SEED, PLUGIN_KINDS, SPACE_KEYS, RunConfig, did_you_mean
from ffablate.errors import ConfigError, FFablateError

# Whether a dataset is here, given the dataset plugin parameters a configuration passes (study.available_datasets).
Available = Callable[[str, dict[str, Any]], bool]

ANALYSES = ("ablation", "k-sweep", "label-hierarchy", "bp-gap", "search")
SAMPLERS = ("grid", "tpe")
PRUNERS = ("median", "none")
BUDGETS = ("smoke", "quick", "full")
# The FF recipe: the keys `--recipe-from` carries over, and the plugin kinds a spec may search or sweep.
RECIPE_KEYS = frozenset({"goodness", "temperature", "norm", "loss", "negatives", "fusion", "schedule", "threshold"})
RECIPE_PLUGIN_KINDS = frozenset(PLUGIN_KINDS) - {"datasets"}
# Keys a BP baseline ignores, so FF cells that differ only in these share one baseline. Everything else (dataset,
# classes, labels, widths, epochs, ...) is matched between FF and its baseline, the norm modules included: they
# are part of the backbone BP trains too, so each norm level gets a baseline with that norm.
FF_ONLY = RECIPE_KEYS - {"norm"}
# Settings a baseline may run at values of its own: how it is optimized. Every other setting it runs is part of the
# backbone, data, augmentation or epochs, which FF and its baseline share in every comparison ffablate makes.
BASELINE_OWN_KEYS = frozenset({"lr", "weight_decay", "batch_size", "micro_batch", "device"})
# Changes to how a dataset is loaded or augmented that alter what a trial trains on while the spec stays the same: a
# study stored before one must not resume after it (its trials would mix both), so they enter the fingerprint of
# plans that use the dataset (and only those: other studies still resume).
DATA_CHANGES = {"digits": "no crops since 2026-11-27"}
# The same for a setting: plans whose runs take a subset of a dataset under coarse labels.
COARSE_SUBSETS_CHANGE = "subsets drawn by the fine labels since 2026-11-27"
# And for the optimizer: plans whose runs decay weights.
WEIGHT_DECAY_CHANGE = "decays only kernels and weight matrices since 2026-11-28"
SUBSET_KEYS = ("limit_train", "limit_test", "val_images")
STUDY_KEYS = {"seeds", "n_trials", "axes"}  # budget keys that are not RunConfig keys
MAX_SEEDS = 1000  # a seed count is a range to run: bounded so a typo is a message, not a MemoryError
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"


class SpecError(ConfigError):
    """A study spec is malformed; the message starts with the file and names the key path."""


@dataclass(frozen=True)
class Cell:
    """One grid configuration: FF with some overrides, or a baseline method matched to FF cells."""

    label: str
    role: str  # "ff" or "baseline"
    group: str
    overrides: dict[str, Any]
    match: str  # JSON of the overrides a baseline must share with the FF cell it is compared to

    @property
    def method(self) -> str:
        return str(self.overrides.get("method", "ff"))


@dataclass
class Group:
    label: str
    set: dict[str, Any]
    axes: dict[str, list[Any]]
    budgets: dict[str, dict[str, Any]]


@dataclass
class Budget:
    name: str
    settings: dict[str, Any]
    seeds: list[int]
    n_trials: int
    axes: dict[str, list[Any]]


@dataclass
class Spec:
    name: str
    path: Path
    question: str
    analysis: str
    sampler: str
    base: dict[str, Any]
    budgets: dict[str, Budget]
    groups: list[Group]
    space: dict[str, dict[str, Any]]
    space_plugins: list[str]
    baseline_methods: list[str]
    baseline_match: list[str] | None
    pruner: dict[str, Any]
    # [space] keys (and searched plugin kinds) the baseline shares but runs at the base value: FF is tuned on them
    # and the baseline is not, which the spec must say and every answer repeats.
    baseline_untuned: list[str] = field(default_factory=list)
    # [space] keys the baseline is tuned on instead: it runs at each level (crossed), and each FF row's gap is to
    # the best complete level on validation (on test where a level lacks it; results._tuned_baseline).
    baseline_levels: dict[str, list[Any]] = field(default_factory=dict)

    def plan(self, budget: str, available: Available | None = None) -> Plan:
        return _plan(self, budget, available or (lambda name, params: True))


@dataclass
class Plan:
    """A spec resolved for one budget: the shared settings, the cells, the seeds and what was skipped."""

    spec: Spec
    budget: Budget
    base: dict[str, Any]
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    recipe_source: str | None = None  # the study whose winning recipe ``with_recipe`` laid over ``base``

    @property
    def baseline_trials(self) -> int:
        """The baseline runs the budget holds: one trial per baseline cell and seed (under TPE too)."""
        return sum(c.role == "baseline" for c in self.cells) * len(self.budget.seeds)

    def cell(self, label: str) -> Cell:
        for cell in self.cells:
            if cell.label == label:
                return cell
        raise FFablateError(f"the study has no configuration {label!r}; was it made from another spec?")

    def with_recipe(self, recipe: dict[str, Any], source: str) -> Plan:
        """This plan with an FF recipe (e.g. another study's winner) in place of its base's recipe settings: what
        the winner left at a default runs at that default here too, not at this spec's own choice."""
        note = f"FF recipe from study {source}: {_label(recipe) or 'the defaults'}"
        kept = {k: v for k, v in self.base.items() if not is_recipe_key(k)}
        plan = dataclasses.replace(self, base={**kept, **recipe}, notes=[*self.notes, note], recipe_source=source)
        _check_configs(plan)
        return plan

    def config(self, overrides: dict[str, Any], seed: int, device: str = "cpu") -> RunConfig:
        from ffablate.plugins import registry, typed_plugin_params

        config = RunConfig().with_updates({**self.base_for(overrides), **overrides, "seed": seed, "device": device})
        return typed_plugin_params(config, registry())

    def base_for(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The base settings of a trial with ``overrides``. A BP baseline leaves out the FF-only ones, which it
        ignores: a goodness parameter in [base] meant for the FF grid's goodness is unknown to the default one."""
        if overrides.get("method", "ff") in FF_METHODS:
            return self.base
        return {k: v for k, v in self.base.items() if not _is_ff_only(k)}

    def untuned_baseline(self) -> dict[str, str]:
        """Each searched key the baseline runs at its base value (``[baseline] untuned``), with what it ran at, in
        words: ``{"lr": "lr=0.003"}``."""
        return {key: at_base(key, self.base) for key in self.spec.baseline_untuned}

    def plugin_name(self, overrides: dict[str, Any], kind: str) -> str:
        """The ``kind`` plugin a trial with ``overrides`` runs."""
        return str(overrides.get(kind) or self.base.get(kind) or getattr(RunConfig(), kind))

    def configurations(self) -> list[Cell]:
        """Every configuration to check before the first trial: the cells and, under TPE, each FF cell at both
        ends of every searched range and at every searched choice (the spec's space and the searched plugins'
        declared ones), one key at a time. Checking the ends, not the trials TPE will draw, is what is cheap."""
        if self.spec.sampler != "tpe":
            return list(self.cells)
        from ffablate.plugins import registry

        probes, spaceless = [], {kind: set() for kind in self.spec.space_plugins}
        for cell in self.cells:
            if cell.role != "ff":  # baselines are fixed trials: nothing is searched on them
                continue
            space = dict(self.spec.space)
            for kind in self.spec.space_plugins:
                plugin = registry().get(kind, self.plugin_name(cell.overrides, kind))
                space.update({f"{kind}.{param}": dist for param, dist in plugin.space.items()})
                if spaceless[kind] is not None:
                    spaceless[kind] = None if plugin.space else spaceless[kind] | {plugin.name}
            for key, dist in space.items():
                for value in _space_values(dist):
                    label = f"{cell.label} with {key}={value} from the search space"
                    probes.append(dataclasses.replace(cell, label=label, overrides={**cell.overrides, key: value}))
        for kind, names in spaceless.items():
            if names:  # the search would draw nothing for it, silently
                raise SpecError(
                    f"{self.spec.path}: space.plugins searches {kind}, but no {kind} plugin the study runs declares a "
                    f"search space ({', '.join(sorted(names))}; `ffablate plugins --json` lists spaces): leave it out"
                )
        return [*self.cells, *probes]

    def error(self, cell: Cell, exc: FFablateError) -> SpecError:
        """``exc`` as a mistake of the spec, naming the configuration it showed in."""
        return SpecError(f"{self.spec.path}: budgets.{self.budget.name} configuration {cell.label!r}: {exc}")

    def code_changes(self) -> dict[str, str]:
        """The changes of ffablate's that alter what this plan's trials compute: the ``DATA_CHANGES`` of the
        datasets it trains on, and those of the settings it uses."""
        used = {str(c.overrides.get("dataset", self.base.get("dataset", RunConfig.dataset))) for c in self.cells}
        changes = {d: DATA_CHANGES[d] for d in sorted(used) if d in DATA_CHANGES}
        for cell in self.cells:
            settings = {**self.base_for(cell.overrides), **cell.overrides}
            if settings.get("labels") == "coarse" and any(settings.get(k) for k in SUBSET_KEYS):
                changes["labels=coarse"] = COARSE_SUBSETS_CHANGE
            if settings.get("weight_decay"):
                changes["weight_decay"] = WEIGHT_DECAY_CHANGE
        return changes

    def fingerprint(self, seeds: list[int] | None = None) -> str:
        """Identifies what the trials mean; resuming a study made from a different plan would mix results. With
        ``seeds``, the fingerprint of this plan run on those seeds instead of its budget's."""
        payload = {
            "base": self.base,
            "cells": [(c.label, c.overrides) for c in self.cells],
            "seeds": self.budget.seeds if seeds is None else seeds,
            "space": self.spec.space,
            "plugins": self.spec.space_plugins,
        }
        changes = self.code_changes()
        if changes:
            payload["data_changes"] = changes  # the key's name predates changes that are not the data's
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve(name_or_path: str) -> Path:
    """A path to a .toml file, or a study name looked up in ./studies and then in the project's studies/."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            known = ", ".join(available_names()) or "none"
            raise SpecError(f"{path}: no such study spec file; known studies: {known}")
        return path
    for folder in (Path.cwd() / "studies", STUDIES_DIR):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(available_names()) or "none"
    hint = did_you_mean(name_or_path, available_names())
    raise SpecError(f"unknown study {name_or_path!r}{hint}; known studies: {known} (or give a path to a .toml spec)")


def available_names() -> list[str]:
    names = set()
    for folder in (Path.cwd() / "studies", STUDIES_DIR):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def load(name_or_path: str) -> Spec:
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}{_toml_hint(text, str(exc))}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the spec as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror}); check the path and its permissions") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Spec:
    v = _Validator(path)
    known = {
        "question",
        "analysis",
        "sampler",
        "base",
        "budgets",
        "axes",
        "groups",
        "space",
        "baseline",
        "pruner",
        "name",
    }
    v.no_unknown(raw, known, "")
    question = v.get(raw, "question", str, required=True)
    analysis = v.choice(raw, "analysis", ANALYSES, "ablation")
    sampler = v.choice(raw, "sampler", SAMPLERS, "grid")
    base = v.settings(v.get(raw, "base", dict, default={}), "base")

    budgets_raw = v.get(raw, "budgets", dict, required=True)
    v.no_unknown(budgets_raw, set(BUDGETS), "budgets")
    for name in BUDGETS:
        if name not in budgets_raw:
            v.fail(f"budgets.{name}", "is missing; every spec defines smoke, quick and full")
    budgets = {name: v.budget(budgets_raw[name], f"budgets.{name}", name, sampler) for name in BUDGETS}

    groups = []
    top_axes = v.axes(v.get(raw, "axes", dict, default={}), "axes")
    groups_raw = v.get(raw, "groups", list, default=[])
    if groups_raw and top_axes:
        v.fail("axes", "cannot be combined with [[groups]]; give each group its own axes")
    if groups_raw and sampler == "tpe":  # a search samples one table of axes; other groups would never run
        v.fail("groups", 'needs sampler = "grid"; a TPE search samples the levels of one [axes] table')
    for i, g in enumerate(groups_raw):
        key = f"groups[{i}]"
        if not isinstance(g, dict):
            v.fail(key, "must be a table")
        v.no_unknown(g, {"label", "set", "axes", "budgets"}, key)
        g_budgets = v.get(g, "budgets", dict, default={}, key=key)
        v.no_unknown(g_budgets, set(BUDGETS), f"{key}.budgets")
        groups.append(
            Group(
                label=v.get(g, "label", str, required=True, key=key),
                set=v.settings(v.get(g, "set", dict, default={}, key=key), f"{key}.set"),
                axes=v.axes(v.get(g, "axes", dict, default={}, key=key), f"{key}.axes"),
                budgets={b: v.settings(s, f"{key}.budgets.{b}") for b, s in g_budgets.items()},
            )
        )
    axis_names = set(top_axes) | {k for g in groups for k in g.axes}
    for b in budgets.values():
        for k in b.axes:
            if k not in axis_names:
                v.fail(f"budgets.{b.name}.axes.{k}", "restricts no axis of the spec")
            levels = {str(x) for g in groups for x in g.axes.get(k, [])} | {str(x) for x in top_axes.get(k, [])}
            for x in b.axes[k]:
                if str(x) not in levels:
                    v.fail(f"budgets.{b.name}.axes.{k}", f"lists {x!r}, which is not a level of the axis")
    labels = [g.label for g in groups]
    if len(set(labels)) != len(labels):
        v.fail("groups", "labels must be unique")
    if not groups:
        groups = [Group("", {}, top_axes, {})]

    space_raw = v.get(raw, "space", dict, default={})
    space_plugins = v.get(space_raw, "plugins", list, default=[], key="space")
    for i, kind in enumerate(space_plugins):
        if not isinstance(kind, str) or kind not in RECIPE_PLUGIN_KINDS:
            v.fail(f"space.plugins[{i}]", f"must be a plugin kind ({', '.join(sorted(RECIPE_PLUGIN_KINDS))})")
    space = {k: v.distribution(d, f"space.{k}", k) for k, d in space_raw.items() if k != "plugins"}
    if sampler == "grid" and (space or space_plugins):
        v.fail("space", 'needs sampler = "tpe": a grid only walks the categorical axes')

    baseline = v.get(raw, "baseline", dict, default={})
    v.no_unknown(baseline, {"methods", "match", "untuned", "levels"}, "baseline")
    methods = v.get(baseline, "methods", list, default=["bp-deepsup"], key="baseline")
    for i, m in enumerate(methods):
        if m not in ("bp", "bp-deepsup", "bp-ga", "bp-ckpt"):
            v.fail(f"baseline.methods[{i}]", "must be one of bp, bp-deepsup, bp-ga, bp-ckpt")
    match = v.get(baseline, "match", list, default=None, key="baseline")
    for i, key in enumerate(match or []):
        # A misspelt key matched nothing: every FF cell was compared with one baseline at the defaults.
        if not isinstance(key, str):
            v.fail(f"baseline.match[{i}]", 'must be a run setting\'s name, e.g. "dataset"')
        v.setting_key(key, f"baseline.match[{i}]")
        if _is_ff_only(key):
            v.fail(f"baseline.match[{i}]", f"names {key!r}, which only FF uses: a baseline cannot match it")
    untuned = v.get(baseline, "untuned", list, default=[], key="baseline")
    levels = v.get(baseline, "levels", dict, default={}, key="baseline")
    searched = [*space, *space_plugins]
    if methods:
        _check_shared_by_design(v, groups, match, space, space_plugins)
    for i, key in enumerate(untuned):
        if key not in searched:
            v.fail(f"baseline.untuned[{i}]", f"names {key!r}, which [space] does not search; list only searched keys")
        if _is_ff_only(key):  # the baseline never runs it, so it is not "untuned" on it
            v.fail(f"baseline.untuned[{i}]", f"names {key!r}, which only FF uses: leave it out")
    if levels and sampler != "tpe":
        v.fail("baseline.levels", 'needs sampler = "tpe": it tunes the baseline on keys that [space] searches')
    for key, given in (("levels", levels), ("untuned", untuned)):
        if given and not methods:
            v.fail(f"baseline.{key}", "says how a baseline runs, and baseline.methods runs none: leave it out")
        if given and analysis not in ("ablation", "search"):  # only their answers say how the baseline was run
            v.fail(f"baseline.{key}", f'is for analysis = "search" or "ablation", not {analysis!r}')
    for key, values in levels.items():
        at = f"baseline.levels.{_toml_key(key)}"
        if key not in space or _is_ff_only(key):
            v.fail(at, "must be a [space] key the baseline shares (FF is tuned on it there)")
        if key in untuned:
            v.fail(at, "is also in baseline.untuned; the baseline is either tuned on it or not")
        if not isinstance(values, list) or not values:
            v.fail(at, "must be a list of values to run the baseline at")
        for i, value in enumerate(values):
            v.value(key, value, f"{at}[{i}]")
        if len(set(values)) < len(values):  # 1 == 1.0: the same run twice
            v.fail(at, "must list distinct values")
    for key in space if methods else ():  # what is left to share: optimizer settings (_check_shared_by_design)
        if not _is_ff_only(key) and key not in untuned and key not in levels:
            v.fail(
                "",
                f"space.{_toml_key(key)} is a setting the BP baseline shares, so FF would be tuned on it and the "
                f"baseline run at the base value; tune the baseline too with [baseline] levels = "
                f'{{ {_toml_key(key)} = [...] }}, or add untuned = ["{key}"] to [baseline] to compare so on purpose '
                "(reports say so)",
            )

    pruner = v.get(raw, "pruner", dict, default={"type": "none"})
    v.no_unknown(pruner, {"type", "n_startup_trials", "n_warmup_steps"}, "pruner")
    v.choice(pruner, "type", PRUNERS, "none", key="pruner")
    for k in ("n_startup_trials", "n_warmup_steps"):
        if v.get(pruner, k, int, default=0, key="pruner") < 0:
            v.fail(f"pruner.{k}", "must be at least 0")
    name = v.get(raw, "name", str, default=path.stem)
    spec = Spec(
        name,
        path,
        question,
        analysis,
        sampler,
        base,
        budgets,
        groups,
        space,
        space_plugins,
        methods,
        match,
        pruner,
        untuned,
        levels,
    )
    for b in BUDGETS:  # resolving every budget catches bad values in any of them now, not mid-study
        _plan(spec, b, lambda name, params: True)
    return spec


class _Validator:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> None:
        where = f"{key} " if key else ""
        raise SpecError(f"{self.path}: {where}{message}")

    def no_unknown(self, table: dict[str, Any], known: set[str], key: str) -> None:
        for k in table:
            if k not in known:
                hint = did_you_mean(k, known)
                self.fail(_join(key, k), f"is not a known key{hint}; known: {', '.join(sorted(known))}")

    def get(
        self,
        table: dict[str, Any],
        k: str,
        kind: type,
        *,
        required: bool = False,
        default: Any = None,
        key: str = "",
    ) -> Any:
        path = _join(key, k)
        if k not in table:
            if required:
                self.fail(path, "is required")
            return default
        value = table[k]
        if not _is(value, kind):
            self.fail(path, f"must be {_a(kind)}")
        return value

    def choice(self, table: dict[str, Any], k: str, choices: tuple[str, ...], default: str, key: str = "") -> str:
        value = self.get(table, k, str, default=default, key=key)
        if value not in choices:
            self.fail(_join(key, k), f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def not_dotted(self, k: str, value: Any, path: str) -> None:
        """An unquoted ``temperature.start = 2.0`` arrives as ``temperature = {start = 2.0}``: say to quote it,
        not that temperature must be a string."""
        if isinstance(value, dict) and value and k.rstrip("s") in {kind.rstrip("s") for kind in PLUGIN_KINDS}:
            param = next(iter(value))
            self.fail(
                path, f"is a table, as TOML reads an unquoted {k}.{param} = ...: quote the key, {_quoted(k, param)}"
            )

    def setting_key(self, k: str, path: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "plugin_params"}
        if "." in k:
            kind = k.split(".", 1)[0]
            if kind not in PLUGIN_KINDS:
                kinds = ", ".join(PLUGIN_KINDS)
                self.fail(path, f"names no plugin kind{did_you_mean(kind, PLUGIN_KINDS)}; kinds: {kinds}")
        elif k not in fields:
            self.fail(path, f"is not a run setting{did_you_mean(k, fields)} (see `ffablate train --help` for the keys)")

    def settings(self, table: dict[str, Any], key: str, extra: set[str] = frozenset()) -> dict[str, Any]:
        """RunConfig keys with values of the field's type, or plugin parameters "kind.param"."""
        if not isinstance(table, dict):
            self.fail(key, "must be a table")
        out = {}
        for k, value in table.items():
            path = _join(key, k)
            if k in extra:
                continue
            self.not_dotted(k, value, path)
            self.setting_key(k, path)
            self.value(k, value, path)
            out[k] = value
        return out

    def value(self, k: str, value: Any, path: str) -> None:
        """``value`` is of the type setting ``k`` takes (RunConfig's field's), or a scalar for a plugin parameter
        (its type is the chosen plugin's to check, per configuration)."""
        if "." in k:
            if not isinstance(value, (str, int, float, bool)):
                self.fail(path, "must be a number, string or boolean")
            return
        want = type(getattr(RunConfig(), k))
        if not _is(value, want):
            self.fail(path, f"must be {_a(want)}")
        self._check_value(k, value, path)

    def _check_value(self, k: str, value: Any, path: str) -> None:
        from ffablate.plugins import registry, unknown_hint

        kind = "datasets" if k == "dataset" else k
        if kind not in PLUGIN_KINDS:
            return
        known = registry().names(kind)
        if value not in known:
            what = "dataset" if kind == "datasets" else f"{kind} plugin"
            self.fail(path, f"names no {what} {value!r}{unknown_hint(value, known)}; known: {', '.join(known)}")

    def axes(self, table: dict[str, Any], key: str) -> dict[str, list[Any]]:
        out = {}
        for k, values in table.items():
            path = _join(key, k)
            self.not_dotted(k, values, path)
            self.setting_key(k, path)
            if values == "*":
                if k not in RECIPE_PLUGIN_KINDS:
                    self.fail(path, '= "*" (every registered plugin) only works for a plugin kind')
                from ffablate.plugins import registry

                values = registry().names(k)
            if not isinstance(values, list) or not values:
                self.fail(path, 'must be a non-empty list of values (or "*" for every plugin of a kind)')
            for i, value in enumerate(values):
                self.settings({k: value}, key) if "." not in k else None
                if not isinstance(value, (str, int, float, bool)):
                    self.fail(f"{path}[{i}]", "must be a number, string or boolean")
            if len(set(map(str, values))) != len(values):
                self.fail(path, "has a repeated value")
            out[k] = list(values)
        return out

    def budget(self, table: Any, key: str, name: str, sampler: str) -> Budget:
        if not isinstance(table, dict):
            self.fail(key, "must be a table")
        settings = self.settings(table, key, extra=STUDY_KEYS)
        seeds = table.get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
            self.fail(f"{key}.seeds", "must be an int (how many seeds) or a list of ints")
        if isinstance(seeds, int):
            if not 1 <= seeds <= MAX_SEEDS:
                self.fail(
                    f"{key}.seeds", f"= {seeds}: give a count from 1 to {MAX_SEEDS} (seeds 0..N-1) or a list of seeds"
                )
            seeds = list(range(seeds))
        if not seeds or not all(_is(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
            self.fail(f"{key}.seeds", "must be a non-empty list of distinct ints")
        if len(seeds) > MAX_SEEDS:
            self.fail(f"{key}.seeds", f"lists {len(seeds)} seeds; at most {MAX_SEEDS}")
        for i, s in enumerate(seeds):
            if not 0 <= s <= MAX_SEED:
                self.fail(f"{key}.seeds[{i}]", f"is {s}; a seed must be in 0..{MAX_SEED}")
        n_trials = table.get("n_trials", 0)
        if not _is(n_trials, int) or n_trials < 0:
            self.fail(f"{key}.n_trials", "must be a non-negative int")
        if sampler == "tpe" and n_trials < 1:
            self.fail(f"{key}.n_trials", 'is required (≥ 1) for sampler = "tpe"')
        if sampler == "grid" and "n_trials" in table:  # it was ignored: the grid ran every point anyway
            self.fail(
                f"{key}.n_trials",
                'is for sampler = "tpe"; a grid runs every configuration x seed: remove it (`ffablate study '
                "--n-trials N` runs at most N trials now, the rest on the next run)",
            )
        axes = (
            self.axes(table.get("axes", {}), f"{key}.axes")
            if isinstance(table.get("axes", {}), dict)
            else self.fail(f"{key}.axes", "must be a table")
        )
        return Budget(name, settings, list(seeds), n_trials, axes)

    def distribution(self, d: Any, key: str, k: str) -> dict[str, Any]:
        """The search distribution of setting ``k``. Whatever it can draw must be a value ``k`` takes: a trial
        handed a string lr, or a float epochs (truncated), would fail for good or run something else. The
        range itself is checked per configuration at both ends (``Plan.configurations``)."""
        if isinstance(d, dict) and "type" not in d:
            self.not_dotted(k, d, key)
        self.setting_key(k, key)
        if not isinstance(d, dict):
            self.fail(key, 'must be a table like {type = "float", low = 1e-4, high = 1e-2, log = true}')
        kind = self.choice(d, "type", tuple(SPACE_KEYS), "", key=key)
        self.no_unknown(d, SPACE_KEYS[kind], key)
        if kind == "categorical":
            choices = self.get(d, "choices", list, required=True, key=key)
            if not choices:
                self.fail(f"{key}.choices", "must not be empty")
            for i, value in enumerate(choices):
                self.value(k, value, f"{key}.choices[{i}]")
            return dict(d)
        if "." not in k:
            want = type(getattr(RunConfig(), k))
            if want not in (int, float):
                self.fail(key, f'searches {k}, which takes {_a(want)}: use type = "categorical" with choices')
            if want is int and kind == "float":
                self.fail(key, f'searches {k}, which takes an int: use type = "int" (a float would be truncated)')
        num = float if kind == "float" else int
        low = self.get(d, "low", num, required=True, key=key)
        high = self.get(d, "high", num, required=True, key=key)
        if not low < high:
            self.fail(key, f"needs low < high, got {low} and {high}")
        if self.get(d, "log", bool, default=False, key=key) and low <= 0:
            self.fail(f"{key}.low", "must be positive when log = true")
        return dict(d)


def _space_values(dist: dict[str, Any]) -> list[Any]:
    """A distribution's choices, or the two ends of its range as the type its trials draw."""
    if dist["type"] == "categorical":
        return list(dist["choices"])
    cast = float if dist["type"] == "float" else int
    return [cast(dist["low"]), cast(dist["high"])]


def _join(key: str, k: str) -> str:
    return f"{key}.{k}" if key else k


# An unquoted dotted key at the start of a line: `temperature.start = 2.0`, which TOML reads as a table.
_UNQUOTED_DOTTED = re.compile(r"^\s*([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\s*=")


def _quoted(kind: str, param: str) -> str:
    """The key to write instead of an unquoted ``kind.param`` (``dataset.size`` means the kind ``datasets``)."""
    return f'"{"datasets" if kind == "dataset" else kind}.{param}" = ...'


def _toml_hint(text: str, message: str) -> str:
    """A hint for a TOML error on a line that holds an unquoted plugin-parameter key, e.g. `temperature.start = 2`
    after `temperature = "cosine"` ("Cannot overwrite a value")."""
    line = re.search(r"at line (\d+)", message)
    lines = text.splitlines()
    if not line or not 1 <= int(line.group(1)) <= len(lines):
        return ""
    dotted = _UNQUOTED_DOTTED.match(lines[int(line.group(1)) - 1])
    if not dotted or dotted.group(1).rstrip("s") not in {k.rstrip("s") for k in PLUGIN_KINDS}:
        return ""
    return f"; a plugin parameter's key must be quoted: {_quoted(dotted.group(1), dotted.group(2))}"


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _a(kind: type) -> str:
    return {
        int: "an int",
        float: "a number",
        str: "a string",
        bool: "a boolean (true/false)",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


# ----------------------------------------------------------------------------------------------------
# Resolving a budget into cells


def is_recipe_key(key: str) -> bool:
    """A setting of the FF recipe: a recipe key or a parameter of a recipe plugin kind ("temperature.start")."""
    return key in RECIPE_KEYS or ("." in key and key.split(".", 1)[0] in RECIPE_PLUGIN_KINDS)


def _is_ff_only(key: str) -> bool:
    return key in FF_ONLY or ("." in key and key.split(".", 1)[0] in FF_ONLY)


def _shared_by_design(key: str) -> bool:
    """Whether FF and its baseline must run ``key`` (a setting or a plugin's "kind.param") at the same value."""
    return not _is_ff_only(key) and key.split(".", 1)[0] not in BASELINE_OWN_KEYS


def _check_shared_by_design(
    v: _Validator, groups: list[Group], match: list[str] | None, space: dict[str, Any], space_plugins: list[str]
) -> None:
    """Refuses a spec whose baseline would train another network than the FF configuration it is compared with.
    A ``match`` that left out ``channels`` compared every FF width with one baseline at the default width, and a
    searched width has no baseline of its own for each value TPE draws."""
    shared = "part of the network FF and its baseline share (backbone, data, augmentation, epochs)"
    if match is not None:
        varied = {k for g in groups for k in [*g.set, *g.axes, *(k for s in g.budgets.values() for k in s)]}
        for key in sorted(k for k in varied if _shared_by_design(k) and k not in match):
            v.fail(
                "baseline.match",
                f'leaves out {key!r}, {shared}, which the FF configurations set; add "{key}" to it or leave match out',
            )
    for key in space:
        if _shared_by_design(key):
            v.fail(
                f"space.{_toml_key(key)}",
                f"is {shared}, and a search draws values no baseline ran at; sweep it as an [axes] key (each level "
                "gets its baseline) or fix it in [base]",
            )
    for key in space_plugins:
        if _shared_by_design(key):
            v.fail(
                "space.plugins", f"searches {key}, {shared}; sweep its parameters as [axes] keys or fix them in [base]"
            )


def at_base(key: str, base: dict[str, Any]) -> str:
    """What setting ``key`` runs at under ``base`` (a budget's shared settings), in words: "lr=0.003"."""
    value = base.get(key, getattr(RunConfig(), key, None))
    return f"{key}={value}" if value is not None else f"{key} at its base value"


def _toml_key(key: str) -> str:
    """``key`` as a TOML table key: a dotted plugin parameter must be quoted, or TOML reads it as nested tables."""
    return f'"{key}"' if "." in key else key


def _label(items: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in items.items())


def _dataset_params(settings: dict[str, Any]) -> dict[str, Any]:
    """The dataset plugin parameters among a group's settings ("datasets.path" -> path)."""
    return {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("datasets.")}


def _plan(spec: Spec, budget_name: str, available: Available) -> Plan:
    if budget_name not in spec.budgets:
        raise SpecError(f"{spec.path}: no budget {budget_name!r}; budgets: {', '.join(BUDGETS)}")
    budget = spec.budgets[budget_name]
    base = {**spec.base, **budget.settings}
    ff_cells: list[Cell] = []
    baselines: dict[str, Cell] = {}
    notes: list[str] = []
    for g in spec.groups:
        group_set = {**g.set, **g.budgets.get(budget_name, {})}
        dataset = group_set.get("dataset", base.get("dataset", RunConfig.dataset))
        params = _dataset_params({**base, **group_set})
        # A dataset parameter varied by an axis (datasets.path) is judged by each run's loader, not here.
        judged = not any(k.startswith("datasets.") for k in g.axes)
        if judged and not available(dataset, params):
            notes.append(
                f"skipped {g.label or 'the study'}: dataset {dataset!r} is not available here "
                f"(see `ffablate data list`)"
            )
            continue
        # A budget's axes pick a subset of each group's levels (e.g. fewer K for smoke), never add new ones.
        axes = {k: [x for x in values if k not in budget.axes or x in budget.axes[k]] for k, values in g.axes.items()}
        if "dataset" in axes:  # an axis over datasets keeps those the user has, and says which it dropped
            missing = [d for d in axes["dataset"] if judged and not available(d, params)]
            if missing:
                notes.append(f"skipped dataset(s) {', '.join(missing)}: not available here (see `ffablate data list`)")
            axes["dataset"] = [d for d in axes["dataset"] if d not in missing]
        for combo in _product(axes):
            overrides = {**group_set, **combo}
            match_keys = spec.baseline_match
            if match_keys is None:
                match = {k: v for k, v in overrides.items() if not _is_ff_only(k)}
            else:
                match = {k: v for k, v in overrides.items() if k in match_keys}
            shown = {k: v for k, v in combo.items()}
            label = " ".join(x for x in (g.label, _label(shown)) if x) or "ff"
            match_json = json.dumps(match, sort_keys=True)
            ff_cells.append(Cell(label, "ff", g.label, {**overrides, "method": "ff"}, match_json))
            for method in spec.baseline_methods:
                shared = {k: v for k, v in combo.items() if k in match}
                # One baseline per level of the settings it is tuned on, all matched to the same FF cells.
                for level in _product(spec.baseline_levels):
                    parts = (method, g.label if _group_is_data(g) else "", _label(shared), _label(level))
                    key = f"{method}|{match_json}|{json.dumps(level, sort_keys=True)}"
                    if key not in baselines:
                        baselines[key] = Cell(
                            " ".join(x for x in parts if x),
                            "baseline",
                            g.label if _group_is_data(g) else "",
                            {**match, **level, "method": method},
                            match_json,
                        )
    cells = list(baselines.values()) + ff_cells
    seen: set[str] = set()
    for cell in cells:
        if cell.label in seen:
            raise SpecError(
                f"{spec.path}: two configurations are both labelled {cell.label!r}; give the groups distinct labels"
            )
        seen.add(cell.label)
    if not ff_cells:  # a search too: its trials sample the planned FF cells
        raise SpecError(f"{spec.path}: nothing to run at budget {budget_name}: " + "; ".join(notes or ["no axes"]))
    plan = Plan(spec, budget, base, cells, notes)
    _check_configs(plan)
    return plan


def _check_configs(plan: Plan) -> None:
    """Every configuration must make a valid RunConfig before any training starts."""
    from ffablate.plugins import registry

    for cell in plan.configurations():
        try:
            config = RunConfig().with_updates({**plan.base_for(cell.overrides), **cell.overrides})
            for kind in PLUGIN_KINDS:  # plugin parameters: known to the chosen plugin, of the right type
                name = config.dataset if kind == "datasets" else getattr(config, kind)
                registry().get(kind, name).checked_params(config.params_of(kind))
        except FFablateError as exc:
            raise plan.error(cell, exc) from None


def _group_is_data(g: Group) -> bool:
    """A group whose fixed settings change the data or backbone gets its own baseline label."""
    return any(not _is_ff_only(k) for k in g.set)


def _product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for k, values in axes.items():
        combos = [{**c, k: v} for c in combos for v in values]
    return combos
