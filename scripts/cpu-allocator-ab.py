"""Training and evaluation speed on the CPU with and without ``ops.retain_cpu_memory()`` (docs/benchmarks.md).

Each variant runs in a fresh process (the setting is process-wide and cannot be undone), alternating, so that
a noisy neighbour hits both. Per process: the default FF (or --method) config on --limit-train images, one
warm-up epoch, then the best of three timed epochs of train steps, then three evaluations of the test split
(batch 1000, as training's evaluations run), best of three.

    PYTHONPATH=. python scripts/cpu-allocator-ab.py --data-root .data [--method bp-deepsup] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(retain: bool, method: str, limit_train: int, data_root: str) -> dict[str, float]:
    from ffablate import ops

    kept = ops.retain_cpu_memory() if retain else False
    from ffablate.config import RunConfig
    from ffablate.train import build_trainer

    config = RunConfig().with_updates({"limit_train": limit_train, "epochs": 1, "method": method})
    trainer = build_trainer(config, data_root=data_root)
    batches = list(trainer.data.train)
    images = sum(x.shape[0] for x, _ in batches)

    def epoch() -> None:
        for x, y in batches:
            if method.startswith("ff"):
                trainer.train_step(x, y, 0.0, range(trainer.net.depth), True)
            else:
                trainer.train_step(x, y)

    def best_of_three(step) -> float:  # noqa: ANN001
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)

    epoch()
    train_s = best_of_three(epoch)
    test = trainer.data.test
    eval_s = best_of_three(lambda: trainer.evaluate(test))
    return {
        "retained": kept,
        "train_images_per_s": images / train_s,
        "eval_images_per_s": len(test.y) / eval_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=".data")
    parser.add_argument("--method", default="ff")
    parser.add_argument("--limit-train", type=int, default=2560)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["retain", "default"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "retain", args.method, args.limit_train, args.data_root)))
        return
    for _ in range(args.rounds):
        for variant in ("default", "retain"):
            argv = [sys.argv[0], "--child", variant, "--method", args.method, "--data-root", args.data_root]
            out = subprocess.run(
                [sys.executable, *argv, "--limit-train", str(args.limit_train)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"variant": variant, "method": args.method, **row}))


if __name__ == "__main__":
    main()
