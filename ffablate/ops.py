"""Fused goodness + normalization ops and their pure-PyTorch reference twin; the CPU ReLU + max-pool op.

``goodness_norm(h, eps)`` returns, for a block activity ``h`` of shape (N, D) or (N, C, H, W),
everything the three FF paths need in one pass over ``h``:

* ``sumsq``   (N,)   per-sample sum of squares (goodness input),
* ``sumabs``  (N,)   per-sample sum of absolute values (for L1 goodness),
* ``out``     like h  ``h * rsqrt(sumsq / D + eps)``: the RMS-normalized forward output,
* ``readout`` (N, C) per-channel spatial mean of ``out`` for 4-D ``h``; ``out`` itself for 2-D ``h``.

Statistics are float32 for fp16/bf16 input (accumulated in fp32) and h's dtype otherwise.

``max_pool2x2(x, relu)`` is ``F.max_pool2d(F.relu(x) if relu else x, 2)`` with fused CPU and CUDA kernels, bit for
bit.

Backend: ``FFABLATE_KERNELS=fused|reference``. The default is the compiled ``ffablate._C`` op when it
was built; without it the reference is used and one warning says so. Inputs the kernels do not cover
(e.g. fp16 on CPU) silently use the reference, and so do calls under forward-mode AD or a ``torch.func``
transform: the ops have a backward formula only. A function ``torch.compile`` traced keeps the backend it was
traced with. ``FFABLATE_CUDA_SCHEDULE=flagged|ticket|lagged|two-pass|cluster`` (default
flagged) picks how the CUDA kernels meet a sample's chunks (docs/kernels.md); those four give the same bits.
``FFABLATE_CUDA_LAG`` (a positive number, default 0.5) tunes the lagged one. ``cluster`` (sm_90 and later; elsewhere
flagged) cuts samples into larger chunks, so its sums round in another order: its bits are its own, the same from
run to run; ``FFABLATE_CUDA_CLUSTER_KB`` (16 to 220, default 104) sets its shared memory per block.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ffablate.errors import ConfigError, FFablateWarning

__all__ = [
    "backend",
    "extension_available",
    "goodness_norm",
    "max_pool2x2",
    "reference_goodness_norm",
    "retain_cpu_memory",
]

try:  # importing the compiled extension registers torch.ops.ffablate.*
    from ffablate import _C

    _EXT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _EXT_ERROR = str(exc)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_POOL_DTYPES = (*_CUDA_DTYPES, torch.float64)
_CUDA_SCHEDULES = ("ticket", "flagged", "lagged", "two-pass", "cluster")
_warned = False
_warned_no_cuda = False


def _check_cuda_lag(lag: str) -> None:
    """FFABLATE_CUDA_LAG, when set, must be a positive decimal number, which the kernels' strtod reads alike."""
    if lag and not (re.fullmatch(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", lag) and 0 < float(lag) < math.inf):
        raise ConfigError(f"FFABLATE_CUDA_LAG must be a positive number (GPU-fulls of blocks) or unset, got {lag!r}")


def _check_cluster_kb(kb: str) -> None:
    """FFABLATE_CUDA_CLUSTER_KB, when set, must be a whole number of KB in the kernels' range."""
    if kb and not (re.fullmatch(r"\d+", kb) and 16 <= int(kb) <= 220):
        raise ConfigError(f"FFABLATE_CUDA_CLUSTER_KB must be a whole number of KB from 16 to 220 or unset, got {kb!r}")


def extension_available() -> bool:
    """True when ``ffablate._C`` was built and imported."""
    return _EXT_ERROR is None


def backend(device: torch.device | str | None = None) -> str:
    """The backend ``goodness_norm`` uses (for tensors on ``device``, when given): ``"fused"`` or
    ``"reference"`` (see module docstring). An extension built without CUDA is the reference on a GPU."""
    global _warned, _warned_no_cuda
    choice = os.environ.get("FFABLATE_KERNELS", "").strip().lower() or "auto"
    if choice == "reference":
        return "reference"
    if choice not in ("auto", "fused"):
        raise ConfigError(f"FFABLATE_KERNELS must be 'fused' or 'reference' (or unset), got {choice!r}")
    schedule = os.environ.get("FFABLATE_CUDA_SCHEDULE", "")
    if schedule and schedule not in _CUDA_SCHEDULES:  # the kernels would refuse it only at their first launch
        raise ConfigError(
            f"FFABLATE_CUDA_SCHEDULE must be one of {', '.join(_CUDA_SCHEDULES)} (or unset), got {schedule!r}"
        )
    _check_cuda_lag(os.environ.get("FFABLATE_CUDA_LAG", ""))
    _check_cluster_kb(os.environ.get("FFABLATE_CUDA_CLUSTER_KB", ""))
    if extension_available() and not _cuda_missing(device):
        return "fused"
    if extension_available():
        if choice == "fused":
            raise ConfigError(f"FFABLATE_KERNELS=fused but {_NO_CUDA}")
        if not _warned_no_cuda and not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
            _warned_no_cuda = True
            warnings.warn(
                f"{_NO_CUDA}; CUDA tensors use the pure-PyTorch reference kernels", FFablateWarning, stacklevel=2
            )
        return "reference"
    if choice == "fused":
        raise ConfigError(
            "FFABLATE_KERNELS=fused but the compiled extension ffablate._C is missing "
            f"({_EXT_ERROR}); build it with `pip install -e . --no-build-isolation`"
        )
    if not _warned and not torch.compiler.is_compiling():
        _warned = True
        warnings.warn(
            f"ffablate._C is not built ({_EXT_ERROR}); using the pure-PyTorch reference kernels",
            FFablateWarning,
            stacklevel=3,
        )
    return "reference"


_NO_CUDA = (
    "ffablate._C was built without CUDA (no toolkit, or FFABLATE_BUILD=cpu): rebuild it where nvcc is, with "
    "CUDA_HOME set, by `pip install -e . --no-build-isolation`"
)


def _cuda_missing(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and not getattr(_C, "WITH_CUDA", False)


_retained = False


def retain_cpu_memory() -> bool:
    """Keep freed CPU memory in the process instead of returning it to the OS (glibc only; idempotent).

    glibc serves blocks above 32 MB with fresh mmap()s and unmaps them on free, so every large CPU tensor
    (a (256, 64, 28, 28) fp32 activity is 51 MB) pays page faults and kernel zeroing on first touch; on a
    small VM that costs more than the kernel itself. This switches the process to heap allocation with
    no trimming (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``), the effect jemalloc/tcmalloc give
    PyTorch CPU jobs. Returns True when the setting is active. Process-wide: call it only from entry
    points (benchmarks, CPU training), never on import.
    """
    global _retained
    if _retained:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_mmap_max, 0) == 1
    _retained = bool(ok)
    return _retained


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def reference_goodness_norm(h: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure-PyTorch twin of the fused op (same outputs, dtypes and readout convention)."""
    if h.dim() not in (2, 4):
        raise RuntimeError(f"goodness_norm: h must be 2-D (N, D) or 4-D (N, C, H, W), got {h.dim()}-D")
    if not h.is_floating_point():
        raise RuntimeError(f"goodness_norm: h must be floating point, got {h.dtype}")
    if not eps >= 0:  # as the kernels refuse it: a negative (or NaN) eps can put a NaN or inf scale on a sample
        raise RuntimeError(f"goodness_norm: eps must be >= 0, got {eps}")
    n = h.shape[0]
    d = math.prod(h.shape[1:])
    if n and not d:
        raise RuntimeError(f"goodness_norm: each sample must have at least one element, got {tuple(h.shape)}")
    acc = h.reshape(n, d).to(_stat_dtype(h.dtype))
    sumsq = acc.square().sum(1)
    sumabs = acc.abs().sum(1)
    inv = torch.rsqrt(sumsq / d + eps) if d else sumsq
    out = (acc * inv[:, None]).to(h.dtype).reshape(h.shape)
    if h.dim() == 4:
        c, hw = h.shape[1], h.shape[2] * h.shape[3]
        readout = (acc.reshape(n, c, hw).mean(-1) * inv[:, None]).to(h.dtype)
    else:
        readout = out
    return sumsq, sumabs, out, readout


def _fused_supported(h: Tensor) -> bool:
    if h.device.type == "cpu":
        return h.dtype in _CPU_DTYPES
    if h.device.type == "cuda":
        return h.dtype in _CUDA_DTYPES and bool(getattr(_C, "WITH_CUDA", False))
    return False


def _transformed() -> bool:
    """True under forward-mode AD or a ``torch.func`` transform (jvp, vmap, grad, ...), in eager mode. The fused ops
    have a backward formula only: a tangent through them came out zero, without an error, and ``torch.func.grad``
    refused them. The reference's torch ops have every derivative."""
    if torch.compiler.is_compiling():
        return False
    return fwAD._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def goodness_norm(h: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sumsq, sumabs, out, readout) of ``h``; readout is ``out`` itself for 2-D ``h``.

    Differentiable through all four outputs; works under ``torch.compile(fullgraph=True)``.
    """
    if backend(h.device) == "fused" and _fused_supported(h) and not _transformed():
        sq, sa, out, readout = torch.ops.ffablate.goodness_norm.default(h, eps)
        return sq, sa, out, (readout if h.dim() == 4 else out)
    return reference_goodness_norm(h, eps)


def _pool_supported(x: Tensor) -> bool:
    if x.device.type == "cpu":
        return x.dtype in _CPU_DTYPES
    if x.device.type == "cuda":
        return x.dtype in _CUDA_POOL_DTYPES and not _channels_innermost(x) and bool(getattr(_C, "WITH_CUDA", False))
    return False


def _channels_innermost(x: Tensor) -> bool:
    """Channels-last input, a view of one included: ATen's CUDA pool takes its NHWC kernel there (also on
    ``relu(x)``, which is laid out as x), whose backward copies the gradient where the NCHW one (and the op) adds it
    to zero, so a -0 would differ; it also returns a channels-last output. Such input stays with ATen."""
    return x.size(1) > 1 and x.stride(1) == 1


def max_pool2x2(x: Tensor, relu: bool = False, inplace: bool = False) -> Tensor:
    """``F.max_pool2d(F.relu(x) if relu else x, 2)``: 2x2 windows, stride 2, odd edges dropped.

    With the fused backend, on the CPU (float32/float64) and on CUDA (float32/float64/float16/bfloat16, not
    channels-last), for H and W >= 2, it runs ``ffablate::max_pool2x2``: one pass over x, the ReLU folded in, and a
    one-byte argmax saved for the backward instead of ATen's eight-byte index and the ReLU's output. Values and
    gradients are bitwise those of the unfused ops on the same device (but for the sign of a zero that torch 2.11's
    CUDA relu cleared, docs/kernels.md); its output is contiguous NCHW, also for channels-last CPU input. Everything
    else runs the unfused ops, where ``inplace`` lets the ReLU overwrite x (as ``nn.ReLU(inplace=True)`` does); the
    fused op never writes x.
    """
    fused = backend(x.device) == "fused"
    if fused and x.dim() == 4 and min(x.shape[2:]) >= 2 and _pool_supported(x) and not _transformed():
        return torch.ops.ffablate.max_pool2x2.default(x, relu)[0]
    return torch.nn.functional.max_pool2d(torch.nn.functional.relu(x, inplace=inplace) if relu else x, 2)


def _check_same_device(op: str, first: Tensor, *others: Tensor | None) -> None:
    for t in others:
        if t is not None:
            torch._check(
                t.device == first.device, lambda t=t: f"{op}: a tensor on {t.device} with one on {first.device}"
            )


def _register() -> None:
    @torch.library.register_fake("ffablate::goodness_norm")
    def _(h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        torch._check(h.dim() in (2, 4), lambda: f"goodness_norm: h must be 2-D or 4-D, got {h.dim()}-D")
        torch._check(h.is_floating_point(), lambda: f"goodness_norm: h must be floating point, got {h.dtype}")
        n = h.shape[0]
        stat = h.new_empty((n,), dtype=_stat_dtype(h.dtype))
        readout = h.new_empty((n, h.shape[1] if h.dim() == 4 else 0))
        return (
            stat,
            torch.empty_like(stat),
            torch.empty_like(h, memory_format=torch.contiguous_format),
            readout,
        )

    @torch.library.register_fake("ffablate::goodness_norm_backward")
    def _(grad_sumsq, grad_sumabs, grad_out, grad_readout, h, sumsq, eps):
        torch._check(h.dim() in (2, 4), lambda: f"goodness_norm_backward: h must be 2-D or 4-D, got {h.dim()}-D")
        # A meta tensor among real ones routes the call here, past the kernels' own device checks.
        _check_same_device("goodness_norm_backward", h, grad_sumsq, grad_sumabs, grad_out, grad_readout, sumsq)
        return torch.empty_like(h, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output) -> None:
        h, eps = inputs
        ctx.save_for_backward(h, output[0])
        ctx.eps = eps
        # Unused outputs arrive as None and the kernel skips their terms, instead of reading
        # materialized zero tensors as large as h.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_sumsq, grad_sumabs, grad_out, grad_readout):
        if torch.is_grad_enabled():
            # The backward op has no derivative of its own: create_graph=True would give wrong second derivatives.
            raise RuntimeError("goodness_norm: double backward (create_graph=True) is not supported")
        h, sumsq = ctx.saved_tensors
        if grad_readout is not None and grad_readout.numel() == 0:
            grad_readout = None
        dh = torch.ops.ffablate.goodness_norm_backward.default(
            grad_sumsq, grad_sumabs, grad_out, grad_readout, h, sumsq, ctx.eps
        )
        return dh, None

    torch.library.register_autograd("ffablate::goodness_norm", backward, setup_context=setup_context)

    @torch.library.register_fake("ffablate::max_pool2x2")
    def _(x: Tensor, relu: bool = False) -> tuple[Tensor, Tensor]:
        torch._check(x.dim() == 4, lambda: f"max_pool2x2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)

    @torch.library.register_fake("ffablate::max_pool2x2_backward")
    def _(grad_out: Tensor, argmax: Tensor, height: int, width: int) -> Tensor:
        _check_same_device("max_pool2x2_backward", grad_out, argmax)
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], height, width))

    def pool_setup_context(ctx, inputs, output) -> None:
        x = inputs[0]
        ctx.save_for_backward(output[1])
        ctx.size = (x.shape[2], x.shape[3])
        ctx.mark_non_differentiable(output[1])
        # Otherwise autograd zero-fills a gradient for the argmax output on every backward: a one-byte-per-output
        # pass for nothing (cheap: no difference in an interleaved wall-time A/B).
        ctx.set_materialize_grads(False)

    def pool_backward(ctx, grad_out, _grad_argmax):
        if torch.is_grad_enabled():
            # As for goodness_norm: the backward op has no derivative of its own, and autograd's fallback would
            # treat it as a constant, giving wrong second derivatives with only a warning.
            raise RuntimeError("max_pool2x2: double backward (create_graph=True) is not supported")
        if grad_out is None:  # an undefined output gradient (gradcheck sends one) means no input gradient
            return None, None
        (argmax,) = ctx.saved_tensors
        return torch.ops.ffablate.max_pool2x2_backward.default(grad_out, argmax, *ctx.size), None

    torch.library.register_autograd("ffablate::max_pool2x2", pool_backward, setup_context=pool_setup_context)


if _EXT_ERROR is None:
    _register()
