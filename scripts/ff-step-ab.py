"""A/B of one FF training step with the fused vs reference goodness_norm (norm=decoupled, full default CNN).

    python scripts/ff-step-ab.py fused|reference [profile]

Prints ms per step over 100 steps after 10 warm-up steps; with a second argument, a torch.profiler table.
Run the two backends alternately several times: single runs on a shared 2-core machine differ by 20%.
"""

import os
import sys
import time

from ffablate.config import RunConfig
from ffablate.train import build_trainer

os.environ["FFABLATE_KERNELS"] = sys.argv[1]
t = build_trainer(RunConfig().with_updates({"norm": "decoupled", "limit_train": 12800}))
batches = list(t.data.train)
for x, y in batches[:10]:
    t.train_step(x, y, 0.0, range(3), True)
start = time.perf_counter()
for x, y in batches[:100]:
    t.train_step(x, y, 0.0, range(3), True)
print(sys.argv[1], "ms/step %.2f" % ((time.perf_counter() - start) / 100 * 1e3))
if len(sys.argv) > 2:
    from torch.profiler import profile

    with profile() as prof:
        for x, y in batches[:20]:
            t.train_step(x, y, 0.0, range(3), True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
