"""Systems audit: peak memory and training throughput of FF against the BP variants, by depth and resolution.

Every configuration runs in a fresh worker process (``python -m ffablate.audit --worker SPEC``) that
prints one JSON row, so allocator caches, peak counters and lazily built kernels of one run cannot leak into
the next. The parent only plans, launches, collects and renders; an over-cap, out-of-memory, crashed or
timed-out worker becomes a status row, never an exception of the audit.

Memory (see docs/audit.md for why):
- CUDA: the caching allocator's peak allocated bytes (``torch.cuda.max_memory_allocated``) over the timed
  steps, with the peak reserved bytes beside it.
- CPU: the peak of live bytes in torch's CPU allocator during one steady-state training step, reconstructed
  from the profiler's allocation/free events (``torch.profiler`` with ``profile_memory=True``). The profiler
  runs from before the model is built, so every live tensor (parameters, optimizer state, the batch,
  activations, temporaries) is in the running total: the CPU twin of CUDA's ``max_memory_allocated``.
``param_state_bytes`` (parameters + gradients + optimizer state) is summed from the tensors themselves;
``activation_memory_bytes`` (the batch, saved activations and temporaries) is the peak of one more step whose
gradients are held from its start, less ``param_state_bytes``. The trainers free every gradient when a step starts,
so at the real peak (FF: early in block 0's backward) the later blocks' gradients do not exist yet, and "real peak
- param_state_bytes" would subtract them anyway: FF's activations would seem to shrink with depth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ffablate import jsontext
from ffablate.config import did_you_mean
from ffablate.errors import ConfigError

# Audit method -> (trainer method, config overrides, micro-batched). "ff" is ffablate's default FF (class-wise
# goodness, one pass per block); "ff-neg" is the paper's setting (label negatives: two passes per block).
# The "-ga" twins split the batch into micro-batches that accumulate gradients, as bp-ga does.
FF_NEGATIVES = {
    "goodness": "meansq",
    "negatives": "random-label",
    "loss": "softplus-threshold",
    "fusion": "sum",
}
METHODS: dict[str, tuple[str, dict[str, str], bool]] = {
    "ff": ("ff", {}, False),
    "ff-ga": ("ff-ga", {}, True),
    "ff-neg": ("ff", FF_NEGATIVES, False),
    "ff-neg-ga": ("ff-ga", FF_NEGATIVES, True),
    "bp": ("bp", {}, False),
    "bp-deepsup": ("bp-deepsup", {}, False),
    "bp-ga": ("bp-ga", {}, True),
    "bp-ckpt": ("bp-ckpt", {}, False),
}
DEFAULT_METHODS = "ff,ff-ga,bp,bp-ga,bp-ckpt"
ROW_FIELDS = (
    "method",
    "depth",
    "resolution",
    "batch",
    "micro_batch",
    "peak_memory_bytes",
    "activation_memory_bytes",
    "param_state_bytes",
    "images_per_second",
    "status",
)
STEP_MARK = "ffablate_audit_step"
HELD_MARK = "ffablate_audit_step_gradients_held"
DOWNSAMPLING_BLOCKS = 2  # 224 -> 56 and 32 -> 8, then every further block keeps the resolution
MAX_SECONDS = 1e6  # --timeout and --budget: 11.6 days, under what subprocess.run's timeout can hold


@dataclass(frozen=True)
class AuditSpec:
    """One configuration: everything a worker needs to build and time it."""

    method: str
    depth: int
    resolution: int
    batch: int
    micro_batch: int
    width: int = 32
    classes: int = 10
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    memory_cap_bytes: int = 0  # 0 = no cap
    seed: int = 0
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    round: int = 0  # which pass over the grid (--rounds): timings of one configuration vary between workers

    @property
    def chunk(self) -> int:
        """The number of images one forward pass holds: the micro-batch for "-ga" methods, else the batch."""
        return self.micro_batch if METHODS[self.method][2] else self.batch


def parse_methods(text: str) -> list[str]:
    """``"ff,bp-ga"`` -> names; an unknown name is a ConfigError that lists the known ones."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        bad = ", ".join(unknown) or repr(text)
        hint = did_you_mean(unknown[0], METHODS) if unknown else ""
        raise ConfigError(f"--methods: unknown method {bad}{hint}; known: {', '.join(METHODS)}")
    return names


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise ConfigError(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}")
    return values


def plan(
    methods: Iterable[str],
    depths: Iterable[int],
    resolutions: Iterable[int],
    *,
    batch: int,
    micro_batch: int = 0,
    rounds: int = 1,
    **common: Any,
) -> list[AuditSpec]:
    """The grid of configurations, resolution-major so each resolution's rows sit together, ``rounds`` times over:
    round after round, so that a slow patch of a shared machine falls on every method of a round alike."""
    micro = micro_batch or max(1, batch // 4)
    if batch % micro:
        raise ConfigError(f"--batch {batch} must be a multiple of --micro-batch {micro}")
    return [
        AuditSpec(method=m, depth=d, resolution=r, batch=batch, micro_batch=micro, round=i, **common)
        for i in range(rounds)
        for r in resolutions
        for d in depths
        for m in methods
    ]


# ----------------------------------------------------------------------------------------------------
# Inside a worker


def backbone_updates(depth: int, width: int) -> dict[str, str]:
    """The backbone of depth ``depth`` shared by every method: ``depth`` conv blocks of ``width`` channels.
    The first two downsample (max-pool), so 224 px becomes 56 px and 32 px becomes 8 px; the rest keep the
    resolution. Constant width and resolution after this stem make every added block cost the same
    activations, which is what makes "memory vs depth" readable.
    """
    strides = [2 if i < DOWNSAMPLING_BLOCKS else 1 for i in range(depth)]
    return {"channels": ",".join([str(width)] * depth), "strides": ",".join(map(str, strides))}


def run_config(spec: AuditSpec):
    from ffablate.config import RunConfig

    method, overrides, _ = METHODS[spec.method]
    updates: dict[str, Any] = {
        "method": method,
        "batch_size": spec.batch,
        "micro_batch": spec.micro_batch,
        "device": spec.device,
        "seed": spec.seed,
        "augment": False,
        **backbone_updates(spec.depth, spec.width),
        **overrides,
    }
    return RunConfig().with_updates(updates)


def synthetic_data(spec: AuditSpec, device):
    """A one-image stand-in dataset: trainers read only its shape and class count."""
    import torch

    from ffablate.data import DeviceLoader, ImageDataset
    from ffablate.train.common import RunData

    image = torch.zeros(1, 3, spec.resolution, spec.resolution, dtype=torch.uint8)
    label = torch.zeros(1, dtype=torch.long)
    ds = ImageDataset(
        name="audit-synthetic",
        train_x=image,
        train_y=label,
        test_x=image,
        test_y=label,
        num_classes=spec.classes,
        class_names=[str(k) for k in range(spec.classes)],
        flips=False,
        source="generated",
    )
    loader = DeviceLoader(image, label, batch_size=1, device=device, shuffle=False)
    return RunData(ds, loader, loader)


def build_step(spec: AuditSpec, device) -> tuple[Any, Callable[[], None]]:
    """(trainer, one training step on a fixed device-resident batch)."""
    import torch

    from ffablate.config import FF_METHODS
    from ffablate.train import build_trainer

    config = run_config(spec)
    trainer = build_trainer(config, data=synthetic_data(spec, device))
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.batch, 3, spec.resolution, spec.resolution, generator=gen).to(device)
    y = (torch.arange(spec.batch) % spec.classes).to(device)
    if config.method in FF_METHODS:
        depth = trainer.net.depth

        def step() -> None:
            trainer.train_step(x, y, 0.5, range(depth), True)
    else:

        def step() -> None:
            trainer.train_step(x, y)

    return trainer, step


def param_state_bytes(trainer: Any) -> int:
    """Parameters + gradients + optimizer state, each storage counted once."""
    import torch

    optimizers = [trainer.optimizer, getattr(trainer, "fusion_optimizer", None)]
    tensors: list[torch.Tensor] = []
    for p in trainer.net.parameters():
        tensors += [p] + ([p.grad] if p.grad is not None else [])
    for opt in optimizers:
        for state in opt.state.values() if opt is not None else []:
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return int(sum(storages.values()))


@contextmanager
def gradients_held(trainer: Any) -> Iterator[None]:
    """The trainer's ``zero_grad`` zeroes gradients in place instead of freeing them: a step's peak then holds
    every gradient, and less ``param_state_bytes`` it leaves exactly the batch, activations and temporaries. The
    update is the same (every parameter of an audit step gets a gradient, so none is stepped on a kept zero)."""
    optimizers = [opt for opt in (trainer.optimizer, getattr(trainer, "fusion_optimizer", None)) if opt is not None]
    for opt in optimizers:
        opt.zero_grad = lambda set_to_none=True, opt=opt: type(opt).zero_grad(opt, set_to_none=False)
    try:
        yield
    finally:
        for opt in optimizers:
            del opt.zero_grad


def timed_steps(step: Callable[[], None], steps: int, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``steps`` steps, synchronized on CUDA so kernels count."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def profiled_cpu_peak(
    build: Callable[[], tuple[Any, Callable[[], None]]], warmup: int
) -> tuple[Any, Callable[[], None], int, int]:
    """Build under the profiler, warm up, then return the peak live CPU-allocator bytes of one marked step, and of
    one more with its gradients held (``gradients_held``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer, step = build()
        # At least one step, as on CUDA: the first one starts without optimizer state or held gradients, and its
        # peak was 24% under the steady state's (ff, depth 4, 16 px).
        for _ in range(max(1, warmup)):
            step()
        with record_function(STEP_MARK):
            step()
        with gradients_held(trainer), record_function(HELD_MARK):
            step()
    events = prof.profiler.kineto_results.events()
    return trainer, step, peak_in_window(events, STEP_MARK), peak_in_window(events, HELD_MARK)


def peak_in_window(events: list[Any], mark: str) -> int:
    """Running total of allocator events (allocations positive, frees negative) in time order; its maximum
    inside the marked range, including the level on entry. Frees of blocks allocated before profiling began
    carry no size and are skipped by the profiler, which is why profiling starts before the model exists.
    """
    window = next(e for e in events if e.name() == mark)
    start, end = window.start_ns(), window.end_ns()
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    level, peak = 0, None
    for t, nbytes in memory:
        if t > end:
            break
        if t >= start and peak is None:
            peak = level
        level += nbytes
        if t >= start:
            peak = max(peak, level)
    return int(level if peak is None else peak)


def is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return "out of memory" in text or "can't allocate" in text


def measure(spec: AuditSpec) -> dict[str, Any]:
    """One row: build, warm up, measure memory and throughput (runs inside the worker)."""
    import torch

    from ffablate.train.common import resolve_device, seed_everything

    device = resolve_device(spec.device)
    seed_everything(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    row = base_row(spec)
    row["kernels"] = _kernel_backend(spec.device)
    try:
        if device.type == "cuda":
            return _measure_cuda(spec, device, row)
        return _measure_cpu(spec, device, row)
    except Exception as exc:
        if not is_oom(exc):
            raise
        row.update(status="oom", error=_one_line(exc))
        if device.type == "cuda":
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return row


def _measure_cpu(spec: AuditSpec, device, row: dict[str, Any]) -> dict[str, Any]:
    import torch

    trainer, step, peak, held_peak = profiled_cpu_peak(lambda: build_step(spec, device), spec.warmup)
    fill_memory(row, peak, held_peak, param_state_bytes(trainer))
    if spec.memory_cap_bytes and peak > spec.memory_cap_bytes:
        row["status"] = "over-cap"
        return row
    seconds, cpu_seconds = timed_steps(step, spec.steps, device)
    # On a shared CPU, wall time depends on the neighbours' load; CPU time per image is a steadier check.
    row.update(
        images_per_second=spec.batch * spec.steps / seconds,
        status="ok",
        images_per_cpu_second=spec.batch * spec.steps / cpu_seconds,
        threads=torch.get_num_threads(),
    )
    return row


def _measure_cuda(spec: AuditSpec, device, row: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.memory_cap_bytes:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_cap_bytes / total), device)
    trainer, step = build_step(spec, device)
    for _ in range(max(1, spec.warmup)):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = timed_steps(step, spec.steps, device)
    peak, reserved = int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))
    # The held gradients are a measuring device, not the method's memory: the cap must not turn them into an OOM.
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.reset_peak_memory_stats(device)
    with gradients_held(trainer):
        step()
    torch.cuda.synchronize(device)
    fill_memory(row, peak, int(torch.cuda.max_memory_allocated(device)), param_state_bytes(trainer))
    row.update(
        images_per_second=spec.batch * spec.steps / seconds,
        status="ok",
        peak_reserved_bytes=reserved,
        device_name=torch.cuda.get_device_name(device),
    )
    return row


def fill_memory(row: dict[str, Any], peak: int, held_peak: int, params: int) -> None:
    """``held_peak``: the peak of a step with every gradient held, of which ``params`` is the rest."""
    row.update(peak_memory_bytes=peak, param_state_bytes=params, activation_memory_bytes=max(0, held_peak - params))


def base_row(spec: AuditSpec) -> dict[str, Any]:
    row: dict[str, Any] = {key: None for key in ROW_FIELDS}
    row.update(
        method=spec.method,
        depth=spec.depth,
        resolution=spec.resolution,
        batch=spec.batch,
        micro_batch=spec.chunk,
        status="error",
        device=spec.device,
        width=spec.width,
        classes=spec.classes,
        steps=spec.steps,
        warmup=max(1, spec.warmup),
        round=spec.round,
    )
    return row


def _kernel_backend(device: str) -> str:
    from ffablate import ops

    return ops.backend(device)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def worker_main(spec_json: str) -> int:
    spec = AuditSpec(**json.loads(spec_json))
    try:
        row = measure(spec)
    except Exception as exc:  # the parent wants a row, whatever happened
        row = base_row(spec)
        row["error"] = _one_line(exc)
    print(json.dumps(row), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# In the parent


def run_worker(spec: AuditSpec, timeout: float = 900.0) -> dict[str, Any]:
    """Run one spec in a fresh interpreter; a crash or timeout becomes a status row."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "ffablate.audit", "--worker", json.dumps(asdict(spec))]
    try:
        # On Ctrl-C (KeyboardInterrupt here) subprocess.run kills the worker before re-raising.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base_row(spec), "status": "timeout", "error": f"worker ran past {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    # Ctrl-C reaches the worker's process group too, and it may die of it before our own KeyboardInterrupt is
    # raised: that is the user stopping the audit, not a failed configuration.
    if proc.returncode == -signal.SIGINT:
        raise KeyboardInterrupt
    # Killed without a row: on CPU the kernel's OOM killer is the usual reason (SIGKILL).
    status = "oom" if proc.returncode in (-9, 137) else "error"
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {**base_row(spec), "status": status, "error": f"worker exit {proc.returncode}: {tail}"[:300]}


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit. ``rows`` still holds a row per spec: the first ``finished`` as the workers left
    them, then the one that was running and the rest as "skipped", so what was measured can still be written."""

    def __init__(self, rows: list[dict[str, Any]], finished: int) -> None:
        super().__init__()
        self.rows = rows
        self.finished = finished


def run_audit(
    specs: list[AuditSpec],
    progress: Callable[[int, int, AuditSpec], None] | None = None,
    timeout: float = 900.0,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Rows for ``specs``, one fresh worker each, run one after another so timings never overlap. ``budget``
    bounds the whole audit (a device lease is finite): a worker gets at most the seconds left, and once they are
    spent the rest become "skipped" rows. Ctrl-C stops the running worker and raises ``AuditInterrupted``.
    """
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    try:
        for index, spec in enumerate(specs):
            if progress:
                progress(index, len(specs), spec)
            left = timeout if budget is None else min(timeout, budget - (time.monotonic() - start))
            if left <= 0:
                rows.append({**base_row(spec), "status": "skipped", "error": f"budget {budget:.0f} s spent"})
                continue
            rows.append(run_worker(spec, left))
    except KeyboardInterrupt:
        finished = len(rows)
        rows += [{**base_row(spec), "status": "skipped", "error": "interrupted"} for spec in specs[finished:]]
        raise AuditInterrupted(rows, finished) from None
    if progress and specs:
        progress(len(specs), len(specs), specs[-1])
    return rows


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (resolution, depth) and FF variant: FF / best-BP peak memory and FF / BP-GA throughput; and per
    (resolution, method) how activation memory grows with depth.

    Memory is the same in every round (the profiler counts bytes); a throughput ratio is taken round by round, FF
    against the BP-GA worker of its own round, and given as the median with the range over the rounds.
    """
    out: list[dict[str, Any]] = []
    ok = _ok(rows)
    for res, depth in sorted({(r["resolution"], r["depth"]) for r in ok}):
        here = [r for r in ok if (r["resolution"], r["depth"]) == (res, depth)]
        first: dict[str, dict[str, Any]] = {}  # each method's row of its earliest round: its memory is every round's
        for r in sorted(here, key=lambda r: r.get("round", 0)):
            first.setdefault(r["method"], r)
        bps = [r for m, r in first.items() if m.startswith("bp")]
        best = min(bps, key=lambda r: r["peak_memory_bytes"], default=None)
        # A BP variant asked for but without a measurement here (skipped, timed out, OOM): "best BP" is then the
        # best of those that ran, which the table must say.
        asked = {r["method"] for r in rows if (r["resolution"], r["depth"]) == (res, depth)}
        missing = sorted(m for m in asked if m.startswith("bp") and m not in first)
        for method in (m for m in first if m.startswith("ff")):
            ff = first[method]
            out.append(
                {
                    "kind": "ratio",
                    "resolution": res,
                    "depth": depth,
                    "method": method,
                    "chunk": ff.get("micro_batch"),
                    "best_bp": best and best["method"],
                    "best_bp_chunk": best and best.get("micro_batch"),
                    "memory_ratio": best and ff["peak_memory_bytes"] / best["peak_memory_bytes"],
                    **_per_round(here, method, "images_per_second", "throughput_ratio_vs_bp_ga"),
                    **_per_round(here, method, "images_per_cpu_second", "cpu_throughput_ratio_vs_bp_ga"),
                    "bp_missing": missing,
                }
            )
    for res, method in sorted({(r["resolution"], r["method"]) for r in ok}):
        mine = [r for r in ok if (r["resolution"], r["method"]) == (res, method)]
        first_bytes: dict[int, int] = {}  # each depth's earliest round, as the memory ratios take it
        for r in sorted(mine, key=lambda r: r.get("round", 0)):
            first_bytes.setdefault(r["depth"], r["activation_memory_bytes"])
        by_depth = sorted(first_bytes.items())
        if len(by_depth) >= 2 and by_depth[0][1]:
            (d0, a0), (d1, a1), (d2, a2) = by_depth[0], by_depth[-2], by_depth[-1]
            out.append(
                {
                    "kind": "depth-growth",
                    "resolution": res,
                    "method": method,
                    "from_depth": d0,
                    "to_depth": d2,
                    "from_bytes": a0,
                    "to_bytes": a2,
                    "activation_growth": a2 / a0,
                    # Between the two deepest depths: the ratio alone hides a slope while the first block's
                    # backward still sets the peak (BP's until about depth 11 at 32 px, width 32).
                    "bytes_per_block": (a2 - a1) / (d2 - d1),
                }
            )
    return out


def _per_round(rows: list[dict[str, Any]], method: str, key: str, name: str) -> dict[str, Any]:
    """``name``: the median over rounds of ``method``'s ``key`` over BP-GA's in the same round; ``name_range``:
    (lowest, highest) of those; ``name_rounds``: how many rounds had both; ``name_missing``: why there is no ratio.
    """
    mine = {r.get("round", 0): r.get(key) for r in rows if r["method"] == method}
    ga = {r.get("round", 0): r.get(key) for r in rows if r["method"] == "bp-ga"}
    ratios = sorted(mine[i] / ga[i] for i in mine if mine[i] and ga.get(i))
    if not ratios:
        # CUDA rows have no CPU-second figures: that column's gap beside a bp-ga row is no missing row.
        why = "no bp-ga row to compare" if not ga else f"no {key} measured"
        return {name: None, f"{name}_range": None, f"{name}_rounds": 0, f"{name}_missing": why}
    return {
        name: statistics.median(ratios),
        f"{name}_range": [ratios[0], ratios[-1]],
        f"{name}_rounds": len(ratios),
        f"{name}_missing": None,
    }


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(summary: dict[str, Any], name: str) -> str:
    """A per-round ratio as "0.91 (0.67-1.06, 4 rounds)", or "0.91 (1 round: spread not measured)"."""
    value, rounds = summary.get(name), summary.get(f"{name}_rounds", 0)
    if value is None:
        return f"- ({summary.get(f'{name}_missing') or 'no bp-ga row to compare'})"
    if rounds < 2:
        return f"{value:.2f} (1 round: spread not measured)"
    low, high = summary[f"{name}_range"]
    return f"{value:.2f} ({low:.2f}-{high:.2f}, {rounds} rounds)"


def render_table(rows: list[dict[str, Any]], title: str = "ffablate audit"):
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "method",
        "depth",
        "res",
        "batch",
        "micro",
        "round",
        "peak MiB",
        "activations MiB",
        "params+state MiB",
        "images/s",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for r in rows:
        ips = r["images_per_second"]
        table.add_row(
            r["method"],
            str(r["depth"]),
            str(r["resolution"]),
            str(r["batch"]),
            str(r["micro_batch"]),
            str(r.get("round", 0)),
            _mb(r["peak_memory_bytes"]),
            _mb(r["activation_memory_bytes"]),
            _mb(r["param_state_bytes"]),
            "-" if ips is None else f"{ips:.1f}",
            r["status"],
        )
    return table


def render_summary(summary: list[dict[str, Any]]) -> list[Any]:
    from rich.table import Table

    table = Table(title="FF vs BP (same effective batch; chunk: images per forward pass; images/s: median over rounds)")
    for column in (
        "res",
        "depth",
        "FF variant (chunk)",
        "best BP (chunk)",
        "FF / best-BP memory",
        "FF / BP-GA images/s",
        "same, per CPU-second",
        "BP not measured",
    ):
        table.add_column(column)
    for s in (s for s in summary if s["kind"] == "ratio"):
        table.add_row(
            str(s["resolution"]),
            str(s["depth"]),
            f"{s['method']} ({s['chunk']})",
            f"{s['best_bp']} ({s['best_bp_chunk']})" if s["best_bp"] else "-",
            _fmt(s.get("memory_ratio")),
            _spread(s, "throughput_ratio_vs_bp_ga"),
            _spread(s, "cpu_throughput_ratio_vs_bp_ga"),
            ", ".join(s.get("bp_missing") or []) or "-",
        )
    growth = Table(
        title="activation memory against depth (per added block: between the two deepest depths; less than a block's"
        " cost while the first block's backward still sets the peak at both)"
    )
    for column in ("res", "method", "depths", "activations MiB", "growth", "KiB per added block"):
        growth.add_column(column)
    for s in (s for s in summary if s["kind"] == "depth-growth"):
        growth.add_row(
            str(s["resolution"]),
            s["method"],
            f"{s['from_depth']}->{s['to_depth']}",
            f"{_mb(s['from_bytes'])}->{_mb(s['to_bytes'])}",
            f"{s['activation_growth']:.2f}x",
            f"{s['bytes_per_block'] / 2**10:.1f}",
        )
    return [t for t in (table, growth) if t.row_count]


def plot(rows: list[dict[str, Any]], out_dir: str | Path, prefix: str = "audit") -> list[Path]:
    """Two PNGs: peak memory vs depth and images/s vs depth, one line per method, one panel per resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows)
    resolutions = sorted({r["resolution"] for r in ok})
    paths = []
    for key, label, name in (
        ("peak_memory_bytes", "peak memory (MiB)", "memory"),
        ("images_per_second", "training images/s (median, bar: range over rounds)", "throughput"),
    ):
        fig, axes = plt.subplots(1, max(1, len(resolutions)), figsize=(5 * max(1, len(resolutions)), 4), squeeze=False)
        for ax, res in zip(axes[0], resolutions, strict=False):
            for method in dict.fromkeys(r["method"] for r in ok):
                by_depth: dict[int, list[float]] = {}
                for r in ok:
                    if r["resolution"] == res and r["method"] == method and r[key] is not None:
                        by_depth.setdefault(r["depth"], []).append(
                            r[key] / (2**20 if key == "peak_memory_bytes" else 1)
                        )
                if not by_depth:
                    continue
                # One point per depth, the median over rounds, with the rounds' range as its bar: joining every
                # round's point drew slopes between one round's high and the next depth's low.
                xs = sorted(by_depth)
                mid = [statistics.median(by_depth[d]) for d in xs]
                low = [m - min(by_depth[d]) for d, m in zip(xs, mid, strict=True)]
                high = [max(by_depth[d]) - m for d, m in zip(xs, mid, strict=True)]
                ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=method)
            ax.set(title=f"{res}x{res}", xlabel="depth (blocks)", ylabel=label)
            ax.set_xticks(sorted({r["depth"] for r in ok if r["resolution"] == res}))  # not "2.2 blocks"
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def cap_bytes(gigabytes: float | None) -> int:
    if gigabytes is None:
        return 0
    if not gigabytes > 0 or math.isinf(gigabytes):
        raise ConfigError(f"--memory-cap must be a positive number of GiB, got {gigabytes}")
    return int(gigabytes * 2**30)


def specs_from_args(args: argparse.Namespace) -> list[AuditSpec]:
    """The CLI's flags -> specs (validated: a bad value is a ConfigError with one line)."""
    from ffablate.train.common import resolve_device

    resolve_device(args.device)
    common = {
        "width": args.width,
        "classes": args.classes,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "memory_cap_bytes": cap_bytes(args.memory_cap),
        "threads": args.threads,
    }
    for key, value, least in (
        ("width", args.width, 1),
        ("classes", args.classes, 2),
        ("steps", args.steps, 1),
        ("batch", args.batch, 1),
        ("micro-batch", args.micro_batch, 0),
        ("warmup", args.warmup, 1),
        ("rounds", args.rounds, 1),
        ("threads", args.threads, 0),
    ):
        if value < least:
            raise ConfigError(f"--{key} must be at least {least}, got {value}")
    for key, value in (("timeout", args.timeout), ("budget", args.budget)):
        # subprocess.run's timeout overflows above about 2.1e6 s (inf included), with a traceback.
        if value is not None and not 0 < value <= MAX_SECONDS:
            raise ConfigError(f"--{key} must be a positive number of seconds, at most {MAX_SECONDS:.0e}, got {value}")
    methods = parse_methods(args.methods)
    classwise = [m for m in methods if m in ("ff", "ff-ga")]  # the default goodness: one channel per class
    if classwise and args.width < args.classes:
        raise ConfigError(
            f"--width {args.width} is below --classes {args.classes}: class-wise FF ({', '.join(classwise)}) "
            "needs a channel per class; raise --width, lower --classes or leave those out of --methods"
        )
    check_output_paths(args.output, args.plot_dir, args.plot_prefix)
    _kernel_backend(args.device)  # a bad FFABLATE_KERNELS fails here, once, not as an error row per configuration
    return plan(
        methods,
        parse_ints(args.depths, "--depths", 2),
        parse_ints(args.resolution, "--resolution", 8),
        batch=args.batch,
        micro_batch=args.micro_batch,
        rounds=args.rounds,
        **common,
    )


def check_output_paths(output: str | None, plot_dir: str | None, prefix: str) -> None:
    """Fail before the audit, not after it, when its results could not be written."""
    if output:
        if Path(output).is_dir():
            raise ConfigError(f"--output {output} is a folder; give a file, e.g. {Path(output) / 'audit.json'}")
        _writable_folder(Path(output).parent, "--output")
    if plot_dir:
        _writable_folder(Path(plot_dir), "--plot-dir")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ConfigError(f"--plot-prefix must be a file name prefix without '/', got {prefix!r}")


def _writable_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot create the folder {folder} ({exc.strerror}); give another path") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag}: the folder {folder} is not writable; give another path")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ffablate audit`` flags (kept here so the CLI stays a thin shell)."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--depths", default="4,8,16", help="comma-separated block counts (>= 2)")
    p.add_argument("--resolution", default="32", help="comma-separated square image sizes, e.g. 32,224")
    p.add_argument("--batch", type=int, default=64, help="effective batch, the same for every method")
    p.add_argument("--micro-batch", type=int, default=0, help="micro-batch of -ga methods (0, the default: batch/4)")
    p.add_argument("--width", type=int, default=32, help="channels of every block")
    p.add_argument("--classes", type=int, default=10, help="classes (class-wise FF needs width >= classes)")
    p.add_argument("--memory-cap", type=float, help="GiB (2**30 bytes); a run above it is an over-cap/oom row")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    p.add_argument("--rounds", type=int, default=3, help="passes over the grid; ratios give median and range")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per worker (0, the default: torch's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one configuration may take")
    p.add_argument("--budget", type=float, help="seconds after which no new configuration starts")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    p.add_argument("--output", help="also write {meta, rows, summary} as JSON to this file")
    p.add_argument("--plot-dir", help="write PREFIX_memory.png and PREFIX_throughput.png here")
    p.add_argument("--plot-prefix", default="audit", help="file name prefix of the plots (default audit)")


def machine() -> dict[str, Any]:
    """What ran the audit, for its output: software, CPU, load, date (each row adds threads, kernels, device)."""
    import platform

    from ffablate.train.common import versions

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        **versions(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": load and [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


MEMORY_NOTE = (
    "peak = torch allocator bytes (parameters, optimizer state, batch, activations); the process baseline (Python, "
    "torch, the data) is not in it"
)


def header(args: argparse.Namespace, before: dict[str, Any]) -> str:
    """One line on how the tables below were made."""
    full = before["ffablate_commit"]
    commit = (full[:12] + ("+dirty" if full.endswith("+dirty") else "")) if full else "unknown commit"
    threads = args.threads or "torch's default"
    return (
        f"ffablate audit on {args.device} ({before['cpu']}, {before['cpu_count']} CPUs, load {before['load_average']}),"
        f" ffablate {before['ffablate']} ({commit}), torch {before['torch']}, {before['date']}: methods {args.methods},"
        f" depths {args.depths}, resolution {args.resolution}, batch {args.batch}, width {args.width}, {args.steps}"
        f" timed steps x {args.rounds} round{'s' if args.rounds != 1 else ''} after {args.warmup} warm-up, threads"
        f" {threads}{'; on CUDA each row names its GPU (device_name)' if args.device == 'cuda' else ''}"
    )


def write_output(path: str | Path, rows: list[dict[str, Any]], argv: dict[str, Any], before: dict[str, Any]) -> None:
    """{meta, rows, summary} as JSON; meta holds the flags, the machine before the audit and the load after it."""
    after = machine()
    meta = {"args": argv, **before, "load_average_after": after["load_average"], "memory": MEMORY_NOTE}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(jsontext.dumps({"meta": meta, "rows": rows, "summary": summarize(rows)}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m ffablate.audit --worker SPEC_JSON`` prints one JSON row."""
    parser = argparse.ArgumentParser(prog="python -m ffablate.audit")
    parser.add_argument("--worker", required=True, help="an AuditSpec as JSON")
    return worker_main(parser.parse_args(argv).worker)


if __name__ == "__main__":
    sys.exit(main())
