"""The plugin registry: built-ins first (registered as ordinary plugins), then the ``ffablate`` entry points."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pluggy

from ffablate import hookspecs
from ffablate.config import SPACE_KEYS, RunConfig, did_you_mean
from ffablate.errors import (
    ConfigError,
    DataError,
    FFablateError,
    FFablateWarning,
    UnknownPlugin,
    described,
    first_line,
)

KINDS = ("goodness", "temperature", "norm", "loss", "negatives", "fusion", "datasets")
BUILTIN_MODULES = [f"ffablate.builtin.{kind}" for kind in KINDS]
HOOKS = [f"ffablate_register_{kind}" for kind in KINDS]
# The types a parameter may take: what --set text and a spec's TOML give, and what JSON (a run's record) holds.
SCALARS = (bool, int, float, str)
# What a plugin's own code raises when it is wrong, whatever the files hold (NameError: UnboundLocalError too).
CODE_ERRORS = (TypeError, AttributeError, NameError)


@dataclass(frozen=True)
class Plugin:
    kind: str
    name: str
    factory: Callable[..., Any]
    description: str
    source: str
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """The factory's tunable keyword parameters and their defaults."""
        return _params_of(self.kind, self.factory)

    @property
    def label(self) -> str:
        """How messages name the plugin: kind, name and where it comes from."""
        origin = "built-in" if self.source == "ffablate" else f"package {self.source}"
        return f"{self.kind} plugin {self.name!r} ({origin})"

    def create(self, params: dict[str, Any] | None = None, **context: Any) -> Any:
        params = self.checked_params(params)
        try:
            return self.factory(**context, **params)
        except (FFablateError, MemoryError):
            raise
        except Exception as exc:
            if self.source == "ffablate":
                raise  # a built-in that fails on its own is ffablate's bug: its traceback is what a report needs
            if self.kind == "datasets":
                # The same for every run on these files, whether they or the plugin's code are at fault: a DataError
                # stops a study, which retries the trial once they are fixed, instead of failing each one.
                fix = (
                    "fix the plugin (an error in its code, not in the files)"
                    if isinstance(exc, CODE_ERRORS)
                    else "check the files under --data-root (or the plugin)"
                )
                raise DataError(f"{self.label} could not load its data: {first_line(exc)}; {fix}") from exc
            raise ConfigError(
                f"{self.label} failed to build: {first_line(exc)}; fix the plugin or choose another {self.kind} plugin"
            ) from exc

    def checked_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """``params`` if every one is a parameter of this plugin with a value of its default's type."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ConfigError(
                f"{self.kind} plugin {self.name!r} has no parameter {unknown[0]!r}"
                f"{did_you_mean(unknown[0], self.params)}; its parameters: {known}"
            )
        return {key: self._checked(key, value) for key, value in self.typed_params(params).items()}

    def typed_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with each text value (from ``--set``) read as its parameter's type; others as they are."""
        defaults, param_types = self.params, self.param_types
        return {
            key: _read_text(value, param_types[key], defaults[key] is None)
            if isinstance(value, str) and key in defaults
            else value
            for key, value in params.items()
        }

    @property
    def param_types(self) -> dict[str, type | None]:
        """Each parameter's type (see ``_types_of``)."""
        return _types_of(self.kind, self.factory)

    def _checked(self, key: str, value: Any) -> Any:
        """``value`` if it has the parameter's type (a str parameter takes any scalar as text, a float one any
        finite number, as a float)."""
        default, type_ = self.params[key], self.param_types[key]
        want = _refusal(value, type_, default)
        if want is not None:
            example = "none" if default is None else default
            raise ConfigError(
                f"{self.kind} plugin {self.name!r}: parameter {key!r} takes {want}, got {value!r} "
                f"(e.g. --set {self.kind}.{key}={example})"
            )
        if value is None:
            return value
        # 2 from --set or TOML: a plugin may build a float tensor from a float parameter.
        return float(value) if type_ is float else str(value) if type_ is str else value


def typed_plugin_params(config: RunConfig, plugins: Registry) -> RunConfig:
    """``config`` with its ``--set`` (or spec) plugin parameters read as their types, so that a run's recorded
    config holds 2.0 where the text said "2". A plugin that is not installed is left for the trainer to name."""
    params = {}
    for kind, values in config.plugin_params.items():
        name = config.plugin_of(kind)
        known = name in plugins.names(kind)
        params[kind] = plugins.get(kind, name).typed_params(values) if known else dict(values)
    return dataclasses.replace(config, plugin_params=params)


def used_params(config: RunConfig, plugins: Registry, kinds: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every parameter of the run's ``kinds`` plugins, the defaults included: what a rerun needs, since a plugin's
    default may change between versions while the run's config names only the values it set."""
    return {kind: {**plugins.get(kind, config.plugin_of(kind)).params, **config.params_of(kind)} for kind in kinds}


def plugin_sources(config: RunConfig, plugins: Registry, kinds: tuple[str, ...]) -> dict[str, str]:
    """``{kind: "name from package version"}`` for the run's ``kinds`` plugins that are not ffablate's own (whose
    version the run records already); a module named in FFABLATE_PLUGINS has no package version to give."""
    out = {}
    for kind in kinds:
        plugin = plugins.get(kind, config.plugin_of(kind))
        if plugin.source == "ffablate":
            continue
        out[kind] = f"{plugin.name} from {plugin.source} {package_version(plugin.source) or '(no package version)'}"
    return out


def package_version(source: str) -> str | None:
    """The installed version of a plugin's package ``source``; None where the source is a module, not a package
    (one named in FFABLATE_PLUGINS, or an in-process plugin)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(source)
    except PackageNotFoundError:
        return None


def _refusal(value: Any, type_: type | None, default: Any) -> str | None:
    """None if a parameter of ``type_`` (None: not known) whose default is ``default`` takes ``value``, else what it
    does take, for the message. A None default makes None one of its values."""
    if value is None and default is None:
        return None
    if type_ is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif type_ is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif type_ is float:
        # inf or nan would train, into NaN losses whose message blames the learning rate (unless the
        # plugin's own default is infinite, e.g. "no clip").
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        no_limit = isinstance(default, float) and math.isinf(default)
        ok, want = number and (no_limit or _finite(value)), "a finite number"
    else:
        # A run's record and Optuna's storage are JSON: a value of another type (a list from a TOML spec) would
        # reach the factory unchecked and then fail to store.
        ok = type(value) in SCALARS
        want = "text" if type_ is str else "a number, true/false or text"
    if ok:
        return None
    return f"{want}, or none" if default is None else want


def _read_text(text: str, type_: type | None, nullable: bool) -> Any:
    """``--set`` text for a parameter of ``type_`` (None: unknown): a str one keeps it as given ("007", a folder
    named "2024_01"); none/null is None, except for a str parameter whose default is not None; a bool one reads
    true/false, yes/no, 1/0 as the run settings do; a float one a float; any other an int, then a float, then
    true/false. Text that reads as none of them stays text, for ``_checked`` to refuse."""
    # A default of None ("no clip") must be expressible, and 'none' is no str.
    if text.lower() in ("none", "null") and (nullable or type_ is not str):
        return None
    if type_ is str:
        return text
    if type_ is bool:
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower(), text)
    for cast in (float,) if type_ is float else (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class Registry:
    """All plugins of all kinds, collected once from a pluggy PluginManager."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._plugins: dict[str, dict[str, Plugin]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            caller = getattr(pm.hook, f"ffablate_register_{kind}")
            # Hook implementations are called one by one so that every registration knows its source package.
            for impl in reversed(caller.get_hookimpls()):
                self._run_hook(kind, impl)

    def _run_hook(self, kind: str, impl: pluggy.HookImpl) -> None:
        try:
            impl.function(register=self._register_callback(kind, impl.plugin))
        except FFablateError:
            raise
        except Exception as exc:  # the plugin's own code: name it instead of a traceback through ffablate
            raise ConfigError(
                f"{_where(impl.plugin)} fails in its hook {impl.function.__name__}: {first_line(exc)}; "
                "fix the plugin or uninstall its package"
            ) from exc

    def _register_callback(self, kind: str, plugin: object) -> Callable[..., None]:
        source = _source_of(self.pm, plugin)

        def register(
            name: str,
            factory: Callable[..., Any],
            # None only so that a call without a description gets a one-line error rather than a TypeError.
            description: str | None = None,
            space: dict[str, dict[str, Any]] | None = None,
        ) -> None:
            _check_registration(kind, name, factory, description, plugin)
            existing = self._plugins[kind].get(name)
            if existing is not None:
                raise ConfigError(
                    f"{kind} plugin {name!r} is registered twice ({existing.source} and {source}); "
                    "uninstall one or rename it"
                )
            space = {} if space is None else space
            _check_space(kind, name, factory, space, plugin)
            self._plugins[kind][name] = Plugin(kind, name, factory, description, source, dict(space))

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[_check_kind(kind)])

    def all(self, kind: str | None = None) -> list[Plugin]:
        kinds = KINDS if kind is None else (_check_kind(kind),)
        return [self._plugins[k][n] for k in kinds for n in sorted(self._plugins[k])]

    def get(self, kind: str, name: str) -> Plugin:
        plugins = self._plugins[_check_kind(kind)]
        if name not in plugins:
            hint = unknown_hint(name, plugins)
            known = ", ".join(f"{p.name} [{p.source}]" for p in self.all(kind))
            raise UnknownPlugin(f"unknown {kind} plugin {name!r}{hint}; known: {known}")
        return plugins[name]

    def create(self, kind: str, name: str, params: dict[str, Any] | None = None, **context: Any) -> Any:
        return self.get(kind, name).create(params, **context)


def unknown_hint(name: str, known: Iterable[str]) -> str:
    """What to say of a plugin name nothing registered: a near name may be a typo, or a plugin of the user's own
    that this process did not load beside a built-in of a similar name (a stored study's 'shifted-label' beside
    'hardest-label'), so both hints where there is a near name."""
    own = "your own? install its package, or name its module in FFABLATE_PLUGINS"
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}? or {own})" if close else f" ({own})"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownPlugin(f"unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
    return kind


# What the trainer passes each kind's factory by keyword (hookspecs.py); any other argument needs a default.
CONTEXT_ARGS = {
    "norm": ("num_features",),
    "fusion": ("num_layers", "num_classes", "feature_dims"),
    "datasets": ("roots", "download"),
}


# What each kind's built plugin is called with (hookspecs.py): a factory that asks for these is the plugin itself.
CALL_ARGS = {
    "goodness": ("paths",),
    "loss": ("g_pos", "g_neg", "labels", "threshold", "temperature"),
    "temperature": ("progress",),
    "fusion": ("scores", "features"),
}


def _required_args(kind: str, factory: Callable[..., Any]) -> list[str]:
    """The factory's arguments without a default that the trainer does not pass: a run could never build it."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature (some builtins): nothing to check
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in CONTEXT_ARGS.get(kind, ())
    ]


def _parameters(kind: str, factory: Callable[..., Any]) -> list[inspect.Parameter]:
    """The factory's keyword parameters with defaults (``**kwargs`` names none: nothing says what it takes). An
    argument ffablate passes (``CONTEXT_ARGS``) is not one, default or not: listed, it was recorded at its default
    while the run passed another value, and setting it clashed with the passed one."""
    return [
        p
        for p in inspect.signature(factory).parameters.values()
        if p.default is not inspect.Parameter.empty
        and p.kind is not p.VAR_KEYWORD
        and p.name not in CONTEXT_ARGS.get(kind, ())
    ]


def _params_of(kind: str, factory: Callable[..., Any]) -> dict[str, Any]:
    """The factory's parameters and their defaults."""
    return {p.name: _as_annotated(p) for p in _parameters(kind, factory)}


def _types_of(kind: str, factory: Callable[..., Any]) -> dict[str, type | None]:
    """Each parameter's type: its default's, or for a None default the one its annotation names beside None
    (``clip: float | None = None``); None where nothing names one."""
    return {
        p.name: _annotated_scalar(p.annotation) if p.default is None else type(_as_annotated(p))
        for p in _parameters(kind, factory)
    }


def _as_annotated(p: inspect.Parameter) -> Any:
    """``p``'s default, as a float where it is annotated ``float`` but written as an integer (``p: float = 3``):
    the parameter's type is read from its default, and 3 made it an integer parameter that refused 2.5."""
    float_annotated = p.annotation is float or p.annotation == "float"
    if float_annotated and isinstance(p.default, int) and not isinstance(p.default, bool):
        return float(p.default)
    return p.default


def _annotated_scalar(annotation: Any) -> type | None:
    """The one scalar type an annotation names beside None: ``float | None`` or ``Optional[float]``, as objects
    or as the text ``from __future__ import annotations`` leaves."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").removeprefix("typing.")
        if text.startswith("Optional[") and text.endswith("]"):
            text = text[len("Optional[") : -1]
        names = set(text.split("|")) - {"None"}
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        names = {getattr(arg, "__name__", "") for arg in typing.get_args(annotation)} - {"NoneType"}
    else:
        names = {getattr(annotation, "__name__", "")}
    by_name = {t.__name__: t for t in SCALARS}
    return by_name.get(names.pop()) if len(names) == 1 else None


def _registration_error(kind: str, name: str, plugin: object, problem: str) -> ConfigError:
    return ConfigError(f"{kind} plugin {name!r} registered by {_where(plugin)}: {problem}")


def _check_registration(
    kind: str, name: str, factory: Callable[..., Any], description: str | None, plugin: object
) -> None:
    # Users type the name in --set kind=name and in a spec's comma-separated lists; an int one also broke sorting
    # the registry, so every command failed.
    if not isinstance(name, str) or not name or any(c.isspace() or c in "=," for c in name):
        raise _registration_error(
            kind,
            name,
            plugin,
            f"its name must be non-empty text without spaces, '=' or ',', as users type it in --set {kind}=NAME: "
            'e.g. register("my-name", factory, description)',
        )
    if not callable(factory):
        raise _registration_error(
            kind,
            name,
            plugin,
            f"its factory is {factory!r}, which is not callable; "
            "pass the class or function that builds the plugin: register(name, factory, description)",
        )
    if not isinstance(description, str) or not description.strip():
        raise _registration_error(
            kind, name, plugin, 'give it a one-line description: register(name, factory, "what it does")'
        )
    required = _required_args(kind, factory)
    if required and required[0] in CALL_ARGS.get(kind, ()):
        raise _registration_error(
            kind,
            name,
            plugin,
            f"its factory takes {required[0]!r}, an argument of the {kind} call itself: register a factory that "
            f"returns the {kind} (a class, or e.g. lambda: your_function), not the {kind} function",
        )
    if required:
        passed = ", ".join(CONTEXT_ARGS.get(kind, ())) or "no argument"
        raise _registration_error(
            kind,
            name,
            plugin,
            f"its factory's argument {required[0]!r} has no default: give it one (parameters are the keyword "
            f"arguments with defaults, set with --set {kind}.{required[0]}=...; ffablate passes {passed} itself)",
        )
    for key, default in _params_of(kind, factory).items():
        if default is not None and type(default) not in SCALARS:
            raise _registration_error(
                kind,
                name,
                plugin,
                f"its parameter {key!r} defaults to {described(default)}, which --set cannot give: default it to a "
                "bool, int, float or str (or None) and convert that in the factory",
            )


def _check_space(kind: str, name: str, factory: Callable[..., Any], space: object, plugin: object) -> None:
    """Refuse at start-up a search space that a study would only trip over (or silently ignore) later."""
    if not isinstance(space, dict):
        raise _registration_error(
            kind, name, plugin, f"space must be a dict {{param: spec}}, got {type(space).__name__}"
        )
    params, param_types = _params_of(kind, factory), _types_of(kind, factory)
    for param, spec in space.items():
        problem = _space_problem(param, spec, params, param_types)
        if problem is not None:
            raise _registration_error(kind, name, plugin, f"search space of {param!r} {problem}")


def _space_problem(param: str, spec: object, params: dict[str, Any], param_types: dict[str, type | None]) -> str | None:
    if param not in params:
        known = ", ".join(sorted(params)) or "none (**kwargs declares none)"
        return f"names no parameter of its factory; its parameters (keyword arguments with defaults): {known}"
    if not isinstance(spec, dict) or spec.get("type") not in SPACE_KEYS:
        return f'needs a dict whose "type" is one of {", ".join(SPACE_KEYS)}'
    allowed = SPACE_KEYS[spec["type"]]
    unknown = sorted(map(str, set(spec) - allowed))
    if unknown:
        return f"has unknown key {unknown[0]!r}; a {spec['type']} space takes {', '.join(sorted(allowed))}"
    # A value the parameter cannot take would only fail at a study's preflight, where it reads as the spec's fault.
    default, type_ = params[param], param_types[param]
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            return "needs a non-empty list of choices"
        for choice in choices:
            # A text choice is read as --set text is, as the trial's value will be.
            value = _read_text(choice, type_, default is None) if isinstance(choice, str) else choice
            want = _refusal(value, type_, default)
            if want is not None:
                return f"has the choice {choice!r}, but the parameter takes {want} (default {default!r})"
        return None
    if type_ in (bool, str):
        takes = "true or false" if type_ is bool else "text"
        return f'is a numeric range, but the parameter takes {takes} (default {default!r}): use type = "categorical"'
    if spec["type"] == "float" and type_ is int:
        return f'is a float range, but the parameter takes an integer (default {default}): use type = "int"'
    return _range_problem(spec)


def _range_problem(spec: dict[str, Any]) -> str | None:
    """Optuna's rules for a numeric range, checked here so that a study does not fail on its first trial."""
    number = int if spec["type"] == "int" else (int, float)
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        want = "integer" if spec["type"] == "int" else "finite numeric"
        return f"needs {want} low and high, got low={low!r}, high={high!r}"
    if not low < high:
        return f"needs low < high (one value is nothing to search), got low={low}, high={high}"
    log = spec.get("log", False)
    if not isinstance(log, bool):
        return f"needs log True or False, got {log!r}"
    if log and low <= 0:
        return f"needs low > 0 when log is True, got low={low}"
    return None


def _module_of(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _source_of(pm: pluggy.PluginManager, plugin: object) -> str:
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return dist.project_name
    module = _module_of(plugin)
    return "ffablate" if module.startswith("ffablate.") else module


def _where(plugin: object) -> str:
    """How a message names a plugin module: its entry point and package when installed. For error paths only: it
    reads every installed distribution's metadata."""
    from importlib.metadata import entry_points

    module = _module_of(plugin)
    for ep in entry_points(group="ffablate"):
        if ep.module == module:
            package = ep.dist.name if ep.dist is not None else "unknown"
            return f"the ffablate plugin {ep.name!r} (module {module}, package {package})"
    return f"the plugin {'module ' if isinstance(plugin, types.ModuleType) else ''}{module}"


def make_plugin_manager(extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """Built-ins, then installed entry points, then the modules named in $FFABLATE_PLUGINS, then ``extra_plugins``
    (e.g. a test's in-memory plugin)."""
    import importlib

    pm = pluggy.PluginManager("ffablate")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_MODULES:
        pm.register(importlib.import_module(module_name), name=module_name)
    try:
        _load_entry_points(pm)
        for plugin in _env_plugin_modules():
            if not pm.is_registered(plugin):  # also installed as an entry point (say, after `pip install -e`)
                pm.register(plugin)
        for plugin in extra_plugins:
            pm.register(plugin)
        pm.check_pending()  # a misspelled hook name fails here, not silently
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"{_where(exc.plugin)} {_hook_mistake(exc)}") from None
    _check_registers_something(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    try:
        pm.load_setuptools_entrypoints("ffablate")
    except pluggy.PluginValidationError:
        raise  # a hook mistake, worded by the caller like the ones found in in-process plugins
    except Exception as exc:  # an installed plugin that fails to import: name it instead of a traceback
        raise ConfigError(_broken_entry_point(exc)) from None


def _env_plugin_modules() -> list[types.ModuleType]:
    """The modules $FFABLATE_PLUGINS names (comma-separated, importable from sys.path / PYTHONPATH): a plugin in
    the making, used without packaging and installing it."""
    import importlib

    modules = []
    names = dict.fromkeys(filter(None, (part.strip() for part in os.environ.get("FFABLATE_PLUGINS", "").split(","))))
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:
            raise ConfigError(
                f"FFABLATE_PLUGINS names {name!r}, which fails to import: {first_line(exc)}; put the directory "
                "that holds it on PYTHONPATH, or fix it"
            ) from None
    return modules


def _hook_mistake(exc: pluggy.PluginValidationError) -> str:
    """What is wrong with a plugin's hooks, on one line (pluggy's message spans several and repeats the module)."""
    for attr in dir(exc.plugin):
        hook = getattr(exc.plugin, attr, None)
        if getattr(hook, "ffablate_impl", None) is None:
            continue
        if attr not in HOOKS:
            return (
                f"implements {attr}, a hook ffablate does not define{did_you_mean(attr, HOOKS)}; "
                "rename it to a hook of ffablate.hookspecs or uninstall the plugin"
            )
        args = list(inspect.signature(hook).parameters)
        if set(args) - {"register"}:
            return f"defines {attr}({', '.join(args)}): its argument must be named `register`, as in {attr}(register)"
    return f"has an invalid hook: {first_line(exc)}; see ffablate/hookspecs.py"


_warned_empty: set[str] = set()


def _check_registers_something(pm: pluggy.PluginManager) -> None:
    """A plugin whose hook functions lack the decorator would otherwise be ignored without a word, and
    ``--set goodness=mine`` would then say only that no such plugin exists."""
    builtins = {pm.get_plugin(name) for name in BUILTIN_MODULES}
    for plugin in pm.get_plugins():
        if plugin in builtins:
            continue
        hooks = [getattr(plugin, attr, None) for attr in HOOKS]
        undecorated = [a for a, h in zip(HOOKS, hooks, strict=True) if callable(h) and not hasattr(h, "ffablate_impl")]
        if undecorated:
            raise ConfigError(
                f"{_where(plugin)} defines {undecorated[0]} without @hookimpl, so ffablate cannot see it: "
                "decorate it (`from ffablate import hookimpl`)"
            )
        name = pm.get_name(plugin)
        if pm.get_hookcallers(plugin):
            continue
        if name not in _warned_empty:
            _warned_empty.add(name)
            warnings.warn(
                f"{_where(plugin)} registers nothing: it defines none of ffablate's hooks ({', '.join(HOOKS)})",
                FFablateWarning,
                stacklevel=3,
            )


def _broken_entry_point(exc: Exception) -> str:
    """One line naming the ``ffablate`` entry point that fails to load (loaded again, one by one, to find it)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="ffablate"):
        try:
            ep.load()
        except Exception as ep_exc:
            package = ep.dist.name if ep.dist is not None else ep.value
            return (
                f"the installed ffablate plugin {ep.name!r} ({ep.value}, package {package}) fails to import: "
                f"{first_line(ep_exc)}; fix its installation or `pip uninstall {package}`"
            )
    return f"loading the installed ffablate plugins failed: {first_line(exc)}; reinstall or uninstall the plugin"


_extra: list[object] = []


@cache
def _default_registry() -> Registry:
    return Registry(make_plugin_manager(tuple(_extra)))


def registry() -> Registry:
    """The process-wide registry (built once)."""
    return _default_registry()


def add_plugin(plugin: object) -> None:
    """Register an in-process plugin object or module (tests, notebooks); rebuilds the registry."""
    _extra.append(plugin)
    _default_registry.cache_clear()


def remove_plugin(plugin: object) -> None:
    _extra.remove(plugin)
    _default_registry.cache_clear()
