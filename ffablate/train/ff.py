"""The layer-local Forward-Forward trainer.

Each block has its own loss (one AdamW holds every block's parameters, but each block's gradient comes from its
own loss alone). After a block's backward its forward output is detached, so the next block cannot send gradients
back and only one block's graph is ever alive: activation memory is O(1) in depth.
The fusion (readout) is fit on detached scores/features with an optimizer of its own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ffablate.config import RunConfig
from ffablate.data import DeviceLoader
from ffablate.errors import ConfigError, PluginContractError, described
from ffablate.model import build_backbone, built_module
from ffablate.plugins import Plugin, Registry, registry
from ffablate.train import common


class FFNet(nn.Module):
    """A backbone plus the plugins that turn its blocks' activity into local losses and a prediction."""

    def __init__(
        self, config: RunConfig, in_shape: tuple[int, int, int], num_classes: int, plugins: Registry | None = None
    ):
        super().__init__()
        reg = plugins or registry()
        self.num_classes, self.threshold = num_classes, config.threshold
        chosen = {kind: reg.get(kind, getattr(config, kind)) for kind in FF_KINDS}
        self.labels = {kind: plugin.label for kind, plugin in chosen.items()}
        self.builtin_temperature = chosen["temperature"].source == "ffablate"

        def make(kind: str, **context: Any) -> Any:
            return chosen[kind].create(config.params_of(kind), **context)

        self.goodness = flagged(make("goodness"), "per_class", self.labels["goodness"])
        self.negatives = flagged(make("negatives"), "embeds_label", self.labels["negatives"])
        _check_compatible(config, self.goodness.per_class, self.negatives.embeds_label)
        if self.negatives.embeds_label:  # the first block takes the input as the embedding leaves it
            in_shape = embedded_shape(self.negatives, self.labels["negatives"], in_shape, num_classes)
        self.backbone = build_backbone(config, in_shape, reg)
        depth = len(self.backbone.blocks)
        # One per block, as modules: a learned T is a parameter of its block, in the block's optimizer group.
        self.temperatures = nn.ModuleList(
            built_module(make("temperature"), self.labels["temperature"]) for _ in range(depth)
        )
        self.loss_fn = make("loss")
        fusion = make("fusion", num_layers=depth, num_classes=num_classes, feature_dims=self.backbone.feature_dims)
        self.fusion = checked_fusion(fusion, self.labels["fusion"])
        _check_loss_fits(config, chosen["loss"], self.loss_fn, self.goodness.per_class)
        _refuse_shared_parameters(
            {
                self.labels["goodness"]: self.goodness,
                self.labels["loss"]: self.loss_fn,
                self.labels["negatives"]: self.negatives,
            }
        )

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @functools.cached_property
    def block_plugins(self) -> str:
        """The plugins a block's loss is computed by, for a message about that loss (built once: every step of
        every block names them)."""
        return ", ".join([self.backbone.norm_label, *(self.labels[k] for k in ("goodness", "loss", "temperature"))])

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        modules = (self.backbone.blocks[index], self.backbone.norms[index], self.temperatures[index])
        return [p for m in modules for p in m.parameters()]

    def layer_goodness(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(goodness, forward output, readout) of block ``index`` on prepared input ``x``."""
        paths = self.backbone.block_paths(index, x)
        goodness = self.goodness(paths, self.num_classes)
        check_goodness(goodness, self.goodness.per_class, x.shape[0], self.num_classes, self.labels["goodness"])
        if goodness.device != x.device:
            raise PluginContractError(
                f"{self.labels['goodness']} returned a tensor on {goodness.device} for activity on {x.device}; "
                "compute the goodness from the paths it is given"
            )
        if torch.is_grad_enabled() and paths.goodness_input.requires_grad and not goodness.requires_grad:
            raise PluginContractError(
                f"{self.labels['goodness']} returned a goodness with no gradient; compute it from the paths it is "
                "given, not from detached values"
            )
        return goodness, paths.forward, paths.readout

    def block_loss(self, g_pos: Tensor, g_neg: Tensor | None, labels: Tensor, temperature: Tensor | float) -> Tensor:
        """The loss plugin's value: one number with a gradient (metadata checks only, so no host sync)."""
        loss = checked_loss(
            self.loss_fn(g_pos, g_neg, labels, self.threshold, temperature), f"{self.labels['loss']} returned"
        )
        if g_pos.requires_grad and not loss.requires_grad:
            raise PluginContractError(
                f"{self.labels['loss']} returned a loss with no gradient; compute it from the goodness it is given, "
                "not from detached values or constants"
            )
        return loss

    def temperature(self, index: int, progress: float, goodness: Tensor) -> Tensor | float:
        """Block ``index``'s temperature, checked (``checked_temperature``)."""
        t = self.temperatures[index](progress, goodness)
        return checked_temperature(t, self.labels["temperature"], progress, index, self.builtin_temperature)

    def temperature_to_check(self, index: int, t: Tensor | float) -> list[tuple[str, Tensor]]:
        """``[(who, t)]`` for a temperature on the device, whose value the trainer reads with the step's losses."""
        if isinstance(t, Tensor) and t.device.type != "cpu":
            return [(f"{self.labels['temperature']} (block {index})", t)]
        return []

    @torch.no_grad()
    def scores_and_features(
        self, x: Tensor, upto: int | None = None, features: bool = True
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-block class scores (N, K) and readout features of blocks ``0..upto-1`` (all by default), without
        gradients; ``features=False`` leaves the features out (an empty list).

        Per-class goodness needs one pass; label-embedding goodness needs one pass per candidate label, plus a
        neutral-label pass for the readout features. The passes run in eval mode and under the run's autocast,
        also when training calls them (hardest-label negatives, fitting a fusion on label-embedding goodness): the
        scores are the ones evaluation sees (a fusion fitted on fp32 scores would be tested on bf16 ones), and
        these extra passes leave batch-norm running statistics alone. (A fusion on per-class goodness is fit on the
        training pass's own scores instead: ``FFTrainer._fusion_backward``.)
        """
        with common.eval_mode(self), common.autocast(x.device):
            return self._scores_and_features(x, self.depth if upto is None else upto, features)

    def _scores_and_features(self, x: Tensor, upto: int, features: bool) -> tuple[list[Tensor], list[Tensor]]:
        if self.goodness.per_class:
            scores, readouts = self._single_pass(x, upto)
            return scores, readouts if features else []
        per_label = []
        for k in range(self.num_classes):
            labels = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            goodness, _ = self._single_pass(self.negatives.embed(x, labels, self.num_classes), upto)
            per_label.append(goodness)
        scores = [torch.stack([g[layer] for g in per_label], dim=1) for layer in range(upto)]
        if not features:
            return scores, []
        _, readouts = self._single_pass(self.negatives.embed(x, None, self.num_classes), upto)
        return scores, readouts

    def _single_pass(self, x: Tensor, upto: int) -> tuple[list[Tensor], list[Tensor]]:
        goodness, features = [], []
        h = self.backbone.prepare(x)
        for index in range(upto):
            g, h, readout = self.layer_goodness(index, h)
            goodness.append(g.float())
            features.append(readout.float())
        return goodness, features

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        scores, features = self.scores_and_features(x)
        logits = self.fusion(scores, features)
        check_logits(logits, x.shape[0], self.num_classes, self.labels["fusion"])
        return logits, scores

    def fusion_loss(self, scores: list[Tensor], features: list[Tensor], labels: Tensor) -> Tensor:
        who = f"the loss(scores, features, labels) of {self.labels['fusion']}"
        loss = checked_loss(self.fusion.loss(scores, features, labels), f"{who} returned")
        if not loss.requires_grad:
            raise PluginContractError(
                f"{who} has no gradient: compute it from the fusion's output, not from detached values"
            )
        return loss


def check_goodness(goodness: object, per_class: bool, batch: int, num_classes: int, label: str) -> None:
    """Refuse a goodness of the wrong shape: (N, 1) or (N, 3) would broadcast against the labels into a
    plausible-looking accuracy. Metadata only, so no host sync in the step."""
    want = (batch, num_classes) if per_class else (batch,)
    if isinstance(goodness, Tensor) and goodness.is_floating_point() and goodness.shape == want:
        return
    what = f"per-class goodness (per_class=True) for {num_classes} classes" if per_class else "scalar goodness"
    raise PluginContractError(
        f"{label} returned {described(goodness)} for {batch} samples; a {what} must return a "
        f"floating tensor of shape {want} (see ffablate_register_goodness in ffablate/hookspecs.py)"
    )


def checked_temperature(t: object, label: str, progress: float, index: int, builtin: bool) -> Tensor | float:
    """``t`` if it is one T: a number or a 0-dim floating tensor. A vector would broadcast into the goodness and
    silently divide each class (or sample) by its own T. A negative T trains each block toward the wrong labels: a
    number or a CPU tensor is checked here, a device tensor by the trainer's one sync a step
    (``FFNet.temperature_to_check``). No host sync here."""
    if isinstance(t, Tensor) and t.dim() == 0 and t.is_floating_point():
        if t.device.type == "cpu":
            _check_positive(float(t.detach()), True, label, progress, index, builtin)
        return t
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        _check_positive(t, False, label, progress, index, builtin)
        return t
    raise PluginContractError(
        f"{label} returned {described(t)}; a temperature must be a number or a 0-dim floating tensor (one T per "
        "block, e.g. torch.tensor(0.5))"
    )


def _check_positive(t: float, tensor: bool, label: str, progress: float, index: int, builtin: bool) -> None:
    if common.bad_temperature(t, tensor):
        what = f"{label} returned {t} at progress {progress:.3f} for block {index}"
        raise common.temperature_error(what, builtin)


def check_logits(logits: object, batch: int, num_classes: int, label: str) -> None:
    """(N, 1) logits would score every image as class 0: a plausible-looking accuracy, not an error."""
    want = (batch, num_classes)
    if not (isinstance(logits, Tensor) and logits.is_floating_point() and logits.shape == want):
        raise PluginContractError(
            f"{label} returned {described(logits)} for {batch} samples; a fusion must return floating logits of "
            f"shape {want}"
        )


def checked_loss(loss: object, who: str) -> Tensor:
    """A loss as the trainers need it: one number with its mean's gradient (metadata checks only, so no host
    sync). ``who`` begins the message: "<plugin> returned"."""
    if isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    raise PluginContractError(f"{who} {described(loss)}; a loss must return a 0-dim floating tensor (its mean)")


def embedded_shape(
    negatives: Any, label: str, in_shape: tuple[int, int, int], num_classes: int
) -> tuple[int, int, int]:
    """The (C, H, W) of an image after ``negatives`` embeds a label in it. An embedding must give one shape
    whatever the label, and keep the height and width (the blocks' strides were checked against them)."""
    image = torch.zeros(2, *in_shape)
    shapes = {tuple(negatives.embed(image, labels, num_classes).shape) for labels in (None, torch.tensor([0, 1]))}
    (shape,) = shapes if len(shapes) == 1 else (None,)
    if shape is None or len(shape) != 4 or shape[0] != 2 or shape[2:] != in_shape[1:]:
        got = " and ".join(str(s) for s in sorted(shapes))
        raise ConfigError(
            f"{label} embeds labels in 2 images of shape {in_shape} as {got}; embed(x, labels, num_classes) must "
            f"return (N, C', {in_shape[1]}, {in_shape[2]}), one shape for every label and for None"
        )
    return shape[1:]


def _cat_chunks(chunks: list[list[Tensor]]) -> list[Tensor]:
    """Per-chunk lists of per-block tensors -> per-block tensors over the whole batch."""
    if len(chunks) == 1:
        return chunks[0]
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


FF_KINDS = ("goodness", "temperature", "loss", "negatives", "fusion")


def flagged(plugin: Any, flag: str, label: str) -> Any:
    """``plugin`` if it declares ``flag`` as a bool: the trainer branches on it all through the run."""
    if not isinstance(getattr(plugin, flag, None), bool):
        raise ConfigError(
            f"{label} builds an object without a boolean {flag!r}: set `{flag} = True` or `{flag} = False` on it "
            "(see ffablate/hookspecs.py)"
        )
    return plugin


def checked_fusion(fusion: Any, label: str) -> nn.Module:
    built_module(fusion, label)
    if any(True for _ in fusion.parameters()) and not callable(getattr(fusion, "loss", None)):
        raise ConfigError(
            f"{label} has trainable parameters but no loss(scores, features, labels) method to fit them with: "
            "define one (e.g. cross-entropy of its logits) or make the parameters buffers"
        )
    return fusion


def _refuse_shared_parameters(shared: dict[str, Any]) -> None:
    """``shared``: plugin label -> the one instance that serves every block."""
    for label, plugin in shared.items():
        if isinstance(plugin, nn.Module) and any(True for _ in plugin.parameters()):
            # One instance serves every block, so its parameters would be trained by (and couple) all blocks'
            # losses, across the detach boundary; no optimizer holds them.
            kind = label.split()[0]
            raise ConfigError(
                f"{label} has trainable parameters, but one {kind} instance is shared by all blocks and nothing "
                "trains it; keep learned state in a temperature plugin (one per block) or make the parameters buffers"
            )


def _check_compatible(config: RunConfig, per_class: bool, embeds_label: bool) -> None:
    if per_class and embeds_label:
        raise ConfigError(f"goodness {config.goodness!r} is per-class and needs no negatives: use --set negatives=none")
    if not per_class and not embeds_label:
        raise ConfigError(
            f"goodness {config.goodness!r} needs labelled negatives: use --set negatives=random-label "
            "(or goodness=classwise with loss=classwise-ce)"
        )


def _check_loss_fits(config: RunConfig, plugin: Plugin, loss: Any, per_class: bool) -> None:
    """A loss that declares ``per_class`` must match the goodness; one that does not is trusted to take both."""
    declared = getattr(loss, "per_class", None)
    if declared is None:
        return
    if not isinstance(declared, bool):
        raise ConfigError(f"{plugin.label} sets per_class={declared!r}; set it to True or False, or leave it out")
    if declared != per_class:
        want = "classwise-ce" if per_class else "softplus-threshold"
        origin = "" if plugin.source == "ffablate" else f" (package {plugin.source}, declaring per_class={declared})"
        raise ConfigError(
            f"loss {config.loss!r}{origin} does not fit goodness {config.goodness!r}: use --set loss={want}"
        )


class FFTrainer:
    def __init__(self, config: RunConfig, data: common.RunData, device: torch.device, plugins: Registry | None = None):
        self.config, self.data, self.device = config, data, device
        self.net = FFNet(config, data.in_shape, data.dataset.num_classes, plugins).to(device)
        # One optimizer over every block: AdamW updates each parameter on its own and skips those without a
        # gradient, so this is the per-block update (blocks outside the active range have none), with one step
        # call instead of one per block (one fused kernel for them all: common.make_optimizer).
        self.optimizer = common.make_optimizer(
            [p for i in range(self.net.depth) for p in self.net.block_parameters(i)], config
        )
        fusion_params = list(self.net.fusion.parameters())
        self.fusion_optimizer = common.make_optimizer(fusion_params, config) if fusion_params else None
        self._negatives_checked = False  # the first batch's negative labels are checked by value (one host sync)
        # ff: the whole batch in one pass per block. ff-ga splits the batch into micro-batches that each go
        # through every block before the next one starts; gradients accumulate and the optimizer steps once at
        # the end. Unless a plugin takes batch statistics (coupled-bn, adaptive T) the update is the same (block
        # l's input comes from block l-1's pre-step weights either way), but only one micro-batch's activations
        # of one block are ever alive: FF's twin of bp-ga.
        self.micro_batch: int | None = config.micro_batch if config.method == "ff-ga" else None

    def train_step(self, x: Tensor, y: Tensor, progress: float, active: range, fit_fusion: bool) -> float:
        """One batch through blocks 0..max(active); only ``active`` blocks learn. Returns the last active
        block's loss."""
        # Every block's, not only the active ones': a gradient left from an earlier greedy phase would be stepped.
        self.optimizer.zero_grad(set_to_none=True)
        size = self.micro_batch or x.shape[0]
        chunks = list(zip(x.split(size), y.split(size), strict=True))
        wrong = self._wrong_labels(x, y, active, size)
        wrongs = wrong.split(size) if wrong is not None else [None] * len(chunks)
        scores, features, losses, temperatures, shares = [], [], [], [], []
        for (xc, yc), wc in zip(chunks, wrongs, strict=True):
            shares.append(yc.numel() / y.numel())
            chunk = self._chunk_backward(xc, yc, wc, progress, active, shares[-1])
            scores.append(chunk[0])
            features.append(chunk[1])
            losses += chunk[2]
            temperatures += chunk[3]
        fusion = None
        if fit_fusion and self.fusion_optimizer is not None:
            fusion = self._fusion_backward(x, y, _cat_chunks(scores), _cat_chunks(features))
        # One check before any step: a diverged block or fusion loss updates no parameter at all.
        fused = [(f"the fusion ({self.net.labels['fusion']})", fusion)] if fusion is not None else []
        values = common.checked_losses(losses + fused, temperatures, self.net.builtin_temperature)
        self.optimizer.step()
        if fusion is not None:
            self.fusion_optimizer.step()
        # ``values`` runs chunk by chunk, each chunk's active blocks in order (then the fusion's, left out here).
        block_values = values[: len(losses)]
        return sum(v * share for v, share in zip(block_values[len(active) - 1 :: len(active)], shares, strict=True))

    def _wrong_labels(self, x: Tensor, y: Tensor, active: range, size: int) -> Tensor | None:
        """The negatives' labels for the whole batch (None for per-class goodness), drawn in one call so that
        ff-ga draws the same random numbers as ff; the scores a plugin may ask for (hardest-label) are computed a
        micro-batch at a time, so ff-ga's memory stays a micro-batch's."""
        net = self.net
        if net.goodness.per_class:
            return None

        def scores() -> Tensor:
            # From the blocks trained so far: under the greedy schedule the later ones are still at their
            # initialisation and would only add noise.
            per_chunk = (net.scores_and_features(xc, active.stop, features=False)[0] for xc in x.split(size))
            return torch.cat([torch.stack(chunk).sum(0) for chunk in per_chunk])

        wrong = net.negatives.wrong_labels(y, net.num_classes, scores)
        who = f"{net.labels['negatives']} wrong_labels returned"
        if not (isinstance(wrong, Tensor) and wrong.dtype == y.dtype and wrong.shape == y.shape):
            raise PluginContractError(
                f"{who} {described(wrong)} for {y.numel()} labels; it must return a {y.dtype} tensor of shape "
                f"{tuple(y.shape)} (see ffablate_register_negatives in hookspecs.py)"
            )
        if wrong.device != y.device:
            raise PluginContractError(
                f"{who} labels on {wrong.device} for labels on {y.device}; return them on the labels'"
            )
        if not self._negatives_checked:
            # By value once, on the first batch: an out-of-range label failed deep in the embedding's scatter, and
            # the true label (a positive presented as a negative) trained silently to chance accuracy.
            k = net.num_classes
            outside, true = torch.stack([((wrong < 0) | (wrong >= k)).sum(), (wrong == y).sum()]).tolist()
            if outside:
                raise PluginContractError(f"{who} {outside} of {y.numel()} labels outside 0..{k - 1}")
            if true:
                raise PluginContractError(
                    f"{who} the true label for {true} of {y.numel()} images; a negative's label must be a wrong one"
                )
            self._negatives_checked = True
        return wrong

    def _chunk_backward(
        self, x: Tensor, y: Tensor, wrong: Tensor | None, progress: float, active: range, weight: float
    ) -> tuple[list[Tensor], list[Tensor], list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
        """Every block's forward, local loss and backward on one chunk (the loss scaled by the chunk's share
        of the batch, so accumulated gradients are the batch mean), with the chunk's negative labels ``wrong``
        (None: per-class goodness). Returns per-block detached scores and pooled features, each active
        block's unscaled loss, still on the device, and its temperature where that is on the device (to check).
        """
        net, k = self.net, self.net.num_classes
        if net.goodness.per_class:
            h, split = net.backbone.prepare(x), None
        else:
            # Positives and negatives share one pass of a doubled batch (two passes' worth of activations).
            pos, neg = net.negatives.embed(x, y, k), net.negatives.embed(x, wrong, k)
            h = net.backbone.prepare(torch.cat([pos, neg]))
            del pos, neg
            split = x.shape[0]
        scores, features, losses, temperatures = [], [], [], []
        for index in range(active.stop):
            learning = index in active
            with torch.set_grad_enabled(learning), common.autocast(self.device):
                g, forward, readout = net.layer_goodness(index, h)
            g = g.float()
            g_pos, g_neg = (g, None) if split is None else (g[:split], g[split:])
            if learning:
                temperature = net.temperature(index, progress, g.detach())
                loss = net.block_loss(g_pos, g_neg, y, temperature)
                (loss * weight).backward()
                losses.append((f"block {index} ({net.block_plugins})", loss))
                temperatures += net.temperature_to_check(index, temperature)
            # The detach boundary: block ``index``'s graph dies here.
            h = forward.detach()
            scores.append(g_pos.detach())
            features.append(readout.detach()[: split or None].float())
        return scores, features, losses, temperatures

    def _fusion_backward(self, x: Tensor, y: Tensor, scores: list[Tensor], features: list[Tensor]) -> Tensor:
        """The fusion's loss on this batch, with its gradient in the fusion's parameters (not yet stepped). Per-class
        goodness reuses the training pass's scores and features (train-mode norm statistics, unlike the eval-mode
        scores evaluation sees; it saves a pass); label-embedding goodness has class scores only from one pass per
        label, which ``scores_and_features`` makes in eval mode."""
        net = self.net
        if not net.goodness.per_class:
            scores, features = net.scores_and_features(x)
        loss = net.fusion_loss(scores, features, y)
        self.fusion_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def rehearse(self, x: Tensor, y: Tensor) -> None:
        """One step of every phase on ``x, y``, to meet the plugin mistakes only training reaches (a fusion whose
        loss fails, a loss that raises) before a study begins. It updates the model: the trainer is spent."""
        for active, fit_fusion in self.phases():
            self.train_step(x, y, 0.0, active, fit_fusion)

    def evaluate(self, loader: DeviceLoader) -> tuple[float, list[float]]:
        """Fused and per-block accuracy on ``loader``'s images. The blocks' passes run under the run's autocast
        (``scores_and_features``); the fusion, outside it, in fp32, as it is fit."""
        return common.evaluate(self.net, loader)

    def phases(self) -> list[tuple[range, bool]]:
        """(active blocks, fit fusion) per phase: one phase for simultaneous, one per block for greedy."""
        depth = self.net.depth
        if self.config.schedule == "simultaneous":
            return [(range(depth), True)]
        return [(range(i, i + 1), i == depth - 1) for i in range(depth)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by name, as a resumable checkpoint keeps their state: the blocks', and the fusion's where
        it has parameters."""
        return {"blocks": self.optimizer, **({"fusion": self.fusion_optimizer} if self.fusion_optimizer else {})}

    def fit(
        self,
        progress: common.Progress | None = None,
        on_epoch: common.EpochCallback | None = None,
        *,
        resume: common.TrainingState | None = None,
        keep: common.EpochKeeper | None = None,
    ) -> common.RunResult:
        """Train, then score the test split. ``keep`` is given the state after every epoch; ``resume`` (one such
        state) goes on from there, skipping the epochs it has: the rest trains as it would have without the stop."""
        cfg, loader = self.config, self.data.train
        # The fusion's logits are first used by the evaluation after an epoch; a wrong shape found there threw the
        # epoch away. Two test images through predict meet it now (eval mode: no state changes, no random draws).
        self.net.predict(next(iter(self.data.test))[0][:2])
        phases = self.phases()
        session = common.Session(self.net, self.optimizers(), self.device, len(phases) * cfg.epochs, resume)
        steps_per_phase = cfg.epochs * len(loader)
        total_steps, done = steps_per_phase * len(phases), session.epochs_done * len(loader)
        for phase, (active, fit_fusion) in enumerate(phases):
            opts = [self.optimizer] + ([self.fusion_optimizer] if fit_fusion and self.fusion_optimizer else [])
            for epoch in range(cfg.epochs):
                if not session.pending(phase * cfg.epochs + epoch):
                    continue
                loader.set_epoch(epoch)
                with session.watch, session.memory:
                    for step, (x, y) in enumerate(loader):
                        phase_step = epoch * len(loader) + step
                        common.set_lr(opts, cfg, phase_step, steps_per_phase)
                        # 0..1 inclusive, so a schedule's last step is at its end value.
                        fraction = phase_step / max(1, steps_per_phase - 1)
                        loss = self.train_step(x, y, fraction, active, fit_fusion)
                        # images/s is (epochs x training images) / train seconds for every method, as BP counts
                        # it: a greedy run's later phases pass the same images again, and counting them would
                        # show it faster per image than BP while it takes longer.
                        if phase == 0:
                            session.images += y.numel()
                        done += 1
                        if progress:
                            progress(done, total_steps, {"loss": loss})
                session.end_epoch(loss, self.evaluate, self.data, on_epoch, keep)
        return session.finish(cfg, self.evaluate, self.data)
