"""Builds the ffablate._C extension (metadata lives in pyproject.toml).

FFABLATE_BUILD=auto|cpu|cuda picks the variant. auto (default) builds the CUDA kernels when a CUDA toolkit
is found (CUDA_HOME, else /usr/local/cuda with bin/nvcc) and torch itself was built with CUDA; otherwise
a CPU-only extension. cuda without a toolkit is an error. TORCH_CUDA_ARCH_LIST, when set, replaces the
default sm_80 + sm_90 targets.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


def _find_cuda_home() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _want_cuda() -> bool:
    mode = os.environ.get("FFABLATE_BUILD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "cpu", "cuda"):
        sys.exit(f"error: FFABLATE_BUILD must be auto, cpu or cuda, got {mode!r}")
    if mode == "cpu":
        return False
    import torch

    home = _find_cuda_home()
    torch_cuda = torch.version.cuda is not None
    if mode == "cuda":
        if home is None:
            sys.exit(
                "error: FFABLATE_BUILD=cuda but no CUDA toolkit was found "
                "(set CUDA_HOME to a directory with bin/nvcc, or use FFABLATE_BUILD=cpu)"
            )
        if not torch_cuda:
            sys.exit(f"error: FFABLATE_BUILD=cuda but torch {torch.__version__} was built without CUDA")
    if home is None or not torch_cuda:
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when imported: point it at the toolkit we found.
    os.environ["CUDA_HOME"] = home
    return True


def _running_libstdcxx() -> str | None:
    """The shared libstdc++ this process (and so torch) runs with, to link _C against; None if none is mapped.

    A toolchain that links libstdc++ statically into shared objects (the GPU image's /opt/gcc g++ does) gives _C a
    second copy of libstdc++ whose locale state torch's never initialised: every number a TORCH_CHECK message
    formats then crashes the process (segfault under torch 2.11 there) or garbles the message. Naming the runtime
    library before the driver's own -lstdc++ makes the linker take from it every symbol it has; only symbols newer
    than that library could still come from a static archive (tests/test_extension_link.py checks the ones that
    crashed).
    """
    import torch  # noqa: F401  (loads libstdc++ if the interpreter had not)

    try:
        with open("/proc/self/maps") as maps:
            # address perms offset dev inode path, where the path may hold spaces or end in " (deleted)"
            mapped = [line.rstrip("\n").split(maxsplit=5) for line in maps]
    except OSError:
        return None
    paths = sorted({f[5] for f in mapped if len(f) == 6 and "/libstdc++.so" in f[5] and os.path.isfile(f[5])})
    if len(paths) > 1:
        print(f"ffablate: several libstdc++ mapped ({', '.join(paths)}); linking {paths[0]}", file=sys.stderr)
    return paths[0] if paths else None


def _extensions() -> list:
    use_cuda = _want_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    from torch.utils.cpp_extension import library_paths

    cxx = ["-O3", "-fno-math-errno", "-Wno-psabi"]
    # rpath to torch's libs so `import ffablate._C` works even before `import torch`.
    link: list[str] = [f"-Wl,-rpath,{p}" for p in library_paths()[:1]]
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
        libstdcxx = _running_libstdcxx()
        if libstdcxx:
            link.append(libstdcxx)
        else:
            print("ffablate: no shared libstdc++ found in this process; linking the compiler's own", file=sys.stderr)
    if not use_cuda:
        print("ffablate: building the CPU-only extension", file=sys.stderr)
        return [CppExtension("ffablate._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--threads=0"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Explicit -gencode flags stop torch from adding its own arch list; compute_90 PTX keeps newer
        # GPUs working through the driver JIT.
        nvcc += [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
    print(f"ffablate: building the CUDA extension with {os.environ['CUDA_HOME']}", file=sys.stderr)
    return [
        CUDAExtension(
            "ffablate._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
