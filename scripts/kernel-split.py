"""Device time of the fused CUDA ops one at a time: the forward, the backward, and a copy of h, per bench shape.

    python scripts/kernel-split.py [--schedules flagged,ticket,lagged@0.25,two-pass] [--json OUT.json]

`ffablate bench kernels` times forward+backward together, the way a training step uses them; this says which
of the two is far from its bandwidth floor. Each op's minimal bytes (`ffablate.bench.minimal_bytes_per_pass`:
forward reads h and writes out; backward reads h and grad_out and writes dh; plus the per-sample and per-channel
vectors) over its median device time gives its GB/s, set against the copy's measured in the same run. Timing is
ffablate.bench's: L2 evicted before every call and a head start for the host, CUDA events around the work. Each
FFABLATE_CUDA_SCHEDULE named (`lagged@0.25`: with FFABLATE_CUDA_LAG=0.25) is timed in turn on the same tensors,
so the rows compare schedules within one run.
"""

import argparse
import json

import torch

from ffablate.bench import DEFAULT_SHAPES, _Timer, minimal_bytes_per_pass, use_cuda_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--schedules", default="flagged", help="comma-separated FFABLATE_CUDA_SCHEDULE values, lagged@LAG too"
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    dev = torch.device("cuda")
    timer = _Timer(dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, shape in DEFAULT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.randn(shape, generator=gen).to(dev, dtype)
            sumsq, sumabs, out, readout = torch.ops.ffablate.goodness_norm(h, 1e-6)
            g_out = torch.randn(shape, generator=gen).to(dev, dtype)
            g_ro = torch.randn(readout.shape, generator=gen).to(dev, dtype) if readout.numel() else None
            g_s = torch.randn(sumsq.shape, generator=gen).to(dev)
            dst = torch.empty_like(h)
            copy_ms = timer.device_time(lambda d=dst, h=h: d.copy_(h), warmup=10, repeats=50)[0]
            copy_gbps = 2 * h.numel() * h.element_size() / (copy_ms * 1e-3) / 1e9
            fwd_bytes, bwd_bytes = minimal_bytes_per_pass(shape, dtype)
            for schedule in args.schedules.split(","):
                use_cuda_schedule(schedule)
                steps = {
                    "forward": (fwd_bytes, lambda h=h: torch.ops.ffablate.goodness_norm(h, 1e-6)),
                    "backward": (
                        bwd_bytes,
                        lambda h=h, s=sumsq, gs=g_s, go=g_out, gr=g_ro: torch.ops.ffablate.goodness_norm_backward(
                            gs, gs, go, gr, h, s, 1e-6
                        ),
                    ),
                }
                row = {
                    "name": name,
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "schedule": schedule,
                    "copy_ms": copy_ms,
                    "copy_gbps": copy_gbps,
                }
                for step, (nbytes, fn) in steps.items():
                    ms = timer.device_time(fn, warmup=10, repeats=50)[0]
                    row[f"{step}_ms"] = ms
                    row[f"{step}_gbps"] = nbytes / (ms * 1e-3) / 1e9
                    row[f"{step}_pct_of_copy"] = 100 * row[f"{step}_gbps"] / copy_gbps
                rows.append(row)
                print(
                    f"{name:<7} {row['dtype']:<9} {schedule:<12} forward {row['forward_ms'] * 1e3:6.1f} us "
                    f"{row['forward_pct_of_copy']:4.0f}% of copy   backward {row['backward_ms'] * 1e3:6.1f} us "
                    f"{row['backward_pct_of_copy']:4.0f}% of copy   copy {copy_ms * 1e3:5.1f} us {copy_gbps:6.0f} GB/s",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
