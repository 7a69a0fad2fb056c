"""How ffablate._C is linked, and that its error messages format numbers.

On the GPU image (session 14) the extension came out of a g++ that links libstdc++ statically into shared objects:
every TORCH_CHECK message that formats a number then crashed the process (segfault in the second copy's
ostream::_M_insert<long>), and here, built with -static-libstdc++, the same messages came out cut off after
"got [". setup.py links the shared libstdc++ the interpreter runs with; these tests hold that in place. The
messages are formatted in a child process so that a crash fails one test instead of ending the session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from ffablate import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="ffablate._C is not built")
HAS_CUDA = bool(getattr(ops._C, "WITH_CUDA", False)) and torch.cuda.is_available()


def _binutils() -> tuple[list[str], list[str]]:
    """(a command printing _C's dynamic section, one printing its symbols): readelf, else objdump."""
    if readelf := shutil.which("readelf"):
        return [readelf, "-d"], [readelf, "-sW"]
    if objdump := shutil.which("objdump"):
        return [objdump, "-p"], [objdump, "-tT"]
    pytest.skip("neither readelf nor objdump (binutils) is on PATH")


def test_extension_takes_libstdcxx_from_the_shared_library() -> None:
    dynamic_cmd, symbols_cmd = _binutils()
    dynamic = subprocess.run([*dynamic_cmd, ops._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, f"{ops._C.__file__} does not load the shared libstdc++:\n{dynamic}"
    # A partly static copy would still list it: the stream and locale code that crashed must not be defined in _C.
    symbols = subprocess.run([*symbols_cmd, ops._C.__file__], capture_output=True, text=True, check=True).stdout
    copied = {
        name
        for line in symbols.splitlines()
        for name in line.split()[-1:]
        if name.startswith(("_ZNSo9_M_insert", "_ZNSt6locale")) and "UND" not in line and "*UND*" not in line
    }
    assert not copied, f"{ops._C.__file__} holds its own copy of libstdc++'s {sorted(copied)[:5]}"


FORMATTED = """
import torch
from ffablate import ops
calls = [
    lambda: torch.ops.ffablate.goodness_norm.default(torch.randn(2, 3, 4, device=DEVICE), 1e-6),
    lambda: torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 1, 4, device=DEVICE)),
    lambda: torch.ops.ffablate.goodness_norm_backward.default(
        torch.randn(3, device=DEVICE), None, None, None, torch.randn(2, 3, device=DEVICE),
        torch.randn(2, device=DEVICE), 1e-6),
]
for call in calls:
    try:
        call()
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA build")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_error_messages_format_numbers(device: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"DEVICE = {device!r}\n{FORMATTED}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.splitlines() == [
        "goodness_norm: h must be 2-D (N, D) or 4-D (N, C, H, W), got 3-D with shape [2, 3, 4]",
        "max_pool2x2: H and W must be at least 2 for a 2x2 window, got [1, 1, 1, 4]",
        "goodness_norm_backward: grad_sumsq has shape [3], expected [2]",
    ]
