"""A/B of a training step in one process: ffablate's fused kernels vs the reference ones, or its fused AdamW vs
torch's default AdamW.

    python scripts/ff-step-ab.py [--set KEY=VALUE ...] [--compare kernels|optimizer] [--rounds 5] [--steps 50]
                                 [--profile] [--data-root DIR]

Builds the trainer of `ffablate train`'s defaults (plus --set overrides, e.g. norm=decoupled or method=bp-deepsup)
on the first 12,800 training images, then alternates the two variants round by round (kernels: FFABLATE_KERNELS=fused
and =reference; optimizer: the trainer's own AdamW, fused, and one with torch's default implementation, each keeping
its own state), each round timing --steps steps after 3 warm-up steps. Alternating in one process keeps the ratio
honest on a shared machine: a slow patch of the host hits both variants. Prints ms/step per round, the medians and
their ratio; --profile adds a torch.profiler table of 10 steps of the first variant (with `--set device=cuda`:
sorted by device time, and each timed round is bracketed by CUDA synchronizations).
"""

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable

import torch

from ffablate.config import RunConfig, parse_sets
from ffablate.train import build_trainer
from ffablate.train.ff import FFTrainer


def time_steps(trainer, batches, steps: int) -> float:
    """Mean ms per step over ``steps`` steps, cycling through ``batches`` (FF: all blocks learn and the fusion
    is fit)."""
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in itertools.islice(itertools.cycle(batches), steps):
        if isinstance(trainer, FFTrainer):
            trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)
        else:
            trainer.train_step(x, y)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def kernels(backend: str) -> None:
    os.environ["FFABLATE_KERNELS"] = backend


def optimizer_switch(trainer) -> Callable[[str], None]:
    """A setter that puts the trainer's fused AdamW ("fused") or one with torch's default implementation
    ("default") in place, each variant keeping its own state from round to round."""
    names = [n for n in ("optimizer", "fusion_optimizer") if getattr(trainer, n, None) is not None]
    fused = {n: getattr(trainer, n) for n in names}
    default = {}
    for n, opt in fused.items():
        group = opt.param_groups[0]
        default[n] = torch.optim.AdamW(group["params"], lr=group["lr"], weight_decay=group["weight_decay"])
    variants = {"fused": fused, "default": default}

    def use(variant: str) -> None:
        for n, opt in variants[variant].items():
            setattr(trainer, n, opt)

    return use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compare", choices=["kernels", "optimizer"], default="kernels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--data-root")
    args = parser.parse_args()
    config = RunConfig().with_updates({"limit_train": 12800, **parse_sets(args.set)})
    trainer = build_trainer(config, data_root=args.data_root)
    batches = list(trainer.data.train)
    if args.compare == "kernels":
        use, (a, b) = kernels, ("fused", "reference")
    else:
        use, (a, b) = optimizer_switch(trainer), ("fused", "default")
    times: dict[str, list[float]] = {a: [], b: []}
    for round_ in range(args.rounds):
        # ABBA: neither variant always runs first in a round (warmer caches, a neighbour's load ramping up).
        for variant in list(times)[:: 1 if round_ % 2 == 0 else -1]:
            use(variant)
            time_steps(trainer, batches, 3)
            times[variant].append(time_steps(trainer, batches, args.steps))
        print(f"round {round_}: " + "  ".join(f"{k} {v[-1]:.2f} ms/step" for k, v in times.items()), flush=True)
    ma, mb = (statistics.median(times[k]) for k in (a, b))
    print(f"median ms/step: {a} {ma:.2f}, {b} {mb:.2f}; {a}/{b} {ma / mb:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        use(a)
        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            time_steps(trainer, batches, 10)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
