import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from ffablate import hookimpl
from ffablate.config import RunConfig
from ffablate.errors import ConfigError
from ffablate.plugins import Registry, make_plugin_manager
from ffablate.train import build_trainer, common, run
from ffablate.train.common import TrainingDiverged, make_optimizer


def test_same_seed_same_accuracy(tiny_config):
    first = run(tiny_config)
    second = run(tiny_config)
    assert first.test_accuracy == second.test_accuracy
    assert first.per_layer_accuracy == second.per_layer_accuracy
    assert first.test_accuracy > 0.3  # 1,000 images, two epochs: well above the 0.1 of chance


@pytest.mark.parametrize("method", ["ff", "bp-deepsup"])
def test_held_out_validation_is_scored_every_epoch_and_at_the_end(tiny_config, method):
    def counting(trainer):  # noqa: ANN001, ANN202
        """Which split each evaluate call scored: "val", "test" or "other"."""
        calls, real = [], trainer.evaluate

        def evaluate(loader):  # noqa: ANN001, ANN202
            calls.append({id(trainer.data.val): "val", id(trainer.data.test): "test"}.get(id(loader), "other"))
            return real(loader)

        trainer.evaluate = evaluate
        return calls

    config = tiny_config.with_updates({"method": method, "val_images": 300})
    trainer = build_trainer(config)
    calls, records = counting(trainer), []
    result = trainer.fit(on_epoch=lambda epoch, record: records.append(record))
    assert [sorted(r) for r in records] == [["epoch", "loss", "val_accuracy"]] * 2
    assert 0.2 < result.val_accuracy <= 1 and 0.2 < result.test_accuracy <= 1
    # One validation pass per epoch; the final result reuses the last one instead of scoring the same model again.
    assert calls == ["val", "val", "test"] and result.val_accuracy == records[-1]["val_accuracy"]
    # Without an epoch callback (a one-epoch study trial) nothing scored it yet: the end scores it once.
    once = build_trainer(config.with_updates({"epochs": 1}))
    calls = counting(once)
    assert once.fit().val_accuracy is not None and calls == ["test", "val"]
    plain = run(tiny_config.with_updates({"method": method, "epochs": 1}), on_epoch=lambda e, r: records.append(r))
    assert plain.val_accuracy is None and sorted(records[-1]) == ["epoch", "loss", "test_accuracy"]
    with pytest.raises(ConfigError, match="val_images must be >= 0"):
        tiny_config.with_updates({"val_images": -1})
    with pytest.raises(ConfigError, match=r"after holding out val_images=59980 .*hold out fewer"):
        build_trainer(tiny_config.with_updates({"method": method, "val_images": 59980, "limit_train": 0}))


# torch warns that the hook fires with no input requiring a gradient: every block's input is detached, the point.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_detach_boundary_each_block_backpropagates_only_its_own_loss(tiny_config):
    trainer = build_trainer(tiny_config)
    calls = [0] * trainer.net.depth
    for index, block in enumerate(trainer.net.backbone.blocks):
        block.register_full_backward_hook(lambda *a, i=index: calls.__setitem__(i, calls[i] + 1))
    x, y = next(iter(trainer.data.train))
    trainer.train_step(x, y, 0.0, range(trainer.net.depth), fit_fusion=True)
    # Without the detach, block 1's loss would backpropagate through block 0 as well.
    assert calls == [1] * trainer.net.depth


def test_greedy_phase_leaves_earlier_blocks_untouched(tiny_config):
    trainer = build_trainer(dataclasses.replace(tiny_config, schedule="greedy"))
    before = [p.detach().clone() for p in trainer.net.backbone.blocks[0].parameters()]
    later = [p.detach().clone() for p in trainer.net.backbone.blocks[1].parameters()]
    x, y = next(iter(trainer.data.train))
    trainer.train_step(x, y, 0.0, range(1, 2), fit_fusion=False)
    assert all(p.grad is None for p in trainer.net.backbone.blocks[0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.net.backbone.blocks[0].parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(later, trainer.net.backbone.blocks[1].parameters(), strict=True))


@pytest.mark.parametrize(
    ("method", "schedule"), [("ff", "simultaneous"), ("ff", "greedy"), ("bp-deepsup", "simultaneous")]
)
def test_images_per_second_counts_each_training_image_once_per_epoch(tiny_config, method, schedule):
    # A greedy run passes the data once per block; counting every pass made it look faster than BP per image
    # while it took longer. Every method's rate is (epochs x training images) / train seconds.
    trainer = build_trainer(tiny_config.with_updates({"method": method, "schedule": schedule, "epochs": 1}))
    images = sum(y.numel() for _, y in trainer.data.train)
    result = trainer.fit()
    assert result.images_per_second * result.train_seconds == pytest.approx(images, rel=1e-9)


def _grads_after_one_step(config: RunConfig) -> tuple[float, list[torch.Tensor]]:
    trainer = build_trainer(config)
    trainer.optimizer.step = lambda: None  # keep the gradients of exactly one batch
    x, y = next(iter(trainer.data.train))
    loss = trainer.train_step(x, y)
    return loss, [p.grad.clone() for p in trainer.net.parameters()]


@pytest.mark.parametrize("norm", ["decoupled", "coupled-ln"])
def test_bp_ga_gradients_match_bp_for_the_same_effective_batch(tiny_config, norm):
    base = dataclasses.replace(tiny_config, norm=norm)
    loss_full, full = _grads_after_one_step(dataclasses.replace(base, method="bp-deepsup"))
    loss_ga, accumulated = _grads_after_one_step(dataclasses.replace(base, method="bp-ga", micro_batch=10))
    assert loss_ga == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(full, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_fused_adamw_makes_torchs_default_adamw_update():
    """The trainers' optimizer is AdamW's fused implementation (for its host time); its update must be the one
    AdamW defines, as torch's per-parameter loop computes it, with lr and weight decay from the config."""
    config = RunConfig(lr=0.01, weight_decay=0.1)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 3, 3, 3), (4,), (1,))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    fused = make_optimizer(params, config)
    # Decay on the kernel, none on the bias and the scalar (make_optimizer's groups).
    groups = [{"params": twins[:1]}, {"params": twins[1:], "weight_decay": 0.0}]
    loop = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(3):
        for p, twin in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            twin.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, twin, p0 in zip(params, twins, start, strict=True):
        assert (p != p0).all()  # every element moved
        torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, fusion", [("ff", "learned-weights"), ("ff", "readout"), ("bp-deepsup", "last")])
def test_weight_decay_shrinks_kernels_and_leaves_biases_gains_and_a_learned_temperature(tiny_config, method, fusion):
    """With no gradient, an AdamW step moves a parameter by its decay alone: every kernel shrinks, and no vector
    or scalar moves (a decayed log T would pull a learned T toward floor + 1, a prior no one chose)."""
    config = tiny_config.with_updates(
        {"method": method, "weight_decay": 0.5, "temperature": "learned", "fusion": fusion}
    )
    trainer = build_trainer(config)
    named = list(trainer.net.named_parameters())
    before = {name: p.detach().clone() for name, p in named}
    for _, p in named:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    if getattr(trainer, "fusion_optimizer", None):
        trainer.fusion_optimizer.step()
    moved = {name for name, p in named if not torch.equal(p, before[name])}
    kernels = {name for name, p in named if p.dim() >= 2}
    assert moved == kernels
    if method == "ff":
        assert any(name.endswith("log_t") for name, _ in named)


HARDEST = {"goodness": "meansq", "negatives": "hardest-label", "loss": "softplus-threshold"}


@pytest.mark.parametrize(
    "updates",
    # Hardest-label negatives drew their random labels per micro-batch: 31 of 64 differed from ff's at p = 0.5.
    [{"norm": "decoupled"}, {"norm": "coupled-ln"}, {"norm": "decoupled", **HARDEST}],
)
def test_ff_ga_gradients_match_ff_for_the_same_effective_batch(tiny_config, updates):
    def grads(config: RunConfig) -> tuple[float, list[torch.Tensor]]:
        trainer = build_trainer(config)
        trainer.optimizer.step = lambda: None  # keep the gradients of exactly one batch
        x, y = next(iter(trainer.data.train))
        loss = trainer.train_step(x, y, 0.5, range(trainer.net.depth), fit_fusion=False)
        return loss, [p.grad.clone() for p in trainer.net.backbone.parameters()]

    base = dataclasses.replace(tiny_config, **updates)
    loss_full, full = grads(base)
    loss_ga, accumulated = grads(dataclasses.replace(base, method="ff-ga", micro_batch=10))
    assert loss_ga == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(full, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ga_micro_batch_must_divide_the_batch(tiny_config):
    with pytest.raises(ConfigError, match="multiple of micro_batch"):
        build_trainer(dataclasses.replace(tiny_config, method="ff-ga", micro_batch=7))


def test_strides_are_checked_for_conv_blocks_only(tiny_config):
    with pytest.raises(ConfigError, match="strides has 3 entries but channels has 2"):
        dataclasses.replace(tiny_config, strides="2,2,2").validate()
    dataclasses.replace(tiny_config, backbone="mlp", strides="2,2,2").validate()  # an MLP has no strides


def test_bp_ckpt_matches_bp_loss_and_gradients(tiny_config):
    loss_plain, plain = _grads_after_one_step(dataclasses.replace(tiny_config, method="bp-deepsup"))
    loss_ckpt, ckpt = _grads_after_one_step(dataclasses.replace(tiny_config, method="bp-ckpt"))
    assert loss_ckpt == loss_plain
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def _block_forward_calls(trainer, step) -> list[list[int]]:  # noqa: ANN001
    """The batch size of every forward call of each backbone block during ``step()``."""
    calls: list[list[int]] = [[] for _ in trainer.net.backbone.blocks]
    hooks = [
        block.register_forward_pre_hook(lambda module, args, i=i: calls[i].append(args[0].shape[0]))
        for i, block in enumerate(trainer.net.backbone.blocks)
    ]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize(("method", "runs"), [("bp-deepsup", 1), ("bp-ckpt", 2)])
def test_bp_ckpt_recomputes_each_block_in_the_backward(tiny_config, method, runs):
    # Checkpointing keeps no block activations: the backward runs every block's forward once more. Without the
    # recompute bp-ckpt would be bp-deepsup under another name, with its memory.
    trainer = build_trainer(dataclasses.replace(tiny_config, method=method))
    x, y = next(iter(trainer.data.train))
    depth = len(trainer.net.backbone.blocks)
    assert _block_forward_calls(trainer, lambda: trainer.train_step(x, y)) == [[50] * runs] * depth
    # Evaluation stores nothing for a backward: one forward per block there.
    assert _block_forward_calls(trainer, lambda: trainer.evaluate([(x, y)])) == [[50]] * depth


@pytest.mark.parametrize(
    ("method", "sizes"),
    [("ff", [50]), ("ff-ga", [10] * 5), ("bp-deepsup", [50]), ("bp-ga", [10] * 5)],
)
def test_gradient_accumulation_feeds_the_blocks_micro_batches(tiny_config, method, sizes):
    # ff-ga and bp-ga exist to keep one micro-batch's activations alive: no block may see the whole batch.
    trainer = build_trainer(dataclasses.replace(tiny_config, method=method, micro_batch=10))
    x, y = next(iter(trainer.data.train))
    if method.startswith("ff"):
        calls = _block_forward_calls(trainer, lambda: trainer.train_step(x, y, 0.0, range(2), True))
    else:
        calls = _block_forward_calls(trainer, lambda: trainer.train_step(x, y))
    assert calls == [sizes] * len(trainer.net.backbone.blocks)


def test_bp_only_has_a_head_on_the_last_block(tiny_config):
    trainer = build_trainer(dataclasses.replace(tiny_config, method="bp"))
    assert len(trainer.net.heads) == 1
    deep = build_trainer(dataclasses.replace(tiny_config, method="bp-deepsup"))
    assert len(deep.net.heads) == deep.net.backbone.blocks.__len__()


@pytest.mark.parametrize("method", ["bp", "bp-deepsup", "bp-ga", "bp-ckpt"])
def test_bp_methods_learn(tiny_config, method):
    result = run(dataclasses.replace(tiny_config, method=method, micro_batch=10))
    assert result.test_accuracy > 0.3
    assert result.images_per_second > 0 and result.peak_memory_bytes > 0


# A label-embedding goodness reads the label from the first 10 pixels: an MLP sees them at every unit, a 3x3 CNN
# only at one corner, where it learns little within a test's budget (label channels: see below). Each combination
# below learns within a second or two: every block and the fused prediction are compared with chance (0.1) on
# 1,000 test images.
LEARNS = {"backbone": "mlp", "channels": "100,100", "epochs": 4}


@pytest.mark.parametrize(
    "updates",
    [
        {"goodness": "meansq", "negatives": "random-label", "loss": "softplus-threshold", "fusion": "sum"},
        {
            "goodness": "l1",
            "negatives": "hardest-label",
            "loss": "symba",
            "fusion": "learned-weights",
            "temperature": "learned",
        },
        # bce's p = 1 - exp(-g/T) saturates for g >> T: sumsq of 100 raw units starts near 12-19, so the default
        # T (2 -> 0.5) leaves positives without gradient and the loss only shrinks all activity (chance accuracy).
        # T on the goodness' scale learns. sum-from-k (k=1) scores block 1 alone, whose RMS-normalized input hides
        # block 0's goodness: it needs more epochs than block 0.
        {
            "goodness": "sumsq",
            "negatives": "random-label",
            "loss": "bce",
            "fusion": "sum-from-k",
            "norm": "decoupled",
            "temperature": "cosine",
            "temperature.start": 20,
            "temperature.end": 5,
            "epochs": 8,
        },
        {
            "goodness": "meansq",
            "negatives": "random-label",
            "loss": "softplus-threshold",
            "fusion": "sum",
            "norm": "none",
        },
        {
            "goodness": "logsumexp",
            "negatives": "random-label",
            "loss": "softplus-threshold",
            "fusion": "readout",
            "norm": "coupled-bn",
            "temperature": "linear",
        },
        {"norm": "coupled-ln", "temperature": "adaptive", "fusion": "last"},
    ],
)
def test_plugin_combinations_train(tiny_config, updates):
    result = run(tiny_config.with_updates({**LEARNS, **updates}))
    assert len(result.per_layer_accuracy) == 2
    # Seeds 0-2 scored 0.32-0.66 fused and 0.38-0.70 at block 0; chance is 0.1.
    assert result.test_accuracy > 0.25, result
    assert result.per_layer_accuracy[0] > 0.25, result  # the FF blocks learn, not only a fused linear probe
    if updates.get("fusion") in ("last", "sum-from-k"):  # both read block 1 alone here (k defaults to 1)
        assert result.test_accuracy == result.per_layer_accuracy[1]


def test_a_cnn_learns_from_label_channels(tiny_config):
    # The same run with the label in the first pixels scored 0.20-0.24 over seeds 0-2; with channels, 0.28-0.35.
    updates = {"goodness": "meansq", "negatives": "random-label", "loss": "symba", "negatives.into": "channels"}
    result = run(tiny_config.with_updates({**updates, "epochs": 4}))
    assert result.test_accuracy > 0.26, result


def test_divergence_raises_training_diverged(tiny_config):
    with pytest.raises(TrainingDiverged, match="lower lr"):
        run(tiny_config.with_updates({"lr": 1e30, "limit_train": 200}))


@pytest.mark.parametrize("method", ["ff", "ff-ga", "bp", "bp-ga"])
def test_a_diverged_step_names_its_first_bad_loss_and_updates_nothing(tiny_config, method):
    trainer = build_trainer(tiny_config.with_updates({"method": method, "micro_batch": 25, "limit_train": 200}))
    before = [p.detach().clone() for p in trainer.net.parameters()]
    x, y = next(iter(trainer.data.train))
    x = x.clone()
    x[-1] = float("nan")  # the last micro-batch only: the losses of the chunks before it stay finite
    is_ff = method.startswith("ff")
    with pytest.raises(TrainingDiverged, match=r"at block 0 \(norm plugin .*\);" if is_ff else "at bp step;"):
        if is_ff:
            trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)
        else:
            trainer.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True))


def test_a_diverged_fusion_step_updates_no_block_either(tiny_config):
    trainer = build_trainer(tiny_config.with_updates({"fusion": "readout", "limit_train": 200}))
    for p in trainer.net.fusion.parameters():
        p.data.fill_(float("nan"))  # the blocks' losses stay finite; only the fusion's diverges
    before = [p.detach().clone() for p in trainer.net.backbone.parameters()]
    x, y = next(iter(trainer.data.train))
    with pytest.raises(
        TrainingDiverged, match=r"at the fusion \(fusion plugin 'readout' \(built-in\)\); lower lr, or check"
    ):
        trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)
    # Before: the blocks had stepped already when the fusion's loss was checked.
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.net.backbone.parameters(), strict=True))


def test_a_temperature_schedule_reaches_its_end_value(tiny_config):
    config = tiny_config.with_updates({"temperature": "linear", "temperature.start": 2.0, "temperature.end": 0.5})
    trainer = build_trainer(config)
    seen = []
    step = trainer.train_step
    trainer.train_step = lambda x, y, progress, *rest: seen.append(progress) or step(x, y, progress, *rest)
    trainer.fit()
    assert seen[0] == 0.0 and seen[-1] == 1.0  # the last step ran at T = 0.5; it ran at (n - 1)/n of the way


def _bn_state(net: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in net.buffers()]


def test_bp_ckpt_updates_batch_norm_statistics_once_per_step(tiny_config):
    """The backward's recompute must not count as a second batch: bp-ckpt's statistics equal bp-deepsup's."""
    states = []
    for method in ("bp-deepsup", "bp-ckpt"):
        trainer = build_trainer(dataclasses.replace(tiny_config, method=method))
        x, y = next(iter(trainer.data.train))
        trainer.train_step(x, y)
        states.append(_bn_state(trainer.net))
    assert any(b.dtype == torch.int64 and int(b) == 1 for b in states[1])  # num_batches_tracked
    for a, b in zip(*states, strict=True):
        assert torch.equal(a, b)


def test_scoring_passes_leave_batch_norm_alone_and_keep_train_mode(tiny_config):
    config = tiny_config.with_updates(
        {"goodness": "meansq", "negatives": "hardest-label", "loss": "softplus-threshold", "threshold": 1.0}
    )
    trainer = build_trainer(config)
    x, _ = next(iter(trainer.data.train))
    before = _bn_state(trainer.net)
    trainer.net.scores_and_features(x)
    assert trainer.net.training
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_state(trainer.net), strict=True))


def test_greedy_hardest_label_negatives_are_scored_by_the_blocks_trained_so_far(tiny_config):
    config = tiny_config.with_updates(
        {"goodness": "meansq", "negatives": "hardest-label", "loss": "softplus-threshold", "schedule": "greedy"}
    )
    trainer = build_trainer(config)
    x, y = next(iter(trainer.data.train))
    seen = []
    real = trainer.net.negatives.wrong_labels
    trainer.net.negatives.wrong_labels = lambda labels, k, scores: seen.append(scores()) or real(labels, k, scores)
    per_block = [s.clone() for s in trainer.net.scores_and_features(x)[0]]
    trainer.train_step(x, y, 0.0, range(0, 1), fit_fusion=False)
    torch.testing.assert_close(seen[0], per_block[0])  # phase 0: block 0 alone, not block 1's untrained scores


@pytest.mark.parametrize(("active", "passes"), [(range(0, 1), [11, 0]), (range(0, 2), [11, 11])])
def test_hardest_label_negatives_run_only_the_blocks_they_score(tiny_config, active, passes):
    # K=10 labelled scoring passes through the blocks trained so far, then the training pass of the doubled batch;
    # no neutral-label pass (its readout features are not needed) and no block beyond the active ones.
    config = tiny_config.with_updates(
        {"goodness": "meansq", "negatives": "hardest-label", "loss": "softplus-threshold", "schedule": "greedy"}
    )
    trainer = build_trainer(config)
    calls = [0] * trainer.net.depth
    for index, block in enumerate(trainer.net.backbone.blocks):
        block.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    x, y = next(iter(trainer.data.train))
    trainer.train_step(x, y, 0.0, active, fit_fusion=False)
    assert calls == passes


PEAK_CHECK = """
import torch
from ffablate.train.common import MemoryMeter, _rss_peak_bytes

meter = MemoryMeter(torch.device("cpu"))
with meter:  # a stretch of training
    small = torch.ones(1024)
# Between the stretches, an evaluation: 256 MiB in 64 KiB tensors (glibc's heap, not mmap), and one more on top of
# them, so that free() alone cannot hand the pages back and RSS stays at the evaluation's level.
chunks = [torch.ones(16384) for _ in range(4096)]
pin = torch.ones(16384)
with_chunks = _rss_peak_bytes()
del chunks
with meter:
    small = torch.ones(1024)
print(meter._resettable, with_chunks - meter.peak_bytes())
"""


def test_cpu_peak_memory_is_that_of_the_training_stretches_alone():
    # A fresh process: its allocator is the default one (entry points that call retain_cpu_memory keep freed memory).
    out = subprocess.run([sys.executable, "-c", PEAK_CHECK], capture_output=True, text=True, check=True).stdout
    resettable, drop = out.split()
    if resettable != "True":
        pytest.skip("this OS cannot reset the RSS high-water mark")
    assert int(drop) > 200 * 2**20


class _Temperature(torch.nn.Module):
    def __init__(self, value_of):
        super().__init__()
        self.value_of = value_of

    def forward(self, progress, goodness):
        return self.value_of(goodness)


class _TemperaturePlugin:
    def __init__(self, value_of):
        self.value_of = value_of

    @hookimpl
    def ffablate_register_temperature(self, register):
        register("probe", lambda: _Temperature(self.value_of), "test temperature")


@pytest.mark.parametrize(
    ("value_of", "got"),
    [
        (lambda g: g.mean(0), r"a torch.float32 tensor of shape \(10,\)"),  # one T per class, broadcast silently
        (lambda g: torch.tensor(1), r"a torch.int64 tensor of shape \(\)"),
        (lambda g: "0.5", "a str"),
    ],
)
def test_a_temperature_that_is_not_one_number_is_refused_before_any_update(tiny_config, value_of, got):
    plugins = Registry(make_plugin_manager((_TemperaturePlugin(value_of),)))
    trainer = build_trainer(tiny_config.with_updates({"temperature": "probe"}), plugins=plugins)
    _assert_refused_before_any_update(trainer, f"temperature plugin 'probe' .* returned {got}; a temperature must be")


@pytest.mark.parametrize(
    ("value", "as_tensor"),
    [(v, False) for v in (0, -0.5, float("inf"), float("nan"))] + [(v, True) for v in (0, -0.5, float("inf"))],
)
def test_a_temperature_that_is_not_positive_and_finite_is_refused(tiny_config, value, as_tensor):
    # A negative tensor T trained every block toward the wrong labels without an error (accuracy under chance).
    returned = torch.tensor(float(value)) if as_tensor else value
    plugins = Registry(make_plugin_manager((_TemperaturePlugin(lambda g: returned),)))
    trainer = build_trainer(tiny_config.with_updates({"temperature": "probe"}), plugins=plugins)
    shown = float(value) if as_tensor else value
    match = rf"temperature plugin 'probe' .* returned {shown} at progress 0.000 for block 0; a temperature must be pos"
    _assert_refused_before_any_update(trainer, match)


def test_a_nan_temperature_tensor_diverges_naming_the_blocks_plugins(tiny_config):
    # An adaptive T follows a diverging goodness to NaN: a diverged run (which a study records and goes on from),
    # not a plugin mistake.
    plugins = Registry(make_plugin_manager((_TemperaturePlugin(lambda g: torch.tensor(float("nan"))),)))
    trainer = build_trainer(tiny_config.with_updates({"temperature": "probe"}), plugins=plugins)
    x, y = next(iter(trainer.data.train))
    match = r"at block 0 \(norm plugin .*, goodness plugin .*, loss plugin .*, temperature plugin 'probe' .*\); lower"
    with pytest.raises(TrainingDiverged, match=match):
        trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)


def test_temperatures_on_the_device_are_read_with_the_losses():
    # A CUDA T is checked in the step's one host sync, after the backward passes and before any update.
    losses = [("block 0", torch.tensor(0.5)), ("block 1", torch.tensor(0.25))]
    assert common.checked_losses(losses, [("temperature plugin 'probe' (block 0)", torch.tensor(0.3))]) == [0.5, 0.25]
    with pytest.raises(ConfigError, match=r"^temperature plugin 'probe' \(block 1\) returned T = -1.0; a temperature"):
        common.checked_losses(
            losses, [("t (block 0)", torch.tensor(2.0)), ("temperature plugin 'probe' (block 1)", torch.tensor(-1.0))]
        )
    # A diverged loss is named first, and a NaN T (which follows it) is no plugin mistake.
    nan = torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at block 1"):
        common.checked_losses([losses[0], ("block 1", nan)], [("t", nan)])
    assert common.checked_losses(losses, [("t", nan)]) == [0.5, 0.25]
    # A built-in schedule's T out of range is training diverging, which a study records and goes on from.
    with pytest.raises(TrainingDiverged, match=r"^t \(block 0\) returned T = inf: the temperature diverged with"):
        common.checked_losses(losses, [("t (block 0)", torch.tensor(float("inf")))], builtin_temperatures=True)


def test_a_learned_temperature_that_overflows_is_a_diverged_run(tiny_config):
    # A huge lr drove log T to inf: "returned inf ...; fix the plugin" stopped a study on every rerun (it is seeded),
    # with no plugin of the user's to fix.
    trainer = build_trainer(tiny_config.with_updates({"temperature": "learned"}))
    with torch.no_grad():
        trainer.net.temperatures[0].log_t.fill_(1000.0)
    match = r"^temperature plugin 'learned' \(built-in\) returned inf at progress 0.000 for block 0: the temperature "
    with pytest.raises(TrainingDiverged, match=match + "diverged with training; lower lr"):
        trainer.train_step(*next(iter(trainer.data.train)), 0.0, range(trainer.net.depth), True)


def _assert_refused_before_any_update(trainer, match: str) -> None:
    before = [p.detach().clone() for p in trainer.net.parameters()]
    x, y = next(iter(trainer.data.train))
    with pytest.raises(ConfigError, match=match):
        trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True))


@pytest.mark.parametrize("value_of", [lambda g: 0.5, lambda g: torch.tensor(0.5)])
def test_a_temperature_may_be_a_number_or_a_0_dim_tensor(tiny_config, value_of):
    plugins = Registry(make_plugin_manager((_TemperaturePlugin(value_of),)))
    trainer = build_trainer(tiny_config.with_updates({"temperature": "probe"}), plugins=plugins)
    x, y = next(iter(trainer.data.train))
    assert math.isfinite(trainer.train_step(x, y, 0.0, range(trainer.net.depth), True))


class _LossPlugin:
    @hookimpl
    def ffablate_register_loss(self, register):
        def unreduced(g_pos, g_neg, labels, threshold, temperature):
            return torch.nn.functional.cross_entropy(g_pos / temperature, labels, reduction="none")

        register("per-sample-ce", lambda: unreduced, "class-wise CE without the mean")


def test_a_loss_that_is_not_one_number_is_refused_before_any_update(tiny_config):
    plugins = Registry(make_plugin_manager((_LossPlugin(),)))
    trainer = build_trainer(tiny_config.with_updates({"loss": "per-sample-ce"}), plugins=plugins)
    _assert_refused_before_any_update(
        trainer, r"loss plugin 'per-sample-ce' .* returned a torch.float32 tensor of shape"
    )


class _MistakesPlugin:
    """A third party's usual mistakes, one plugin per kind: a constant loss, a detached goodness, negatives that
    are the true label or outside 0..K-1."""

    @hookimpl
    def ffablate_register_loss(self, register):
        register("constant", lambda: lambda g_pos, g_neg, labels, threshold, t: torch.tensor(0.5), "no gradient")

    @hookimpl
    def ffablate_register_goodness(self, register):
        class Detached:
            per_class = True

            def __call__(self, paths, num_classes):
                h = paths.goodness_input.detach()
                return h[:, :num_classes].flatten(2).pow(2).mean(-1)

        register("detached", Detached, "no gradient")

        class Elsewhere(Detached):
            def __call__(self, paths, num_classes):  # right shape and dtype, another device (meta stands for one)
                return torch.empty(paths.goodness_input.shape[0], num_classes, device="meta")

        register("elsewhere", Elsewhere, "another device")

    @hookimpl
    def ffablate_register_negatives(self, register):
        from ffablate.builtin.negatives import RandomLabel

        class Shifted(RandomLabel):
            def __init__(self, shift: int = 0):
                super().__init__()
                self.shift = shift

            def wrong_labels(self, labels, num_classes, scores):
                return labels + self.shift

        register("shifted", Shifted, "labels moved by `shift`")


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        ({"loss": "constant"}, r"loss plugin 'constant' .* returned a loss with no gradient; compute it from"),
        ({"goodness": "detached"}, r"goodness plugin 'detached' .* returned a goodness with no gradient"),
        ({"goodness": "elsewhere"}, r"goodness plugin 'elsewhere' .* returned a tensor on meta for activity on cpu"),
        (
            {"goodness": "meansq", "loss": "symba", "negatives": "shifted"},
            r"negatives plugin 'shifted' .* wrong_labels returned the true label for 50 of 50 images",
        ),
        (
            {"goodness": "meansq", "loss": "symba", "negatives": "shifted", "negatives.shift": 10},
            r"negatives plugin 'shifted' .* wrong_labels returned 50 of 50 labels outside 0..9",
        ),
    ],
)
def test_plugin_mistakes_that_trained_silently_or_crashed_are_refused_before_any_update(tiny_config, updates, match):
    # A constant loss or a detached goodness ended in autograd's "element 0 of tensors does not require grad"
    # traceback; the true label as a negative trained to chance; an out-of-range one crashed in the embedding.
    plugins = Registry(make_plugin_manager((_MistakesPlugin(),)))
    trainer = build_trainer(tiny_config.with_updates(updates), plugins=plugins)
    _assert_refused_before_any_update(trainer, match)
