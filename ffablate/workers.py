"""More worker processes for one ``ffablate study``: the same command again, on the same storage.

The workers share the study's points and trial budget (``ffablate.study``'s claims and surplus checks), so none
runs a point twice. Each gets an equal share of the CPU threads: on a 2-core CPU two 1-thread workers ran
temperature-vs-norm (quick) in 0.64-0.78x the wall time of one 2-thread worker (``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import ffablate

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Deferred while the workers are forked: a handler that raised then would raise its KeyboardInterrupt inside an
# at-fork hook (logging's), where Python prints and drops it, and the study would go on after a SIGTERM.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def shares(total: int | None, workers: int) -> list[int | None]:
    """``total`` trials split over ``workers`` as evenly as they go (None: no limit for any)."""
    if total is None:
        return [None] * workers
    return [total // workers + (i < total % workers) for i in range(workers)]


def _as_a_worker() -> None:
    """Run in each worker between fork and exec. An ignored SIGINT (a background job's) would be inherited and make
    the worker deaf to ``stop``; on Linux the worker is also interrupted when this process dies, even killed
    outright, so no worker goes on alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGINT))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are only noted; on leaving, the first noted one is raised again for the handlers
    that were in place. (Blocking them would not do: another thread can take a process-directed signal, and Python
    then runs the handler in the main thread all the same.) Outside the main thread, where Python sets no handler,
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    handled = [signum for signum in DEFERRED_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum)) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted:
            signal.raise_signal(noted[0])


class Workers:
    """Extra ``ffablate study`` processes, one per argument list in ``argvs``, with ``threads`` threads each."""

    def __init__(self, argvs: list[list[str]], threads: int, storage: str | None = None):
        self.argvs, self.threads, self.storage = argvs, threads, storage
        self.procs: list[tuple[subprocess.Popen, IO[bytes]]] = []

    def start(self, deadline: float | None = None) -> None:
        """Start them; none starts a trial after the ``time.time()`` ``deadline`` (this process's)."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        if self.storage is not None:
            # Through the environment, not the command line, where `ps` would show a database password to anyone.
            env["FFABLATE_STORAGE"] = self.storage
        root = Path(ffablate.__file__).resolve().parent.parent
        if root.name not in ("site-packages", "dist-packages"):  # a source tree: the workers import this very one
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        with _signals_deferred():
            for argv in self.argvs:
                log = tempfile.TemporaryFile()  # noqa: SIM115 (open until the worker is waited for)
                extra = [] if deadline is None else ["--deadline", repr(deadline)]
                command = [sys.executable, "-m", "ffablate.cli", *argv, *extra]
                proc = subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_as_a_worker
                )
                self.procs.append((proc, log))

    def running(self) -> int:
        return sum(proc.poll() is None for proc, _ in self.procs)

    def wait(self) -> list[str]:
        """Wait for every worker; one line per worker that failed: what stopped it, or the last line it printed."""
        failures = []
        for number, (proc, log) in enumerate(self.procs, start=2):
            code = proc.wait()
            if code < 0:
                failures.append(f"worker {number} was killed by {signal.Signals(-code).name}; rerun to resume")
            elif code == 130:
                failures.append(f"worker {number} was interrupted; rerun to resume")
            elif code != 0:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                failures.append(f"worker {number} stopped with exit code {code}: {lines[-1] if lines else 'no output'}")
            log.close()
        self.procs = []
        return failures

    def stop(self) -> None:
        """Interrupt the workers still running (as Ctrl-C would): their finished trials stay stored, and a trial
        cut short is stored as failed and rerun by the next run."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, log in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        self.procs = []


def study_argvs(args: Any, workers: int) -> tuple[int | None, list[list[str]]]:
    """This process's trial share and the other workers' ``ffablate study`` arguments (those with no share left
    out): the same spec, budget, study name, device, data, recipe source and checkpoint folder (the storage goes to
    ``Workers``, which hands it over in the environment). Their time limit is this process's deadline
    (``Workers.start``), not a ``--timeout`` of their own that would start after their startup."""
    own, *others = shares(args.n_trials, workers)
    argvs = []
    for n_trials in others:
        if n_trials == 0:
            continue
        argv = ["study", args.name, "--budget", args.budget, "--json"]
        options = {
            "--study-name": args.study_name,
            "--n-trials": n_trials,
            "--device": args.device,
            "--data-root": args.data_root,
            "--recipe-from": args.recipe_from,
            "--checkpoints": args.checkpoints,  # each worker keeps its trials' epochs where a rerun looks for them
        }
        for flag, value in options.items():
            if value is not None:
                argv += [flag, str(value)]
        argvs.append(argv)
    return own, argvs
