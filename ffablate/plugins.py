"""The plugin registry: built-ins first (registered as ordinary plugins), then the ``ffablate`` entry points."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pluggy

from ffablate import hookspecs
from ffablate.errors import ConfigError, UnknownPlugin

KINDS = ("goodness", "temperature", "norm", "loss", "negatives", "fusion", "datasets")
BUILTIN_MODULES = [f"ffablate.builtin.{kind}" for kind in KINDS]
_SPACE_TYPES = {"float", "int", "categorical"}


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
        sig = inspect.signature(self.factory)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
        }

    def create(self, params: dict[str, Any] | None = None, **context: Any) -> Any:
        return self.factory(**context, **self.checked_params(params))

    def checked_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """``params`` if every one is a parameter of this plugin with a value of its default's type."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ConfigError(
                f"{self.kind} plugin {self.name!r} has no parameter {unknown[0]!r}; its parameters: {known}"
            )
        return {key: self._checked(key, value) for key, value in params.items()}

    def _checked(self, key: str, value: Any) -> Any:
        """``value`` if it has the type of the parameter's default (a str default takes any scalar as text)."""
        default = self.params[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str) and isinstance(value, (int, float, bool)):
            return str(value)
        else:
            return value
        if not ok:
            raise ConfigError(
                f"{self.kind} plugin {self.name!r}: parameter {key!r} takes {want}, got {value!r} "
                f"(e.g. --set {self.kind}.{key}={default})"
            )
        return value


class Registry:
    """All plugins of all kinds, collected once from a pluggy PluginManager."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._plugins: dict[str, dict[str, Plugin]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            caller = getattr(pm.hook, f"ffablate_register_{kind}")
            # Hook implementations are called one by one so that every registration knows its source package.
            for impl in reversed(caller.get_hookimpls()):
                impl.function(register=self._register_callback(kind, _source_of(pm, impl.plugin)))

    def _register_callback(self, kind: str, source: str) -> Callable[..., None]:
        def register(
            name: str,
            factory: Callable[..., Any],
            description: str,
            space: dict[str, dict[str, Any]] | None = None,
        ) -> None:
            existing = self._plugins[kind].get(name)
            if existing is not None:
                raise ConfigError(
                    f"{kind} plugin {name!r} is registered twice ({existing.source} and {source}); "
                    "uninstall one or rename it"
                )
            _check_space(kind, name, space or {})
            self._plugins[kind][name] = Plugin(kind, name, factory, description, source, dict(space or {}))

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[_check_kind(kind)])

    def all(self, kind: str | None = None) -> list[Plugin]:
        kinds = KINDS if kind is None else (_check_kind(kind),)
        return [self._plugins[k][n] for k in kinds for n in sorted(self._plugins[k])]

    def get(self, kind: str, name: str) -> Plugin:
        plugins = self._plugins[_check_kind(kind)]
        if name not in plugins:
            close = difflib.get_close_matches(name, plugins, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(f"{p.name} [{p.source}]" for p in self.all(kind))
            raise UnknownPlugin(f"unknown {kind} plugin {name!r}{hint}; known: {known}")
        return plugins[name]

    def create(self, kind: str, name: str, params: dict[str, Any] | None = None, **context: Any) -> Any:
        return self.get(kind, name).create(params, **context)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownPlugin(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    return kind


def _check_space(kind: str, name: str, space: dict[str, dict[str, Any]]) -> None:
    for param, spec in space.items():
        if spec.get("type") not in _SPACE_TYPES:
            raise ConfigError(
                f"{kind} plugin {name!r}: search space of {param!r} needs type one of {sorted(_SPACE_TYPES)}"
            )


def _source_of(pm: pluggy.PluginManager, plugin: object) -> str:
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return dist.project_name
    module = getattr(plugin, "__name__", "")
    return "ffablate" if module.startswith("ffablate.") else module or repr(plugin)


def make_plugin_manager(extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """Built-ins, then installed entry points, then ``extra_plugins`` (e.g. a test's in-memory plugin)."""
    import importlib

    pm = pluggy.PluginManager("ffablate")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_MODULES:
        pm.register(importlib.import_module(module_name), name=module_name)
    try:
        pm.load_setuptools_entrypoints("ffablate")
    except Exception as exc:  # an installed plugin that fails to import: name it instead of a traceback
        raise ConfigError(_broken_entry_point(exc)) from None
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()  # a misspelled hook name fails here, not silently
    except pluggy.PluginValidationError as exc:
        raise ConfigError(
            f"plugin {exc.plugin!r} implements a hook ffablate does not define: {exc}; "
            "rename it to a hook of ffablate.hookspecs or uninstall the plugin"
        ) from None
    return pm


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
                f"{_first_line(ep_exc)}; fix its installation or `pip uninstall {package}`"
            )
    return f"loading the installed ffablate plugins failed: {_first_line(exc)}; reinstall or uninstall the plugin"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


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
