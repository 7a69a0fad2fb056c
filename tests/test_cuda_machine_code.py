"""Static checks of the compiled CUDA kernels' machine code (SASS): they need the CUDA build, not a GPU.

The kernels are bandwidth-bound, so much of what matters is visible without running them: the 16-byte path must
copy its inputs into shared memory with 16-byte asynchronous copies (or load them with 16-byte loads), store every
output vector with one 16-byte instruction, and never touch local memory (a spill under the launch bounds that
buy occupancy). NVVM once split the first of the unrolled output stores into per-element stores (2-byte ones for
bf16); this catches that.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ffablate import ops

_SCHEDULES = {"SlotRendezvous": "flagged", "LaggedRendezvous": "lagged"}  # else TicketRendezvous
TILE_BYTES, THREADS = 16384, 256  # kChunkBytes and the default kForwardThreads = kBackwardThreads (the .cu)
_DTYPES = {"f": "float", "N3c104HalfE": "half", "N3c108BFloat16E": "bfloat16"}


def _cuobjdump() -> str | None:
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    found = shutil.which("cuobjdump") or shutil.which("cuobjdump", path=str(cuda_home / "bin"))
    if found:
        return found
    try:  # the CUDA build of torch brings triton, which ships the CUDA binary utilities
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@functools.cache
def _functions() -> list[tuple[str, str, list[str]]]:
    """(arch, mangled name, SASS instructions) of each function in each embedded cubin."""
    if not (ops.extension_available() and getattr(ops._C, "WITH_CUDA", False)):
        pytest.skip("ffablate._C was built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (not on PATH, in $CUDA_HOME/bin or bundled with triton)")
    sass = subprocess.run([tool, "-sass", ops._C.__file__], capture_output=True, text=True, check=True).stdout
    functions = []
    for cubin in sass.split("Fatbin elf code:")[1:]:
        arch = re.search(r"arch = (sm_\d+\w*)", cubin)[1]
        for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{10,}|\Z)", cubin, flags=re.S):
            functions.append((arch, name, re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", body)))
    return functions


def _kernels() -> list[tuple[tuple[str, str, str, int], list[str]]]:
    """((forward|backward, ticket|flagged|lagged, element type, VEC), SASS instructions) for each kernel in each
    embedded cubin."""
    kernels = []
    for _, name, code in _functions():
        match = re.search(r"(forward|backward)_kernelI(f|N3c104HalfE|N3c108BFloat16E)Li(\d+)E", name)
        if match:
            schedule = next((s for r, s in _SCHEDULES.items() if r in name), "ticket")
            kernels.append(((match[1], schedule, _DTYPES[match[2]], int(match[3])), code))
    return kernels


def test_vector_kernels_store_whole_vectors_and_never_spill() -> None:
    vector_paths = [(key, code) for key, code in _kernels() if key[3] > 1]
    assert {key[:3] for key, _ in vector_paths} == set(
        itertools.product(("forward", "backward"), ("ticket", "flagged", "lagged"), ("float", "half", "bfloat16"))
    )
    for (direction, _, dtype, vec), code in vector_paths:
        vectors_per_thread = TILE_BYTES // (THREADS * 16)  # one tile of 16-byte vectors, every dtype
        wide_loads = sum(bool(re.search(r"\b(LDG\.E|LDGSTS\.E(\.BYPASS)?)\.128\b", op)) for op in code)
        wide_stores = sum(bool(re.search(r"\bSTG\.E\.128\b", op)) for op in code)
        # The forward reads h; the backward reads h and grad_out (the latter in two code paths).
        assert wide_loads >= vectors_per_thread * (1 if direction == "forward" else 2), (direction, dtype, vec)
        assert wide_stores == vectors_per_thread, (direction, dtype, vec, wide_stores)
        assert not any(re.search(r"\b(LDL|STL)\b", op) for op in code), (direction, dtype, vec, "local memory")


def test_cluster_kernels_meet_at_the_cluster_barrier_and_never_spill() -> None:
    # The cluster schedule runs on sm_90 and later only (elsewhere its kernels are built but never launched). Its
    # tiles are as long as the launch makes them, so its threads loop over 16-byte vectors: the loop's copies and
    # stores must still be 16 bytes wide. Two cluster barriers: the partials' (a releasing arrival: one GPU-scope
    # fence) and the exit's (relaxed: a fence there would wait for the block's output stores to land).
    cluster = {}
    for arch, name, code in _functions():
        match = re.search(r"(forward|backward)_cluster_kernelI(f|N3c104HalfE|N3c108BFloat16E)Li(?:4|8)E", name)
        if match and arch.startswith("sm_9"):
            cluster[match[1], _DTYPES[match[2]]] = code
    assert set(cluster) == set(itertools.product(("forward", "backward"), ("float", "half", "bfloat16")))
    for key, code in cluster.items():
        assert any(re.search(r"\bLDGSTS\.E(\.BYPASS)?\.128\b", op) for op in code), key
        assert any(re.search(r"\bSTG\.E\.128\b", op) for op in code), key
        assert not any(re.search(r"\b(LDL|STL)\b", op) for op in code), (key, "local memory")
        for instruction, count in (("UCGABAR_ARV", 2), ("UCGABAR_WAIT", 2), ("MEMBAR", 1)):
            assert sum(bool(re.search(rf"\b{instruction}\b", op)) for op in code) == count, (key, instruction)
