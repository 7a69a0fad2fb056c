"""Kernel benchmark: fused goodness_norm vs the eager and compiled reference, forward + backward.

Every timed call is one training-style step: run the op on ``h`` (requires grad) and back-propagate
random gradients into all of its outputs. The fused time is also expressed as bandwidth over the
minimal bytes such a step must move, next to a plain ``dst.copy_(src)`` of h measured in the same run
as the practical ceiling.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ffablate import ops
from ffablate.errors import ConfigError

__all__ = [
    "DEFAULT_SHAPES",
    "CUDA_POOL_SHAPES",
    "POOL_SHAPES",
    "kernel_bench",
    "minimal_bytes_per_pass",
    "pool_bench",
    "render_pool_table",
    "render_table",
]

# (name, shape): activity of a 28x28 CNN block (batch 256), a 224x224 network's first stage after a
# stride-4 stem (56x56, batch 64) and a wide MLP layer. The two conv shapes hold 12.8M elements each.
DEFAULT_SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("cnn28", (256, 64, 28, 28)),
    ("cnn224", (64, 64, 56, 56)),
    ("mlp", (1024, 4096)),
]

# The three ReLU + pools of `ffablate train`'s default CNN (32-64-128 channels on 28x28 input) at batch 256.
POOL_SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("pool28", (256, 32, 28, 28)),
    ("pool14", (256, 64, 14, 14)),
    ("pool7", (256, 128, 7, 7)),
]
# On a GPU also the first pool of the 224 px audit's net (width 128, batch 16): memory-bound, 822 MB in fp32.
CUDA_POOL_SHAPES: list[tuple[str, tuple[int, ...]]] = [("pool224", (16, 128, 224, 224))]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

Step = Callable[[Tensor], tuple[Tensor, ...]]


def _outputs(res: tuple[Tensor, Tensor, Tensor, Tensor], four_d: bool) -> tuple[Tensor, ...]:
    # For 2-D input readout *is* out; back-propagating into it twice would double-count.
    return res if four_d else res[:3]


def _step(fn: Step, h: Tensor, grads: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], Tensor]:
    outs = fn(h)
    (dh,) = torch.autograd.grad(outs, h, grads)
    return outs, dh


class _Timer:
    """Median and min milliseconds of each variant after warm-up.

    CPU: wall time per call, the variants interleaved. CUDA: two clocks. ``device`` is the GPU time of the
    call's work alone: before each timed call a 256 MB read evicts L2 (every variant starts cold, the copy
    too; a read, not a write, so the timed work finds no dirty lines to write back) and a sleep kernel gives
    the host a head start, so the host has enqueued the whole call before the GPU reaches it and the CUDA
    events bracket kernel time, not launch overhead. ``call`` is one call issued on an idle GPU and waited
    for: what a lone eager call costs end to end, host dispatch included. A step that spends more host time
    than the head start would leak host time into ``device``; ``host_ms`` (the enqueue time of the step) is
    reported so that can be checked.
    """

    _HEAD_START_MS = 2.0

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._flush = torch.zeros(64 * 2**20, dtype=torch.int32, device=device)
            self._sleep_cycles = self._calibrate_sleep()

    def _calibrate_sleep(self) -> int:
        probe = 1_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(probe)  # first launch loads the kernel
        start.record()
        torch.cuda._sleep(probe)
        end.record()
        end.synchronize()
        return int(probe * self._HEAD_START_MS / max(start.elapsed_time(end), 1e-3))

    @staticmethod
    def wall(steps: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
        """Wall milliseconds per call, the variants interleaved round by round: a noisy neighbour that slows
        the host for a while then slows every variant alike, which keeps same-run ratios honest."""
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        return times

    def host(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median host milliseconds to enqueue ``fn`` on a GPU kept busy (CUDA only)."""
        times = []
        for _ in range(repeats):
            torch.cuda._sleep(self._sleep_cycles)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize(self.device)
        return statistics.median(times)

    def device_time(self, fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize(self.device)
        for start, end in events:
            self._flush.max()
            torch.cuda._sleep(self._sleep_cycles)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        times = [start.elapsed_time(end) for start, end in events]
        return statistics.median(times), min(times)

    def call(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median milliseconds of one call on an idle GPU, waited for (CUDA events)."""
        times = []
        torch.cuda.synchronize(self.device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def measure(
        self, steps: dict[str, Callable[[], Any]], warmup: int, repeats: int
    ) -> dict[str, dict[str, float | None]]:
        """Per variant: ``ms`` (median), ``min``, and on CUDA ``call_ms`` and ``host_ms``."""
        if self.device.type != "cuda":
            return {
                name: {"ms": statistics.median(t), "min": min(t), "call_ms": None, "host_ms": None}
                for name, t in self.wall(steps, warmup, repeats).items()
            }
        out: dict[str, dict[str, float | None]] = {}
        for name, fn in steps.items():
            median, low = self.device_time(fn, warmup, repeats)
            out[name] = {
                "ms": median,
                "min": low,
                "call_ms": self.call(fn, repeats),
                "host_ms": self.host(fn, max(3, repeats // 5)),
            }
        return out


def _minimal_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return sum(minimal_bytes_per_pass(shape, dtype))


def minimal_bytes_per_pass(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """The fewest bytes the fused forward and the fused backward must each move through memory for ``h`` of
    ``shape``: every input read once, every output written once (the floor behind the bench's GB/s)."""
    n = shape[0]
    el = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    ssize = 4 if dtype in (torch.float16, torch.bfloat16) else esize
    readout = n * shape[1] if len(shape) == 4 else 0
    fwd = el * esize * 2 + readout * esize + 2 * n * ssize  # read h; write out, readout, sumsq, sumabs
    bwd = el * esize * 3 + readout * esize + 3 * n * ssize  # read h, grad_out, grad_readout, 3 stats; write dh
    return fwd, bwd


def use_cuda_schedule(spec: str) -> None:
    """Sets FFABLATE_CUDA_SCHEDULE for the next launches, and the schedule's knob when ``spec`` names one:
    ``"lagged@0.25"`` is the lagged schedule at a lag of 0.25 (FFABLATE_CUDA_LAG), ``"cluster@192"`` the cluster
    schedule with 192 KB per block (FFABLATE_CUDA_CLUSTER_KB). The device scripts A/B several in one process."""
    schedule, _, knob = spec.partition("@")
    os.environ["FFABLATE_CUDA_SCHEDULE"] = schedule
    os.environ["FFABLATE_CUDA_LAG"] = knob if schedule == "lagged" else ""
    os.environ["FFABLATE_CUDA_CLUSTER_KB"] = knob if schedule == "cluster" else ""
    if knob and schedule not in ("lagged", "cluster"):
        raise ConfigError(f"{spec!r}: only lagged@LAG and cluster@KB take a value after '@'")
    ops.backend()  # a bad schedule or knob fails here, with ops' message, not at the first launch


def peak_copy_gbps(timer: _Timer, device: torch.device, warmup: int, repeats: int) -> float:
    """GB/s of a copy far larger than the caches (8x the GPU's L2, at least 256 MB; 256 MB on the CPU).

    A copy of a small case's size is held back by launch time or served partly from cache, so "% of copy" can
    flatter a small case; this is the memory system's streaming rate in the same run, the stricter ceiling.
    """
    nbytes = 256 * 2**20
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        nbytes = max(nbytes, 8 * l2)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timer.measure({"copy": lambda: dst.copy_(src)}, warmup, repeats)["copy"]["ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def kernel_bench(
    device: str = "cpu",
    dtypes: list[str] | None = None,
    quick: bool = False,
    shapes: Sequence[tuple[str, tuple[int, ...]]] | None = None,
    compile_reference: bool = True,
    retain_memory: bool | None = None,
) -> list[dict[str, Any]]:
    """Time forward+backward of eager reference, compiled reference and fused op; one row per case.

    ``quick`` cuts repeats (for tests); ``shapes`` and ``compile_reference`` exist for tests too.
    ``retain_memory`` (default: on for CPU) calls :func:`ffablate.ops.retain_cpu_memory` first, so that
    the page faults of fresh large allocations, paid alike by all three variants, do not drown the
    kernels; rows say which allocator setting was in force. Times are medians in milliseconds: wall time on
    CPU; on GPU the device time of the work (see :class:`_Timer`), with the synchronous per-call time and the
    host enqueue time beside it in ``call_ms`` and ``host_ms``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("kernel_bench: device 'cuda' requested but CUDA is not available")
    if dtypes is None:
        dtypes = ["float32", "bfloat16"] if dev.type == "cuda" else ["float32"]
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown:
        raise ValueError(f"kernel_bench: unknown dtype(s) {unknown}; choose from {sorted(_DTYPES)}")
    shapes = list(shapes) if shapes is not None else DEFAULT_SHAPES
    if retain_memory is None:
        retain_memory = dev.type == "cpu"
    retained = ops.retain_cpu_memory() if retain_memory else ops._retained
    allocator = "glibc-retain" if retained else "default"
    timer = _Timer(dev)
    if dev.type == "cuda":
        warmup, repeats = (2, 5) if quick else (10, 50)
    else:
        warmup, repeats = (1, 3) if quick else (3, 15)
    compiled_ref = torch.compile(ops.reference_goodness_norm, dynamic=False) if compile_reference else None
    fused_backend = ops.backend()
    peak_gbps = peak_copy_gbps(timer, dev, warmup, repeats)
    # Each shape and dtype is one more compiled variant of the same function; Dynamo stops recompiling after
    # recompile_limit of them (8 in torch 2.14) and would then run the "compiled" variant eagerly, unannounced.
    enough_recompiles = torch._dynamo.config.patch(recompile_limit=len(shapes) * len(dtypes) + 8)

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    with enough_recompiles:
        for name, shape in shapes:
            for dname in dtypes:
                dtype = _DTYPES[dname]
                four_d = len(shape) == 4
                h = torch.randn(shape, generator=gen, dtype=torch.float32).to(dev, dtype).requires_grad_()
                ref_out = _outputs(ops.reference_goodness_norm(h), four_d)
                grads = [torch.randn(t.shape, generator=gen).to(dev, t.dtype) for t in ref_out]

                def eager(h: Tensor = h, four_d: bool = four_d) -> tuple[Tensor, ...]:
                    return _outputs(ops.reference_goodness_norm(h), four_d)

                def fused(h: Tensor = h, four_d: bool = four_d) -> tuple[Tensor, ...]:
                    return _outputs(ops.goodness_norm(h), four_d)

                steps: dict[str, Callable[[], Any]] = {"eager": lambda f=eager, h=h, g=grads: _step(f, h, g)}
                if compiled_ref is not None:

                    def comp(h: Tensor = h, four_d: bool = four_d) -> tuple[Tensor, ...]:
                        return _outputs(compiled_ref(h), four_d)

                    steps["compiled"] = lambda f=comp, h=h, g=grads: _step(f, h, g)
                steps["fused"] = lambda f=fused, h=h, g=grads: _step(f, h, g)
                src = h.detach()
                dst = torch.empty_like(src)
                steps["copy"] = lambda d=dst, s=src: d.copy_(s)
                t = timer.measure(steps, warmup, repeats)
                t.setdefault("compiled", {"ms": None, "min": None, "call_ms": None, "host_ms": None})
                eager_ms, compiled_ms, fused_ms, copy_ms = (t[k]["ms"] for k in ("eager", "compiled", "fused", "copy"))

                (r_out, r_dh), (f_out, f_dh) = _step(eager, h, grads), _step(fused, h, grads)
                # out, readout and dh are O(1) per element; sumsq and sumabs grow with D, so they are judged relatively.
                err_out = max(
                    (f.float() - r.float()).abs().max().item() for f, r in zip(f_out[2:], r_out[2:], strict=True)
                )
                err_dh = (f_dh.float() - r_dh.float()).abs().max().item()
                err_stats = max(
                    ((f.double() - r.double()).abs() / r.double().abs().clamp_min(1e-30)).max().item()
                    for f, r in zip(f_out[:2], r_out[:2], strict=True)
                )
                nbytes = _minimal_bytes(shape, dtype)
                copy_bytes = 2 * src.numel() * src.element_size()
                fused_gbps = nbytes / (fused_ms * 1e-3) / 1e9
                copy_gbps = copy_bytes / (copy_ms * 1e-3) / 1e9
                rows.append(
                    {
                        "name": name,
                        "shape": list(shape),
                        "dtype": dname,
                        "device": dev.type,
                        "backend": fused_backend if ops._fused_supported(h) else "reference",
                        "cpu_allocator": allocator if dev.type == "cpu" else None,
                        "eager_ms": eager_ms,
                        "compiled_ms": compiled_ms,
                        "fused_ms": fused_ms,
                        "copy_ms": copy_ms,
                        "min_ms": {k: v["min"] for k, v in t.items()},
                        "call_ms": {k: v["call_ms"] for k, v in t.items()} if dev.type == "cuda" else None,
                        "host_ms": {k: v["host_ms"] for k, v in t.items()} if dev.type == "cuda" else None,
                        "timing": "cuda-device" if dev.type == "cuda" else "wall",
                        "bytes": nbytes,
                        "fused_gbps": fused_gbps,
                        "copy_gbps": copy_gbps,
                        "max_abs_err": max(err_out, err_dh),
                        "max_abs_err_out": err_out,
                        "max_abs_err_dh": err_dh,
                        "max_rel_err_stats": err_stats,
                        "speedup_vs_eager": eager_ms / fused_ms,
                        "speedup_vs_compiled": None if compiled_ms is None else compiled_ms / fused_ms,
                        "pct_of_copy": 100.0 * fused_gbps / copy_gbps,
                        "peak_copy_gbps": peak_gbps,
                        "pct_of_peak_copy": 100.0 * fused_gbps / peak_gbps,
                    }
                )
                del h, grads, src, dst, ref_out
    return rows


def render_table(rows: list[dict[str, Any]], title: str = "goodness_norm forward+backward"):
    """The bench rows as a rich table (rich is imported lazily)."""
    from rich.table import Table

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    on_cuda = any(r.get("call_ms") for r in rows)
    table = Table(title=f"ffablate kernels: {title}")
    columns = ["case", "shape", "dtype", "dev", "eager ms", "compiled ms", "fused ms"]
    if on_cuda:  # device time above; a lone synchronous call and its host enqueue time here
        columns += ["fused call ms", "fused host ms"]
    columns += ["fused GB/s", "copy GB/s", "% copy", "% peak copy", "x eager", "x compiled", "max err"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("case", "shape", "dtype", "dev") else "right")
    for r in rows:
        cells = [
            r["name"],
            "x".join(map(str, r["shape"])),
            r["dtype"],
            r["device"],
            f(r["eager_ms"], ".3f"),
            f(r["compiled_ms"], ".3f"),
            f(r["fused_ms"], ".3f"),
        ]
        if on_cuda:
            cells += [f((r.get("call_ms") or {}).get("fused"), ".3f"), f((r.get("host_ms") or {}).get("fused"), ".3f")]
        cells += [
            f(r["fused_gbps"], ".1f"),
            f(r["copy_gbps"], ".1f"),
            f(r["pct_of_copy"], ".0f"),
            f(r.get("pct_of_peak_copy"), ".0f"),
            f(r["speedup_vs_eager"], ".2f"),
            f(r["speedup_vs_compiled"], ".2f"),
            f(r["max_abs_err"], ".1e"),
        ]
        table.add_row(*cells)
    return table


def pool_bench(
    quick: bool = False,
    shapes: Sequence[tuple[str, tuple[int, ...]]] | None = None,
    device: str = "cpu",
    dtypes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Forward+backward of a downsampling block's ReLU + 2x2 max pool: ``ops.max_pool2x2(x, relu=True)`` (fused
    backend) vs ``F.max_pool2d(F.relu(x), 2)`` (ATen): wall time on the CPU, the variants interleaved; on CUDA the
    device time of the work (``_Timer``), float32 and bfloat16 (what autocast trains in) by default.

    Inputs are Gaussian noise, like a conv output. Rows: name, shape, dtype, device, aten_ms, fused_ms, speedup, and
    whether output and input gradient are bitwise equal. Runs under the process's default allocator, as training
    does.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pool_bench: device 'cuda' requested but CUDA is not available")
    dtypes = dtypes or (["float32", "bfloat16"] if dev.type == "cuda" else ["float32"])
    warmup, repeats = (1, 3) if quick else (3, 15)
    timer = _Timer(dev)
    gen = torch.Generator().manual_seed(0)
    rows = []
    cases = shapes if shapes is not None else POOL_SHAPES + (CUDA_POOL_SHAPES if dev.type == "cuda" else [])
    for (name, shape), dtype in itertools.product(cases, dtypes):
        x = torch.randn(shape, generator=gen).to(device=dev, dtype=_DTYPES[dtype]).requires_grad_()
        grad = torch.randn(torch.nn.functional.max_pool2d(x.detach(), 2).shape, generator=gen).to(x)

        def aten(x: Tensor = x, grad: Tensor = grad) -> tuple[Tensor, Tensor]:
            return _step(lambda t: (torch.nn.functional.max_pool2d(torch.relu(t), 2),), x, [grad])

        def fused(x: Tensor = x, grad: Tensor = grad) -> tuple[Tensor, Tensor]:
            return _step(lambda t: (ops.max_pool2x2(t, relu=True),), x, [grad])

        times = timer.measure({"aten": aten, "fused": fused}, warmup, repeats)
        (want_out,), want_dx = aten()
        (got_out,), got_dx = fused()
        aten_ms, fused_ms = times["aten"]["ms"], times["fused"]["ms"]
        rows.append(
            {
                "name": name,
                "shape": list(shape),
                "dtype": dtype,
                "device": dev.type,
                "backend": ops.backend(dev),
                "aten_ms": aten_ms,
                "fused_ms": fused_ms,
                "speedup": aten_ms / fused_ms,
                "bitwise_equal": _same_bits(got_out, want_out) and _same_bits(got_dx, want_dx),
            }
        )
    return rows


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, unlike ``torch.equal``, which calls -0 equal to +0 and NaN unequal to itself."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def render_pool_table(rows: list[dict[str, Any]]):
    """The pool bench rows as a rich table."""
    from rich.table import Table

    devices = sorted({r["device"] for r in rows}) or ["cpu"]
    table = Table(title=f"ffablate kernels: ReLU + 2x2 max pool, forward+backward ({', '.join(devices).upper()})")
    for col in ("case", "shape", "dtype", "aten ms", "fused ms", "x aten", "bitwise equal"):
        table.add_column(col, justify="left" if col in ("case", "shape", "dtype") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            "x".join(map(str, r["shape"])),
            r["dtype"],
            f"{r['aten_ms']:.2f}",
            f"{r['fused_ms']:.2f}",
            f"{r['speedup']:.2f}",
            "yes" if r["bitwise_equal"] else "NO",
        )
    return table
