"""ms per training step of `ffablate train`'s defaults in this process, for A/Bs of what must be set before torch
starts (OMP_WAIT_POLICY, OMP_NUM_THREADS): run one process per variant, alternating.

    OMP_WAIT_POLICY=passive python scripts/step-time.py [STEPS] [KEY=VALUE ...]

Builds the trainer on the first 2,560 training images (plus the KEY=VALUE overrides, as --set takes them), takes 3
warm-up steps, then times STEPS (default 30) steps cycling through the batches (FF: every block learns and the
fusion is fit).
"""

import itertools
import os
import sys
import time

import torch

from ffablate.config import RunConfig, parse_sets
from ffablate.train import build_trainer
from ffablate.train.ff import FFTrainer


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    sets = sys.argv[2:]
    trainer = build_trainer(RunConfig().with_updates({"limit_train": 2560, **parse_sets(sets)}))
    batches = list(trainer.data.train)

    def run(n: int) -> None:
        for x, y in itertools.islice(itertools.cycle(batches), n):
            if isinstance(trainer, FFTrainer):
                trainer.train_step(x, y, 0.3, range(trainer.net.depth), True)
            else:
                trainer.train_step(x, y)

    run(3)
    start = time.perf_counter()
    run(steps)
    ms = (time.perf_counter() - start) / steps * 1e3
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"OMP_WAIT_POLICY={policy} threads={torch.get_num_threads()} {' '.join(sets)}: {ms:.2f} ms/step")


if __name__ == "__main__":
    main()
