"""One run's fully resolved configuration, and ``--set KEY=VALUE`` parsing with errors that say what to do."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ffablate.errors import ConfigError

METHODS = ("ff", "ff-ga", "bp", "bp-deepsup", "bp-ga", "bp-ckpt")
FF_METHODS = ("ff", "ff-ga")
PLUGIN_KINDS = ("goodness", "temperature", "norm", "loss", "negatives", "fusion", "datasets")
# The keys of each search-space type, in a spec's [space] and a plugin's declared space alike: what
# ``study.suggest`` reads, so nothing declared is silently ignored.
SPACE_KEYS = {
    "float": {"type", "low", "high", "log"},
    "int": {"type", "low", "high", "log"},
    "categorical": {"type", "choices"},
}
MAX_SEED = 2**32 - 1  # numpy's seed range: seed_everything seeds numpy too


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the nearest known word, or ""."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class RunConfig:
    method: str = "ff"
    dataset: str = "fashion-mnist"
    classes: int = 0  # 0 = all classes, else the first K
    labels: str = "fine"  # "coarse" maps to the dataset's label hierarchy
    limit_train: int = 0  # 0 = the whole training split
    limit_test: int = 0  # 0 = the whole test split, else a fixed stratified subset (quick study budgets)
    val_images: int = 0  # > 0: hold out this many training images (fixed, stratified) to select and prune on
    backbone: str = "cnn"  # "cnn" (conv blocks) or "mlp" (Hinton's fully connected setting)
    channels: str = "32,64,128"  # per-block widths; its length is the depth
    strides: str = "2,2,2"  # per-block: 2 downsamples with a max-pool after the conv
    epochs: int = 16
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0  # AdamW decay of kernels and weight matrices only (not biases, gains, T, fusion scalars)
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    threshold: float = 2.0  # goodness threshold theta of the threshold losses
    schedule: str = "simultaneous"  # FF layer schedule: "simultaneous" or "greedy"
    micro_batch: int = 32  # ff-ga and bp-ga: micro-batch size accumulated up to batch_size
    goodness: str = "classwise"
    temperature: str = "constant"
    norm: str = "coupled-bn"
    loss: str = "classwise-ce"
    negatives: str = "none"
    fusion: str = "last"
    plugin_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return _int_list(self.channels, "channels")

    @property
    def stride_list(self) -> list[int]:
        strides = _int_list(self.strides, "strides")
        if len(strides) == 1:
            strides = strides * len(self.widths)
        if len(strides) != len(self.widths):
            raise ConfigError(
                f"strides has {len(strides)} entries but channels has {len(self.widths)}; give one per block"
            )
        if max(strides) > 2:
            raise ConfigError(f"strides must be 1 or 2 per block (2 adds a 2x2 max-pool), got {self.strides!r}")
        return strides

    def params_of(self, kind: str) -> dict[str, Any]:
        return dict(self.plugin_params.get(kind, {}))

    def plugin_of(self, kind: str) -> str:
        """The name of the ``kind`` plugin this run uses: its dataset for "datasets", else the setting itself."""
        return self.dataset if kind == "datasets" else getattr(self, kind)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        flat = out.pop("plugin_params")
        for kind, params in sorted(flat.items()):
            for key, value in sorted(params.items()):
                out[f"{kind}.{key}"] = value
        return out

    def with_updates(self, updates: dict[str, Any]) -> RunConfig:
        new = dataclasses.replace(self, plugin_params={k: dict(v) for k, v in self.plugin_params.items()})
        for key, value in updates.items():
            new._set(key, value)
        new.validate()
        return new

    def _set(self, key: str, value: Any) -> None:
        if "." in key:
            kind, param = key.split(".", 1)
            if kind not in PLUGIN_KINDS:
                kinds = ", ".join(PLUGIN_KINDS)
                raise ConfigError(
                    f"--set {key}: {kind!r} is not a plugin kind{did_you_mean(kind, PLUGIN_KINDS)}; kinds: {kinds}"
                )
            # --set text stays text: only the plugin knows the parameter's type (``Plugin.typed_params``).
            self.plugin_params.setdefault(kind, {})[param] = value
            return
        fields = {f.name: f for f in dataclasses.fields(self) if f.name != "plugin_params"}
        if key not in fields:
            hint = did_you_mean(key, fields)
            raise ConfigError(f"--set {key}: unknown key{hint}; see `ffablate train --help` for the keys")
        setattr(self, key, _coerce(key, value, type(fields[key].default)))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        if self.backbone not in ("cnn", "mlp"):
            raise ConfigError(f"unknown backbone {self.backbone!r}; use cnn or mlp")
        if self.labels not in ("fine", "coarse"):
            raise ConfigError(f"labels must be fine or coarse, not {self.labels!r}")
        if self.schedule not in ("simultaneous", "greedy"):
            raise ConfigError(f"schedule must be simultaneous or greedy, not {self.schedule!r}")
        for key, zero_means in (("limit_train", "all"), ("limit_test", "all"), ("val_images", "none")):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 = {zero_means}), got {getattr(self, key)}")
        for key in ("epochs", "batch_size", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.batch_size % self.micro_batch and self.method in ("ff-ga", "bp-ga"):
            raise ConfigError(f"batch_size {self.batch_size} must be a multiple of micro_batch {self.micro_batch}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed {self.seed} is out of range; give a seed in 0..{MAX_SEED}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        _ = self.widths
        if self.backbone == "cnn":  # an MLP has no strides: the default "2,2,2" must not fail a 2-layer MLP
            _ = self.stride_list


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "temperature.start=2"]`` -> dict; a malformed item is a ConfigError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set lr=0.01)")
        out[key.strip()] = value.strip()  # a key given again overrides: a wrapper's defaults, then the user's
    return out


def _int_list(text: str, key: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{key} must be comma-separated positive integers, got {text!r}")
    return values


def _coerce(key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, str):
        return kind(value)
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        want = {bool: "bool (true or false)", int: "int (e.g. 3)", float: "float (e.g. 0.01)"}.get(kind, kind.__name__)
        raise ConfigError(f"--set {key}={value}: expected {want}") from None
