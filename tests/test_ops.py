"""ffablate.ops: the fused goodness_norm kernels against their pure-PyTorch reference twin."""

from __future__ import annotations

import itertools
import math
import os
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from ffablate import ops
from ffablate.bench import kernel_bench, render_table, use_cuda_schedule
from ffablate.errors import ConfigError, FFablateWarning

OUTS = ("sumsq", "sumabs", "out", "readout")
SCHEDULES = ("ticket", "flagged", "lagged", "two-pass", "cluster")  # FFABLATE_CUDA_SCHEDULE
HAS_CUDA = ops.extension_available() and bool(getattr(ops._C, "WITH_CUDA", False)) and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of ffablate._C")


def _require_fused() -> None:
    """Without the extension ops.goodness_norm runs the reference: a comparison with it would hold trivially.
    (conftest.py unsets FFABLATE_KERNELS and FFABLATE_CUDA_SCHEDULE for every test.)"""
    assert ops.extension_available(), "ffablate._C is not built: run `pip install -e . --no-build-isolation`"
    assert ops.backend() == "fused"


def _random_shapes(seed: int, count: int, big: bool = False) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    shapes: list[tuple[int, ...]] = [(0, 5), (0, 3, 2, 2), (1, 1), (3, 1, 1, 1), (2, 4096), (2, 4097)]
    for _ in range(count):
        if rng.random() < 0.4:
            shapes.append((rng.randint(1, 6), rng.randint(1, 9000 if big else 700)))
        else:
            hw = rng.choice([1, 2, 3, 7, 8, 28, 33, 64] + ([65, 70] if big else []))
            shapes.append((rng.randint(1, 5), rng.randint(1, 40), hw, rng.choice([1, hw, 5])))
    return shapes


def _make(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.3).to(device, dtype)


def _fwd_bwd(fn, h: torch.Tensor, which: tuple[bool, ...], seed: int):  # noqa: ANN001, ANN202
    """Outputs of fn(h) and dh for a loss over the selected outputs (unselected get no gradient)."""
    h = h.detach().clone().requires_grad_()
    res = fn(h)
    gen = torch.Generator().manual_seed(seed)
    loss = h.new_zeros((), dtype=torch.float64)
    for used, t in zip(which, res, strict=True):
        if used and t.numel():
            w = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
            loss = loss + (t.double() * w).sum()
    if not loss.requires_grad:
        return res, torch.zeros_like(h)
    (dh,) = torch.autograd.grad(loss, h)
    return [t.detach() for t in res], dh


def _check_against_reference(h: torch.Tensor, seed: int, atol: float, rtol: float, subsets: int = 2) -> None:
    # fp16/bf16 are judged against the reference evaluated on the same values in fp32.
    _require_fused()
    ref_h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    which_all = list(itertools.product([True, False], repeat=4))
    for which in [which_all[0], *random.Random(seed).sample(which_all[1:], subsets)]:
        got, dh = _fwd_bwd(ops.goodness_norm, h, which, seed)
        want, dh_ref = _fwd_bwd(ops.reference_goodness_norm, ref_h, which, seed)
        for name, a, b in zip(OUTS, got, want, strict=True):
            assert a.shape == b.shape, (name, h.shape)
            torch.testing.assert_close(
                a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n} {h.shape}: {m}"
            )
        torch.testing.assert_close(
            dh.double(),
            dh_ref.double(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, w=which: f"dh {h.shape} {w}: {m}",
        )


def test_extension_is_built_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole comparison suite is meaningless if goodness_norm silently ran the reference.
    assert ops.extension_available(), "ffablate._C is not built: run `pip install -e . --no-build-isolation`"
    assert ops.backend() == "fused"

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("reference called although the fused op supports this input")

    monkeypatch.setattr(ops, "reference_goodness_norm", boom)
    for shape in [(3, 17), (2, 3, 4, 4)]:
        for dtype in (torch.float32, torch.float64):
            ops.goodness_norm(torch.randn(shape, dtype=dtype))


def test_output_contract() -> None:
    h = torch.randn(4, 3, 5, 5)
    sq, sa, out, ro = ops.goodness_norm(h)
    assert sq.shape == sa.shape == (4,) and out.shape == h.shape and ro.shape == (4, 3)
    h2 = torch.randn(4, 10, dtype=torch.float64)
    sq, sa, out, ro = ops.goodness_norm(h2)
    assert ro is out and sq.dtype == torch.float64
    raw = torch.ops.ffablate.goodness_norm.default(h2, 1e-6)
    assert raw[3].shape == (4, 0)
    assert ops.goodness_norm(torch.randn(2, 5, dtype=torch.bfloat16))[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference_random_shapes(dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for i, shape in enumerate(_random_shapes(seed=1, count=30)):
        _check_against_reference(_make(shape, dtype, "cpu", i), seed=i, atol=tol, rtol=tol)


def test_cpu_large_streaming_path() -> None:
    # > 16 MB of output switches the CPU kernel to streaming stores.
    h = _make((16, 64, 64, 64), torch.float32, "cpu", 0)
    _check_against_reference(h, seed=0, atol=1e-5, rtol=1e-5, subsets=0)


@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (5, 3, 7, 9), (4, 2, 8, 8), (9, 70), (3, 1)])
def test_cpu_prefetch_changes_no_bit(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    # Prefetching the next sample is a hint, but it splits the sweeps into cache lines and a tail: every output
    # and dh, streaming (the first shape) or not, with a tail or none, must be the bits of the plain sweep.
    _require_fused()
    h = _make(shape, torch.float32, "cpu", 7)
    for which in [(True, True, True, True), (False, True, False, True), (True, False, True, False)]:
        monkeypatch.delenv("FFABLATE_CPU_PREFETCH", raising=False)
        got, dh = _fwd_bwd(ops.goodness_norm, h, which, 3)
        monkeypatch.setenv("FFABLATE_CPU_PREFETCH", "0")
        want, dh_plain = _fwd_bwd(ops.goodness_norm, h, which, 3)
        for name, a, b in zip(OUTS, got, want, strict=True):
            assert torch.equal(a, b), (name, shape, which)
        assert torch.equal(dh, dh_plain), (shape, which)


@pytest.mark.parametrize("shape", [(7, 3000), (5, 4, 33, 31), (1, 2, 700, 700)])
def test_cpu_bits_do_not_depend_on_the_thread_count(shape: tuple[int, ...]) -> None:
    # Threads split the batch, never a sample, so a run's bits are the same on any machine's core count.
    _require_fused()
    h = _make(shape, torch.float32, "cpu", 8)

    def outputs_and_grads() -> list[torch.Tensor]:
        out, dh = _fwd_bwd(ops.goodness_norm, h, (True, True, True, True), 4)
        if h.dim() == 2:
            return [*out, dh]
        pooled, dx = _fwd_bwd(lambda x: (ops.max_pool2x2(x, relu=True),), h, (True,), 4)
        return [*out, dh, *pooled, dx]

    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(outputs_and_grads())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True)), shape


def test_non_contiguous_inputs() -> None:
    base = _make((3, 8, 6, 5), torch.float32, "cpu", 3)
    for h in (
        base.transpose(2, 3),
        base.to(memory_format=torch.channels_last),
        base[:, ::2],
        base.flatten(1)[:, ::3],
    ):
        assert not h.is_contiguous()
        _check_against_reference(h, seed=5, atol=1e-5, rtol=1e-5)
    # Contiguous, but one element into its storage: data pointers off vector alignment.
    shifted = _make((base.numel() + 1,), torch.float32, "cpu", 4)[1:].view(base.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    _check_against_reference(shifted, seed=5, atol=1e-5, rtol=1e-5)
    # Non-contiguous incoming gradients as well.
    h = base.clone().requires_grad_()
    g_out = torch.randn(3, 8, 5, 6).transpose(2, 3)
    (dh,) = torch.autograd.grad(ops.goodness_norm(h)[2], h, g_out)
    (dh_ref,) = torch.autograd.grad(ops.reference_goodness_norm(h)[2], h, g_out)
    torch.testing.assert_close(dh, dh_ref)


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4, 5), (2, 2, 1, 1), (1, 40)])
def test_gradcheck_fp64(shape: tuple[int, ...]) -> None:
    h = _make(shape, torch.float64, "cpu", 11).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.goodness_norm(x, 1e-3), (h,))
    # Each output alone, so the kernel's "gradient absent" branches are checked too.
    for k in range(4):
        assert torch.autograd.gradcheck(lambda x, k=k: ops.goodness_norm(x, 1e-3)[k], (h,))


def test_opcheck() -> None:
    for shape in [(3, 9), (2, 3, 4, 4)]:
        h = _make(shape, torch.float32, "cpu", 2)
        torch.library.opcheck(torch.ops.ffablate.goodness_norm.default, (h.requires_grad_(), 1e-6))
        h = h.detach()
        n = h.shape[0]
        sq = h.flatten(1).square().sum(1)
        c = h.shape[1] if h.dim() == 4 else 0
        full = (torch.randn(n), torch.randn(n), torch.randn_like(h), torch.randn(n, c), h, sq, 1e-6)
        torch.library.opcheck(torch.ops.ffablate.goodness_norm_backward.default, full)
        torch.library.opcheck(
            torch.ops.ffablate.goodness_norm_backward.default, (None, torch.randn(n), None, None, h, sq, 1e-6)
        )


def test_torch_compile_fullgraph() -> None:
    def step(h: torch.Tensor) -> torch.Tensor:
        sq, sa, out, ro = ops.goodness_norm(h)
        return torch.nn.functional.softplus(sq - 2.0).mean() + sa.mean() * 1e-3 + (ro * ro).sum() + out.sum()

    _require_fused()
    compiled = torch.compile(step, fullgraph=True)
    h = _make((4, 3, 5, 5), torch.float32, "cpu", 9).requires_grad_()
    (g_c,) = torch.autograd.grad(compiled(h), h)
    (g_e,) = torch.autograd.grad(step(h), h)
    torch.testing.assert_close(g_c, g_e)


def test_a_first_call_under_torch_compile_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback's one warning was issued from inside the trace, which dynamo cannot follow (fullgraph failed).
    monkeypatch.setattr(ops, "_EXT_ERROR", "simulated: no module named ffablate._C")
    monkeypatch.setattr(ops, "_warned", False)
    compiled = torch.compile(lambda h: ops.goodness_norm(h)[0].sum(), fullgraph=True)
    h = _make((2, 5), torch.float32, "cpu", 10)
    torch.testing.assert_close(compiled(h), ops.reference_goodness_norm(h)[0].sum())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's own import, not ours
def test_forward_mode_ad_and_torch_func_get_true_derivatives() -> None:
    # The fused ops have a backward formula only: under jvp their tangents came out zero, without an error.
    _require_fused()
    h, t = _make((3, 4, 6, 5), torch.float64, "cpu", 11), _make((3, 4, 6, 5), torch.float64, "cpu", 12)

    def fused(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*ops.goodness_norm(x), ops.max_pool2x2(x, relu=True))

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*ops.reference_goodness_norm(x), torch.nn.functional.max_pool2d(x.relu(), 2))

    _, want = torch.func.jvp(reference, (h,), (t,))
    assert all(w.abs().sum() > 0 for w in want)
    _, got = torch.func.jvp(fused, (h,), (t,))
    with fwAD.dual_level():
        got_dual = [fwAD.unpack_dual(o).tangent for o in fused(fwAD.make_dual(h, t))]
    for a, b, w in zip(got, got_dual, want, strict=True):
        torch.testing.assert_close(a, w)
        torch.testing.assert_close(b, w)
    # Reverse mode through torch.func, which refused the fused ops' autograd registration, and vmap.
    loss = lambda x: sum(o.square().sum() for o in fused(x))  # noqa: E731
    want_loss = lambda x: sum(o.square().sum() for o in reference(x))  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss)(h), torch.func.grad(want_loss)(h))
    torch.testing.assert_close(torch.vmap(loss)(h[:, None]), torch.vmap(want_loss)(h[:, None]))


BAD_FORWARD = [
    (lambda: torch.randn(2, 3, 4), "2-D"),
    (lambda: torch.randn(2, 3, 4, 5, 6), "2-D"),
    (lambda: torch.ones(2, 3, dtype=torch.int64), "floating"),
    (lambda: torch.randn(2, 3, dtype=torch.float16), "float32 and float64"),
    (lambda: torch.randn(2, 0), "at least one element"),
]


@pytest.mark.parametrize(("make", "msg"), BAD_FORWARD)
def test_bad_forward_inputs_raise(make, msg: str) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.ffablate.goodness_norm.default(make(), 1e-6)


def test_bad_eps_and_wrapper_errors() -> None:
    # The twin refuses what the op refuses (FFABLATE_KERNELS=reference took a negative eps, and until session 17
    # a NaN one, returning NaN outputs).
    for eps in (-1.0, math.nan):
        with pytest.raises(RuntimeError, match="eps must be >= 0"):
            torch.ops.ffablate.goodness_norm.default(torch.randn(2, 3), eps)
        with pytest.raises(RuntimeError, match="eps must be >= 0"):
            ops.reference_goodness_norm(torch.full((1, 4), 2.0), eps)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.goodness_norm(torch.randn(3))
    with pytest.raises(RuntimeError, match="floating"):
        ops.goodness_norm(torch.ones(2, 3, dtype=torch.int32))


EDGE_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_goodness_only_gradients_follow_the_reference_at_the_edges(device: str) -> None:
    """With only goodness gradients, dh must not pick up r (inf for an all-zero sample at eps = 0) or h * 0 (NaN
    where h is inf), and a NaN element must not spread over its sample: the reference's autograd has neither."""
    h = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, float("inf"), 0.5], [1.0, float("nan"), -3.0, 2.0]])
    h = h.to(device)
    gs, ga = torch.tensor([0.5, 0.0, 0.25], device=device), torch.tensor([1.5, -2.0, 0.0], device=device)
    for eps in (0.0, 1e-6):
        for grad_sumsq, grad_sumabs in [(gs, None), (None, ga), (gs, ga), (None, None)]:
            ref = h.clone().requires_grad_()
            sumsq, sumabs, _, _ = ops.reference_goodness_norm(ref, eps)
            loss = sum(((s * g).sum() for s, g in [(sumsq, grad_sumsq), (sumabs, grad_sumabs)] if g is not None), 0.0)
            want = torch.autograd.grad(loss, ref)[0] if torch.is_tensor(loss) else torch.zeros_like(h)
            got = torch.ops.ffablate.goodness_norm_backward.default(
                grad_sumsq, grad_sumabs, None, None, h, ops.goodness_norm(h, eps)[0], eps
            )
            torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, e=eps: f"eps={e}: {m}")


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sumabs_gradient_is_zero_at_nan_in_every_lane(device: str, dtype: torch.dtype) -> None:
    # sign(NaN) is 0 in torch.abs's gradient; the CPU's vector lanes gave +-1 there, its scalar tail 0. A row of
    # 37 with a NaN every third element puts NaNs in every lane of 4-, 8- and 16-wide vectors and in the tail.
    h = torch.arange(1.0, 38.0, dtype=dtype) * torch.tensor([1.0, -1.0], dtype=dtype).repeat(19)[:37]
    h[::3] = float("nan")
    h = h[None].to(device)
    ref = h.clone().requires_grad_()
    want = torch.autograd.grad((ops.reference_goodness_norm(ref)[1] * 1.5).sum(), ref)[0]
    ga = torch.tensor([1.5], dtype=dtype, device=device)
    got = torch.ops.ffablate.goodness_norm_backward.default(None, ga, None, None, h, ops.goodness_norm(h)[0], 1e-6)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_cpu_sums_of_long_rows_stay_accurate() -> None:
    # One fp32 lane running over a 2^21-element row drifted by 6e-5 (relative); blocks of partial sums do not.
    _require_fused()
    h = torch.rand(2, 2**21 + 4, generator=torch.Generator().manual_seed(0)) + 0.5
    sumsq, sumabs, _, _ = ops.goodness_norm(h)
    exact = h.double()
    torch.testing.assert_close(sumsq.double(), exact.square().sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(sumabs.double(), exact.abs().sum(1), rtol=1e-6, atol=0)


def test_double_backward_is_refused() -> None:
    h = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    (dh,) = torch.autograd.grad(ops.goodness_norm(h)[0].sum(), h, create_graph=False)
    assert dh.shape == h.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ops.goodness_norm(h)[0].sum(), h, create_graph=True)


def test_a_meta_gradient_among_cpu_tensors_is_refused() -> None:
    # The dispatcher sends such a call to the fake implementation, which once returned uninitialised memory.
    h = torch.randn(2, 3, 4, 4)
    sq = h.flatten(1).square().sum(1)
    with pytest.raises(RuntimeError, match="a tensor on meta with one on cpu"):
        torch.ops.ffablate.goodness_norm_backward.default(
            None, None, torch.empty(2, 3, 4, 4, device="meta"), None, h, sq, 1e-6
        )
    with pytest.raises(RuntimeError, match="a tensor on meta with one on cpu"):
        torch.ops.ffablate.max_pool2x2_backward.default(
            torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device="meta"), 4, 4
        )


def test_bad_backward_inputs_raise() -> None:
    h = torch.randn(2, 3, 4, 4)
    sq = h.flatten(1).square().sum(1)
    bwd = torch.ops.ffablate.goodness_norm_backward.default
    cases = [
        ((torch.randn(3), None, None, None, h, sq, 1e-6), "grad_sumsq has shape"),
        ((None, torch.randn(2, 1), None, None, h, sq, 1e-6), "grad_sumabs has shape"),
        ((None, None, torch.randn(2, 3, 4, 5), None, h, sq, 1e-6), "grad_out has shape"),
        ((None, None, None, torch.randn(2, 4), h, sq, 1e-6), "grad_readout has shape"),
        ((None, None, None, None, h, torch.randn(3), 1e-6), "sumsq has shape"),
        ((None, None, torch.ones(2, 3, 4, 4, dtype=torch.int32), None, h, sq, 1e-6), "floating"),
        ((None, None, None, None, torch.randn(2, 3, 4), sq, 1e-6), "2-D"),
        ((None, None, None, None, h, sq, -1.0), "eps must be >= 0"),
        ((None, None, None, None, h, sq, float("nan")), "eps must be >= 0"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            bwd(*args)


def test_reference_backend_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ops.reference_goodness_norm

    def spy(h: torch.Tensor, eps: float = 1e-6):  # noqa: ANN202
        calls.append(h.shape)
        return real(h, eps)

    monkeypatch.setattr(ops, "reference_goodness_norm", spy)
    monkeypatch.setenv("FFABLATE_KERNELS", "reference")
    assert ops.backend() == "reference"
    ops.goodness_norm(torch.randn(2, 3))
    assert calls == [(2, 3)]
    monkeypatch.setenv("FFABLATE_KERNELS", "fused")
    ops.goodness_norm(torch.randn(2, 3))
    assert calls == [(2, 3)]
    monkeypatch.setenv("FFABLATE_KERNELS", "bogus")
    with pytest.raises(ConfigError, match="FFABLATE_KERNELS"):  # the CLI prints it on one line, exit 2
        ops.backend()
    monkeypatch.setenv("FFABLATE_KERNELS", "fused")
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "flagged")
    assert ops.backend() == "fused"
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "single-pass")
    with pytest.raises(ConfigError, match="FFABLATE_CUDA_SCHEDULE must be one of ticket, flagged, lagged, two-pass"):
        ops.backend()
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "lagged")
    for lag in ("0.25", "2", "1e-3", ".5"):
        monkeypatch.setenv("FFABLATE_CUDA_LAG", lag)
        assert ops.backend() == "fused"
    # What the kernels' strtod would refuse or read otherwise (a Python-only "1_0", a hex float) is refused here.
    for lag in ("0", "-1", "half", "inf", "nan", "1e999", "1_0", "0x1p-1"):
        monkeypatch.setenv("FFABLATE_CUDA_LAG", lag)
        with pytest.raises(ConfigError, match="FFABLATE_CUDA_LAG must be a positive number"):
            ops.backend()
    monkeypatch.setenv("FFABLATE_CUDA_LAG", "")
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "cluster")
    for kb in ("16", "104", "220"):
        monkeypatch.setenv("FFABLATE_CUDA_CLUSTER_KB", kb)
        assert ops.backend() == "fused"
    for kb in ("15", "221", "96.5", "-96", "1e2", "ninety"):  # the kernels' strtol would read some of these alike
        monkeypatch.setenv("FFABLATE_CUDA_CLUSTER_KB", kb)
        with pytest.raises(ConfigError, match="FFABLATE_CUDA_CLUSTER_KB must be a whole number of KB from 16 to 220"):
            ops.backend()


def test_missing_extension_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_EXT_ERROR", "simulated: no module named ffablate._C")
    monkeypatch.setattr(ops, "_warned", False)
    with pytest.warns(FFablateWarning, match="reference"):
        assert ops.backend() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(ops.goodness_norm(h)[2], ops.reference_goodness_norm(h)[2])
    monkeypatch.setenv("FFABLATE_KERNELS", "fused")
    with pytest.raises(ConfigError, match="FFABLATE_KERNELS=fused"):
        ops.backend()


class _CPUOnlyBuild:
    WITH_CUDA = False


def test_a_build_without_cuda_says_reference_for_cuda_and_fused_for_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a run records as its kernels must be what its tensors get: goodness_norm sends CUDA tensors to the
    # reference when the extension has no CUDA kernels.
    monkeypatch.setattr(ops, "_C", _CPUOnlyBuild())
    monkeypatch.setattr(ops, "_warned_no_cuda", False)
    assert ops.backend("cpu") == "fused"
    with pytest.warns(FFablateWarning, match="built without CUDA"):
        assert ops.backend("cuda") == "reference"
    monkeypatch.setenv("FFABLATE_KERNELS", "fused")
    with pytest.raises(ConfigError, match="FFABLATE_KERNELS=fused but ffablate._C was built without CUDA"):
        ops.backend("cuda")


def test_unsupported_dtype_falls_back_silently() -> None:
    h = _make((3, 4, 5, 5), torch.bfloat16, "cpu", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.goodness_norm(h)
    for a, b in zip(got, ops.reference_goodness_norm(h), strict=True):
        torch.testing.assert_close(a, b)


def test_use_cuda_schedule_sets_the_schedule_and_its_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "")  # restored after the test, like every FFABLATE_* variable
    monkeypatch.setenv("FFABLATE_CUDA_LAG", "")
    use_cuda_schedule("lagged@0.25")
    assert (os.environ["FFABLATE_CUDA_SCHEDULE"], os.environ["FFABLATE_CUDA_LAG"]) == ("lagged", "0.25")
    use_cuda_schedule("flagged")  # a lag from the previous spec must not carry over
    assert (os.environ["FFABLATE_CUDA_SCHEDULE"], os.environ["FFABLATE_CUDA_LAG"]) == ("flagged", "")
    with pytest.raises(ConfigError, match="FFABLATE_CUDA_LAG must be a positive number"):
        use_cuda_schedule("lagged@0")
    use_cuda_schedule("cluster@192")
    assert [os.environ[f"FFABLATE_CUDA_{k}"] for k in ("SCHEDULE", "LAG", "CLUSTER_KB")] == ["cluster", "", "192"]
    use_cuda_schedule("lagged@0.5")  # nor a budget
    assert [os.environ[f"FFABLATE_CUDA_{k}"] for k in ("SCHEDULE", "LAG", "CLUSTER_KB")] == ["lagged", "0.5", ""]
    with pytest.raises(ConfigError, match="only lagged@LAG and cluster@KB take a value"):
        use_cuda_schedule("flagged@2")


def test_kernel_bench_quick() -> None:
    rows = kernel_bench("cpu", quick=True, shapes=[("conv", (8, 4, 6, 6)), ("mlp", (8, 64))], compile_reference=False)
    assert [r["name"] for r in rows] == ["conv", "mlp"]
    for r in rows:
        assert r["backend"] == "fused"
        assert r["max_abs_err"] < 1e-4
        assert r["fused_ms"] > 0 and r["copy_gbps"] > 0 and r["compiled_ms"] is None
        assert r["timing"] == "wall" and r["call_ms"] is None
        for key in ("shape", "dtype", "device", "eager_ms", "fused_gbps", "speedup_vs_eager", "pct_of_copy"):
            assert key in r
        assert r["max_rel_err_stats"] < 1e-5 and r["peak_copy_gbps"] > 0 and r["pct_of_peak_copy"] > 0
    assert render_table(rows).row_count == 2


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_matches_reference(dtype: torch.dtype, schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", schedule)
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    # Beyond the random shapes: split channels (HW above one tile), 1x1 maps with more channels than a tile
    # may hold (the kMaxK cap), and samples that fit one block (solo, no rendezvous).
    extra = [(3, 2, 100, 100), (2, 5, 3, 3000), (2, 3000, 1, 1), (5, 16, 16, 16), (7, 4096)]
    for i, shape in enumerate(_random_shapes(seed=7, count=30, big=True) + extra):
        _check_against_reference(_make(shape, dtype, "cuda", i), seed=i, atol=tol, rtol=tol)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_misaligned_contiguous_inputs(dtype: torch.dtype) -> None:
    # Contiguous views one element into their storage: HW is a multiple of the vector width, but the data
    # pointers are not 16-byte aligned, so the kernels must take their scalar path for h and for grad_out.
    shape = (3, 4, 8, 8)
    numel = 3 * 4 * 8 * 8
    h = _make((numel + 1,), dtype, "cuda", 6)[1:].view(shape)
    assert h.is_contiguous() and h.data_ptr() % 16
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    _check_against_reference(h, seed=6, atol=tol, rtol=tol)
    g_out = _make((numel + 1,), dtype, "cuda", 7)[1:].view(shape)
    hr = h.detach().clone().requires_grad_()
    (dh,) = torch.autograd.grad(ops.goodness_norm(hr)[2], hr, g_out)
    href = h.detach().float().requires_grad_()
    (dh_ref,) = torch.autograd.grad(ops.reference_goodness_norm(href)[2], href, g_out.float())
    torch.testing.assert_close(dh.float(), dh_ref, atol=tol, rtol=tol)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(130, 64, 28, 28), (100, 3, 100, 100), (2000, 4096), (4096, 3, 28, 28), (1024, 12, 28, 28)]
)
def test_cuda_schedules_agree_bitwise(
    shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every schedule sums a sample's partials in the same order, so all give the same bits, run after run. The
    # shapes have more chunks than the GPU holds at once (blocks take tickets while others wait), channels split
    # across blocks (the readout sums published partials), and one-block samples. The last shape has 4,096
    # samples with 1/D not a power of two: a backward coefficient rounded differently by one schedule (an FMA
    # contraction, session 8's review: about 0.6% of samples at D = 2,352) cannot hide there; its samples fit one
    # block, so the last shape does the same over 1,024 samples of 2 (bf16) or 3 (fp32) blocks each.
    _require_fused()
    h = _make(shape, dtype, "cuda", 1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    runs = {}
    # lagged at its default lag, at the shortest (apply blocks right behind their stats blocks, often waiting)
    # and at one longer than the launch (every stats block first, two-pass in one launch).
    lagged = [("lagged", lag) for lag in ("", "1e-9", "1e300")]
    for schedule, lag in [("ticket", ""), ("flagged", ""), *lagged, ("two-pass", ""), ("flagged", "")]:
        monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", schedule)
        monkeypatch.setenv("FFABLATE_CUDA_LAG", lag)
        for which in ((True, True, True, True), (True, False, False, False), (False, False, False, True)):
            res, dh = _fwd_bwd(ops.goodness_norm, h, which, seed=3)
            first = runs.setdefault(which, (res, dh))
            for a, b in zip([*res, dh], [*first[0], first[1]], strict=True):
                assert torch.equal(a, b), (schedule, lag, which)
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "flagged")
    _check_against_reference(h, seed=5, atol=tol, rtol=tol, subsets=1)


def _cluster_blocks(shape: tuple[int, ...], elem_bytes: int, tiles: int, kb: int) -> int:
    """Blocks per sample under the cluster schedule (csrc's cluster_plan, then make_plan); 0 past 16 (flagged then).
    ``tiles``: 1 for the forward, 2 for the backward (h and grad_out)."""
    tile = kb * 1024 // (tiles * elem_bytes) // 8 * 8
    c, hw = (shape[1], shape[2] * shape[3]) if len(shape) == 4 else (1, shape[1])
    if hw <= tile:  # whole channels, balanced over the fewest chunks
        chunks = -(-c // min(tile // hw, c, 1024))
        blocks = -(-c // -(-c // chunks))
    else:  # a channel split into S pieces of Ls elements (a multiple of 8)
        ls = (-(-hw // -(-hw // tile)) + 7) // 8 * 8
        blocks = c * -(-hw // ls)
    return blocks if blocks <= 16 else 0


def _fwd_bwd_kernels(h: torch.Tensor, seed: int):  # noqa: ANN202
    """``_fwd_bwd`` of the op with every output used, and the names of the CUDA kernels it launched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = _fwd_bwd(ops.goodness_norm, h, (True,) * 4, seed)
        torch.cuda.synchronize()
    return got, [e.name for e in prof.events()]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cluster_schedule_matches_reference_and_repeats_its_bits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its chunks are its own, so are its bits: it is held to the reference, and to itself run after run. The
    # samples below take 1 to 16 blocks of whole or split channels at 16, 104 (the default) and 220 KB per block,
    # or more than a cluster holds (flagged then). It falls back to flagged silently, so on sm_90 and later the test
    # also checks that the cluster kernels ran wherever a portable cluster (at most 8 blocks) was planned.
    _require_fused()
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "cluster")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    shapes = [(130, 64, 28, 28), (9, 64, 56, 56), (3, 2, 100, 100), (5, 3000, 1, 1), (4, 5, 3, 3000), (64, 12288)]
    for kb in (16, 104, 220):
        monkeypatch.setenv("FFABLATE_CUDA_CLUSTER_KB", str(kb))
        for i, shape in enumerate(shapes):
            h = _make(shape, dtype, "cuda", i)
            _check_against_reference(h, seed=i, atol=tol, rtol=tol, subsets=1)
            (res, dh), names = _fwd_bwd_kernels(h, seed=i)
            res2, dh2 = _fwd_bwd(ops.goodness_norm, h, (True,) * 4, seed=i)
            for a, b in zip([*res, dh], [*res2, dh2], strict=True):
                assert torch.equal(a, b), (kb, shape)
            for kernel, tiles in (("forward_cluster_kernel", 1), ("backward_cluster_kernel", 2)):
                if hopper and 1 <= _cluster_blocks(shape, h.element_size(), tiles, kb) <= 8:
                    assert sum(kernel in n for n in names) == 1, (kb, shape, kernel, sorted(set(names)))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_huge_sample_uses_two_pass_fallback(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One sample with more chunks than can be resident at once: every schedule must fall back, not deadlock
    # (lagged has no residency bound and runs it in its one launch).
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", schedule)
    h = _make((2, 4_000_000), torch.float32, "cuda", 2)
    _check_against_reference(h, seed=2, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@cuda_only
def test_cuda_kernel_refuses_unknown_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    # ops.backend() catches a bad value first; the raw op must still refuse it with a message, not pick one.
    h = _make((4, 8, 8, 8), torch.float32, "cuda", 0)
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "fast")
    with pytest.raises(
        RuntimeError, match="FFABLATE_CUDA_SCHEDULE must be ticket, flagged, lagged, two-pass or cluster"
    ):
        torch.ops.ffablate.goodness_norm.default(h, 1e-6)
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "cluster")
    monkeypatch.setenv("FFABLATE_CUDA_CLUSTER_KB", "8")
    with pytest.raises(RuntimeError, match="FFABLATE_CUDA_CLUSTER_KB must be a whole number of KB from 16 to 220"):
        torch.ops.ffablate.goodness_norm.default(h, 1e-6)
    monkeypatch.setenv("FFABLATE_CUDA_CLUSTER_KB", "")
    monkeypatch.setenv("FFABLATE_CUDA_SCHEDULE", "lagged")
    monkeypatch.setenv("FFABLATE_CUDA_LAG", "0")
    with pytest.raises(RuntimeError, match="FFABLATE_CUDA_LAG must be a positive number"):
        torch.ops.ffablate.goodness_norm.default(h, 1e-6)


@pytest.mark.cuda
@cuda_only
def test_cuda_opcheck_compile_and_errors() -> None:
    h = _make((3, 4, 5, 5), torch.bfloat16, "cuda", 4)
    torch.library.opcheck(torch.ops.ffablate.goodness_norm.default, (h, 1e-6))
    sq = h.float().flatten(1).square().sum(1)
    args = (
        torch.randn(3, device="cuda"),
        None,
        torch.randn_like(h),
        torch.randn(3, 4, device="cuda", dtype=h.dtype),
    )
    torch.library.opcheck(torch.ops.ffablate.goodness_norm_backward.default, (*args, h, sq, 1e-6))
    compiled = torch.compile(lambda x: ops.goodness_norm(x)[0].sum(), fullgraph=True)
    hr = h.float().requires_grad_()
    (g,) = torch.autograd.grad(compiled(hr), hr)
    torch.testing.assert_close(g, 2 * hr.detach())
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        torch.ops.ffablate.goodness_norm.default(h.double(), 1e-6)
    with pytest.raises(RuntimeError, match="goodness_norm_backward: grad_out is on cpu but h is on cuda"):
        torch.ops.ffablate.goodness_norm_backward.default(None, None, torch.randn(3, 4, 5, 5), None, h, sq, 1e-6)


@pytest.mark.cuda
@cuda_only
def test_cuda_bench_quick() -> None:
    rows = kernel_bench("cuda", quick=True, shapes=[("conv", (32, 16, 28, 28))], compile_reference=False)
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["backend"] == "fused" and r["max_abs_err"] < 5e-2 for r in rows)
    for r in rows:  # device time excludes the host launch cost that a lone synchronous call pays
        assert r["timing"] == "cuda-device" and r["fused_ms"] > 0 and r["call_ms"]["fused"] > 0
        assert r["host_ms"]["fused"] > 0


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize(
    "updates",
    [
        # 4-D activity: the conv backbone, its readout features through the linear probe (CPU: 0.40 after 6 epochs).
        {"fusion": "readout", "epochs": 6},
        # 2-D activity: dense blocks, where the readout is the normalized output itself (CPU: 0.58).
        {"backbone": "mlp", "channels": "100,100"},
    ],
)
def test_cuda_training_is_the_same_with_fused_and_reference_kernels(
    updates: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Decoupled normalization is the norm whose three paths come from goodness_norm; a tiny run under bf16 autocast
    # must learn the same with the fused kernels as with their reference twin (rounding apart).
    from ffablate.config import RunConfig
    from ffablate.train import run
    from tests.conftest import TINY

    config = RunConfig().with_updates({**TINY, "device": "cuda", "norm": "decoupled", **updates})
    results = {}
    for backend in ("fused", "reference"):
        monkeypatch.setenv("FFABLATE_KERNELS", backend)
        # The repository's .data/ is where scripts/device-check.sh carries Fashion-MNIST to a GPU machine, which has
        # no offline package; elsewhere the lookup goes on to the package.
        results[backend] = run(config, data_root=str(Path(__file__).parents[1] / ".data"))
        assert results[backend].kernel_backend == backend
    fused, reference = results["fused"], results["reference"]
    assert fused.test_accuracy > 0.25 and reference.test_accuracy > 0.25  # chance is 0.1
    assert fused.test_accuracy == pytest.approx(reference.test_accuracy, abs=0.03)
    for a, b in zip(fused.per_layer_accuracy, reference.per_layer_accuracy, strict=True):
        assert a == pytest.approx(b, abs=0.03)
