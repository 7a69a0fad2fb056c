"""Blocks and backbones shared by FF and BP: both methods train the very same modules, so they are
architecture-matched by construction. Only the objective differs (local goodness vs end-to-end cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ffablate import ops
from ffablate.config import RunConfig
from ffablate.errors import ConfigError, PluginContractError, described
from ffablate.paths import NormPaths
from ffablate.plugins import Registry, registry

NormFactory = Callable[[int], nn.Module]


class ReLUMaxPool2x2(nn.Module):
    """``nn.ReLU(inplace=True)`` then ``nn.MaxPool2d(2)``, fused on the CPU by :func:`ffablate.ops.max_pool2x2`:
    the same numbers, several times faster."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.max_pool2x2(x, relu=True, inplace=True)


def conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv + ReLU, then a 2x2 max-pool when the block downsamples (stride 2)."""
    if stride not in (1, 2):
        raise ValueError(f"block stride must be 1 or 2, got {stride}")
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    return nn.Sequential(conv, ReLUMaxPool2x2() if stride == 2 else nn.ReLU(inplace=True))


def dense_block(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """``depth`` blocks, each followed by its norm module (the three paths). The forward path of block l's norm
    feeds block l+1; the readout path gives block l's features (N, F_l).
    """

    def __init__(
        self, config: RunConfig, in_shape: tuple[int, int, int], make_norm: NormFactory, norm_label: str = "norm"
    ):
        super().__init__()
        self.norm_label = norm_label
        widths = config.widths
        self.flatten_input = config.backbone == "mlp"
        if self.flatten_input:
            c, h, w = in_shape
            dims = [c * h * w, *widths]
            self.blocks = nn.ModuleList(dense_block(a, b) for a, b in zip(dims, dims[1:], strict=False))
        else:
            chans = [in_shape[0], *widths]
            self.blocks = nn.ModuleList(
                conv_block(a, b, s) for a, b, s in zip(chans, chans[1:], config.stride_list, strict=False)
            )
        self.norms = nn.ModuleList(make_norm(w) for w in widths)
        self.feature_dims = list(widths)

    def prepare(self, x: Tensor) -> Tensor:
        return x.flatten(1) if self.flatten_input else x

    def block_paths(self, index: int, x: Tensor) -> NormPaths:
        h = self.blocks[index](x)
        return checked_paths(self.norms[index](h), h, self.feature_dims[index], self.norm_label)

    def forward(self, x: Tensor) -> list[Tensor]:
        """End-to-end pass (BP): every block's readout features, gradients flowing through the forward path."""
        x = self.prepare(x)
        features = []
        for index in range(len(self.blocks)):
            paths = self.block_paths(index, x)
            features.append(paths.readout)
            x = paths.forward
        return features


def checked_paths(paths: object, h: Tensor, width: int, label: str) -> NormPaths:
    """``paths`` if it is what the goodness plugins, the next block and the readout take from a norm plugin
    ``label``: a NormPaths of floating tensors, the forward output shaped as the block's output ``h``, the readout
    features (N, width), a goodness input per sample. A wrong one would fail far from the plugin, in a built-in
    goodness or fusion, or train silently on the wrong features. Metadata only, so no host sync."""
    n = h.shape[0]
    fields = ("goodness_input", "forward", "readout")
    if not isinstance(paths, NormPaths):
        problem = f"{described(paths)}, not an ffablate.paths.NormPaths"
    elif not all(isinstance(getattr(paths, f), Tensor) and getattr(paths, f).is_floating_point() for f in fields):
        problem = "a NormPaths whose " + ", ".join(f"{f} is {described(getattr(paths, f))}" for f in fields)
    elif paths.forward.shape != h.shape:
        problem = f"a forward output of shape {tuple(paths.forward.shape)} for a block output of {tuple(h.shape)}"
    elif paths.readout.shape != (n, width):
        problem = f"readout features of shape {tuple(paths.readout.shape)}, not (N, F) = ({n}, {width})"
    elif paths.goodness_input.dim() < 2 or paths.goodness_input.shape[0] != n:
        problem = f"a goodness input of shape {tuple(paths.goodness_input.shape)} for {n} samples"
    elif h.requires_grad and not paths.goodness_input.requires_grad:
        # FF's loss reaches the block only through it: an autograd error far from the plugin, or (with a learned
        # T, the loss's one other gradient) a run whose blocks never learn.
        problem = "a goodness input with no gradient (detached from the block's activity)"
    else:
        return paths
    raise PluginContractError(f"{label} returned {problem} (see ffablate_register_norm in ffablate/hookspecs.py)")


def built_module(built: object, label: str) -> nn.Module:
    """``built`` if it is a module, as a plugin ``label`` ("temperature plugin 'x' (...)") must build."""
    if not isinstance(built, nn.Module):
        kind = label.split()[0]
        raise ConfigError(f"{label} builds a {type(built).__name__}; a {kind} factory must return a torch.nn.Module")
    return built


def build_backbone(config: RunConfig, in_shape: tuple[int, int, int], plugins: Registry | None = None) -> Backbone:
    """The backbone of ``config`` with its norm plugin after every block: the one constructor FF and BP share."""
    plugin = (plugins or registry()).get("norm", config.norm)

    def make_norm(width: int) -> nn.Module:
        return built_module(plugin.create(config.params_of("norm"), num_features=width), plugin.label)

    return Backbone(config, in_shape, make_norm, plugin.label)
