import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffablate import hookimpl
from ffablate.cli import main
from ffablate.errors import ConfigError, UnknownPlugin
from ffablate.plugins import KINDS, Registry, add_plugin, make_plugin_manager, registry, remove_plugin
from tests.conftest import tiny_args

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


def test_in_test_plugin_is_used_by_ffablate_train(capsys):
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
        assert len(err.splitlines()) == 1 and "goodness plugin 'learned-scale' has trainable parameters" in err
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
    with pytest.raises(ConfigError, match="no parameter 'tt'.*t"):
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


def test_goodness_plugins_agree_with_their_definitions():
    from ffablate.paths import NormPaths

    h = torch.randn(4, 10, 3, 3)
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
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(
        reg.create("loss", "classwise-ce")(logits, None, labels, theta, t),
        torch.nn.functional.cross_entropy(logits / t, labels),
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
    torch.manual_seed(0)
    fusion = registry().create("fusion", "readout", {}, num_layers=2, num_classes=4, feature_dims=[3, 5])
    scores, features = [torch.randn(6, 4), torch.randn(6, 4)], [torch.randn(6, 3), torch.randn(6, 5)]
    scaled = [scores[0] * 500 + 7, scores[1] * 0.01]
    torch.testing.assert_close(fusion(scaled, features), fusion(scores, features), atol=1e-4, rtol=1e-4)
