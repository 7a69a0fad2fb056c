import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ffablate import hookimpl
from ffablate.cli import main
from ffablate.errors import ConfigError, DataError, FFablateWarning, UnknownPlugin
from ffablate.paths import NormPaths
from ffablate.plugins import HOOKS, KINDS, Plugin, Registry, add_plugin, make_plugin_manager, registry, remove_plugin
from tests.conftest import OnePlugin, registry_with, tiny_args

EXPECTED_BUILTINS = {
    "goodness": {"sumsq", "meansq", "l1", "logsumexp", "classwise"},
    "temperature": {"constant", "linear", "cosine", "adaptive", "learned"},
    "norm": {"coupled-bn", "coupled-ln", "decoupled", "none"},
    "loss": {"softplus-threshold", "symba", "bce", "classwise-ce"},
    "negatives": {"random-label", "hardest-label", "none"},
    "fusion": {"last", "sum", "sum-from-k", "learned-weights", "readout"},
    "datasets": {
        "fashion-mnist",
        "mnist",
        "digits",
        "teacher-student",
        "cifar10",
        "cifar100",
        "svhn",
        "stl10",
        "imagefolder",
    },
}


def test_every_builtin_is_registered_and_listed(capsys):
    reg = registry()
    for kind, names in EXPECTED_BUILTINS.items():
        assert names <= set(reg.names(kind)), kind
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_kind = {(row["kind"], row["name"]) for row in listed}
    for kind, names in EXPECTED_BUILTINS.items():
        assert {(kind, n) for n in names} <= by_kind
    assert all(row["description"] and row["source"] for row in listed)
    assert set(row["kind"] for row in listed) == set(KINDS)


def test_unknown_plugin_names_the_known_ones():
    with pytest.raises(UnknownPlugin, match="did you mean 'meansq'.*sumsq \\[ffablate\\]"):
        registry().get("goodness", "meansqq")


class Cube:
    per_class = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, paths, num_classes):
        return self.scale * paths.goodness_input.flatten(1).float().abs().pow(3).mean(1)


class CubePlugin:
    calls = 0

    @hookimpl
    def ffablate_register_goodness(self, register):
        register(
            "cube", self.make, "mean |h|^3 (test plugin)", space={"scale": {"type": "float", "low": 0.5, "high": 2.0}}
        )

    def make(self, scale: float = 1.0):
        CubePlugin.calls += 1
        return Cube(scale)


def test_in_test_plugin_is_used_by_ffablate_train(capsys, monkeypatch):
    monkeypatch.setattr(CubePlugin, "calls", 0)  # a count of this run's factory calls, whatever ran before
    plugin = CubePlugin()
    add_plugin(plugin)
    try:
        args = tiny_args(
            "--set",
            "goodness=cube",
            "--set",
            "goodness.scale=2",
            "--set",
            "negatives=random-label",
            "--set",
            "loss=softplus-threshold",
            "--set",
            "fusion=sum",
            "--json",
        )
        assert main(["train", *args]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["config"]["goodness"] == "cube"
        assert result["config"]["goodness.scale"] == 2
        assert CubePlugin.calls == 1
        assert 0.0 <= result["test_accuracy"] <= 1.0
    finally:
        remove_plugin(plugin)
    with pytest.raises(UnknownPlugin):
        registry().get("goodness", "cube")


class LearnedScale(torch.nn.Module):
    per_class = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def __call__(self, paths, num_classes):
        return self.w * paths.sumsq()


class LearnedScalePlugin:
    @hookimpl
    def ffablate_register_goodness(self, register):
        register("learned-scale", LearnedScale, "a goodness with a parameter (test plugin)")


def test_a_shared_plugin_with_parameters_is_refused_in_one_line(capsys):
    # One goodness instance serves every block: its parameter would be in no optimizer yet couple the blocks.
    plugin = LearnedScalePlugin()
    add_plugin(plugin)
    try:
        args = tiny_args("--set", "goodness=learned-scale", "--set", "negatives=random-label")
        assert main(["train", *args, "--set", "loss=softplus-threshold"]) == 2
        err = capsys.readouterr().err.strip()
        named = r"goodness plugin 'learned-scale' \(package [\w.]*LearnedScalePlugin\) has trainable parameters"
        assert len(err.splitlines()) == 1 and re.search(named, err), err
    finally:
        remove_plugin(plugin)


def test_duplicate_name_fails_fast():
    class Clash:
        @hookimpl
        def ffablate_register_goodness(self, register):
            register("meansq", Cube, "clashes with the built-in")

    with pytest.raises(ConfigError, match="registered twice"):
        Registry(make_plugin_manager((Clash(),)))


def test_misspelled_hook_fails_fast():
    class Typo:
        @hookimpl
        def ffablate_register_goodnes(self, register):  # missing "s"
            pass

    with pytest.raises(ConfigError, match="ffablate_register_goodnes"):
        make_plugin_manager((Typo(),))


def test_unknown_plugin_parameter_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"^temperature plugin 'constant' has no parameter 'tt' \(did you mean 't'\?\); its parameters: t$",
    ):
        registry().create("temperature", "constant", {"tt": 1.0})


def test_example_package_is_found_through_its_entry_point(tmp_path: Path):
    package = Path(__file__).parents[1] / "plugins" / "ffablate-power"
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
    )
    env_path = f"{target}:{Path(__file__).parents[1]}"
    out = subprocess.run(
        [sys.executable, "-m", "ffablate.cli", "plugins", "goodness", "--json"],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    ).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["power"]["source"] == "ffablate-power"
    assert rows["power"]["params"] == {"p": 3.0}


def test_a_run_records_where_its_outside_plugins_came_from():
    # A run of goodness=power named the plugin and its parameters, not which package (or version) it came from.
    from ffablate.config import RunConfig
    from ffablate.plugins import plugin_sources

    reg = registry_with(OnePlugin("goodness", Cube))
    config = RunConfig().with_updates({"goodness": "probe", "negatives": "random-label", "loss": "softplus-threshold"})
    sources = plugin_sources(config, reg, ("norm", "goodness", "temperature"))
    assert sources == {"goodness": f"probe from {OnePlugin.__module__}.OnePlugin (no package version)"}


def test_goodness_plugins_agree_with_their_definitions():
    from ffablate.paths import NormPaths

    h = torch.randn(4, 10, 3, 3, generator=torch.Generator().manual_seed(0))
    paths = NormPaths(h, h, h.mean((2, 3)))
    reg = registry()
    flat = h.flatten(1)
    assert torch.allclose(reg.create("goodness", "sumsq")(paths, 5), flat.square().sum(1))
    assert torch.allclose(reg.create("goodness", "meansq")(paths, 5), flat.square().mean(1))
    assert torch.allclose(reg.create("goodness", "l1")(paths, 5), flat.abs().mean(1))
    per_class = reg.create("goodness", "classwise")(paths, 5)
    assert per_class.shape == (4, 5)
    assert torch.allclose(per_class[:, 1], h[:, 2:4].square().mean((1, 2, 3)))


def test_losses_agree_with_their_definitions():
    reg = registry()
    g_pos, g_neg, t, theta = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]), torch.tensor(2.0), 2.0
    softplus = torch.nn.functional.softplus
    expected = (softplus(-(g_pos - theta) / t) + softplus((g_neg - theta) / t)).mean()
    torch.testing.assert_close(reg.create("loss", "softplus-threshold")(g_pos, g_neg, None, theta, t), expected)
    torch.testing.assert_close(
        reg.create("loss", "symba", {"alpha": 3.0})(g_pos, g_neg, None, theta, t),
        softplus(-3.0 * (g_pos - g_neg) / t).mean(),
    )
    p_pos = (1 - torch.exp(-g_pos / t)).clamp_min(1e-6)
    expected_bce = -(p_pos.log().mean() + (-g_neg / t).mean())
    got = reg.create("loss", "bce")(g_pos, g_neg, None, theta, t)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected_bce)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(
        reg.create("loss", "classwise-ce")(logits, None, labels, theta, t),
        torch.nn.functional.cross_entropy(logits / t, labels),
    )


def test_temperature_schedules_run_from_start_to_end():
    reg, g = registry(), torch.zeros(3)

    def at(t, progress: float) -> float:  # noqa: ANN001
        value = t(progress, g)
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
        return value.item()

    constant = reg.create("temperature", "constant", {"t": 0.7})
    assert [at(constant, p) for p in (0.0, 0.3, 1.0)] == [pytest.approx(0.7)] * 3
    assert at(reg.create("temperature", "constant"), 0.5) == pytest.approx(0.3)  # the documented default
    for name in ("linear", "cosine"):
        default = reg.create("temperature", name)  # anneals 2 -> 0.5
        assert (at(default, 0.0), at(default, 1.0)) == (pytest.approx(2.0), pytest.approx(0.5)), name
        rising = reg.create("temperature", name, {"start": 0.5, "end": 3.0})
        assert (at(rising, 0.0), at(rising, 0.5), at(rising, 1.0)) == (
            pytest.approx(0.5),
            pytest.approx(1.75),  # both pass the midpoint halfway
            pytest.approx(3.0),
        ), name
    # Linear moves evenly; cosine is slow near both ends: a quarter in, 0.146 of the way, not 0.25.
    quarter = {n: at(reg.create("temperature", n, {"start": 0.5, "end": 3.0}), 0.25) for n in ("linear", "cosine")}
    assert quarter == {"linear": pytest.approx(0.5 + 2.5 * 0.25), "cosine": pytest.approx(0.5 + 2.5 * 0.1464466)}


def test_norm_modes_feed_goodness_and_the_next_block_as_documented():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, 5, 5, generator=gen).relu() + 0.1
    h[1] *= 10  # a sample ten times as active as the others
    reg = registry()

    def paths(norm: str, x: torch.Tensor):  # noqa: ANN202
        module = reg.create("norm", norm, num_features=3)
        module.train()
        return module(x)

    none = paths("none", h)  # raw activity on all three paths
    assert torch.equal(none.goodness_input, h) and torch.equal(none.forward, h)
    torch.testing.assert_close(none.readout, h.mean((2, 3)))

    # decoupled: goodness on raw h, the next block sees h / RMS(h), the readout pools that.
    decoupled = paths("decoupled", h)
    rms = h.flatten(1).square().mean(1).add(1e-6).sqrt().view(-1, 1, 1, 1)
    assert torch.equal(decoupled.goodness_input, h)
    torch.testing.assert_close(decoupled.forward, h / rms)
    torch.testing.assert_close(decoupled.readout, (h / rms).mean((2, 3)))
    torch.testing.assert_close(decoupled.sumsq(), h.flatten(1).square().sum(1))
    torch.testing.assert_close(decoupled.sumabs(), h.flatten(1).sum(1))
    # So the louder sample's goodness is 100x, while the next block cannot tell it apart.
    louder = paths("decoupled", h * 10)
    torch.testing.assert_close(louder.sumsq(), decoupled.sumsq() * 100)
    torch.testing.assert_close(louder.forward, decoupled.forward, atol=1e-5, rtol=1e-5)

    # coupled-bn: one batch-normalized tensor (batch statistics in training, no affine) on all three paths.
    bn = paths("coupled-bn", h)
    z = torch.nn.functional.batch_norm(h, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(bn.goodness_input, z)
    assert torch.equal(bn.forward, bn.goodness_input)
    torch.testing.assert_close(bn.readout, z.mean((2, 3)))
    flat = h.flatten(2).mean(2)  # (N, C) activity takes the 1-D batch norm
    torch.testing.assert_close(
        paths("coupled-bn", flat).forward, torch.nn.functional.batch_norm(flat, None, None, training=True)
    )

    # coupled-ln: each sample standardized on its own, on all three paths.
    ln = paths("coupled-ln", h)
    z = (h - h.mean((1, 2, 3), keepdim=True)) / (h.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(ln.goodness_input, z)
    assert torch.equal(ln.forward, ln.goodness_input)
    torch.testing.assert_close(ln.readout, z.mean((2, 3)))


def test_fusions_combine_the_blocks_they_name():
    reg = registry()
    # Three blocks, two samples, three classes; each rule picks other classes.
    scores = [
        torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]),
        torch.tensor([[0.0, 4.0, 0.0], [0.0, 4.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]),
    ]
    features = [torch.zeros(2, 4)] * 3

    def fuse(name: str, **params: int) -> torch.Tensor:
        return reg.create("fusion", name, params, num_layers=3, num_classes=3, feature_dims=[4, 4, 4])(scores, features)

    assert torch.equal(fuse("last"), scores[2])
    assert torch.equal(fuse("sum"), scores[0] + scores[1] + scores[2])
    assert torch.equal(fuse("sum-from-k"), scores[1] + scores[2])  # k defaults to 1
    assert torch.equal(fuse("sum-from-k", k=0), fuse("sum")) and torch.equal(fuse("sum-from-k", k=2), fuse("last"))
    predictions = {name: fuse(name).argmax(1).tolist() for name in ("last", "sum", "sum-from-k")}
    assert predictions == {"last": [2, 0], "sum": [0, 2], "sum-from-k": [1, 1]}
    with pytest.raises(ConfigError, match=r"fusion.k must be in 0..2 for 3 blocks, got 3"):
        fuse("sum-from-k", k=3)


def _no_scores() -> torch.Tensor:
    raise AssertionError("random-label negatives must not score the network")


def test_random_label_negatives_are_never_the_true_label():
    labels = torch.arange(10).repeat(2000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wrong = registry().create("negatives", "random-label").wrong_labels(labels, 10, _no_scores)
    assert wrong.shape == labels.shape and wrong.dtype == labels.dtype
    assert not (wrong == labels).any()
    # Uniform over the nine wrong labels: every (true, wrong) pair occurs, each about 2000 / 9 = 222 times.
    counts = torch.zeros(10, 10).index_put_((labels, wrong), torch.ones(len(labels)), accumulate=True)
    off_diagonal = counts[~torch.eye(10, dtype=torch.bool)]
    assert off_diagonal.min() > 150 and off_diagonal.max() < 300


def test_hardest_label_negatives_are_the_highest_scoring_wrong_label():
    labels = torch.tensor([0, 1, 2, 3])
    scores = torch.tensor(
        [
            [9.0, 1.0, 5.0, 2.0],  # the true label scores highest; the hardest wrong one is 2
            [0.0, 1.0, 0.5, 3.0],  # 3
            [7.0, 6.0, 8.0, -1.0],  # 0
            [-5.0, -2.0, -3.0, -4.0],  # all negative: 1
        ]
    )
    before = scores.clone()
    hardest = registry().create("negatives", "hardest-label", {"p": 1.0})
    assert hardest.wrong_labels(labels, 4, lambda: scores).tolist() == [2, 3, 0, 1]
    assert torch.equal(scores, before)  # the true label is masked in a copy
    many = labels.repeat(500)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        never = registry().create("negatives", "hardest-label", {"p": 0.0}).wrong_labels(many, 4, _no_scores)
        half = (
            registry()
            .create("negatives", "hardest-label", {"p": 0.5})
            .wrong_labels(many, 4, lambda: scores.repeat(500, 1))
        )
    assert not (never == many).any() and not (half == many).any()
    # p = 0.5: the hardest label half the time, else one of the three wrong ones: 1/2 + 1/2 * 1/3 = 2/3 of draws.
    share = (half == torch.tensor([2, 3, 0, 1]).repeat(500)).float().mean().item()
    assert share == pytest.approx(2 / 3, abs=0.05)


def test_label_channels_append_one_constant_plane_per_class():
    x = torch.randn(3, 2, 5, 4)
    negatives = registry().create("negatives", "random-label", {"into": "channels", "on": 2.0, "off": -1.0})
    labels = torch.tensor([0, 3, 1])
    embedded = negatives.embed(x, labels, 4)
    assert embedded.shape == (3, 6, 5, 4) and torch.equal(embedded[:, :2], x)
    code = torch.where(torch.nn.functional.one_hot(labels, 4).bool(), 2.0, -1.0)
    assert torch.equal(embedded[:, 2:], code[:, :, None, None].expand(3, 4, 5, 4))
    assert torch.equal(negatives.embed(x, None, 4)[:, 2:], torch.full((3, 4, 5, 4), -1.0))  # neutral: all off
    with pytest.raises(ConfigError, match="^negatives.into must be one of pixels, channels, got 'planes'$"):
        registry().create("negatives", "hardest-label", {"into": "planes"})


def test_the_first_block_takes_the_channels_a_label_embedding_adds():
    labelled = {"goodness": "meansq", "negatives": "random-label", "loss": "softplus-threshold"}
    pixels = _ff_net(registry_with(), **labelled)
    channels = _ff_net(registry_with(), **labelled, **{"negatives.into": "channels"})
    assert pixels.backbone.blocks[0][0].in_channels == 1 and channels.backbone.blocks[0][0].in_channels == 11
    scores, _ = channels.scores_and_features(torch.randn(4, 1, 28, 28))
    assert [tuple(s.shape) for s in scores] == [(4, 10), (4, 10)]


class CroppingNegatives:
    """Embeds a label by cutting the image: the blocks' strides were checked against the uncut size."""

    embeds_label = True

    def embed(self, x, labels, num_classes):
        return x[..., 1:, :] if labels is None else x

    def wrong_labels(self, labels, num_classes, scores):
        return (labels + 1) % num_classes


def test_a_label_embedding_must_keep_one_shape_and_the_image_size():
    reg = registry_with(OnePlugin("negatives", CroppingNegatives))
    with pytest.raises(ConfigError) as info:
        _ff_net(reg, goodness="meansq", negatives="probe", loss="softplus-threshold")
    assert re.fullmatch(
        r"negatives plugin 'probe' \(package [\w.]*OnePlugin\) embeds labels in 2 images of shape \(1, 28, 28\) "
        r"as \(2, 1, 27, 28\) and \(2, 1, 28, 28\); embed\(x, labels, num_classes\) must return \(N, C', 28, 28\), "
        r"one shape for every label and for None",
        str(info.value),
    )


def test_learned_temperature_starts_at_init_and_keeps_a_gradient_near_its_floor():
    t = registry().create("temperature", "learned", {"init": 0.5})
    assert t(0.0, torch.zeros(3)).item() == pytest.approx(0.5)
    with torch.no_grad():
        t.log_t.fill_(-30.0)  # far below the floor's scale, where a clamp would have cut the gradient to zero
    t(0.0, torch.zeros(3)).backward()
    assert t(0.0, torch.zeros(3)).item() == pytest.approx(0.01) and t.log_t.grad.item() > 0
    with pytest.raises(ConfigError, match="init must exceed its floor"):
        registry().create("temperature", "learned", {"init": 0.01})


def test_readout_fusion_does_not_care_how_large_a_blocks_goodness_is():
    # sumsq goodness runs in the hundreds while pooled features sit near 1; the probe sees standardized scores.
    with torch.random.fork_rng(devices=[]):  # seeded weights, without reseeding the tests that follow
        torch.manual_seed(0)
        fusion = registry().create("fusion", "readout", {}, num_layers=2, num_classes=4, feature_dims=[3, 5])
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)]
    features = [torch.randn(6, 3, generator=gen), torch.randn(6, 5, generator=gen)]
    scaled = [scores[0] * 500 + 7, scores[1] * 0.01]
    torch.testing.assert_close(fusion(scaled, features), fusion(scores, features), atol=1e-4, rtol=1e-4)


def _ff_net(reg: Registry, **updates):
    from ffablate.config import RunConfig
    from ffablate.train.ff import FFNet
    from tests.conftest import TINY

    return FFNet(RunConfig().with_updates({**TINY, **updates}), (1, 28, 28), 10, reg)


def _returning(value_of, per_class: bool = False) -> type:
    class Returning:
        def __call__(self, paths, num_classes):
            return value_of(paths.goodness_input.flatten(1).float().square().mean(1))

    Returning.per_class = per_class
    return Returning


@pytest.mark.parametrize(
    ("value_of", "per_class", "got", "want"),
    [
        (lambda g: g[:, None], False, r"shape \(8, 1\)", r"\(8,\)"),  # argmax(1) of (N, 1) once scored 13%
        (lambda g: g.tolist(), False, "a list", r"\(8,\)"),
        (lambda g: 1.0, False, "a float", r"\(8,\)"),
        (lambda g: g[:-1], False, r"shape \(7,\)", r"\(8,\)"),
        (lambda g: g.long(), False, r"torch.int64 tensor", r"\(8,\)"),
        (lambda g: g, True, r"shape \(8,\)", r"\(8, 10\)"),  # once blamed on the loss
        (lambda g: g[:, None].expand(-1, 3), True, r"shape \(8, 3\)", r"\(8, 10\)"),
    ],
)
def test_a_goodness_of_the_wrong_shape_is_refused_naming_the_plugin(value_of, per_class, got, want):
    negatives = {"negatives": "none"} if per_class else {"negatives": "random-label", "loss": "softplus-threshold"}
    net = _ff_net(registry_with(OnePlugin("goodness", _returning(value_of, per_class))), goodness="probe", **negatives)
    with pytest.raises(
        ConfigError,
        match=rf"goodness plugin 'probe' \(package [\w.]*OnePlugin\) returned .*{got}.*shape {want}",
    ):
        net.scores_and_features(torch.randn(8, 1, 28, 28))


@pytest.mark.parametrize(
    ("wrong_of", "got"),
    [
        (lambda y: None, "a NoneType"),  # once read as per-class goodness: a traceback, or training without labels
        (lambda y: y.tolist(), "a list"),
        (lambda y: y[:-1], r"a torch.int64 tensor of shape \(49,\)"),  # the last negative kept the neutral code
    ],
)
def test_negatives_of_the_wrong_kind_are_refused_naming_the_plugin(tiny_config, wrong_of, got):
    from ffablate.builtin.negatives import RandomLabel
    from ffablate.train import build_trainer

    class Returning(RandomLabel):
        def wrong_labels(self, labels, num_classes, scores):
            return wrong_of(labels)

    config = tiny_config.with_updates({"goodness": "meansq", "negatives": "probe", "loss": "softplus-threshold"})
    trainer = build_trainer(config, plugins=registry_with(OnePlugin("negatives", Returning)))
    x, y = next(iter(trainer.data.train))
    with pytest.raises(ConfigError, match=rf"negatives plugin 'probe' .* wrong_labels returned {got} for 50 labels"):
        trainer.train_step(x, y, 0.0, range(trainer.net.depth), False)


def test_a_wrongly_shaped_goodness_fails_the_run_in_one_line(capsys):
    plugin = OnePlugin("goodness", _returning(lambda g: g[:, None]))
    add_plugin(plugin)
    try:
        args = tiny_args(
            "--set", "goodness=probe", "--set", "negatives=random-label", "--set", "loss=softplus-threshold"
        )
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "goodness plugin 'probe'" in err and "shape (2,)" in err
    finally:
        remove_plugin(plugin)


def test_a_goodness_without_per_class_is_refused_when_built():
    class NoFlag:
        def __call__(self, paths, num_classes):
            return paths.sumsq()

    with pytest.raises(ConfigError, match="goodness plugin 'probe'.*set `per_class = True` or `per_class = False`"):
        _ff_net(registry_with(OnePlugin("goodness", NoFlag)), goodness="probe")


class Tunable:
    per_class = False

    def __init__(self, p: float = 2.0, n: int = 1, on: bool = False, tag: str = "a"):
        self.p, self.n, self.on, self.tag = p, n, on, tag


def _kwargs_factory(**kwargs):
    return Tunable(**kwargs)


@pytest.mark.parametrize(
    ("space", "factory", "message"),
    [
        (["p"], Tunable, "space must be a dict"),
        ({"p": "float"}, Tunable, "'p' needs a dict whose \"type\""),
        ({"p": {"type": "uniform", "low": 1, "high": 2}}, Tunable, "'p' needs a dict whose \"type\""),
        ({"p": {"type": "float", "low": 4, "high": 1}}, Tunable, "'p' needs low < high"),
        ({"p": {"type": "float", "low": 1, "high": 1}}, Tunable, "'p' needs low < high"),
        ({"p": {"type": "float", "low": 1}}, Tunable, "'p' needs finite numeric low and high"),
        ({"p": {"type": "float", "low": "1", "high": "x"}}, Tunable, "'p' needs finite numeric"),
        ({"p": {"type": "float", "low": 1, "high": float("inf")}}, Tunable, "'p' needs finite numeric"),
        ({"n": {"type": "int", "low": 1.5, "high": 4}}, Tunable, "'n' needs integer low and high"),
        ({"p": {"type": "float", "low": 0, "high": 1, "log": True}}, Tunable, "'p' needs low > 0 when log"),
        ({"p": {"type": "float", "low": 1, "high": 2, "log": "yes"}}, Tunable, "'p' needs log True or False"),
        ({"p": {"type": "float", "low": 1, "high": 2, "step": 0.1}}, Tunable, "'p' has unknown key 'step'"),
        ({"p": {"type": "categorical", "choices": []}}, Tunable, "'p' needs a non-empty list of choices"),
        ({"p": {"type": "categorical", "choices": [1.0], "low": 0}}, Tunable, "'p' has unknown key 'low'"),
        ({"q": {"type": "float", "low": 1, "high": 2}}, Tunable, "'q' names no parameter.*: n, on, p, tag"),
        # Ranges the parameter cannot take: caught at a study's preflight before, where they read as the spec's.
        ({"n": {"type": "float", "low": 1, "high": 2}}, Tunable, "'n' is a float range.*takes an integer.*\"int\""),
        ({"on": {"type": "int", "low": 0, "high": 1}}, Tunable, "'on' is a numeric range.*takes true or false"),
        ({"tag": {"type": "float", "low": 0, "high": 1}}, Tunable, "'tag' is a numeric range.*takes text"),
        ({"p": {"type": "float", "low": 1, "high": 2}}, _kwargs_factory, r"'p' names no parameter.*\*\*kwargs"),
        # Choices the parameter cannot take: caught at a study's preflight before, blaming the spec.
        (
            {"p": {"type": "categorical", "choices": [1, "big", None]}},
            Tunable,
            "'p' has the choice 'big', but the parameter takes a finite number \\(default 2.0\\)",
        ),
        ({"p": {"type": "categorical", "choices": [1.5, None]}}, Tunable, "'p' has the choice None, but .*finite"),
        ({"n": {"type": "categorical", "choices": [1, 2.5]}}, Tunable, "'n' has the choice 2.5, but .*an integer"),
        ({"on": {"type": "categorical", "choices": [True, 1]}}, Tunable, "'on' has the choice 1, but .*true or false"),
        ({"tag": {"type": "categorical", "choices": ["a", [1]]}}, Tunable, "'tag' has the choice \\[1\\], but .*text"),
    ],
)
def test_a_bad_search_space_is_refused_at_registration(space, factory, message):
    with pytest.raises(
        ConfigError, match=rf"goodness plugin 'probe' registered by the plugin [\w.]*OnePlugin: .*{message}"
    ):
        registry_with(OnePlugin("goodness", factory, space))


def test_a_factory_argument_without_default_is_refused_at_registration():
    # It was listed with no parameters, then failed to build ("missing 'rate'"), and --set temperature.rate=2 said
    # it had no parameter 'rate'.
    class NoDefault:
        def __init__(self, rate: float):
            self.rate = rate

    with pytest.raises(
        ConfigError, match=r"temperature plugin 'probe' .*: its factory's argument 'rate' has no default: give it one"
    ):
        registry_with(OnePlugin("temperature", NoDefault))

    # The loss function itself, registered as its own factory: "give 'g_pos' a default" led nowhere.
    def hinge(g_pos, g_neg, labels, threshold, temperature):  # noqa: ANN001, ANN202
        return g_pos.mean()

    with pytest.raises(ConfigError, match=r"its factory takes 'g_pos', an argument of the loss call itself: regis"):
        registry_with(OnePlugin("loss", hinge))
    # What the trainer passes (a norm's num_features) needs none.
    assert registry_with(OnePlugin("norm", lambda num_features, eps=1e-5: None)).get("norm", "probe").params == {
        "eps": 1e-5
    }
    # Nor is it a parameter when it has one: a fusion's num_classes=10 was listed, recorded as 10 for a 3-class
    # run, and --set fusion.num_classes=5 clashed with the value passed ("got multiple values").
    fusion = lambda num_layers, feature_dims, num_classes=10, eps=0.1: None  # noqa: E731
    assert registry_with(OnePlugin("fusion", fusion)).get("fusion", "probe").params == {"eps": 0.1}


class _PathsAs(torch.nn.Module):
    """A norm returning ``make(h)`` instead of proper NormPaths."""

    def __init__(self, make):  # noqa: ANN001
        super().__init__()
        self.make = make

    def forward(self, h: torch.Tensor):  # noqa: ANN201
        return self.make(h)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda h: h, r"returned a torch.float32 tensor of shape \(\d+, 20, 14, 14\), not an ffablate.paths.NormPaths"),
        (lambda h: (h, h, h), "returned a tuple, not an ffablate.paths.NormPaths"),
        (
            lambda h: NormPaths(h, h, h),
            r"returned readout features of shape \((\d+), 20, 14, 14\), not \(N, F\) = \(\1, 20\)",
        ),
        (lambda h: NormPaths(h, h[:, :2], h.mean((2, 3))), r"a forward output of shape \(\d+, 2, 14, 14\) for a block"),
        (lambda h: NormPaths(h, h, h.mean((2, 3)).long()), r"readout is a torch.int64 tensor"),
        # An autograd error naming no plugin; with a learned T, a run whose blocks never learned.
        (lambda h: NormPaths(h.detach(), h, h.mean((2, 3))), r"returned a goodness input with no gradient"),
    ],
)
@pytest.mark.parametrize("method", ["ff", "bp-deepsup"])
def test_a_norm_that_returns_the_wrong_paths_fails_in_one_line(capsys, make, message, method):
    # A tensor or tuple ended in an AttributeError inside the built-in goodness; a 4-D readout trained silently
    # under the default fusion and crashed the readout fusion and BP's heads.
    plugin = OnePlugin("norm", lambda num_features: _PathsAs(make))
    add_plugin(plugin)
    try:
        assert main(["train", *tiny_args("--set", "norm=probe", "--set", f"method={method}")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "norm plugin 'probe'" in err and re.search(message, err), err
    finally:
        remove_plugin(plugin)


def clipped_cube(p: float = 3, clip: float | None = None, scale: "float" = 2):  # noqa: UP037 (as a string)
    return Cube()


def test_a_float_annotation_and_a_none_default_are_read_as_their_authors_meant():
    # p: float = 3 was an integer parameter that refused 2.5 (and a float space, with the wrong advice), and
    # --set goodness.clip=none gave the factory the text 'none'.
    plugin = registry_with(OnePlugin("goodness", clipped_cube)).get("goodness", "probe")
    assert plugin.params == {"p": 3.0, "clip": None, "scale": 2.0}
    assert plugin.checked_params({"p": "2.5", "clip": "none"}) == {"p": 2.5, "clip": None}
    assert plugin.checked_params({"clip": "0.5", "scale": "4"}) == {"clip": 0.5, "scale": 4.0}
    with pytest.raises(ConfigError, match="parameter 'p' takes a finite number, got None"):
        plugin.checked_params({"p": "none"})


def test_a_good_search_space_registers():
    space = {
        "p": {"type": "float", "low": 0.5, "high": 4, "log": True},
        "n": {"type": "categorical", "choices": [1, 2]},
    }
    assert registry_with(OnePlugin("goodness", Tunable, space)).get("goodness", "probe").space == space


def test_a_factory_that_raises_is_named_and_a_config_error_passes_unchanged():
    def exploding(p: float = 1.0):
        if p < 0:
            raise ConfigError("goodness.p must be >= 0")
        raise RuntimeError("factory exploded\nsecond line")

    reg = registry_with(OnePlugin("goodness", exploding))
    with pytest.raises(
        ConfigError,
        match=r"^goodness plugin 'probe' \(package [\w.]*OnePlugin\) failed to build: "
        r"RuntimeError: factory exploded; ",
    ):
        reg.create("goodness", "probe")
    with pytest.raises(ConfigError, match=r"^goodness\.p must be >= 0$"):
        reg.create("goodness", "probe", {"p": -1.0})


@pytest.mark.parametrize(
    "error", [PermissionError(13, "Permission denied", "/data/x"), ValueError("cannot reshape array"), EOFError()]
)
def test_a_dataset_that_cannot_load_its_files_is_a_data_error(error):
    def unreadable(path: str = ""):
        raise error

    reg = registry_with(OnePlugin("datasets", unreadable))
    # A DataError stops a study (a rerun retries), where a ConfigError would fail every trial on the data for good.
    with pytest.raises(DataError, match=rf"could not load its data: {type(error).__name__}\b.*; check the files"):
        reg.create("datasets", "probe")


@pytest.mark.parametrize(
    "error", [TypeError("unsupported operand"), AttributeError("no attribute 'shape'"), NameError("name 'x'")]
)
def test_a_dataset_whose_code_fails_is_told_to_fix_the_plugin_not_the_files(error):
    def buggy(path: str = ""):
        raise error

    reg = registry_with(OnePlugin("datasets", buggy))
    # Before: "check the files under --data-root", for a bug no file could cause.
    with pytest.raises(DataError, match=rf"could not load its data: {type(error).__name__}: .*; fix the plugin \(an"):
        reg.create("datasets", "probe")


def test_a_failing_builtin_keeps_its_traceback():
    def broken(num_features: int, eps: float = 1e-5):
        raise AttributeError("a bug inside ffablate")

    # A built-in failing on its own is ffablate's bug, not the user's: its traceback is what a report needs.
    with pytest.raises(AttributeError, match="a bug inside ffablate"):
        Plugin("norm", "probe", broken, "test", "ffablate", {}).create({}, num_features=4)


class Misregistering:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    @hookimpl
    def ffablate_register_goodness(self, register):
        if self.args == ("raise",):
            raise KeyError("boom in hook")
        register(*self.args, **self.kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("raise",), "fails in its hook ffablate_register_goodness: KeyError: 'boom in hook'"),
        (("x", 5, "not callable"), "goodness plugin 'x' registered by .*: its factory is 5, which is not callable"),
        (("x", Tunable), "goodness plugin 'x' registered by .*: give it a one-line description"),
        # A name users cannot type in --set goodness=NAME or a spec's list; an int one crashed every command.
        ((3, Tunable, "int name"), "goodness plugin 3 registered by .*: its name must be non-empty text without"),
        (("", Tunable, "empty"), "goodness plugin '' registered by .*: its name must be non-empty text"),
        (("my goodness=1", Tunable, "spaced"), "plugin 'my goodness=1' .*: its name must be non-empty text"),
        (("a,b", Tunable, "listed"), "plugin 'a,b' .*: its name must be non-empty text without spaces, '=' or ','"),
    ],
)
def test_a_broken_registration_names_the_plugin_module_in_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as info:
        registry_with(Misregistering(*args))
    assert "Misregistering" in str(info.value) and "\n" not in str(info.value)


def test_a_plugin_named_with_an_int_fails_every_command_in_one_line_not_a_traceback(capsys):
    plugin = Misregistering(3, Tunable, "int name")
    add_plugin(plugin)
    try:
        assert main(["plugins"]) == 2
    finally:
        remove_plugin(plugin)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "goodness plugin 3 registered by" in err and "Traceback" not in err, err


def weights_tuple(weights=(1.0, 1.0)):
    return weights


def dtyped(dtype=torch.float64):
    return dtype


@pytest.mark.parametrize(
    ("factory", "message"),
    [(weights_tuple, "'weights' defaults to a tuple"), (dtyped, "'dtype' defaults to a dtype")],
)
def test_a_parameter_default_that_set_cannot_give_is_refused_at_registration(factory, message):
    # Before: --set goodness.weights=1,2,3 passed the text '1,2,3' to the factory, and dtype=float64 'float64'.
    with pytest.raises(ConfigError, match=rf"goodness plugin 'probe' registered by .*: its parameter {message}, wh"):
        registry_with(OnePlugin("goodness", factory))


# Annotations as objects and as the text `from __future__ import annotations` leaves.
def optional_params(
    clip: float | None = None,
    n: "int | None" = None,
    tag: "Optional[str]" = None,  # noqa: F821
    free=None,
):
    return clip, n, tag, free


def test_a_none_default_takes_none_or_the_type_its_annotation_names():
    plugin = registry_with(OnePlugin("goodness", optional_params)).get("goodness", "probe")
    # "007" for an Optional[str] was read as the int 7 and passed on as it was.
    assert plugin.create({"clip": "2", "n": "3", "tag": "007", "free": "x"}) == (2.0, 3, "007", "x")
    assert plugin.create({"clip": "none", "n": "none", "tag": "none", "free": "none"}) == (None, None, None, None)
    # Each of these reached the factory unchecked.
    for key, value, want in [
        ("clip", "abc", "a finite number, or none"),
        ("n", "2.5", "an integer, or none"),
        ("tag", [1], "text, or none"),
        ("free", [1], "a number, true/false or text, or none"),
    ]:
        with pytest.raises(ConfigError, match=rf"parameter '{key}' takes {want}, got .*--set goodness.{key}=none"):
            plugin.create({key: value})


class NoLossFusion(torch.nn.Module):
    def __init__(self, num_layers: int, num_classes: int, feature_dims: list[int]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(num_layers))

    def forward(self, scores, features):
        return sum(w * s for w, s in zip(self.w, scores, strict=True))


class HalfT:
    def __call__(self, progress, goodness):
        return 0.5


def no_norm(num_features: int):
    return lambda h: h


@pytest.mark.parametrize(("kind", "factory", "built"), [("temperature", HalfT, "HalfT"), ("norm", no_norm, "function")])
def test_a_factory_that_builds_no_module_is_refused_in_one_line(kind, factory, built):
    # A module per block is what puts a learned T (or a norm's state) in the block's optimizer and on its device.
    with pytest.raises(ConfigError) as info:
        _ff_net(registry_with(OnePlugin(kind, factory)), **{kind: "probe"})
    message = str(info.value)
    assert message.startswith(f"{kind} plugin 'probe' (package ") and "\n" not in message
    assert message.endswith(f"builds a {built}; a {kind} factory must return a torch.nn.Module")


def test_a_fusion_with_parameters_but_no_loss_is_refused_when_built():
    with pytest.raises(ConfigError, match="fusion plugin 'probe'.*trainable parameters but no loss"):
        _ff_net(registry_with(OnePlugin("fusion", NoLossFusion)), fusion="probe")


class ScalarOnlyLoss:
    per_class = False

    def __call__(self, g_pos, g_neg, labels, threshold, temperature):
        return (g_pos - g_neg).mean()


class AnyGoodnessLoss:
    def __call__(self, g_pos, g_neg, labels, threshold, temperature):
        return g_pos.mean()


def test_a_loss_plugin_declares_which_goodness_it_fits():
    reg = registry_with(OnePlugin("loss", ScalarOnlyLoss))
    with pytest.raises(
        ConfigError,
        match=r"^loss 'probe' \(package [\w.]*OnePlugin, declaring per_class=False\) does not fit "
        r"goodness 'classwise': use --set loss=classwise-ce$",
    ):
        _ff_net(reg, goodness="classwise", negatives="none", loss="probe")
    _ff_net(reg, goodness="meansq", negatives="random-label", loss="probe")
    # Without the attribute nothing is checked: such a loss takes whichever goodness it is given.
    undeclared = registry_with(OnePlugin("loss", AnyGoodnessLoss))
    _ff_net(undeclared, goodness="classwise", negatives="none", loss="probe")
    _ff_net(undeclared, goodness="meansq", negatives="random-label", loss="probe")


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (
            {"goodness": "classwise", "loss": "bce"},
            "loss 'bce' does not fit goodness 'classwise': use --set loss=classwise-ce",
        ),
        (
            {"goodness": "meansq", "negatives": "random-label", "loss": "classwise-ce"},
            "loss 'classwise-ce' does not fit goodness 'meansq': use --set loss=softplus-threshold",
        ),
    ],
)
def test_builtin_losses_keep_their_compatibility_messages(updates, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        _ff_net(registry(), **updates)


def test_a_misspelled_hook_argument_says_to_name_it_register():
    class BadArg:
        @hookimpl
        def ffablate_register_goodness(self, reg):
            reg("x", Cube, "x")

    with pytest.raises(ConfigError, match="ffablate_register_goodness\\(reg\\): its argument must be named `register`"):
        make_plugin_manager((BadArg(),))


def _install(tmp_path: Path, monkeypatch, module: str, source: str) -> None:
    """A module and the dist-info of a package ``<module>-pkg`` publishing it under the ``ffablate`` group."""
    (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{module}_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ffablate]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_an_installed_plugin_with_a_misspelled_argument_names_its_package(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "ffablate_test_badarg",
        "from ffablate import hookimpl\n\n@hookimpl\ndef ffablate_register_goodness(reg):\n    pass\n",
    )
    with pytest.raises(ConfigError) as info:
        make_plugin_manager()
    message = str(info.value)
    assert message.startswith(
        "the ffablate plugin 'ffablate_test_badarg' (module ffablate_test_badarg, package ffablate_test_badarg-pkg) "
        "defines ffablate_register_goodness(reg): its argument must be named `register`"
    )
    assert "\n" not in message


def test_an_installed_plugin_with_a_misspelled_hook_is_named_once(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "ffablate_test_typo",
        "from ffablate import hookimpl\n\n@hookimpl\ndef ffablate_register_goodnes(register):\n    pass\n",
    )
    with pytest.raises(ConfigError, match="did you mean 'ffablate_register_goodness'") as info:
        make_plugin_manager()
    message = str(info.value)
    assert message.count("ffablate_test_typo'") == 1 and "<module" not in message and "\n" not in message
    assert "package ffablate_test_typo-pkg" in message


def test_an_installed_plugin_with_an_undecorated_hook_is_an_error(tmp_path, monkeypatch):
    # pluggy ignores a hook function without the marker: the plugin's names would be unknown without a word.
    _install(
        tmp_path, monkeypatch, "ffablate_test_undecorated", "def ffablate_register_goodness(register):\n    pass\n"
    )
    with pytest.raises(ConfigError) as info:
        make_plugin_manager()
    assert str(info.value) == (
        "the ffablate plugin 'ffablate_test_undecorated' (module ffablate_test_undecorated, package "
        "ffablate_test_undecorated-pkg) defines ffablate_register_goodness without @hookimpl, so ffablate cannot "
        "see it: decorate it (`from ffablate import hookimpl`)"
    )


def test_an_installed_plugin_that_registers_nothing_is_warned_about_once(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "ffablate_test_empty", "HOOKS = None\n")
    with pytest.warns(FFablateWarning, match="'ffablate_test_empty'.*registers nothing: it defines none of"):
        make_plugin_manager()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_plugin_manager()


POWER = """
from ffablate import hookimpl


class Power:
    per_class = False

    def __init__(self, p: float = 3.0):
        self.p = p

    def __call__(self, paths, num_classes):
        return paths.goodness_input.flatten(1).float().abs().pow(self.p).mean(1)


@hookimpl
def ffablate_register_goodness(register):
    register("power", Power, "mean |h|^p")
"""


@pytest.mark.parametrize(
    "modules",
    ["my_power", "my_power, my_power", "my_power,no_such_module", "my_power,undecorated", "half", "my_power,empty"],
)
def test_ffablate_plugins_loads_a_module_without_packaging_it(tmp_path, modules):
    (tmp_path / "my_power.py").write_text(POWER)
    (tmp_path / "undecorated.py").write_text(POWER.replace("@hookimpl\n", ""))
    # One hook decorated, one not: the second one was ignored while the module registered something.
    (tmp_path / "half.py").write_text(POWER + "\n\ndef ffablate_register_loss(register):\n    pass\n")
    (tmp_path / "empty.py").write_text("")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "FFABLATE_PLUGINS": modules, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    argv = [sys.executable, "-m", "ffablate.cli", "plugins", "goodness", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    if "no_such_module" in modules:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "FFABLATE_PLUGINS names 'no_such_module', which fails to import" in proc.stderr
    elif "undecorated" in modules or "half" in modules:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        hook = "goodness" if "undecorated" in modules else "loss"
        assert f"module {modules.split(',')[-1]} defines ffablate_register_{hook} without @hookimpl" in proc.stderr
    elif "empty" in modules:  # a warning, on one line like the errors, and the listing still comes
        assert proc.returncode == 0 and json.loads(proc.stdout)
        assert proc.stderr.strip().splitlines() == [
            f"ffablate: warning: the plugin module empty registers nothing: it defines none of ffablate's hooks "
            f"({', '.join(HOOKS)})"
        ]
    else:
        assert proc.returncode == 0, proc.stderr
        power = next(p for p in json.loads(proc.stdout) if p["name"] == "power")
        assert power["source"] == "my_power" and power["params"] == {"p": 3.0}


def clip_loss(max_logit: float = math.inf):
    return lambda g_pos, g_neg, labels, threshold, temperature: g_pos.clamp_max(max_logit).mean()


def test_plugins_json_is_strict_json_with_an_infinite_default(capsys):
    # Python wrote the default as Infinity, which no other JSON reader takes.
    plugin = OnePlugin("loss", clip_loss)
    add_plugin(plugin)
    try:
        assert main(["plugins", "loss", "--json"]) == 0
    finally:
        remove_plugin(plugin)
    text = capsys.readouterr().out
    assert "Infinity" not in text
    rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert next(r for r in rows if r["name"] == "probe")["params"] == {"max_logit": "inf"}


def tagged_loss(tag: str = "[bold]x[/bold]"):
    return lambda g_pos, g_neg, labels, threshold, temperature: g_pos.mean()


def test_the_plugins_table_prints_brackets_as_text(capsys):
    # Rich read "[bold]x[/bold]" in a plugin's default as markup and printed "tag=x".
    plugin = OnePlugin("loss", tagged_loss)
    add_plugin(plugin)
    try:
        assert main(["plugins", "loss"]) == 0
    finally:
        remove_plugin(plugin)
    assert "tag=[bold]x[/bold]" in capsys.readouterr().out


def test_float_parameters_must_be_finite_unless_their_default_is_not():
    clip = Plugin("loss", "clip", clip_loss, "test", "tests", {"max_logit": math.inf})
    assert clip.checked_params({"max_logit": math.inf}) == {"max_logit": math.inf}  # "no clip" stays expressible
    constant = registry().get("temperature", "constant")
    for value in (math.inf, math.nan, 10**400):  # the last overflows a float
        with pytest.raises(ConfigError, match="parameter 't' takes a finite number"):
            constant.checked_params({"t": value})


def tagged(tag: str = "x", scale: float = 1.0, flag: bool = False, steps: int = 1):
    return (tag, scale, flag, steps)


def test_set_text_is_read_as_the_type_of_each_parameter():
    plugin = Plugin("goodness", "tagged", tagged, "test", "tests")
    # Before: --set text was parsed before the type was known, so "007" arrived as "7", "2024_01" (a folder
    # name) as "202401", and "2" for a float parameter as the int 2, which torch.tensor(2) cannot learn.
    text = {"tag": "2024_01", "scale": "2", "flag": "yes", "steps": "3"}
    assert plugin.create(text) == ("2024_01", 2.0, True, 3)
    assert type(plugin.create({"scale": 2})[1]) is float  # a whole number from a TOML spec too
    assert plugin.create({"tag": "007", "flag": "0"})[::2] == ("007", False)
    with pytest.raises(ConfigError, match="parameter 'steps' takes an integer, got '2.5'|got 2.5"):
        plugin.create({"steps": "2.5"})


def test_a_runs_recorded_config_holds_typed_plugin_parameters(tiny_config):
    from ffablate.config import parse_sets
    from ffablate.train import build_trainer

    config = tiny_config.with_updates(parse_sets(["temperature=cosine", "temperature.start=2"]))
    assert config.params_of("temperature") == {"start": "2"}  # the text as --set gave it
    recorded = build_trainer(config).config.to_dict()["temperature.start"]
    assert recorded == 2.0 and type(recorded) is float


def test_the_cli_prints_ffablate_warnings_on_one_line_and_callers_still_record_them():
    from ffablate.cli import one_line_warnings

    with one_line_warnings():
        line = warnings.formatwarning("no kernels", FFablateWarning, "x.py", 1)
        other = warnings.formatwarning("deprecated", DeprecationWarning, "x.py", 1)
        with pytest.warns(FFablateWarning, match="no kernels"):
            warnings.warn("no kernels", FFablateWarning, stacklevel=1)
    assert line == "ffablate: warning: no kernels\n" and other.startswith("x.py:1: DeprecationWarning")
    assert warnings.formatwarning("no kernels", FFablateWarning, "x.py", 1).startswith("x.py:1:")  # restored
