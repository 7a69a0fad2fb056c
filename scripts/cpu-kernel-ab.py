"""A/B of a CPU kernel knob in one process: the fused forward and backward ops timed apart, with the knob's
environment variable on and off in alternation, against a copy of the same size.

    python scripts/cpu-kernel-ab.py [--knob prefetch|stream] [--repeats 40] [--json OUT.json]

`prefetch` toggles FFABLATE_CPU_PREFETCH (the next sample's lines fetched during a sample's second sweep),
`stream` FFABLATE_CPU_STREAM (non-temporal stores). The kernels read the variable at every call, so each
repetition times the copy, then the forward and backward with the knob off and on: a slow patch of a shared host
hits both alike. Checks that both settings give bitwise-equal outputs. Prints each op's median ms and its share of
the copy's GB/s (bytes from `ffablate.bench.minimal_bytes_per_pass`), per bench shape, fp32, torch's threads.
"""

import argparse
import json
import os
import statistics
import time

import torch

from ffablate import ops
from ffablate.bench import DEFAULT_SHAPES, minimal_bytes_per_pass

KNOBS = {"prefetch": "FFABLATE_CPU_PREFETCH", "stream": "FFABLATE_CPU_STREAM"}


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knob", choices=sorted(KNOBS), default="prefetch")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    var = KNOBS[args.knob]
    ops.retain_cpu_memory()  # as the bench: no page faults of fresh outputs in the timings
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in DEFAULT_SHAPES:
        h = torch.randn(shape, generator=gen)
        sumsq, sumabs, out, readout = torch.ops.ffablate.goodness_norm(h, 1e-6)
        g_out, g_s = torch.randn(shape, generator=gen), torch.randn(sumsq.shape, generator=gen)
        g_ro = torch.randn(readout.shape, generator=gen) if h.dim() == 4 else None
        dst = torch.empty_like(h)
        steps = {
            "forward": lambda h=h: torch.ops.ffablate.goodness_norm(h, 1e-6),
            "backward": lambda h=h, s=sumsq, gs=g_s, go=g_out, gr=g_ro: torch.ops.ffablate.goodness_norm_backward(
                gs, gs, go, gr, h, s, 1e-6
            ),
        }
        results = {}
        for setting in ("0", "1"):
            os.environ[var] = setting
            results[setting] = [fn() for fn in steps.values()]
        fwd_a, fwd_b = results["0"][0], results["1"][0]
        assert all(torch.equal(a, b) for a, b in zip(fwd_a, fwd_b, strict=True)), "forward bits differ"
        assert torch.equal(results["0"][1], results["1"][1]), "backward bits differ"
        times: dict[str, list[float]] = {"copy": []} | {f"{s}_{k}": [] for s in ("0", "1") for k in steps}
        for _ in range(args.repeats):
            times["copy"].append(wall_ms(lambda d=dst, h=h: d.copy_(h)))
            for setting in ("0", "1"):
                os.environ[var] = setting
                for step, fn in steps.items():
                    times[f"{setting}_{step}"].append(wall_ms(fn))
        os.environ.pop(var)
        ms = {k: statistics.median(v) for k, v in times.items()}
        copy_gbps = 2 * h.numel() * h.element_size() / ms["copy"] / 1e6
        nbytes = dict(zip(steps, minimal_bytes_per_pass(shape, h.dtype), strict=True))
        row = {"name": name, "shape": list(shape), "threads": torch.get_num_threads(), "copy_gbps": copy_gbps}
        for setting in ("0", "1"):
            for step in steps:
                row[f"{var}={setting} {step}_ms"] = ms[f"{setting}_{step}"]
                row[f"{var}={setting} {step}_pct_of_copy"] = (
                    100 * nbytes[step] / ms[f"{setting}_{step}"] / 1e6 / copy_gbps
                )
        total = {s: ms[f"{s}_forward"] + ms[f"{s}_backward"] for s in ("0", "1")}
        row["on/off forward+backward"] = total["1"] / total["0"]
        rows.append(row)
        print(
            f"{name:<7} copy {copy_gbps:5.1f} GB/s  "
            + "  ".join(
                f"{var}={s}: forward {ms[f'{s}_forward']:5.2f} ms ({row[f'{var}={s} forward_pct_of_copy']:3.0f}%) "
                f"backward {ms[f'{s}_backward']:5.2f} ms ({row[f'{var}={s} backward_pct_of_copy']:3.0f}%)"
                for s in ("0", "1")
            )
            + f"  on/off {row['on/off forward+backward']:.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
