"""The ffablate plugin contract: every hook a plugin may implement, in one file.

Each hook receives a ``register`` callback (simonw/llm style). A plugin module implements, say::

    from ffablate import hookimpl

    @hookimpl
    def ffablate_register_goodness(register):
        register("cubic", Cubic, "mean of |h|^3 per sample", space={"p": {"type": "float", "low": 1, "high": 4}})

``register(name, factory, description, space=None)`` records one plugin of that hook's kind:

- ``name``: what users type (``--set goodness=cubic``): non-empty text without spaces, ``=`` or ``,``; unique
  within its kind across all installed plugins.
- ``factory``: a callable. Its keyword arguments with defaults are the plugin's parameters, settable with
  ``--set goodness.p=3`` (a ``**kwargs`` factory has none); the trainer passes the context arguments listed per
  kind below by keyword. A default must be a bool, int, float, str or None (another is refused at start-up, as
  ``--set`` cannot give it); the parameter takes its default's type (``p: float = 3`` is a float). A None default
  takes ``--set goodness.clip=none`` and the one type its annotation names beside None (``clip: float | None``),
  or, unannotated, any number, true/false or text.
- ``description``: one line for ``ffablate plugins`` (required).
- ``space``: the plugin's own Optuna search space, ``{param: spec}`` where spec is one of
  ``{"type": "float", "low": a, "high": b, "log": bool}``, ``{"type": "int", "low": a, "high": b, "log": bool}``,
  ``{"type": "categorical", "choices": [...]}``. Studies may search it without the core knowing the knobs. It is
  checked at start-up: every ``param`` is a parameter of the factory, ``low < high`` (numbers; integers for
  ``int``; a single value is refused, as there is nothing to search), ``log`` needs ``low > 0``, ``choices`` is a
  non-empty list of values the parameter takes, and no other keys.

Errors: for a mistake the user can fix (a bad parameter value, a dataset too small), raise
``ffablate.errors.ConfigError`` with a message that says what to do; ffablate prints it on one line and exits 2.
Any other exception from a hook or factory is reported on one line as the plugin failing, naming its package (a
dataset factory's as a data error, which stops a study instead of failing its trials).

What each kind's factory receives and must return is documented on its hook below (the trainer checks the
shapes and attributes named there); the reference implementations live in ``ffablate/builtin/``, which registers
through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("ffablate")
hookimpl = pluggy.HookimplMarker("ffablate")

Register = Callable[..., None]
FactoryContext = dict[str, Any]


@hookspec
def ffablate_register_goodness(register: Register) -> None:
    """Register goodness functions.

    Factory: ``factory(**params) -> Goodness``. A Goodness has ``per_class: bool`` (required) and is called as
    ``goodness(paths: NormPaths, num_classes: int) -> Tensor``: a floating tensor of shape (N,) for scalar
    goodness, (N, K) for per-class goodness (``per_class=True``), on the paths' device and, in training, with a
    gradient from them. A per-class goodness needs no negative data and
    runs with ``negatives=none`` (a negatives plugin with ``embeds_label = False``); a scalar one needs labelled
    negatives. ``NormPaths`` is ``ffablate.paths.NormPaths``: ``paths.goodness_input`` is the tensor the norm plugin
    routes to goodness; ``paths.sumsq()`` / ``paths.sumabs()`` give per-sample sums that a fused norm kernel may
    already have computed.
    """


@hookspec
def ffablate_register_temperature(register: Register) -> None:
    """Register temperature schedules.

    Factory: ``factory(**params) -> torch.nn.Module``; one instance per block. Called as
    ``schedule(progress: float, goodness: Tensor) -> Tensor | float`` with training progress in [0, 1] and the
    detached goodness of the current batch; it returns one T for the block: a 0-dim floating tensor (a CPU one
    costs no host-to-device copy) or a Python number, never a vector. T must be positive and finite: zero, a
    negative or an infinite T is refused before the step updates anything (a NaN tensor shows as a diverged loss).
    Parameters of the module are trained by the block's optimizer.
    """


@hookspec
def ffablate_register_norm(register: Register) -> None:
    """Register normalization modes (the three paths from a block's activity h).

    Factory: ``factory(num_features: int, **params) -> torch.nn.Module``; one instance per block, called as
    ``norm(h) -> NormPaths`` (``ffablate.paths.NormPaths``) holding the goodness input, the forward output (to the
    next block, detached by the trainer) and the readout features (N, F).
    """


@hookspec
def ffablate_register_loss(register: Register) -> None:
    """Register layer losses.

    Factory: ``factory(**params) -> Callable``; called as
    ``loss(g_pos, g_neg, labels, threshold, temperature) -> Tensor`` (a scalar with a gradient from the goodness).
    For per-class goodness ``g_pos``
    is (N, K) and ``g_neg`` is None. A loss may declare ``per_class: bool``: then a run whose goodness differs is
    refused at start-up (the built-ins declare it). A loss without the attribute is not checked, so it must take
    whichever goodness it is given.
    """


@hookspec
def ffablate_register_negatives(register: Register) -> None:
    """Register label-embedding / negative-sampling strategies.

    Factory: ``factory(**params) -> Negatives`` with ``embeds_label: bool``, ``embed(x, labels, num_classes) ->
    x'`` (labels may be None for a neutral embedding; x' keeps x's height and width and has one shape for every
    label, but may add channels: the first block is built for them), and ``wrong_labels(labels, num_classes,
    scores) -> labels'`` (a wrong label in 0..K-1 for every image, as the labels' dtype and device; the first
    batch's are checked) where ``scores()`` returns (N, K) class scores of the current network (K no-grad passes:
    call it only when the strategy needs them).
    """


@hookspec
def ffablate_register_fusion(register: Register) -> None:
    """Register inference-time fusions of layers.

    Factory: ``factory(num_layers: int, num_classes: int, feature_dims: list[int], **params) -> torch.nn.Module``.
    Called as ``fusion(scores, features) -> logits`` with per-layer class scores (list of (N, K)) and per-layer
    readout features (list of (N, F), detached). A fusion with parameters must define
    ``loss(scores, features, labels) -> Tensor`` (a scalar): the trainer fits it with that, on detached inputs only
    and with its own optimizer. One without parameters is used as it is.
    """


@hookspec
def ffablate_register_datasets(register: Register) -> None:
    """Register datasets.

    Factory: ``factory(roots: list[Path], download: bool, **params) -> ImageDataset`` (``ffablate.data``), built
    by keyword with these fields, all but ``name`` and the coarse ones checked when it loads (a mistake is one line
    naming the plugin):

    - ``name``: the dataset's name, for messages;
    - ``train_x``, ``test_x``: the full splits as uint8 (N, C, H, W) tensors of one image shape, neither empty;
    - ``train_y``, ``test_y``: int64 (N,) labels in 0..num_classes-1;
    - ``num_classes``: an int, at least 2; ``class_names``: a list of one str per class;
    - ``flips``: True if horizontal flips preserve labels; ``crops`` (default True): if small shifts do;
    - ``source``: where the bytes came from, as text (a path, or e.g. "generated");
    - optional ``coarse_train_y``, ``coarse_test_y``, ``coarse_names``: a label hierarchy for ``labels=coarse``.

    ffablate sets the remaining fields (a validation split) itself. Raises ``DataNotFound`` naming the ways to
    obtain the bytes. An optional ``factory.locate(roots) -> (path or None, hint)`` tells `ffablate data list` and
    studies where the data are without loading them; the plugin parameters it names (``locate(roots, path="")``)
    are passed a study's values, and ``ffablate.errors.ParameterNeeded(setting, message)`` says one it needs is
    unset (``ParameterNeeded("datasets.path", "dataset 'x' needs --set datasets.path=DIR")``).
    """
