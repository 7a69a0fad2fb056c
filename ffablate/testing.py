"""Conformance checks for a plugin, for its author: ``ffablate plugins KIND NAME --check`` on the command line, or
``ffablate.testing.assert_conforms(KIND, NAME)`` in the plugin's own tests.

A run already refuses a plugin whose output has the wrong type or shape. These checks go on to what a run does not
test, where a wrong plugin still trains to a plausible accuracy:

- a goodness, norm or fusion whose value for one image depends on the other images in its batch (in eval mode),
  so that test accuracy depends on the batch size;
- NaN or infinite values or gradients at all-zero activity (a dead ReLU block) or at extreme goodness;
- a loss that sums over the batch instead of averaging (micro-batches and the batch size would change the step
  size), or whose gradient pushes the right goodness down;
- negatives that return the true label, or an embedding that does not depend on the label;
- a temperature that is not positive and finite over the whole run;
- state that a checkpoint does not keep (a plain attribute, not a parameter or buffer): a saved model then scores
  differently from the run that trained it;
- a run that is not reproducible from its seed, or that a resume (``train --resume``) does not continue as it
  would have gone on (random draws from a generator of the plugin's own, which a checkpoint does not restore).

Every check but the last group runs the plugin on small generated tensors on the CPU, in a second or so. The
training checks train a tiny network on generated data (teacher-student; a dataset plugin's own data for a
dataset) for one epoch, twice, then save it, load it back and score it again; then for two epochs, uninterrupted
and stopped after the first and resumed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ffablate import ops
from ffablate.config import RunConfig
from ffablate.errors import ConfigError, DataNotFound, FFablateError, PluginContractError, described, first_line
from ffablate.model import built_module, checked_paths
from ffablate.paths import NormPaths
from ffablate.plugins import Plugin, Registry, registry
from ffablate.train.common import seed_everything
from ffablate.train.ff import (
    check_goodness,
    check_logits,
    checked_fusion,
    checked_loss,
    checked_temperature,
    embedded_shape,
    flagged,
)

PASS, FAIL, SKIP = "pass", "fail", "skip"
NUM_CLASSES = 4
ACTIVITY = {"conv": (6, 8, 5, 5), "dense": (6, 16)}  # a block's output: (N, C, H, W) and (N, F)
FEATURE_DIMS = [8, 12, 16]  # a fusion's three blocks


@dataclass(frozen=True)
class CheckResult:
    check: str  # what was checked
    outcome: str  # PASS, FAIL or SKIP
    detail: str  # what was seen: the figure behind a pass, the reason for a failure or a skip


class PluginCheckFailed(AssertionError):
    """``assert_conforms`` found a plugin failing a check; the message lists each failure."""


class _Failed(Exception):
    pass


class _Skipped(Exception):
    pass


@dataclass
class _Subject:
    """The plugin under test, built with the parameters given."""

    plugin: Plugin
    params: dict[str, Any]
    plugins: Registry
    data_root: str | None
    # The training checks' first run of each method, which the later ones score and compare with (``_trained``).
    runs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.plugin.label

    def build(self, **context: Any) -> Any:
        return self.plugin.create(self.params, **context)


def check_plugin(
    kind: str,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    plugins: Registry | None = None,
    data_root: str | None = None,
    train: bool = True,
) -> list[CheckResult]:
    """Run every check of ``kind`` on the installed plugin ``name`` built with ``params`` (text values are read as
    the parameters' types, as ``--set`` gives them); ``train=False`` leaves the training checks out. An unknown
    plugin or parameter raises the ConfigError a run would; a plugin's failure is a result, not an exception.
    ``plugins`` (default: the installed ones) serves the plugin under test, the plugins it is checked beside and the
    training checks' dataset."""
    plugins = plugins or registry()
    plugin = plugins.get(kind, name)
    subject = _Subject(plugin, plugin.checked_params(plugin.typed_params(dict(params or {}))), plugins, data_root)
    results: list[CheckResult] = []
    with _random_state_kept():
        _refuse_bad_values(subject)
        for title, check in [*CHECKS[kind], *(TRAINING_CHECKS if train else ())]:
            # The first check is the basic contract, which the others build on; training a plugin that failed a
            # check would fail again, further from the cause.
            blocked = results and (
                results[0].outcome == FAIL or (check in TRAINING and FAIL in {r.outcome for r in results})
            )
            if blocked:
                results.append(CheckResult(title, SKIP, "an earlier check failed"))
            else:
                # From one seed: a plugin's own draws (its initial weights, its negatives) then give the same
                # result whatever the caller drew before and whichever checks ran first.
                seed_everything(0)
                results.append(_run(title, check, subject))
    return results


def assert_conforms(kind: str, name: str, params: dict[str, Any] | None = None, **options: Any) -> list[CheckResult]:
    """``check_plugin``, raising PluginCheckFailed that lists every failed check (for a plugin's own pytest)."""
    results = check_plugin(kind, name, params, **options)
    failed = [r for r in results if r.outcome == FAIL]
    if failed:
        raise PluginCheckFailed("\n".join(f"{r.check}: {r.detail}" for r in failed))
    return results


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's global generators as they were: the checks seed them, as a run does, and
    a plugin author's own tests draw from them after ``assert_conforms``."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _refuse_bad_values(s: _Subject) -> None:
    """Raise the ConfigError a factory raises for the parameter values given (``temperature.t=-1``): the user's
    mistake, which a run reports the same way, not the plugin's. (A dataset's factory loads the data: it is built
    here only when values were given, and its missing files are left to its first check.)"""
    from ffablate.data import default_data_root

    if s.plugin.kind == "datasets" and not s.params:
        return
    context = {
        "norm": {"num_features": ACTIVITY["conv"][1]},
        "fusion": {"num_layers": len(FEATURE_DIMS), "num_classes": NUM_CLASSES, "feature_dims": list(FEATURE_DIMS)},
        "datasets": {"roots": [default_data_root(s.data_root)], "download": False},
    }.get(s.plugin.kind, {})
    try:
        s.plugin.factory(**context, **s.params)
    except ConfigError as exc:
        if isinstance(exc, PluginContractError):
            return
        raise
    except Exception:  # the plugin's own failure, which its first check reports
        return


def _run(title: str, check: Callable[[_Subject], str], subject: _Subject) -> CheckResult:
    try:
        return CheckResult(title, PASS, check(subject))
    except _Skipped as exc:
        return CheckResult(title, SKIP, str(exc))
    except _Failed as exc:
        return CheckResult(title, FAIL, str(exc))
    except DataNotFound:
        raise  # where the data are is the user's to say (--data-root), as for a run
    except FFablateError as exc:  # a contract check of the trainer's, or the plugin's own ConfigError
        return CheckResult(title, FAIL, str(exc).strip().split("\n")[0])
    except Exception as exc:  # the plugin's code raised: that is what its author needs to see
        return CheckResult(title, FAIL, f"raised {first_line(exc)}")


# ---- generated inputs


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activity(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> Tensor:
    """A block's output after its ReLU: non-negative, some units dead."""
    return torch.randn(shape, generator=_generator(seed)).relu().mul(scale).requires_grad_()


def _labels(n: int, k: int, seed: int) -> Tensor:
    return torch.randint(0, k, (n,), generator=_generator(seed))


def _builtin_norms(plugins: Registry) -> list[Plugin]:
    return [p for p in plugins.all("norm") if p.source == "ffablate"]


def _paths(norm: nn.Module, h: Tensor, label: str) -> NormPaths:
    return checked_paths(norm(h), h, h.shape[1], label)


def _norm_module(plugin: Plugin, width: int, params: dict[str, Any] | None = None) -> nn.Module:
    return built_module(plugin.create(params, num_features=width), plugin.label)


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _grad(output: Tensor, inputs: list[Tensor], seed: int = 1) -> list[Tensor]:
    """Gradients of a random weighting of ``output`` (a plain sum has zero gradient through a batch norm)."""
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    weights = torch.randn(output.shape, generator=_generator(seed))
    grads = torch.autograd.grad((output.float() * weights).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _max_difference(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to float32 rounding: a reduction over another batch size may add in another order."""
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through torch.save and torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise _Failed(
            f"its state_dict holds what torch.load(weights_only=True) refuses ({first_line(exc)}): keep only "
            "tensors and plain numbers in it"
        ) from exc


def _perturbed(module: nn.Module) -> None:
    """Move every parameter, so that a state_dict that left one out shows."""
    with torch.no_grad():
        for index, p in enumerate(module.parameters()):
            p.add_(0.1 * (index + 1))


def _reloaded(trained: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A new instance loaded with ``trained``'s state_dict as a checkpoint stores it, both in eval mode. ``trained``
    first had its parameters moved, so that a state_dict that left one out shows."""
    _perturbed(trained)
    loaded = build()
    loaded.load_state_dict(_roundtrip(trained.state_dict()))
    trained.eval(), loaded.eval()
    return loaded


def _agree(a: Tensor, b: Tensor, problem: str, advice: str = "") -> float:
    """The largest difference between ``a`` and ``b``, failing with ``problem`` (then the difference, then
    ``advice``) where they differ by more than float32 rounding."""
    difference = _max_difference(a, b)
    if not _close(a, b):
        raise _Failed(f"{problem} (max difference {difference:.3g}){advice}")
    return difference


@contextlib.contextmanager
def _kernels(backend: str) -> Iterator[None]:
    saved = os.environ.get("FFABLATE_KERNELS")
    os.environ["FFABLATE_KERNELS"] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FFABLATE_KERNELS"]
        else:
            os.environ["FFABLATE_KERNELS"] = saved


def _need_extension() -> None:
    if not ops.extension_available():
        raise _Skipped("the compiled extension ffablate._C is not built: there is only the reference")


STATE_ADVICE = "keep what changes in training in a parameter or a buffer (register_buffer), not a plain attribute"


# ---- goodness


def _goodness_output(s: _Subject) -> str:
    goodness = flagged(s.build(), "per_class", s.label)
    norms, moved = _builtin_norms(s.plugins), False
    for norm_plugin in norms:
        for shape in ACTIVITY.values():
            h = _activity(shape)
            g = goodness(_paths(_norm_module(norm_plugin, shape[1]), h, norm_plugin.label), NUM_CLASSES)
            check_goodness(g, goodness.per_class, shape[0], NUM_CLASSES, s.label)
            where = f"under norm {norm_plugin.name!r} on {shape} activity"
            if not g.requires_grad:
                raise _Failed(f"no gradient {where}: compute the goodness from the paths it is given")
            grad = _grad(g, [h])[0]
            if not _finite(g) or not _finite(grad):
                raise _Failed(f"NaN or infinite goodness or gradient {where}")
            moved = moved or bool(grad.abs().sum() > 0)
    if not moved:
        # A goodness of rounded or counted values has a graph but a zero gradient: the blocks never learn, and the
        # tiny training run cannot tell that from a slow start.
        raise _Failed(
            "its gradient is zero for every activity tried: the blocks would never learn; compute it from the paths "
            "with differentiable operations (not round, sign or comparisons)"
        )
    want = f"(N, {NUM_CLASSES})" if goodness.per_class else "(N,)"
    return f"{want}, finite, with a gradient, under norms {', '.join(p.name for p in norms)} on conv and dense activity"


def _goodness_per_sample(s: _Subject) -> str:
    goodness = s.build()
    worst = 0.0
    for norm_plugin in _builtin_norms(s.plugins):
        for shape in ACTIVITY.values():
            norm = _norm_module(norm_plugin, shape[1]).eval()
            h = _activity(shape).detach()
            with torch.no_grad():
                whole = goodness(_paths(norm, h, norm_plugin.label), NUM_CLASSES)
                again = goodness(_paths(norm, h, norm_plugin.label), NUM_CLASSES)
                parts = torch.cat([goodness(_paths(norm, part, norm_plugin.label), NUM_CLASSES) for part in h.split(2)])
            where = f"under norm {norm_plugin.name!r} (eval mode) on {tuple(shape)} activity"
            if not torch.equal(whole, again):
                raise _Failed(f"two calls on the same activity differ {where}")
            advice = ": compute it from each image's own activity"
            problem = f"{where}, an image's goodness changes with the other images in its batch"
            worst = max(worst, _agree(whole, parts, problem, advice))
    return f"the same per image in a batch of 6 and in batches of 2 (max difference {worst:.2g})"


def _goodness_at_zero(s: _Subject) -> str:
    goodness = s.build()
    for norm_plugin in _builtin_norms(s.plugins):
        for shape in ACTIVITY.values():
            h = torch.zeros(shape, requires_grad=True)
            g = goodness(_paths(_norm_module(norm_plugin, shape[1]), h, norm_plugin.label), NUM_CLASSES)
            if not _finite(g) or not _finite(_grad(g, [h])[0]):
                raise _Failed(
                    f"NaN or infinite goodness or gradient for all-zero activity (a dead block) under norm "
                    f"{norm_plugin.name!r}: guard divisions and logs with an epsilon"
                )
    return "finite goodness and gradients for all-zero activity under every built-in norm"


def _goodness_kernels(s: _Subject) -> str:
    _need_extension()
    goodness, worst = s.build(), 0.0
    for norm_plugin in _builtin_norms(s.plugins):
        for shape in ACTIVITY.values():
            norm = _norm_module(norm_plugin, shape[1])
            values = {}
            for backend in ("fused", "reference"):
                with _kernels(backend):
                    h = _activity(shape)
                    g = goodness(_paths(copy.deepcopy(norm), h, norm_plugin.label), NUM_CLASSES)
                    values[backend] = (g.detach(), _grad(g, [h])[0])
            problem = (
                f"the fused kernels and the reference give different goodness or gradients under norm "
                f"{norm_plugin.name!r}"
            )
            for fused, reference in zip(values["fused"], values["reference"], strict=True):
                worst = max(worst, _agree(fused, reference, problem))
    return f"the same goodness and gradients with the fused kernels and the reference (max difference {worst:.2g})"


# ---- loss


def _loss_modes(loss: Any) -> list[bool]:
    """The goodness kinds a loss must take: the one it declares, or both (hookspecs: an undeclared loss takes
    whichever goodness it is given)."""
    declared = getattr(loss, "per_class", None)
    return [declared] if isinstance(declared, bool) else [False, True]


def _goodness_pair(per_class: bool, n: int, seed: int) -> tuple[Tensor, Tensor | None, Tensor]:
    gen = _generator(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if per_class:
        return (torch.rand(n, NUM_CLASSES, generator=gen) * 4).requires_grad_(), None, labels
    g_pos = (torch.rand(n, generator=gen) * 4).requires_grad_()
    return g_pos, (torch.rand(n, generator=gen) * 4).requires_grad_(), labels


def _loss_value(s: _Subject, loss: Any, g_pos: Tensor, g_neg: Tensor | None, labels: Tensor, t: Any) -> Tensor:
    value = checked_loss(loss(g_pos, g_neg, labels, RunConfig.threshold, t), f"{s.label} returned")
    if not value.requires_grad:
        raise _Failed("the loss has no gradient: compute it from the goodness it is given")
    return value


def _loss_direction(s: _Subject) -> str:
    loss, seen = s.build(), []
    for per_class in _loss_modes(loss):
        for t in (torch.tensor(0.3), 2.0):
            g_pos, g_neg, labels = _goodness_pair(per_class, 16, seed=3)
            value = _loss_value(s, loss, g_pos, g_neg, labels, t)
            inputs = [g_pos] if g_neg is None else [g_pos, g_neg]
            grads = torch.autograd.grad(value, inputs, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
            if per_class:
                right = torch.nn.functional.one_hot(labels, NUM_CLASSES).bool()
                up, down = grads[0][~right], grads[0][right]
                what = "the true class's goodness", "the other classes'"
            else:
                up, down = grads[1], grads[0]
                what = "the positives' goodness", "the negatives'"
            if not (down != 0).any():
                raise _Failed(f"{what[0]} has no gradient (T={float(t):g})")
            # The slope when all of the batch's right (or wrong) goodness rises together, not each image's: label
            # smoothing or a penalty on large goodness rightly turns a few images' gradients round where the right
            # goodness already wins.
            if not float(down.sum()) < 0 or float(up.sum()) < -1e-12:
                raise _Failed(
                    f"raising {what[0]} across the batch raises the loss, or raising {what[1]} lowers it "
                    f"(T={float(t):g}): the loss must fall as the right goodness rises"
                )
        seen.append("per-class" if per_class else "scalar")
    return f"falls as the right goodness rises and the wrong one falls ({', '.join(seen)} goodness, T 0.3 and 2)"


def _loss_extremes(s: _Subject) -> str:
    loss = s.build()
    for per_class in _loss_modes(loss):
        g_pos, g_neg, labels = _goodness_pair(per_class, 8, seed=4)
        for big in (0.0, 1e4):
            for small in (0.0, 1e4):
                for t in (torch.tensor(0.05), 5.0):
                    pos = torch.full_like(g_pos, small).requires_grad_()
                    if per_class:
                        with torch.no_grad():
                            pos[torch.arange(len(labels)), labels] = big
                        neg = None
                    else:
                        with torch.no_grad():
                            pos.fill_(big)
                        neg = torch.full_like(g_neg, small).requires_grad_()
                    value = _loss_value(s, loss, pos, neg, labels, t)
                    grads = torch.autograd.grad(value, [x for x in (pos, neg) if x is not None], allow_unused=True)
                    if not _finite(value) or not all(g is None or _finite(g) for g in grads):
                        raise _Failed(
                            f"NaN or infinite loss or gradient at goodness {big:g} (right) and {small:g} (wrong), "
                            f"T={float(t):g}: use softplus / log-sum-exp forms, not log(1 + exp(x))"
                        )
    return "finite loss and gradients at goodness 0 and 1e4, T 0.05 and 5"


def _loss_is_a_mean(s: _Subject) -> str:
    loss, worst = s.build(), 0.0
    for per_class in _loss_modes(loss):
        g_pos, g_neg, labels = _goodness_pair(per_class, 8, seed=5)
        t = torch.tensor(0.5)
        once = _loss_value(s, loss, g_pos, g_neg, labels, t)
        doubled = [None if g is None else torch.cat([g, g]) for g in (g_pos, g_neg)]
        twice = _loss_value(s, loss, doubled[0], doubled[1], torch.cat([labels, labels]), t)
        if not _close(once, twice):
            raise _Failed(
                f"the loss of a batch and of the same batch twice differ ({float(once.detach()):.6g} against "
                f"{float(twice.detach()):.6g}): return the batch mean, or micro-batches and the batch size change "
                "the step size"
            )
        worst = max(worst, _max_difference(once, twice))
    return f"a mean over the batch: a batch and the same batch twice give the same loss (difference {worst:.2g})"


# ---- temperature


def _temperature_module(s: _Subject) -> str:
    first, second = (built_module(s.build(), s.label) for _ in range(2))
    shared = {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    shared_buffers = {b.data_ptr() for b in first.buffers()} & {b.data_ptr() for b in second.buffers()}
    if shared or shared_buffers:
        raise _Failed("two instances share parameters or buffers: each block needs its own (create them in __init__)")
    return f"a torch.nn.Module, one per block ({sum(p.numel() for p in first.parameters())} parameters each)"


def _goodness_batches() -> list[Tensor]:
    """What a temperature is given: the detached goodness of positives and negatives (2N,) or per class (N, K),
    at zero, typical and very large goodness."""
    typical = [torch.rand(16, generator=_generator(6)) * 4, torch.rand(8, NUM_CLASSES, generator=_generator(7)) * 4]
    return [*typical, torch.zeros(16), torch.zeros(8, NUM_CLASSES), torch.full((16,), 1e4), torch.full((8, 4), 1e4)]


def _temperature_values(s: _Subject) -> str:
    schedule = built_module(s.build(), s.label)
    lowest, highest = math.inf, -math.inf
    for mode in ("train", "eval"):
        schedule.train(mode == "train")
        for step in range(11):
            progress = step / 10
            for goodness in _goodness_batches():
                t = checked_temperature(schedule(progress, goodness), s.label, progress, 0, builtin=False)
                value = float(t.detach()) if isinstance(t, Tensor) else float(t)
                if not math.isfinite(value):
                    raise _Failed(f"T is {value} at progress {progress:.1f} ({mode} mode) for finite goodness")
                lowest, highest = min(lowest, value), max(highest, value)
    span = f"{lowest:.3g} to {highest:.3g}"
    return f"one positive, finite T at progress 0 to 1 for goodness 0 to 1e4, in train and eval mode ({span})"


def _temperature_state(s: _Subject) -> str:
    trained = built_module(s.build(), s.label)
    for progress, goodness in zip((0.0, 0.2, 0.4), _goodness_batches(), strict=False):
        trained(progress, goodness)
    loaded = _reloaded(trained, lambda: built_module(s.build(), s.label))
    goodness = torch.rand(16, generator=_generator(8)) * 2
    a, b = (float(torch.as_tensor(m(0.5, goodness)).detach()) for m in (trained, loaded))
    if a != b:
        raise _Failed(
            f"after a few steps, a new instance loaded with its state_dict returns T={b:.6g} where it returns "
            f"T={a:.6g}: {STATE_ADVICE}"
        )
    return f"a new instance loaded with its state_dict (through torch.save) returns the same T ({a:.4g})"


# ---- negatives


def _negatives_flag(s: _Subject) -> str:
    negatives = flagged(s.build(), "embeds_label", s.label)
    return f"embeds_label = {negatives.embeds_label}"


def _embedding(s: _Subject) -> Any:
    negatives = s.build()
    if not getattr(negatives, "embeds_label", False):
        raise _Skipped("embeds_label is False: per-class goodness runs it, which embeds no label")
    return negatives


def _wrong_labels(s: _Subject) -> str:
    negatives = _embedding(s)
    for k in (2, 10):
        for draw in range(5):
            labels = _labels(64, k, seed=10 + draw)
            scores = torch.randn(64, k, generator=_generator(20 + draw))
            wrong = negatives.wrong_labels(labels, k, lambda scores=scores: scores)
            if not (isinstance(wrong, Tensor) and wrong.shape == labels.shape and wrong.dtype == labels.dtype):
                got = described(wrong)
                raise _Failed(f"wrong_labels returned {got} for 64 int64 labels; return an int64 (N,) tensor")
            if bool(((wrong < 0) | (wrong >= k)).any()):
                raise _Failed(f"wrong_labels returned a label outside 0..{k - 1}")
            if bool((wrong == labels).any()):
                hits = int((wrong == labels).sum())
                raise _Failed(f"wrong_labels returned the true label for {hits} of 64 images ({k} classes)")
    return "a wrong label in range for every image, 5 draws each of 2 and 10 classes"


def _embeds_the_label(s: _Subject) -> str:
    negatives = _embedding(s)
    for in_shape in ((1, 8, 8), (3, 6, 6)):
        embedded_shape(negatives, s.label, in_shape, 10)
        x = torch.rand(6, *in_shape, generator=_generator(11))
        before = x.clone()
        codes = [negatives.embed(x, torch.full((6,), k), 10) for k in range(10)]
        if not torch.equal(x, before):
            raise _Failed("embed changed its input image in place: return a new tensor")
        for k in range(10):
            for j in range(k):
                if torch.equal(codes[k], codes[j]):
                    raise _Failed(
                        f"labels {j} and {k} embed into the same image: the network could not tell them apart"
                    )
        labels = _labels(6, 10, seed=12)
        whole = negatives.embed(x, labels, 10)
        parts = torch.cat([negatives.embed(xp, lp, 10) for xp, lp in zip(x.split(2), labels.split(2), strict=True)])
        if not torch.equal(whole, parts):
            raise _Failed("an image's embedding changes with the other images in its batch")
    return "each of 10 labels gives a different image, of one shape, per image, input left unchanged"


# ---- norm


def _norm_paths(s: _Subject) -> str:
    for name, shape in ACTIVITY.items():
        norm = _norm_module(s.plugin, shape[1], s.params)
        h = _activity(shape)
        paths = _paths(norm, h, s.label)
        for field in ("goodness_input", "forward", "readout"):
            output = getattr(paths, field)
            if not _finite(output):
                raise _Failed(f"NaN or infinite {field} for {name} activity")
            grad = _grad(output, [h])[0]
            if not _finite(grad):
                raise _Failed(f"NaN or infinite gradient through {field} for {name} activity")
            if not bool(grad.abs().sum() > 0):
                # FF trains through the goodness input, BP through the forward output and its heads' readout.
                raise _Failed(f"no gradient reaches the block's activity through {field} ({name} activity)")
    return "three finite paths of the right shapes for conv and dense activity, each with a gradient to the activity"


def _norm_at_zero(s: _Subject) -> str:
    for name, shape in ACTIVITY.items():
        h = torch.zeros(shape, requires_grad=True)
        paths = _paths(_norm_module(s.plugin, shape[1], s.params), h, s.label)
        outputs = [paths.goodness_input, paths.forward, paths.readout]
        total = sum(_grad(o, [h], seed=i)[0] for i, o in enumerate(outputs))
        if not all(_finite(o) for o in outputs) or not _finite(total):
            raise _Failed(f"NaN or infinite paths or gradients for all-zero {name} activity (a dead block)")
    return "finite paths and gradients for all-zero activity"


def _norm_per_sample(s: _Subject) -> str:
    worst = 0.0
    for name, shape in ACTIVITY.items():
        norm = _norm_module(s.plugin, shape[1], s.params)
        with torch.no_grad():
            for seed in range(3):  # training batches, for running statistics
                norm(_activity(shape, seed=30 + seed).detach())
            norm.eval()
            h = _activity(shape).detach()
            whole, parts = _paths(norm, h, s.label), [_paths(norm, part, s.label) for part in h.split(2)]
        for field in ("goodness_input", "forward", "readout"):
            a, b = getattr(whole, field), torch.cat([getattr(p, field) for p in parts])
            problem = f"on {name} activity in eval mode, an image's {field} changes with the other images in its batch"
            worst = max(worst, _agree(a, b, problem, ": use running statistics in eval mode"))
    return f"in eval mode, the same paths per image in a batch of 6 and in batches of 2 (max difference {worst:.2g})"


def _norm_kernels(s: _Subject) -> str:
    _need_extension()
    worst = 0.0
    for name, shape in ACTIVITY.items():
        norm = _norm_module(s.plugin, shape[1], s.params)
        runs = {}
        for backend in ("fused", "reference"):
            with _kernels(backend):
                h = _activity(shape)
                paths = _paths(copy.deepcopy(norm), h, s.label)
                outputs = [paths.goodness_input, paths.forward, paths.readout, paths.sumsq(), paths.sumabs()]
                total = sum(_grad(o, [h], seed=i)[0] for i, o in enumerate(outputs))
                runs[backend] = [o.detach() for o in outputs] + [total]
        for fused, reference in zip(runs["fused"], runs["reference"], strict=True):
            worst = max(
                worst, _agree(fused, reference, f"the fused kernels and the reference disagree on {name} activity")
            )
    return f"the same paths, sums and gradients with the fused kernels and the reference (max difference {worst:.2g})"


def _norm_state(s: _Subject) -> str:
    for name, shape in ACTIVITY.items():
        trained = _norm_module(s.plugin, shape[1], s.params)
        with torch.no_grad():
            for seed in range(3):
                trained(_activity(shape, seed=40 + seed).detach())
        loaded = _reloaded(trained, lambda width=shape[1]: _norm_module(s.plugin, width, s.params))
        h = _activity(shape).detach()
        with torch.no_grad():
            a, b = _paths(trained, h, s.label), _paths(loaded, h, s.label)
        for field in ("goodness_input", "forward", "readout"):
            if not torch.equal(getattr(a, field), getattr(b, field)):
                raise _Failed(
                    f"after training steps, a new instance loaded with its state_dict gives another {field} in eval "
                    f"mode ({name} activity): {STATE_ADVICE}"
                )
    return "a new instance loaded with its state_dict (through torch.save) gives the same paths in eval mode"


# ---- fusion


def _fusion_module(s: _Subject) -> nn.Module:
    fusion = s.build(num_layers=len(FEATURE_DIMS), num_classes=NUM_CLASSES, feature_dims=list(FEATURE_DIMS))
    return checked_fusion(fusion, s.label)


def _fusion_inputs(n: int, seed: int, labels: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Per-block class scores and readout features; with ``labels``, scores that point at them."""
    gen = _generator(seed)
    scores = [torch.randn(n, NUM_CLASSES, generator=gen) for _ in FEATURE_DIMS]
    if labels is not None:
        scores = [s + 2 * torch.nn.functional.one_hot(labels, NUM_CLASSES) for s in scores]
    return scores, [torch.randn(n, d, generator=gen) for d in FEATURE_DIMS]


def _fusion_logits(s: _Subject) -> str:
    fusion = _fusion_module(s)
    for mode in ("train", "eval"):
        fusion.train(mode == "train")
        for zero in (False, True):
            scores, features = _fusion_inputs(6, seed=50)
            if zero:
                scores, features = [torch.zeros_like(x) for x in scores], [torch.zeros_like(x) for x in features]
            logits = fusion(scores, features)
            check_logits(logits, 6, NUM_CLASSES, s.label)
            if not _finite(logits):
                raise _Failed(f"NaN or infinite logits for {'all-zero' if zero else 'random'} scores ({mode} mode)")
    return f"finite (N, {NUM_CLASSES}) logits from three blocks' scores and features, zero ones included"


def _fusion_fits(s: _Subject) -> str:
    fusion = _fusion_module(s)
    params = list(fusion.parameters())
    if not params:
        raise _Skipped("no parameters: the trainer does not fit it")
    labels = _labels(64, NUM_CLASSES, seed=51)
    scores, features = _fusion_inputs(64, seed=52, labels=labels)
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(30):
        loss = checked_loss(fusion.loss(scores, features, labels), f"the loss(scores, features, labels) of {s.label}")
        if not loss.requires_grad:
            raise _Failed("its loss has no gradient: compute it from the fusion's output")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if not losses[-1] < losses[0]:
        raise _Failed(f"30 Adam steps on its loss did not lower it ({losses[0]:.4g} to {losses[-1]:.4g})")
    return f"30 Adam steps on its loss lower it from {losses[0]:.4g} to {losses[-1]:.4g}"


def _fusion_per_sample(s: _Subject) -> str:
    fusion = _fusion_module(s).eval()
    scores, features = _fusion_inputs(6, seed=53)
    with torch.no_grad():
        whole = fusion(scores, features)
        parts = torch.cat(
            [fusion([x[i : i + 2] for x in scores], [x[i : i + 2] for x in features]) for i in range(0, 6, 2)]
        )
    worst = _agree(whole, parts, "in eval mode an image's logits change with the other images in its batch")
    return f"in eval mode, the same logits per image in a batch of 6 and in batches of 2 (max difference {worst:.2g})"


def _fusion_state(s: _Subject) -> str:
    trained = _fusion_module(s)
    scores, features = _fusion_inputs(6, seed=54)
    with torch.no_grad():
        trained(scores, features)
    loaded = _reloaded(trained, lambda: _fusion_module(s))
    with torch.no_grad():
        if not torch.equal(trained(scores, features), loaded(scores, features)):
            raise _Failed(f"a new instance loaded with its state_dict gives other logits: {STATE_ADVICE}")
    return "a new instance loaded with its state_dict (through torch.save) gives the same logits"


# ---- datasets


def _dataset(s: _Subject) -> Any:
    from ffablate.data import load_dataset

    return load_dataset(s.plugin.name, data_root=s.data_root, params=s.params, plugins=s.plugins)


def _digest(ds: Any) -> str:
    digest = hashlib.sha256()
    for tensor in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _dataset_loads(s: _Subject) -> str:
    ds = _dataset(s)
    shape = "x".join(str(d) for d in ds.train_x.shape[1:])
    return f"{len(ds.train_y)} training and {len(ds.test_y)} test images of {shape}, {ds.num_classes} classes"


def _dataset_repeats(s: _Subject) -> str:
    first, second = _digest(_dataset(s)), _digest(_dataset(s))
    if first != second:
        raise _Failed("two loads gave different images or labels: seeds could not reproduce a run on it")
    return f"two loads give the same bytes (SHA-256 {first[:12]})"


def _dataset_located(s: _Subject) -> str:
    from ffablate.data import dataset_found

    if not callable(getattr(s.plugin.factory, "locate", None)):
        raise _Skipped("the factory has no locate(roots): `ffablate data list` cannot say where its data are")
    found = dataset_found(s.plugin.name, s.data_root, s.params, s.plugins)
    if found is False:
        raise _Failed("locate(roots) says the data are missing, but they loaded")
    return "locate(roots) finds the data it loads"


# ---- training


def _training_config(s: _Subject, method: str = "ff") -> RunConfig:
    """A tiny run with the plugin under test and plugins that fit it (a scalar goodness needs labelled negatives and a
    threshold loss)."""
    kind, name = s.plugin.kind, s.plugin.name
    updates: dict[str, Any] = {
        "method": method,
        "dataset": "teacher-student",
        "datasets.k": NUM_CLASSES,
        "datasets.n_train": 256,
        "datasets.n_test": 128,
        "channels": "8,8",
        "strides": "2,2",
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "device": "cpu",
    }
    scalar = {"goodness": "meansq", "negatives": "random-label", "loss": "softplus-threshold"}
    if kind in ("goodness", "loss", "negatives") and _needs_negatives(s):
        updates |= scalar
    elif kind == "datasets":
        ds = _dataset(s)
        width = 2 * ds.num_classes  # classwise goodness: two channels per class
        # Halve the images only as often as they allow (check_downsampling): a dataset of 2x2 images, or of
        # features as 1x1 ones, is valid, and the strides are not the author's to --set here.
        halvings = min(2, max(0, min(ds.image_shape[1:]).bit_length() - 1))
        strides = ",".join(["2"] * halvings + ["1"] * (2 - halvings))
        updates = {k: v for k, v in updates.items() if not k.startswith("datasets.")}
        updates |= {"limit_train": 256, "limit_test": 128, "channels": f"{width},{width}", "strides": strides}
    field = "dataset" if kind == "datasets" else kind
    updates |= {field: name, **{f"{kind}.{param}": value for param, value in s.params.items()}}
    return RunConfig().with_updates(updates)


def _needs_negatives(s: _Subject) -> bool:
    """Whether the goodness, loss or negatives plugin under test trains with labelled negatives."""
    built = s.build()
    if s.plugin.kind == "negatives":
        return built.embeds_label
    return getattr(built, "per_class", True) is False  # a loss that declares nothing is trained per class


def _trained(s: _Subject, method: str = "ff", fresh: bool = False) -> Any:
    """The tiny run of ``method`` with the plugin under test: the first one trained, unless ``fresh``. Every check
    starts from seed 0, so the first run is the one each check would train itself."""
    from ffablate.train import trained_run

    if fresh or method not in s.runs:
        run = trained_run(_training_config(s, method), plugins=s.plugins, data_root=s.data_root)
        s.runs.setdefault(method, run)
        return run
    return s.runs[method]


def _trains(s: _Subject) -> str:
    # A loss that turns NaN stops the run with TrainingDiverged, which names the block's plugins.
    runs = [_trained(s)] + ([_trained(s, "bp-deepsup")] if s.plugin.kind == "norm" else [])
    scores = ", ".join(f"{run.trainer.config.method} {run.result.test_accuracy:.3f}" for run in runs)
    config = runs[0].trainer.config
    recipe = ", ".join(getattr(config, kind) for kind in ("goodness", "negatives", "loss"))
    return f"one epoch on {config.dataset} ({recipe}): test accuracy {scores}"


def _reproducible(s: _Subject) -> str:
    first, second = _trained(s), _trained(s, fresh=True)
    if (first.result.test_accuracy, first.result.per_layer_accuracy) != (
        second.result.test_accuracy,
        second.result.per_layer_accuracy,
    ):
        raise _Failed(
            f"two runs with seed 0 scored {first.result.test_accuracy} and {second.result.test_accuracy}: draw random "
            "numbers from torch's generator (which the seed sets), not from time or os.urandom"
        )
    a, b = first.trainer.net.state_dict(), second.trainer.net.state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[key], b[key]) for key in a):
        raise _Failed("two runs with seed 0 ended with different weights")
    return f"two runs with seed 0 end with the same weights and test accuracy ({first.result.test_accuracy:.4f})"


def _checkpoint(s: _Subject) -> str:
    from ffablate import checkpoint
    from ffablate.saved import load_run

    trained = _trained(s)
    with tempfile.TemporaryDirectory(prefix="ffablate-check-") as folder:
        path = Path(folder) / "model.pt"
        checkpoint.save(checkpoint.contents(trained), path)
        scored = load_run(path, plugins=s.plugins).evaluate(s.data_root)
    recorded = trained.result.test_accuracy
    if scored.test_accuracy != recorded:
        raise _Failed(
            f"saved and loaded back, the model scores {scored.test_accuracy} where the run scored {recorded}: "
            f"{STATE_ADVICE}"
        )
    return f"saved with `train --save` and loaded back, it scores the run's {recorded:.4f}"


class _Stopped(Exception):
    """The resume check's stop after a run's first epoch."""


def _stop_after_first_epoch(epoch: int, record: dict[str, float]) -> None:
    raise _Stopped


def _resumes(s: _Subject) -> str:
    from ffablate import checkpoint
    from ffablate.saved import resume_run
    from ffablate.train import trained_run

    config = dataclasses.replace(_training_config(s), epochs=2)
    whole = trained_run(config, plugins=s.plugins, data_root=s.data_root)
    with tempfile.TemporaryDirectory(prefix="ffablate-check-") as folder:
        path = Path(folder) / "run.pt"
        with contextlib.suppress(_Stopped):  # the epoch's checkpoint is written before on_epoch is called
            trained_run(
                config,
                plugins=s.plugins,
                data_root=s.data_root,
                on_epoch=_stop_after_first_epoch,
                keep=checkpoint.EpochWriter(path),
            )
        resumed = resume_run(path, plugins=s.plugins, data_root=s.data_root)
    a, b = whole.trainer.net.state_dict(), resumed.trainer.net.state_dict()
    same_weights = a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    if not same_weights or whole.result.test_accuracy != resumed.result.test_accuracy:
        raise _Failed(
            f"stopped after epoch 1 of 2 and resumed (`train --resume`), the run ends with other weights (test "
            f"accuracy {resumed.result.test_accuracy} against {whole.result.test_accuracy}): keep state in "
            "parameters or buffers, and draw random numbers from torch's global generator (a checkpoint restores "
            "it), not from a generator of the plugin's own"
        )
    return "stopped after epoch 1 of 2 and resumed, it ends with the uninterrupted run's weights"


CHECKS: dict[str, list[tuple[str, Callable[[_Subject], str]]]] = {
    "goodness": [
        ("output", _goodness_output),
        ("per image", _goodness_per_sample),
        ("zero activity", _goodness_at_zero),
        ("kernels", _goodness_kernels),
    ],
    "loss": [("direction", _loss_direction), ("extremes", _loss_extremes), ("batch mean", _loss_is_a_mean)],
    "temperature": [("module", _temperature_module), ("values", _temperature_values), ("state", _temperature_state)],
    "negatives": [("flag", _negatives_flag), ("wrong labels", _wrong_labels), ("embedding", _embeds_the_label)],
    "norm": [
        ("paths", _norm_paths),
        ("zero activity", _norm_at_zero),
        ("per image", _norm_per_sample),
        ("kernels", _norm_kernels),
        ("state", _norm_state),
    ],
    "fusion": [
        ("logits", _fusion_logits),
        ("fit", _fusion_fits),
        ("per image", _fusion_per_sample),
        ("state", _fusion_state),
    ],
    "datasets": [("loads", _dataset_loads), ("same bytes", _dataset_repeats), ("located", _dataset_located)],
}
TRAINING_CHECKS = [
    ("trains", _trains),
    ("reproducible", _reproducible),
    ("checkpoint", _checkpoint),
    ("resumes", _resumes),
]
TRAINING = {check for _, check in TRAINING_CHECKS}
