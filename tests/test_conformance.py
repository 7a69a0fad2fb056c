"""ffablate.testing: every built-in plugin passes its conformance checks, and each check fails the broken plugin it
was written for (and only its own check, where the others cannot see the fault)."""

import contextlib
import importlib.util
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffablate.cli import main
from ffablate.data import ImageDataset
from ffablate.errors import ConfigError
from ffablate.paths import NormPaths
from ffablate.plugins import add_plugin, registry, remove_plugin
from ffablate.testing import CHECKS, FAIL, PASS, SKIP, TRAINING_CHECKS, PluginCheckFailed, assert_conforms, check_plugin
from tests.conftest import OnePlugin, registry_with

# Built-in datasets other than these read files a test cannot count on (or, teacher-student at its defaults,
# generates 12,000 images); tests/test_data.py covers them.
SMALL_DATASETS = {"digits"}


def _builtins():
    return [
        (p.kind, p.name)
        for p in registry().all()
        if p.source == "ffablate" and (p.kind != "datasets" or p.name in SMALL_DATASETS)
    ]


@pytest.mark.parametrize(("kind", "name"), _builtins())
def test_every_builtin_passes_its_checks(kind, name):
    results = check_plugin(kind, name, train=False)
    assert [r.check for r in results] == [title for title, _ in CHECKS[kind]]
    assert [r for r in results if r.outcome == FAIL] == []


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    [
        ("goodness", "sumsq", {}),  # scalar goodness: labelled negatives, a threshold loss
        ("norm", "coupled-bn", {}),  # FF and BP-DeepSup
        ("fusion", "learned-weights", {}),
        ("temperature", "adaptive", {"momentum": "0.5"}),  # text, as --set gives it
        ("datasets", "digits", {}),
    ],
)
def test_builtins_pass_the_training_checks(kind, name, params):
    results = assert_conforms(kind, name, params)
    training = {r.check: r for r in results if r.check in {title for title, _ in TRAINING_CHECKS}}
    assert {r.outcome for r in training.values()} == {PASS}, training
    if kind == "norm":
        assert "bp-deepsup" in training["trains"].detail


def _outcomes(kind, factory, train=False):
    results = check_plugin(kind, "probe", plugins=registry_with(OnePlugin(kind, factory)), train=train)
    return {r.check: (r.outcome, r.detail) for r in results}


def _failed(kind, factory, train=False):
    return {check: detail for check, (outcome, detail) in _outcomes(kind, factory, train).items() if outcome == FAIL}


# ---- goodness


class BatchRelative:
    """Each image's sum of squares over the batch's mean: the value of an image depends on its batch."""

    per_class = False

    def __call__(self, paths, num_classes):
        g = paths.sumsq()
        return g / g.mean().clamp_min(1e-6)


class RootOfSum:
    """sqrt(sum h^2): its gradient is h / sqrt(sum h^2), 0/0 for a dead block."""

    per_class = False

    def __call__(self, paths, num_classes):
        return paths.sumsq().sqrt()


def test_a_goodness_that_depends_on_its_batch_fails_per_image():
    failed = _failed("goodness", BatchRelative)
    assert list(failed) == ["per image"]
    assert "changes with the other images in its batch" in failed["per image"]


def test_a_goodness_with_nan_gradient_at_zero_fails_zero_activity():
    failed = _failed("goodness", RootOfSum)
    assert list(failed) == ["zero activity"]
    assert "all-zero activity" in failed["zero activity"]


def test_a_goodness_with_a_zero_gradient_fails_output():
    class Rounded:
        per_class = False

        def __call__(self, paths, num_classes):
            return (paths.sumsq() / paths.numel_per_sample).round()  # a graph, but a zero gradient everywhere

    failed = _failed("goodness", Rounded)
    assert list(failed) == ["output"] and "gradient is zero" in failed["output"]


def test_a_failed_first_check_skips_the_rest():
    class Wide:
        per_class = False

        def __call__(self, paths, num_classes):
            return paths.sumsq().unsqueeze(1)  # (N, 1): broadcast against labels, a plausible accuracy

    outcomes = _outcomes("goodness", Wide, train=True)
    assert outcomes["output"][0] == FAIL and "shape (6,)" in outcomes["output"][1]
    assert {outcome for check, (outcome, _) in outcomes.items() if check != "output"} == {SKIP}


# ---- loss


def _softplus_loss(flip=False, reduce=torch.mean, naive=False):
    def build():
        def loss(g_pos, g_neg, labels, threshold, temperature):
            sign = -1 if flip else 1
            x = torch.cat([sign * (threshold - g_pos), sign * (g_neg - threshold)]) / temperature
            return reduce(torch.log(1 + torch.exp(x)) if naive else F.softplus(x))

        loss.per_class = False
        return loss

    return build


def test_the_softplus_loss_passes():
    assert _failed("loss", _softplus_loss()) == {}


def test_a_loss_summed_over_the_batch_fails_batch_mean():
    failed = _failed("loss", _softplus_loss(reduce=torch.sum))
    assert list(failed) == ["batch mean"]
    assert "return the batch mean" in failed["batch mean"]


def test_a_loss_with_the_wrong_sign_fails_direction():
    failed = _failed("loss", _softplus_loss(flip=True))
    assert list(failed) == ["direction"]
    assert "must fall as the right goodness rises" in failed["direction"]


def test_label_smoothing_and_a_goodness_penalty_pass_direction():
    # Each turns some images' gradients round where the right goodness already wins; the batch's still falls.
    results = check_plugin("loss", "classwise-ce", {"label_smoothing": 0.2}, train=False)
    assert {r.outcome for r in results} == {PASS}

    def penalized():
        def loss(g_pos, g_neg, labels, threshold, temperature):
            fit = F.softplus((threshold - g_pos) / temperature) + F.softplus((g_neg - threshold) / temperature)
            return fit.mean() + 0.05 * (g_pos.square().mean() + g_neg.square().mean())

        loss.per_class = False
        return loss

    assert _failed("loss", penalized) == {}


def test_a_loss_that_pushes_the_negatives_up_fails_direction():
    def both_up():
        def loss(g_pos, g_neg, labels, threshold, temperature):
            up = F.softplus((threshold - g_pos) / temperature) + F.softplus((threshold - g_neg) / temperature)
            return up.mean()

        loss.per_class = False
        return loss

    assert list(_failed("loss", both_up)) == ["direction"]


def test_a_loss_that_overflows_fails_extremes():
    failed = _failed("loss", _softplus_loss(naive=True))
    assert list(failed) == ["extremes"]
    assert "and 10000 (wrong), T=0.05" in failed["extremes"]


def test_an_undeclared_loss_is_checked_with_both_goodness_kinds():
    def scalar_only():
        def loss(g_pos, g_neg, labels, threshold, temperature):
            return F.softplus(torch.cat([threshold - g_pos, g_neg - threshold]) / temperature).mean()

        return loss  # no per_class: it must take per-class goodness too, where g_neg is None

    failed = _failed("loss", scalar_only)
    assert "direction" in failed and "TypeError" in failed["direction"]


# ---- temperature


class PlainAttributeT(nn.Module):
    """T follows the goodness's spread, kept in a float attribute: a checkpoint loses it."""

    def __init__(self):
        super().__init__()
        self.spread = 1.0

    def forward(self, progress, goodness):
        if self.training:
            self.spread = 0.5 * self.spread + 0.5 * float(goodness.std()) + 0.1
        return torch.tensor(self.spread)


class Crossing(nn.Module):
    """T from 1 down through zero: negative late in training."""

    def forward(self, progress, goodness):
        return 1.0 - 2.0 * progress


def test_a_temperature_kept_in_a_plain_attribute_fails_state():
    failed = _failed("temperature", PlainAttributeT)
    assert list(failed) == ["state"]
    assert "register_buffer" in failed["state"]


def test_a_temperature_that_turns_negative_fails_values():
    failed = _failed("temperature", Crossing)
    assert list(failed) == ["values"]
    assert "returned 0.0 at progress 0.500" in failed["values"]


def test_temperature_instances_must_not_share_parameters():
    shared = nn.Parameter(torch.tensor(0.0))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_t = shared

        def forward(self, progress, goodness):
            return self.log_t.exp()

    failed = _failed("temperature", Shared)
    assert list(failed) == ["module"]


# ---- negatives


class _Pixels:
    embeds_label = True

    def embed(self, x, labels, num_classes):
        flat = x.flatten(1).clone()
        if labels is not None:
            flat[:, :num_classes] = F.one_hot(labels, num_classes).to(x.dtype)
        return flat.view_as(x)

    def wrong_labels(self, labels, num_classes, scores):
        return (labels + torch.randint(1, num_classes, labels.shape)) % num_classes


class SometimesRight(_Pixels):
    def wrong_labels(self, labels, num_classes, scores):
        return (labels + torch.randint(0, num_classes, labels.shape)) % num_classes  # offset 0: the true label


class LabelBlind(_Pixels):
    def embed(self, x, labels, num_classes):
        return x.clone()


class Unseeded(_Pixels):
    """Draws from a generator seeded by the clock: each run gets other negatives."""

    def wrong_labels(self, labels, num_classes, scores):
        gen = torch.Generator().manual_seed(time.time_ns())
        return (labels + torch.randint(1, num_classes, labels.shape, generator=gen)) % num_classes


class OwnGenerator(_Pixels):
    """Draws from a generator of its own, seeded once: reproducible from the seed, but a resumed run starts it over."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def wrong_labels(self, labels, num_classes, scores):
        offset = torch.randint(1, num_classes, labels.shape, generator=self.generator)
        return (labels + offset) % num_classes


def test_pixel_negatives_pass():
    assert _failed("negatives", _Pixels) == {}


def test_negatives_that_return_the_true_label_fail_wrong_labels():
    failed = _failed("negatives", SometimesRight)
    assert list(failed) == ["wrong labels"]
    assert "the true label for" in failed["wrong labels"]


def test_wrong_labels_of_another_dtype_are_named_by_dtype_and_shape():
    class Int32(_Pixels):
        def wrong_labels(self, labels, num_classes, scores):
            return super().wrong_labels(labels, num_classes, scores).int()

    failed = _failed("negatives", Int32)
    assert failed["wrong labels"].startswith("wrong_labels returned a torch.int32 tensor of shape (64,) for 64")


def test_an_embedding_blind_to_the_label_fails_embedding():
    failed = _failed("negatives", LabelBlind)
    assert list(failed) == ["embedding"]
    assert "embed into the same image" in failed["embedding"]


def test_negatives_drawn_outside_the_seed_fail_reproducible():
    failed = _failed("negatives", Unseeded, train=True)
    assert list(failed) == ["reproducible"]
    assert "two runs with seed 0" in failed["reproducible"]


def test_negatives_with_a_generator_of_their_own_fail_resumes():
    failed = _failed("negatives", OwnGenerator, train=True)
    assert list(failed) == ["resumes"]
    assert "a generator of the plugin's own" in failed["resumes"]


# ---- norm


class BatchStatsAlways(nn.Module):
    """Standardizes with the batch's statistics in eval mode too."""

    def __init__(self, num_features):
        super().__init__()

    def forward(self, h):
        out = F.batch_norm(h, None, None, training=True)
        return NormPaths(out, out, out.flatten(2).mean(2) if out.dim() == 4 else out)


class DetachedReadout(nn.Module):
    def __init__(self, num_features):
        super().__init__()

    def forward(self, h):
        readout = (h.flatten(2).mean(2) if h.dim() == 4 else h).detach()
        return NormPaths(h, h, readout)


class RunningScaleAttribute(nn.Module):
    """Divides by a running mean of the activity's scale, kept as a plain tensor attribute, not a buffer."""

    def __init__(self, num_features):
        super().__init__()
        self.scale = torch.tensor(1.0)

    def forward(self, h):
        if self.training:
            self.scale = 0.5 * self.scale + 0.5 * h.detach().abs().mean() + 0.1
        out = h / self.scale
        return NormPaths(out, out, out.flatten(2).mean(2) if out.dim() == 4 else out)


def test_a_norm_with_batch_statistics_in_eval_mode_fails_per_image():
    failed = _failed("norm", BatchStatsAlways)
    assert list(failed) == ["per image"]
    assert "running statistics" in failed["per image"]


def test_a_norm_with_a_detached_readout_fails_paths():
    failed = _failed("norm", DetachedReadout)
    assert list(failed) == ["paths"]
    assert "through readout" in failed["paths"]


def test_a_norm_with_state_outside_its_state_dict_fails_state():
    failed = _failed("norm", RunningScaleAttribute)
    assert list(failed) == ["state"]


# ---- fusion


class BatchSoftmax(nn.Module):
    """Normalizes the last block's scores over the batch."""

    def __init__(self, num_layers, num_classes, feature_dims):
        super().__init__()

    def forward(self, scores, features):
        return scores[-1].softmax(dim=0)


class BiasSetByItsLoss(nn.Module):
    """Its loss sets a class-0 bias in a plain attribute: the unit checks compare instances whose loss never ran,
    so only a trained model, saved and loaded back, shows it."""

    def __init__(self, num_layers, num_classes, feature_dims):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_layers))
        self.bias = torch.zeros(num_classes)

    def forward(self, scores, features):
        return sum(w * s for w, s in zip(self.weight, scores, strict=True)) + self.bias

    def loss(self, scores, features, labels):
        self.bias = 100.0 * F.one_hot(torch.tensor(0), len(self.bias)).float()
        return F.cross_entropy(self.forward(scores, features), labels)


def test_a_fusion_that_mixes_the_batch_fails_per_image():
    failed = _failed("fusion", BatchSoftmax)
    assert list(failed) == ["per image"]


def test_a_fusion_whose_state_a_checkpoint_loses_fails_checkpoint():
    failed = _failed("fusion", BiasSetByItsLoss, train=True)
    assert list(failed) == ["checkpoint"]
    assert "saved and loaded back" in failed["checkpoint"]


# ---- datasets


@contextlib.contextmanager
def _installed(plugin):
    """``plugin`` in the process-wide registry, where the command line finds it."""
    add_plugin(plugin)
    try:
        yield
    finally:
        remove_plugin(plugin)


def _images(roots, download, size: int = 2):
    """64 training and 32 test generated images of size x size pixels, two classes."""
    if size < 1:
        raise ConfigError(f"datasets.size must be at least 1, got {size}")
    x = torch.randint(0, 256, (96, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.arange(96) % 2
    return ImageDataset("probe", x[:64], y[:64], x[64:], y[64:], 2, ["a", "b"], False, "generated")


def test_a_dataset_of_tiny_images_trains_with_strides_that_fit():
    # 2x2 images can be halved once: the training checks' 2,2 strides were refused, with advice to --set strides.
    # Checked through a registry of its own (not installed): the loads and the training runs find it there too.
    results = check_plugin("datasets", "probe", plugins=registry_with(OnePlugin("datasets", _images)))
    assert {r.outcome for r in results if r.check != "located"} == {PASS}, results


def test_a_bad_dataset_parameter_is_the_users_mistake(capsys):
    with _installed(OnePlugin("datasets", _images)):
        assert main(["plugins", "datasets", "probe", "--check", "--set", "datasets.size=0", "--no-train"]) == 2
    assert "datasets.size must be at least 1" in capsys.readouterr().err


# ---- API and command line


def test_assert_conforms_lists_each_failure():
    with pytest.raises(PluginCheckFailed, match=r"^batch mean: the loss of a batch"):
        assert_conforms("loss", "probe", plugins=registry_with(OnePlugin("loss", _softplus_loss(reduce=torch.sum))))


def test_a_bad_parameter_value_is_the_users_mistake():
    with pytest.raises(ConfigError, match="temperature.t must be positive"):
        check_plugin("temperature", "constant", {"t": "-1"})


def test_the_command_checks_one_plugin(capsys):
    assert main(["plugins", "goodness", "logsumexp", "--check", "--set", "goodness.tau=2", "--no-train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plugin"] == "goodness plugin 'logsumexp' (built-in)"
    assert report["params"] == {"tau": "2"}
    assert [c["check"] for c in report["checks"]] == [title for title, _ in CHECKS["goodness"]]
    assert {c["outcome"] for c in report["checks"]} == {PASS}
    assert main(["plugins", "goodness", "logsumexp"]) == 0
    out = capsys.readouterr().out
    assert "logsumexp" in out and "sumsq" not in out


def test_the_command_exits_1_on_a_failed_check(capsys):
    plugin = OnePlugin("goodness", RootOfSum)
    add_plugin(plugin)
    try:
        assert main(["plugins", "goodness", "probe", "--check", "--no-train"]) == 1
    finally:
        remove_plugin(plugin)
    out = capsys.readouterr().out
    assert "3 passed, 1 failed, 0 skipped" in out and "all-zero activity" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["goodness", "--check"], "--check needs a plugin"),
        (["goodness", "sumsq", "--check", "--set", "loss.p=1"], "as --set goodness.PARAM=VALUE"),
        (["goodness", "sumsq", "--check", "--set", "goodness.p=1"], "has no parameter 'p'"),
        (["goodness", "sumsq", "--set", "goodness.p=1"], "go with --check"),
        (["goodness", "sumsqq", "--check"], "did you mean 'sumsq'"),
        (["temperature", "constant", "--check", "--set", "temperature.t=-1"], "must be positive"),
    ],
)
def test_command_mistakes_are_one_line(capsys, args, message):
    assert main(["plugins", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_checks_leave_the_kernel_backend_as_it_was(monkeypatch):
    monkeypatch.setenv("FFABLATE_KERNELS", "reference")
    check_plugin("norm", "decoupled", train=False)
    assert os.environ["FFABLATE_KERNELS"] == "reference"


def test_checks_leave_the_random_generators_as_they_were():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    check_plugin("negatives", "random-label")  # the training checks seed all three, as a run does
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all() and torch.equal(torch.get_rng_state(), before[2])


def test_results_do_not_depend_on_the_callers_random_state():
    # The readout fusion's weights are drawn from torch's generator: its fit check's figures followed the caller's.
    torch.manual_seed(1)
    first = check_plugin("fusion", "readout", train=False)
    torch.manual_seed(2)
    assert check_plugin("fusion", "readout", train=False) == first


def test_the_example_package_conforms():
    # Loaded from its file, not from sys.path: there, a build's egg-info left in its folder would register it again
    # through its entry point.
    source = Path(__file__).parents[1] / "plugins" / "ffablate-power" / "ffablate_power" / "__init__.py"
    spec = importlib.util.spec_from_file_location("ffablate_power_example", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = assert_conforms("goodness", "power", {"p": "2"}, plugins=registry_with(module))
    assert {r.outcome for r in results} == {PASS}


def test_a_dataset_whose_files_are_missing_is_one_line(capsys, tmp_path):
    assert main(["plugins", "datasets", "cifar10", "--check", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err.lower() and len(err.strip().splitlines()) == 1
