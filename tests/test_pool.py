"""ffablate::max_pool2x2 against ATen's (ReLU and) max pooling: the same bits forward and backward, ties, -0 and NaN
included."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from ffablate import ops
from ffablate.bench import pool_bench, render_pool_table
from ffablate.model import ReLUMaxPool2x2, conv_block

HAS_CUDA = ops.extension_available() and bool(getattr(ops._C, "WITH_CUDA", False)) and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of ffablate._C")


@pytest.fixture(autouse=True)
def _fused_backend() -> None:
    # Every test here compares ffablate::max_pool2x2 with ATen: without the extension ops.max_pool2x2 would run
    # ATen itself and each comparison would hold trivially. (conftest.py unsets FFABLATE_KERNELS.)
    assert ops.extension_available(), "ffablate._C is not built: run `pip install -e . --no-build-isolation`"
    assert ops.backend() == "fused"


def _shapes(seed: int, count: int) -> list[tuple[int, int, int, int]]:
    rng = random.Random(seed)
    shapes = [(1, 1, 2, 2), (2, 3, 3, 3), (1, 2, 2, 9), (2, 1, 9, 2), (0, 3, 4, 4), (1, 1, 16, 17)]
    for _ in range(count):
        shapes.append((rng.randint(1, 4), rng.randint(1, 6), rng.randint(2, 30), rng.randint(2, 30)))
    return shapes


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """Noise rounded to a coarse grid: many exact ties, negative, zero (both signs) and positive; small integers,
    so exact in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).round().to(device=device, dtype=dtype)


_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@functools.cache
def _aten_cuda_quirks() -> tuple[bool, bool]:
    """What ATen's CUDA ops do on this torch that the op does not: (its relu turns -0 into +0, as torch 2.11's did,
    pytorch/pytorch#181533; its pool turns a bf16 NaN's payload into the canonical NaN)."""
    zero = F.relu(torch.tensor([-0.0], device="cuda"))
    nan = torch.full((1, 1, 2, 2), 0x7FC1, dtype=torch.int16, device="cuda").view(torch.bfloat16)
    return not bool(torch.signbit(zero)), int(F.max_pool2d(nan, 2).view(torch.int16).item()) != 0x7FC1


def _assert_same_as_aten(x: torch.Tensor, seed: int, relu: bool) -> None:
    """ops.max_pool2x2 against ATen's ops on x's device: values and input gradients, bit for bit (on CUDA, minus
    what ``_aten_cuda_quirks`` finds this torch's ATen doing)."""
    gen = torch.Generator().manual_seed(seed)
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    out_a, out_b = ops.max_pool2x2(a, relu=relu), F.max_pool2d(F.relu(b) if relu else b, 2)
    grad = torch.randn(out_b.shape, generator=gen, dtype=torch.float64).to(x)
    if grad.numel():
        grad.view(-1)[0] = -0.0  # ATen adds into zeros, turning -0 into +0: so must we
    out_a.backward(grad)
    out_b.backward(grad)
    # Bits, not values: NaN == NaN and -0 != +0 here.
    assert out_a.shape == out_b.shape
    for what, got, want in (("output", out_a.detach(), out_b.detach()), ("gradient", a.grad, b.grad)):
        assert got.dtype == want.dtype
        got, want = got.contiguous().view(-1), want.contiguous().view(-1)
        differ = got.view(_INT_OF[got.dtype]) != want.view(_INT_OF[want.dtype])
        if what == "output" and got.is_cuda:
            clears_negative_zero, canonical_nan = _aten_cuda_quirks()
            if relu and clears_negative_zero:
                differ &= ~((got == 0) & (want == 0))
            if canonical_nan and got.dtype in (torch.float16, torch.bfloat16):
                differ &= ~(got.isnan() & want.isnan())
        assert not differ.any(), (what, got[differ][:4], want[differ][:4])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_aten_bit_for_bit(dtype: torch.dtype, relu: bool) -> None:
    for i, shape in enumerate(_shapes(seed=3, count=40)):
        _assert_same_as_aten(_input(shape, dtype, i), seed=i, relu=relu)
        _assert_same_as_aten(_input(shape, dtype, i).relu(), seed=i, relu=relu)  # ties at zero, like activity


def _with_special_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, +inf, -inf and -0 strewn over it."""
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = float("-inf")
    flat[1::5] = -0.0
    return x


@pytest.mark.parametrize("relu", [False, True])
def test_nan_inf_and_signed_zero_follow_atens_rule(relu: bool) -> None:
    _assert_same_as_aten(_with_special_values(_input((2, 3, 10, 11), torch.float32, 0)), seed=1, relu=relu)
    _assert_same_as_aten(torch.full((1, 2, 4, 6), float("-inf")), seed=2, relu=relu)
    _assert_same_as_aten(torch.full((1, 2, 4, 6), -0.0), seed=3, relu=relu)


@pytest.mark.parametrize("relu", [False, True])
def test_non_contiguous_inputs(relu: bool) -> None:
    base = _input((2, 4, 12, 10), torch.float32, 5)
    for x in (base.transpose(2, 3), base.to(memory_format=torch.channels_last), base[:, ::2]):
        assert not x.is_contiguous()
        _assert_same_as_aten(x, seed=6, relu=relu)
    # Non-contiguous incoming gradient too.
    x = base.clone().requires_grad_()
    grad = torch.randn(2, 4, 5, 6).transpose(2, 3)
    (got,) = torch.autograd.grad(ops.max_pool2x2(x, relu=relu), x, grad)
    (want,) = torch.autograd.grad(F.max_pool2d(F.relu(x) if relu else x, 2), x, grad)
    assert torch.equal(got, want)


def test_fused_op_runs_where_it_applies_and_aten_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    aten_calls = []
    aten = F.max_pool2d

    def counting(x, *args):  # noqa: ANN001, ANN002, ANN202
        aten_calls.append((tuple(x.shape), x.dtype))
        return aten(x, *args)

    monkeypatch.setattr(F, "max_pool2d", counting)
    ops.max_pool2x2(torch.randn(1, 2, 4, 4))  # the op
    ops.max_pool2x2(torch.randn(1, 2, 4, 4, dtype=torch.bfloat16))  # no CPU kernel for bf16
    with pytest.raises(RuntimeError):  # a window larger than the input: ATen's own error
        ops.max_pool2x2(torch.randn(1, 2, 1, 4))
    monkeypatch.setenv("FFABLATE_KERNELS", "reference")
    ops.max_pool2x2(torch.randn(1, 2, 4, 4))
    assert aten_calls == [
        ((1, 2, 4, 4), torch.bfloat16),
        ((1, 2, 1, 4), torch.float32),
        ((1, 2, 4, 4), torch.float32),
    ]
    # Unfused, inplace=True lets the ReLU overwrite x, as nn.ReLU(inplace=True) does; the fused op never does.
    x = torch.arange(-16.0, 16.0).reshape(1, 2, 4, 4)
    ops.max_pool2x2(x, relu=True, inplace=True)
    assert x.min() == 0
    monkeypatch.delenv("FFABLATE_KERNELS")
    x = torch.arange(-16.0, 16.0).reshape(1, 2, 4, 4)
    ops.max_pool2x2(x, relu=True, inplace=True)
    assert torch.equal(x, torch.arange(-16.0, 16.0).reshape(1, 2, 4, 4))


def test_channels_last_input_and_its_views_are_told_apart() -> None:
    """CUDA leaves them to ATen, whose NHWC kernel it would otherwise contradict on a -0 gradient."""
    base = torch.randn(2, 8, 6, 6)
    channels_last = base.to(memory_format=torch.channels_last)
    assert ops._channels_innermost(channels_last) and ops._channels_innermost(channels_last[:, :, 1:5, 1:5])
    assert not any(ops._channels_innermost(x) for x in (base, base.transpose(2, 3), base[:, ::2]))


def test_backward_is_one_kernel_call() -> None:
    """Autograd must not zero-fill a gradient for the argmax output that nothing reads."""
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    y = ops.max_pool2x2(x, relu=True)
    grad = torch.randn_like(y)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(y, x, grad)
    aten_ops = {e.name for e in prof.events() if e.name.startswith("aten::")}
    assert not aten_ops & {"aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like"}, aten_ops


@pytest.mark.parametrize("size", [4, 6, 7])
@pytest.mark.parametrize("byte", [8, 251, 0x0B, 0x0C])
def test_backward_keeps_any_argmax_byte_inside_its_window(size: int, byte: int) -> None:
    """The raw op can be handed bytes the forward never writes; on narrow planes one once wrote rows past the
    plane (heap corruption). Bits 1 and 0 pick the cell, as in the row kernels; bit 2 marks a dead window."""
    g = torch.arange(1.0, 1 + 2 * (size // 2) ** 2).reshape(1, 2, size // 2, size // 2)
    a = torch.full(g.shape, byte, dtype=torch.uint8)
    dx = torch.ops.ffablate.max_pool2x2_backward.default(g, a, size, size)
    assert dx.shape == (1, 2, size, size)
    assert dx.sum() == (0 if byte & 4 else g.sum())


def test_gradcheck_opcheck_and_compile() -> None:
    # Distinct values 0.25 apart, none near 0: gradcheck's 1e-6 steps cross no max-pool tie and no ReLU kink.
    gen = torch.Generator().manual_seed(0)
    values = (torch.randperm(2 * 3 * 5 * 6, generator=gen, dtype=torch.float64) - 89.5) * 0.25
    x = values.reshape(2, 3, 5, 6).requires_grad_()
    assert torch.autograd.gradcheck(ops.max_pool2x2, (x,))
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2x2(t, relu=True), (x,))
    for relu in (False, True):
        torch.library.opcheck(torch.ops.ffablate.max_pool2x2.default, (x.detach().float().requires_grad_(), relu))
    out, arg = torch.ops.ffablate.max_pool2x2.default(x.detach())
    assert arg.dtype == torch.uint8 and arg.shape == out.shape and int(arg.max()) <= 3
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    torch.library.opcheck(torch.ops.ffablate.max_pool2x2_backward.default, (grad, arg, 5, 6))
    compiled = torch.compile(lambda t: ops.max_pool2x2(t, relu=True).square().sum(), fullgraph=True)
    xf = x.detach().float().requires_grad_()
    (g_c,) = torch.autograd.grad(compiled(xf), xf)
    (g_e,) = torch.autograd.grad(F.max_pool2d(F.relu(xf), 2).square().sum(), xf)
    assert torch.equal(g_c, g_e)


BAD = [
    (lambda: torch.ops.ffablate.max_pool2x2.default(torch.randn(3, 4, 4)), "4-D"),
    (lambda: torch.ops.ffablate.max_pool2x2.default(torch.ones(1, 1, 4, 4, dtype=torch.int32)), "float32 and float64"),
    (lambda: torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 1, 4)), "at least 2"),
    (
        lambda: torch.ops.ffablate.max_pool2x2_backward.default(
            torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int64), 4, 4
        ),
        "uint8",
    ),
    (
        lambda: torch.ops.ffablate.max_pool2x2_backward.default(
            torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 6, 4
        ),
        "gives",
    ),
    (
        lambda: torch.ops.ffablate.max_pool2x2_backward.default(
            torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 3, dtype=torch.uint8), 4, 4
        ),
        "argmax has shape",
    ),
]


@pytest.mark.parametrize(("call", "msg"), BAD)
def test_bad_inputs_raise(call, msg: str) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError, match=msg):
        call()


def test_double_backward_is_refused() -> None:
    # Autograd's fallback treated the backward op as a constant: second derivatives came out wrong (3975.5 where
    # ATen gives -24667.1), with only a deprecation warning.
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    loss = ops.max_pool2x2(F.conv2d(x, w, padding=1), relu=True).pow(2).sum()
    with pytest.raises(RuntimeError, match="max_pool2x2: double backward"):
        torch.autograd.grad(loss, w, create_graph=True)
    (g,) = torch.autograd.grad(ops.max_pool2x2(F.conv2d(x, w, padding=1), relu=True).pow(2).sum(), w)
    assert g.shape == w.shape  # first-order gradients as before


def test_downsampling_block_equals_conv_relu_maxpool() -> None:
    with torch.random.fork_rng(devices=[]):  # seeded weights, without reseeding the tests that follow
        torch.manual_seed(0)
        block = conv_block(3, 8, stride=2)
    assert isinstance(block[-1], ReLUMaxPool2x2) and not any(isinstance(m, torch.nn.ReLU) for m in block)
    unfused = torch.nn.Sequential(block[0], torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 13, 12, generator=gen)
    got, want = block(x), unfused(x)
    assert torch.equal(got, want)
    grad = torch.randn(got.shape, generator=gen)
    got_grads = torch.autograd.grad(block(x), list(block.parameters()), grad)
    want_grads = torch.autograd.grad(unfused(x), list(block.parameters()), grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)
    assert list(block.state_dict()) == ["0.weight", "0.bias"]  # checkpoints keep their keys


def test_pool_bench_quick() -> None:
    rows = pool_bench(quick=True, shapes=[("small", (4, 3, 9, 8))])
    assert len(rows) == 1 and rows[0]["bitwise_equal"] and rows[0]["backend"] == "fused"
    assert (rows[0]["device"], rows[0]["dtype"]) == ("cpu", "float32")
    assert rows[0]["aten_ms"] > 0 and rows[0]["fused_ms"] > 0
    assert render_pool_table(rows).row_count == 1


def _saved_bytes(fn, x: torch.Tensor) -> int:  # noqa: ANN001
    """Bytes of the tensors autograd saves for ``fn(x)``'s backward, counting each storage once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])])
def test_backward_keeps_one_byte_per_output(device: str) -> None:
    """What the fused op saves for its backward: the argmax byte alone, where ATen's ReLU and pool keep the ReLU's
    output (4 bytes per input element in fp32) and int64 indices (8 bytes per output)."""
    x = torch.randn(4, 8, 16, 16, device=device, requires_grad=True)
    fused = _saved_bytes(lambda t: ops.max_pool2x2(t, relu=True), x)
    unfused = _saved_bytes(lambda t: F.max_pool2d(F.relu(t), 2), x)
    outputs = 4 * 8 * 8 * 8
    assert fused == outputs
    assert unfused == x.numel() * 4 + outputs * 8


# ----------------------------------------------------------------------------------------------- CUDA

CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_matches_aten_bit_for_bit(dtype: torch.dtype, relu: bool) -> None:
    # Beyond the small random shapes: a real block's map, odd edges, and a long plane of odd width.
    extra = [(8, 64, 56, 56), (3, 5, 29, 31), (1, 1, 2, 2_000_001)]
    for i, shape in enumerate(_shapes(seed=4, count=30) + extra):
        _assert_same_as_aten(_input(shape, dtype, i, "cuda"), seed=i, relu=relu)
        _assert_same_as_aten(_input(shape, dtype, i, "cuda").relu(), seed=i, relu=relu)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_nan_inf_signed_zero_and_layouts(dtype: torch.dtype, relu: bool) -> None:
    _assert_same_as_aten(_with_special_values(_input((2, 3, 10, 11), dtype, 0, "cuda")), seed=1, relu=relu)
    for fill in (float("-inf"), -0.0, float("nan")):
        _assert_same_as_aten(torch.full((1, 2, 4, 6), fill, dtype=dtype, device="cuda"), seed=2, relu=relu)
    base = _input((2, 4, 12, 10), dtype, 5, "cuda")
    for view in (base.transpose(2, 3), base[:, ::2]):
        _assert_same_as_aten(view, seed=6, relu=relu)
    # Channels-last input is ATen's (its backward for that layout copies the gradient, keeping a -0): the output
    # keeps the layout, as ATen's does.
    channels_last = base.to(memory_format=torch.channels_last)
    assert ops.max_pool2x2(channels_last, relu=relu).is_contiguous(memory_format=torch.channels_last)
    _assert_same_as_aten(channels_last, seed=6, relu=relu)


@pytest.mark.cuda
@cuda_only
def test_cuda_backward_keeps_any_argmax_byte_inside_its_window() -> None:
    for size, byte in itertools.product((4, 7), (8, 251, 0x0B, 0x0C)):
        g = torch.arange(1.0, 1 + 2 * (size // 2) ** 2, device="cuda").reshape(1, 2, size // 2, size // 2)
        a = torch.full(g.shape, byte, dtype=torch.uint8, device="cuda")
        dx = torch.ops.ffablate.max_pool2x2_backward.default(g, a, size, size)
        assert dx.shape == (1, 2, size, size)
        assert dx.sum() == (0 if byte & 4 else g.sum())


@pytest.mark.cuda
@cuda_only
def test_cuda_opcheck_compile_and_block() -> None:
    gen = torch.Generator().manual_seed(0)
    values = (torch.randperm(2 * 3 * 5 * 6, generator=gen, dtype=torch.float64) - 89.5) * 0.25
    x = values.reshape(2, 3, 5, 6).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2x2(t, relu=True), (x,))
    for relu, dtype in itertools.product((False, True), (torch.float32, torch.bfloat16)):
        torch.library.opcheck(torch.ops.ffablate.max_pool2x2.default, (x.detach().to(dtype).requires_grad_(), relu))
    out, arg = torch.ops.ffablate.max_pool2x2.default(x.detach())
    torch.library.opcheck(torch.ops.ffablate.max_pool2x2_backward.default, (torch.randn_like(out), arg, 5, 6))
    compiled = torch.compile(lambda t: ops.max_pool2x2(t, relu=True).square().sum(), fullgraph=True)
    xf = x.detach().float().requires_grad_()
    (g_c,) = torch.autograd.grad(compiled(xf), xf)
    (g_e,) = torch.autograd.grad(F.max_pool2d(F.relu(xf), 2).square().sum(), xf)
    assert torch.equal(g_c, g_e)
    # A downsampling block under bf16 autocast, as FF trains on a GPU: the same numbers as conv, ReLU, pool.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = conv_block(3, 8, stride=2).cuda()
    unfused = torch.nn.Sequential(block[0], torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
    xb = torch.randn(4, 3, 14, 14, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = block(xb), unfused(xb)
        grads = [torch.autograd.grad(m(xb).float().square().sum(), list(block.parameters())) for m in (block, unfused)]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for g, w in zip(*grads, strict=True):
        assert torch.equal(g, w)


@pytest.mark.cuda
@cuda_only
def test_cuda_pool_bench_quick() -> None:
    rows = pool_bench(quick=True, shapes=[("small", (4, 3, 9, 8))], device="cuda")
    assert [(r["device"], r["dtype"]) for r in rows] == [("cuda", "float32"), ("cuda", "bfloat16")]
    assert all(r["bitwise_equal"] and r["aten_ms"] > 0 and r["fused_ms"] > 0 for r in rows)


CUDA_BAD = [
    (
        lambda: torch.ops.ffablate.max_pool2x2.default(torch.ones(1, 1, 4, 4, dtype=torch.int32, device="cuda")),
        "float16",
    ),
    (lambda: torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 4, 1, device="cuda")), "at least 2"),
    (lambda: torch.ops.ffablate.max_pool2x2.default(torch.randn(4, 4, device="cuda")), "4-D"),
    (
        lambda: torch.ops.ffablate.max_pool2x2_backward.default(
            torch.randn(1, 1, 2, 2, device="cuda"), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 4, 4
        ),
        "CUDA kernel got tensors on",
    ),
    (
        lambda: torch.ops.ffablate.max_pool2x2_backward.default(
            torch.randn(1, 1, 2, 2, device="cuda"), torch.zeros(1, 1, 2, 3, dtype=torch.uint8, device="cuda"), 4, 4
        ),
        "argmax has shape",
    ),
]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize(("call", "msg"), CUDA_BAD)
def test_cuda_bad_inputs_raise(call, msg: str) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError, match=msg):
        call()
