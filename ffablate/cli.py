"""The ``ffablate`` command. Every user mistake ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ffablate import __version__, jsontext
from ffablate.config import METHODS, RunConfig, parse_sets
from ffablate.errors import CheckpointError, ConfigError, FFablateError, FFablateWarning

# What an interrupted command leaves behind and how to go on; commands that keep something say so themselves.
NOTHING_KEPT = "it keeps no state, so nothing was lost: rerun it to start again"
NOT_SAVED = "without --save it keeps no checkpoint: rerun it to train from the start (--save PATH makes it resumable)"
# The options of `train` that set up a run: --resume takes them all from its checkpoint instead.
RUN_OPTIONS = ("method", "dataset", "epochs", "seed", "device", "limit_train", "set", "save")


def _stderr_console() -> Console:
    """stderr; when it is a file or CI log, one that does not wrap at 80 columns, so each message stays one line."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, soft_wrap=True)


stdout = Console()
stderr = _stderr_console()


def wide_console(width: int = 160) -> Console:
    """stdout, or, when piped to a file or CI log, a console ``width`` columns wide, so that tables do not wrap at 80
    columns (a table takes only the width it needs)."""
    return stdout if stdout.is_terminal else Console(width=width)


# Piped, `data list` is as wide as its longest path: a path cut with "…" or broken over lines cannot be copied.
UNCUT = 100_000


def silence_stdout() -> None:
    """Python's "Note on SIGPIPE": whatever is still buffered would raise again at exit, so send it nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def write_result(text: str, kept: Callable[[], str]) -> None:
    """Write a finished command's output to stdout, where a full disk or a closed file (OSError) must not end in a
    traceback after the work is done: one line says so, and ``kept()`` where the result is kept. A reader that went away
    (BrokenPipeError) is left to main(), as any command's."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        silence_stdout()
        raise FFablateError(f"cannot write the output to stdout ({os_reason(exc)}); {kept()}") from None


def rendered(*items: Any) -> str:
    """What ``wide_console().print`` prints for each item, as text: markup and highlighting off, and a line of text
    never wrapped (a path broken over two lines cannot be copied). Rendered apart from stdout, whose failures
    ``write_result`` catches: a capturing console still flushes stdout when it ends."""
    out, text = wide_console(), io.StringIO()
    # Its color system as stdout's (rich reads the name it reports).
    system: Any = out.color_system
    console = Console(file=text, width=out.width, color_system=system, force_terminal=out.is_terminal)
    for item in items:
        console.print(item, markup=False, highlight=False, soft_wrap=isinstance(item, str))
    return text.getvalue()


class VersionAction(argparse.Action):
    """``--version``: ffablate's and torch's, importing torch only when asked (it takes seconds)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print ffablate's and torch's versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        import torch

        from ffablate.revision import source_revision

        commit = source_revision()
        print(f"ffablate {__version__}{f' at {commit}' if commit else ''} (torch {torch.__version__})")
        parser.exit()


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The innermost command's parser wins (its defaults are set last): main() reports an unknown option
        # through it, so the message names `ffablate data list --help`, not `ffablate --help`.
        self.set_defaults(command_parser=self)

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage; one line that points at --help is easier to act on.
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="where datasets live (default: $FFABLATE_DATA or ~/.cache/ffablate/data)")
    p.add_argument("--download", action="store_true", help="download a dataset that is found nowhere else")


STORAGE_HELP = "Optuna RDB URL (default: $FFABLATE_STORAGE, else sqlite:///ffablate.db in this directory)"


def build_parser() -> Parser:
    parser = Parser(prog="ffablate", description="Ablate Forward-Forward against backpropagation.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser(
        "train", help="train one FF or BP network and report its test accuracy", epilog=run_settings_help()
    )
    train.add_argument("--method", choices=METHODS, help="default: ff")
    train.add_argument("--dataset", default=None, help="dataset plugin name (see `ffablate data list`)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=["cpu", "cuda"])
    train.add_argument("--limit-train", type=int, help="use only N training images")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key (lr, channels, goodness, ...) or plugin parameter (temperature.t=0.5)",
    )
    train.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    train.add_argument(
        "--save",
        metavar="PATH",
        help="write the trained model to PATH (for `ffablate evaluate` and ffablate.load_run), and after every epoch "
        "the run so far, which --resume PATH goes on with",
    )
    train.add_argument(
        "--resume",
        metavar="PATH",
        help="go on with the interrupted run --save PATH was writing, with its own settings (so no other option but "
        "--json, --data-root and --download), writing on to PATH",
    )
    add_data_args(train)
    train.set_defaults(func=cmd_train, on_interrupt=NOT_SAVED)

    evaluate = sub.add_parser("evaluate", help="score a model saved by `train --save` on its run's test split again")
    evaluate.add_argument("path", metavar="PATH", help="the checkpoint `ffablate train --save PATH` wrote")
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_data_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    plugins = sub.add_parser(
        "plugins",
        help="list the installed plugins, or check one against the plugin contract",
        epilog="`ffablate plugins KIND NAME --check` runs the conformance checks of ffablate/testing.py on one plugin "
        "(exit 1 if one fails).",
    )
    plugins.add_argument("kind", nargs="?", help="only this kind")
    plugins.add_argument("name", nargs="?", help="only this plugin")
    plugins.add_argument("--check", action="store_true", help="check the plugin against the plugin contract")
    plugins.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KIND.PARAM=VALUE",
        help="with --check: a parameter of the plugin to check it with",
    )
    plugins.add_argument("--no-train", action="store_true", help="with --check: leave out the training checks")
    plugins.add_argument("--data-root", help="with --check of a dataset: where datasets live")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="{list}", required=True, parser_class=Parser)
    data_list = data_sub.add_parser("list", help="which datasets are available and from where")
    data_list.add_argument("--data-root")
    data_list.add_argument("--json", action="store_true")
    data_list.set_defaults(func=cmd_data_list)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{kernels,pool}", required=True, parser_class=Parser)
    kernels = bench_sub.add_parser("kernels", help="fused kernels vs eager and torch.compile reference")
    kernels.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    kernels.add_argument("--quick", action="store_true", help="fewer repeats")
    kernels.add_argument("--json", action="store_true")
    kernels.set_defaults(func=cmd_bench_kernels)
    pool = bench_sub.add_parser("pool", help="the ReLU + 2x2 max-pool kernel vs ATen's (bitwise equal results)")
    pool.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pool.add_argument("--quick", action="store_true", help="fewer repeats")
    pool.add_argument("--json", action="store_true")
    pool.set_defaults(func=cmd_bench_pool)

    study = sub.add_parser("study", help="run or resume an ablation study (Optuna trials + BP baselines)")
    study.add_argument("name", metavar="NAME|PATH", help="a study in studies/ or a .toml file")
    study.add_argument("--budget", choices=["smoke", "quick", "full"], default="quick")
    study.add_argument("--storage", default=os.environ.get("FFABLATE_STORAGE") or None, help=STORAGE_HELP)
    study.add_argument("--study-name", help="Optuna study name (default: NAME-BUDGET)")
    study.add_argument("--n-trials", type=int, help="run at most N trials now (the rest on the next run)")
    study.add_argument("--timeout", type=float, metavar="SEC", help="start no new trial after SEC seconds")
    study.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    study.add_argument("--data-root", help="where datasets live (default: $FFABLATE_DATA or ~/.cache/ffablate/data)")
    study.add_argument("--json", action="store_true", help="print the results as one JSON object")
    study.add_argument(
        "--recipe-from",
        metavar="STUDY",
        help="run FF with the best configuration of a stored study (e.g. temperature-vs-norm)",
    )
    study.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="keep each running trial's resumable checkpoint in DIR (made if its parent exists): a rerun with the same "
        "DIR after an interrupt or a kill goes on from the trial's last finished epoch",
    )
    study.add_argument(
        "--plan",
        action="store_true",
        help="print what the study would run (its configurations, and the trials stored and left) and exit: "
        "trains nothing, loads no data, makes no storage",
    )
    # A worker's stop time, from the process that started it (ffablate.workers): not for users.
    study.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    study.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes here, each with 1/N of the CPU threads; they share the study's points",
    )
    study.set_defaults(
        func=cmd_study, on_interrupt="finished trials are stored: rerun the same command to resume the study"
    )

    report = sub.add_parser("report", help="write report.md and plots of a stored study (trains nothing)")
    report.add_argument(
        "name", metavar="NAME", help="study name, or its spec's name when the storage holds one study of that spec"
    )
    report.add_argument("--storage", default=os.environ.get("FFABLATE_STORAGE") or None, help=STORAGE_HELP)
    report.add_argument("--out", help="output folder (default: reports/STUDY-NAME)")
    report.set_defaults(
        func=cmd_report, on_interrupt="the study's storage is untouched: rerun the command to write the report"
    )

    audit = sub.add_parser(
        "audit",
        help="peak memory and images/s of FF vs the BP variants, by depth",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # its defaults decide whether it takes minutes
    )
    from ffablate.audit import add_arguments as add_audit_arguments

    add_audit_arguments(audit)
    audit.set_defaults(func=cmd_audit)
    return parser


def run_settings_help() -> str:
    """The keys `--set` takes, with their defaults: what the messages about unknown keys point to."""
    keys = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(RunConfig) if f.name != "plugin_params")
    return (
        f"run settings for --set KEY=VALUE (default values shown): {keys}. Plugin parameters: --set KIND.PARAM=VALUE "
        "(each plugin's parameters: `ffablate plugins --json`)."
    )


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {
        key: getattr(args, key)
        for key in ("method", "dataset", "epochs", "seed", "device", "limit_train")
        if getattr(args, key) is not None
    }
    sets = parse_sets(args.set)
    for key, value in flags.items():
        # One of the two would be dropped without a word.
        if key in sets and str(sets[key]) != str(value):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {value} and --set {key}={sets[key]} disagree: give {key} once")
    return RunConfig().with_updates({**flags, **sets})


def new_progress(enabled: bool) -> Progress:
    """Transient bars on stderr: description, bar, done/total, elapsed time, and a free-text info field."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    return Progress(*columns, console=stderr, transient=True, disable=not enabled)


@contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    with new_progress(enabled) as bar:
        task = bar.add_task(label, total=None, info="")

        def update(done: int, total: int, info: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.4g}" for k, v in info.items())
            bar.update(task, completed=done, total=total, info=text)

        yield update


def _warn_missing_data_root(data_root: str | None, download: bool = False) -> None:
    """A data root that does not exist (--data-root, else $FFABLATE_DATA) is searched in vain and the data come from
    elsewhere: say so, or a typo in the path goes unseen (a file is refused later, by the loader). A download makes
    the folder. An empty --data-root would silently mean the default."""
    from ffablate.data import DATA_ENV

    if data_root == "":
        raise FFablateError("--data-root is empty: give a folder, or leave the option out for the default")
    if download:
        return
    folder = data_root or os.environ.get(DATA_ENV)
    if folder and not Path(folder).expanduser().exists():
        given = f"--data-root {folder}" if data_root else f"${DATA_ENV}={folder}"
        warnings.warn(
            f"{given} does not exist; only data found elsewhere is used (offline packages, an absolute "
            "datasets.path, generated datasets): see `ffablate data list`",
            FFablateWarning,
            stacklevel=2,
        )


def _retain_cpu_memory(device: str) -> None:
    """Keep freed CPU memory in this process (``ops.retain_cpu_memory``): evaluation runs at batch 1000, whose
    activations (100 MB for a 28 px block of 32 channels) glibc would otherwise map afresh and fault in on every
    batch, which halved its speed (4,460-4,700 against 9,260-9,950 test images/s, docs/benchmarks.md). Training's
    own batches were as fast either way and its peak memory the same; an entry point's choice, never an import's."""
    if device == "cpu":
        from ffablate import ops

        ops.retain_cpu_memory()


def cmd_train(args: argparse.Namespace) -> int:
    from ffablate import checkpoint
    from ffablate.train import trained_run

    if args.resume is not None:
        target = _resume_target(args)
    else:
        config = run_config_from_args(args)
        # Before training: a path that cannot be written must not cost a 16-epoch run at its end.
        target = checkpoint.writable_target(args.save) if args.save is not None else None
    _warn_missing_data_root(args.data_root, args.download)
    writer = checkpoint.EpochWriter(target) if target else None
    # A job runner's SIGTERM (a time limit) keeps what Ctrl-C keeps, and says so.
    with terminated_as_interrupted(), checkpoint.claimed(target) if target else contextlib.nullcontext():
        if target is not None and args.resume is None:
            _refuse_unfinished(target)  # claimed first: a run still writing it is not one to resume
        try:
            if args.resume is not None:
                from ffablate.saved import resume_run

                with progress_bar(f"resuming {target}", enabled=stderr.is_terminal) as update:
                    trained = resume_run(
                        target, data_root=args.data_root, download=args.download, progress=update, keep=writer
                    )
            else:
                _retain_cpu_memory(config.device)
                with progress_bar(f"{config.method} on {config.dataset}", enabled=stderr.is_terminal) as update:
                    trained = trained_run(
                        config, data_root=args.data_root, download=args.download, progress=update, keep=writer
                    )
            unsaved = None
            if target:  # before the output: a stdout that fails must not cost the model either
                try:
                    checkpoint.save(checkpoint.contents(trained), target)
                except FFablateError as exc:
                    unsaved = exc  # the model is kept in the temp folder; said after the result
        except KeyboardInterrupt:
            # Until the finished checkpoint replaces it, the file holds the last epoch's: a stop in that write loses
            # only the final scoring, which a resume repeats.
            args.on_interrupt = _what_is_kept(target, writer.written if writer else None, args.resume is not None)
            raise
        # Only the output (and the lock's release) is left to do, which a stop cuts short: the checkpoint is as
        # written above.
        args.on_interrupt = (
            f"the finished run is saved in {target}: score it again with `ffablate evaluate {target}`"
            if target and not unsaved
            else _what_is_kept(target, writer.written if writer else None, args.resume is not None)
        )
    config, result = trained.trainer.config, trained.result
    fields = result.to_dict()
    if not fields["history"]:  # per-epoch scores are kept in studies (which prune on them), not here
        del fields["history"]
    if target and not unsaved:
        fields["checkpoint"] = str(target)
    text = jsontext.dumps(fields)
    # The run is not stored anywhere else: a stdout that cannot take it must not cost it.
    kept = _keep_aside(text)
    if args.json:
        write_result(text + "\n", kept)
        return _saved(unsaved)
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    table = Table(title=f"{config.method} on {config.dataset} (seed {config.seed}, {epochs})")
    # Per-layer: each block's own class scores alone (FF; BP-DeepSup: each head). Peak on the CPU: the process's
    # resident memory while training (torch, Python and the data included), not allocator bytes as the audit's.
    peak = "peak allocated MiB (CUDA)" if config.device == "cuda" else "peak RSS MiB (process)"
    columns = ["test accuracy", "per-layer accuracy", "train s", "images/s", peak, "kernels"]
    cells = [
        f"{result.test_accuracy:.4f}",
        " ".join(f"{a:.3f}" for a in result.per_layer_accuracy),
        f"{result.train_seconds:.1f}",
        f"{result.images_per_second:.0f}",
        f"{result.peak_memory_bytes / 2**20:.0f}",
        result.kernel_backend,
    ]
    if result.val_accuracy is not None:
        columns.insert(1, f"val accuracy ({config.val_images} held out)")
        cells.insert(1, f"{result.val_accuracy:.4f}")
    for column in columns:
        table.add_column(column)
    table.add_row(*cells)
    # Which copy: --data-root is searched first, then the offline packages (docs/data.md).
    saved = [f"checkpoint: {target}"] if "checkpoint" in fields else []
    write_result(rendered(table, f"data: {result.data_source}", *saved), kept)
    return _saved(unsaved)


def _resume_target(args: argparse.Namespace) -> Path:
    """--resume's checkpoint, where the run goes on writing; the run's own settings come from it, so an option that
    would set one up is refused rather than silently dropped or mixed in."""
    from ffablate import checkpoint

    given = [name for name in RUN_OPTIONS if getattr(args, name) not in (None, [])]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(
            f"--resume goes on with the run's own settings, from its checkpoint: drop {flag} (it takes only --json, "
            "--data-root and --download; to train otherwise, start a new run)"
        )
    if args.resume and not Path(args.resume).expanduser().exists():
        # Before writable_target, whose "create the folder" is no answer to a mistyped checkpoint's path.
        raise CheckpointError(f"no checkpoint at {args.resume}: give {checkpoint.WRITTEN_BY}")
    return checkpoint.writable_target(args.resume, option="--resume")


def _refuse_unfinished(target: Path) -> None:
    """--save onto the checkpoint of a run still training would replace it after one epoch: the command that started
    the run, rerun where its resume was meant, would throw every epoch it had away."""
    from ffablate import checkpoint

    if not target.is_file():
        return
    try:
        saved = checkpoint.read(target)
    except CheckpointError:
        return  # not an unfinished run's: replaced, as --save replaces any file
    if checkpoint.unfinished(saved):
        raise CheckpointError(
            f"--save {target} holds a run still training ({checkpoint.progress_of(saved)} done): go on with it with "
            f"`ffablate train --resume {target}`, or delete it (or give another path) to train from the start"
        )


def _what_is_kept(target: Path | None, written: tuple[int, int] | None, resumed: bool) -> str:
    """What an interrupted `train` leaves and how to go on: with --save (or --resume), the checkpoint of the last
    finished epoch, if one was written (``written``: its epochs done and in all)."""
    if target is None:
        return NOT_SAVED
    resume = f"resume it with `ffablate train --resume {target}`"
    if written:
        done, total = written
        lost = "its final scoring was not" if done == total else f"the steps of epoch {done + 1} are lost"
        return f"{target} holds the run after epoch {done} of {total} ({lost}): {resume}"
    if resumed:
        return f"{target} holds the run as it was before this session, whose steps are lost: {resume}"
    return f"no epoch finished, so {target} was not written: rerun it to train from the start"


def _saved(unsaved: FFablateError | None) -> int:
    """0, or the error of a checkpoint that went to the temp folder instead of --save's path (after the result)."""
    if unsaved:
        raise unsaved
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ffablate.saved import load_run

    _warn_missing_data_root(args.data_root, args.download)
    _retain_cpu_memory(args.device)
    saved = load_run(args.path, device=args.device)
    scored = saved.evaluate(args.data_root, args.download)
    fields = {
        "checkpoint": str(saved.path),
        "test_accuracy": scored.test_accuracy,
        "per_layer_accuracy": scored.per_layer_accuracy,
        "recorded_test_accuracy": saved.result["test_accuracy"],
        "recorded_per_layer_accuracy": saved.result["per_layer_accuracy"],
        "images": scored.images,
        "device": args.device,
        "kernel_backend": scored.kernel_backend,
        "recorded_device": saved.config.device,
        "recorded_kernel_backend": saved.result.get("kernel_backend"),
        "data_source": scored.data_source,
    }

    def kept() -> str:
        return f"nothing was changed: rerun `ffablate evaluate {saved.path}`"

    if args.json:
        write_result(jsontext.dumps(fields) + "\n", kept)
        return 0
    config = saved.config
    table = Table(title=f"{config.method} on {config.dataset} (seed {config.seed}) from {saved.path}")
    columns = ["", "test accuracy", "per-layer accuracy", "device", "kernels"]
    for column in columns:
        table.add_column(column)
    table.add_row(
        *map(
            Text,
            [
                f"now ({scored.images} test images)",
                f"{scored.test_accuracy:.4f}",
                " ".join(f"{a:.3f}" for a in scored.per_layer_accuracy),
                args.device,
                scored.kernel_backend,
            ],
        )
    )
    recorded = saved.result
    table.add_row(
        *map(
            Text,
            [
                "recorded at training",
                f"{recorded['test_accuracy']:.4f}",
                " ".join(f"{a:.3f}" for a in recorded["per_layer_accuracy"]),
                config.device,
                str(recorded.get("kernel_backend")),
            ],
        )
    )
    notes = [f"data: {scored.data_source}"]
    if config.device != args.device:
        # CUDA scores under bf16 autocast, the CPU in fp32: the same weights can move a few test images.
        notes.append(
            f"note: the run was scored on {config.device}; this is {args.device}, so the last digits may differ"
        )
    write_result(rendered(table, *notes), kept)
    return 0


def _keep_aside(text: str) -> Callable[[], str]:
    """How to say where a run's JSON went when stdout cannot take it: a file in the temp folder (stdout's disk may be
    the full one), or, when that fails too, the JSON itself on the error's line."""

    def keep() -> str:
        path = Path(tempfile.gettempdir()) / f"ffablate-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        try:
            path.write_text(text + "\n")
        except OSError:
            return f"the result as JSON: {text}"
        return f"the result is saved as JSON in {path}"

    return keep


def cmd_plugins(args: argparse.Namespace) -> int:
    from ffablate.plugins import registry

    # Kinds are lower case; "Goodness" can only mean one of them.
    kind = args.kind and args.kind.lower()
    if args.check:
        return _check_plugin(args, kind)
    if args.set or args.no_train:
        raise ConfigError("--set and --no-train go with --check: ffablate plugins KIND NAME --check")
    plugins = [registry().get(kind, args.name)] if args.name else registry().all(kind)
    rows = [
        {
            "kind": p.kind,
            "name": p.name,
            "source": p.source,
            "description": p.description,
            "params": p.params,
            "space": p.space,
        }
        for p in plugins
    ]
    if args.json:
        print(jsontext.dumps(rows))
        return 0
    table = Table(title="ffablate plugins")
    for column in ("kind", "name", "source", "params", "description"):
        table.add_column(column)
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        table.add_row(*map(Text, (row["kind"], row["name"], row["source"], params, row["description"])))
    wide_console().print(table)  # piped, 80 columns cut plugin names short
    return 0


def _check_plugin(args: argparse.Namespace, kind: str | None) -> int:
    from ffablate.plugins import registry
    from ffablate.testing import FAIL, PASS, SKIP, check_plugin

    if not args.name:
        raise ConfigError("--check needs a plugin: ffablate plugins KIND NAME --check (e.g. goodness sumsq)")
    params = {}
    for key, value in parse_sets(args.set).items():
        prefix, _, param = key.partition(".")
        if prefix != kind or not param:
            raise ConfigError(f"--set {key}: give a parameter of the plugin checked, as --set {kind}.PARAM=VALUE")
        params[param] = value
    _warn_missing_data_root(args.data_root)
    plugin = registry().get(kind, args.name)
    results = check_plugin(kind, args.name, params, data_root=args.data_root, train=not args.no_train)
    failed = sum(r.outcome == FAIL for r in results)
    if args.json:
        print(jsontext.dumps({"plugin": plugin.label, "params": params, "checks": [vars(r) for r in results]}))
        return 1 if failed else 0
    passed, skipped = (sum(r.outcome == o for r in results) for o in (PASS, SKIP))
    table = Table(title=f"{plugin.label}: {passed} passed, {failed} failed, {skipped} skipped")
    for column in ("check", "outcome", "detail"):
        table.add_column(column)
    for r in results:
        table.add_row(Text(r.check), Text(r.outcome, style="red" if r.outcome == FAIL else ""), Text(r.detail))
    wide_console(UNCUT).print(table)
    return 1 if failed else 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from ffablate.data import list_datasets

    _warn_missing_data_root(args.data_root)
    rows = list_datasets(args.data_root)
    if args.json:
        print(jsontext.dumps(rows))
        return 0
    # Found is what it checks: the files are there; whether they read is checked when a run loads them.
    table = Table(title="datasets (files found, not read: a run checks them)")
    for column in ("name", "found", "where"):
        table.add_column(column)
    for row in rows:
        found = {True: "yes", False: "no", None: "unknown"}[row["available"]]
        table.add_row(*map(Text, (row["name"], f"needs {row['needs']}" if row["needs"] else found, str(row["where"]))))
    wide_console(UNCUT).print(table)
    return 0


def _fused_or_refuse(device: str) -> None:
    """A bench times the fused kernels against the rest: with the reference in their place its "fused" column
    would be the reference again, labelled as the kernel."""
    from ffablate import ops
    from ffablate.train.common import resolve_device

    resolve_device(device)
    if ops.backend(device) != "fused":
        raise FFablateError(
            "the bench times the fused kernels, but this process uses the reference ones (FFABLATE_KERNELS=reference, "
            "or no ffablate._C build): unset FFABLATE_KERNELS or build the extension (`make setup`)"
        )


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from ffablate.bench import kernel_bench, render_table

    _fused_or_refuse(args.device)
    with without_cuda_home_warning():
        rows = kernel_bench(device=args.device, quick=args.quick)
    if args.json:
        print(jsontext.dumps(rows))
    else:
        wide_console().print(render_table(rows))
    return 0


@contextmanager
def without_cuda_home_warning() -> Iterator[None]:
    """torch.compile's CPU backend imports torch.utils.cpp_extension, which warns "No CUDA runtime is found"
    whenever a CUDA toolkit sits beside a torch without a usable GPU: noise for a CPU benchmark."""
    logger = logging.getLogger("torch.utils.cpp_extension")

    def keep(record: logging.LogRecord) -> bool:
        return "No CUDA runtime" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def cmd_bench_pool(args: argparse.Namespace) -> int:
    from ffablate.bench import pool_bench, render_pool_table

    _fused_or_refuse(args.device)
    rows = pool_bench(quick=args.quick, device=args.device)
    if args.json:
        print(jsontext.dumps(rows))
    else:
        wide_console().print(render_pool_table(rows))
    return 0


def _print_plan(plan: dict[str, Any], as_json: bool) -> int:
    """``ffablate study --plan``: ``study.planned``'s answer as a table (or JSON); a study a run would refuse is then
    the run's error (exit 2)."""
    if as_json:
        print(jsontext.dumps(plan))
    else:
        title = f"study {plan['study']} ({plan['sampler']}, seeds {plan['seeds']}) in {plan['storage']}"
        table = Table(title=Text(title))
        for column in ("configuration", "method", "planned", "done", "running", "mean s a trial"):
            table.add_column(column)
        for row in plan["configurations"]:
            planned = "TPE" if row["planned"] is None else str(row["planned"])
            mean = "-" if row["mean_seconds"] is None else f"{row['mean_seconds']:.0f}"
            cells = (row["configuration"], row["method"], planned, str(row["done"]), str(row["running"]), mean)
            table.add_row(*(Text(cell) for cell in cells))
        lines = []
        if plan["base"]:
            lines.append("shared settings: " + ", ".join(f"{key}={value}" for key, value in plan["base"].items()))
        searched = [*plan["space"], *(f"the {kind} plugins' own spaces" for kind in plan["space_plugins"])]
        if searched:
            lines.append("searched: " + ", ".join(searched))
        lines += [f"note: {note}" for note in plan["notes"]]
        trials = f"{plan['trials']} trial{'s' * (plan['trials'] != 1)}"
        if plan["refused"]:
            pass  # the error below says it
        elif plan["stored"]:
            running = f" ({plan['running']} running now)" if plan["running"] else ""
            pace = ""
            if plan["left_seconds"] is not None and plan["left"] > plan["running"]:
                took = _duration(plan["left_seconds"])
                pace = f"; those not started would take one worker about {took} at the completed trials' pace"
            lines.append(f"{plan['left']} of {trials} left to run{running}{pace}")
        else:
            lines.append(f"nothing stored yet: all {trials} to run")
        print(rendered(table, *lines), end="")
    if plan["refused"]:
        raise FFablateError(f"a run would stop here: {plan['refused']}")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_study(args: argparse.Namespace) -> int:
    import torch

    from ffablate import checkpoint, ops, results, spec, study, workers
    from ffablate.train.common import resolve_device

    if args.n_trials is not None and args.n_trials < 1:
        raise FFablateError(f"--n-trials must be at least 1, got {args.n_trials}")
    if args.timeout is not None and not args.timeout > 0:
        raise FFablateError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.workers < 1:
        raise FFablateError(f"--workers must be at least 1, got {args.workers}")
    plan = spec.load(args.name).plan(args.budget, study.available_datasets(args.data_root))
    source = None
    if args.recipe_from:
        recipe, source = study.winning_recipe(args.storage, args.recipe_from)
        plan = plan.with_recipe(recipe, source)
    name = args.study_name or study.default_study_name(plan.spec, args.budget, source)
    # Mistakes of the machine, not of one configuration, fail here: inside a trial they would fail it for good.
    resolve_device(args.device)
    ops.backend(args.device)
    if args.plan:  # the errors a run would stop with, but nothing made: not the storage, nor the folder
        if args.checkpoints is not None:
            checkpoint.writable_folder(args.checkpoints, create=False)
        return _print_plan(study.planned(plan, args.storage, name), args.json)
    _retain_cpu_memory(args.device)
    _warn_missing_data_root(args.data_root)
    if args.checkpoints is not None:  # run_study checks it too, but after the storage is opened (and made)
        checkpoint.writable_folder(args.checkpoints)
    study.storage_for(args.storage)  # a bad --storage is one line, not a banner and then the error
    size = (
        f"TPE, {plan.budget.n_trials} FF trials + {plan.baseline_trials} baseline" + "s" * (plan.baseline_trials != 1)
        if plan.spec.sampler == "tpe"
        else f"{len(plan.cells)} configurations x {len(plan.budget.seeds)} seed" + "s" * (len(plan.budget.seeds) != 1)
    )
    where = study.describe_storage(args.storage)

    own_trials, argvs = workers.study_argvs(args, args.workers)
    threads_before = torch.get_num_threads()
    threads = max(1, threads_before // (len(argvs) + 1))
    helpers = workers.Workers(argvs, threads, args.storage)

    def banner() -> None:
        stderr.print(f"study {name} ({size}) in {where}", markup=False, highlight=False)
        for note in plan.notes:
            stderr.print(f"note: {note}", markup=False, highlight=False)

    def start_workers(deadline: float | None) -> None:  # only when there is a trial to run
        if argvs:
            stderr.print(f"{len(argvs) + 1} workers, {threads} thread(s) each", markup=False, highlight=False)
            torch.set_num_threads(threads)
            helpers.start(deadline)

    if args.checkpoints is not None:
        # A search's sampled trials keep no epochs: a rerun samples new ones in their place.
        running = "running baselines" if plan.spec.sampler == "tpe" else "those running"
        args.on_interrupt = (
            f"finished trials are stored, and the finished epochs of {running} in {args.checkpoints}: rerun the "
            "same command (with the same --checkpoints) to resume the study"
        )
    # The running trial records why a SIGTERM stopped it, and the finally below stops the workers too.
    with terminated_as_interrupted():
        try:
            with study.StudyProgress(new_progress(stderr.is_terminal)) as bars:
                done = study.run_study(
                    plan,
                    storage_url=args.storage,
                    study_name=name,
                    n_trials=own_trials,
                    timeout=args.timeout,
                    device=args.device,
                    data_root=args.data_root,
                    progress=bars,
                    log=lambda m: stderr.print(m, markup=False, highlight=False),
                    on_ready=banner,
                    deadline=args.deadline,
                    on_trials=start_workers,
                    checkpoints=args.checkpoints,
                )
            if helpers.running():
                stderr.print(f"waiting for {helpers.running()} other worker(s)", markup=False, highlight=False)
            failures = helpers.wait()
        finally:
            helpers.stop()  # only those still running: an error or an interrupt here
            torch.set_num_threads(threads_before)
    for line in failures:
        stderr.print(f"ffablate: {line}", markup=False, highlight=False)
    summary = results.summarize(done.study)
    code = 1 if failures else 0

    def kept() -> str:
        return "the study's trials are stored: rerun the same command to print its results"

    if args.json:
        write_result(results.to_json(summary) + "\n", kept)
        return code
    table = Table(title=f"{name}: {plan.spec.question}", title_justify="left")
    for column in results.TABLE_COLUMNS:
        table.add_column(column, overflow="fold")  # names must stay whole: "tempera…" hides which level
    for row in results.table_rows(summary, top=results.TABLE_TOP):
        table.add_row(*map(Text, row))  # plain text: a failure reason's "[batch, 3]" is no markup tag
    lines: list[Table | str] = [table]
    if results.table_cut(summary):
        lines.append(results.table_cut(summary))
    lines.append(results.answer(summary))
    left = study.remaining(done.study, plan)
    grown = results.planned_seeds(done.study.user_attrs)
    if grown and grown != plan.budget.seeds:  # another run added seeds meanwhile: this command's budget is refused now
        lines.append(
            f"another run added seeds to this study, which now runs seeds {grown}: give the budget seeds = {grown} "
            "to resume it"
        )
    elif left:
        running = min(left, study.running_elsewhere(done.study))
        elsewhere = f" ({running} running in another worker)" if running else ""
        lines.append(f"{left} trial(s) left{elsewhere}; rerun the same command to resume")
    elif not done.ran:  # a rerun of a finished study: the table is what was stored, nothing was trained now
        lines.append("nothing left to run here: the study is finished and the table is its stored one")
    write_result(rendered(*lines), kept)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from ffablate.report import PLOTS, write_report
    from ffablate.study import load_study

    found = load_study(args.storage, args.name)
    out = Path(args.out or Path("reports") / found.study_name)
    try:
        path = write_report(found, out)
    except OSError as exc:
        raise FFablateError(
            f"cannot write the report into {out}: {os_reason(exc)}; pass --out a writable folder"
        ) from None
    drawn = [name for name in PLOTS if (out / name).exists()]  # write_report removes an earlier report's first
    plots = f"and {', '.join(drawn)}" if drawn else "(no plot applies to this study)"
    stdout.print(f"wrote {path} {plots}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ffablate import audit

    specs = audit.specs_from_args(args)
    before = audit.machine()
    interrupted: audit.AuditInterrupted | None = None
    with progress_bar("audit", enabled=stderr.is_terminal) as update:

        def tick(done: int, total: int, spec: audit.AuditSpec) -> None:
            update(done, total, {f"{spec.method} {spec.resolution}px depth": spec.depth})

        try:
            rows = audit.run_audit(specs, progress=tick, timeout=args.timeout, budget=args.budget)
        except audit.AuditInterrupted as exc:
            rows, interrupted = exc.rows, exc
    # The rows go out first: a file that cannot be written must not cost the measurements.
    if args.json:
        print(jsontext.dumps(rows))
    else:
        wide = wide_console()
        wide.print(audit.header(args, before), markup=False, highlight=False)
        wide.print(audit.render_table(rows, title=audit.MEMORY_NOTE))
        for table in audit.render_summary(audit.summarize(rows)):
            wide.print(table)
    try:
        if args.output:
            argv = {k: v for k, v in vars(args).items() if k not in ("func", "command_parser")}
            audit.write_output(args.output, rows, argv, before)
        if args.plot_dir:
            for path in audit.plot(rows, args.plot_dir, prefix=args.plot_prefix):
                stderr.print(f"wrote {path}", markup=False, highlight=False)
    except OSError as exc:
        raise FFablateError(
            f"the audit's rows are printed above, but writing its files failed: {os_reason(exc)}; "
            "rerun with a writable --output/--plot-dir"
        ) from None
    if interrupted:
        files = " and ".join(path for path in (args.output, args.plot_dir) if path)
        kept = f" and written to {files}" if files else ""
        stderr.print(
            f"ffablate: interrupted after {interrupted.finished} of {len(rows)} configurations "
            f"({sum(r['status'] == 'ok' for r in rows)} measured); their rows are "
            f"printed above{kept} with the rest marked 'skipped': rerun the missing --depths/--methods to measure them",
            markup=False,
            highlight=False,
        )
        return 130
    return 0


def os_reason(exc: OSError) -> str:
    """``File exists: /tmp/x`` from an OSError, on one line."""
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


@contextmanager
def terminated_as_interrupted() -> Iterator[None]:
    """Within: a job runner's SIGTERM (a scheduler's time limit, a preemption) ends the command as Ctrl-C does, with
    its message of what was kept. Python lets only the main thread set a handler (a caller may run main() in another
    one). An ignored SIGINT (a background job's) stays ignored."""
    handled = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, _interrupt) for signum in handled} if in_main_thread else {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: object) -> None:
    """The first SIGINT or SIGTERM ends the study as Ctrl-C does; later ones are ignored until it has. A second one
    (an impatient Ctrl-C, or a worker's SIGINT from the terminal and then from ``Workers.stop``) would land in the
    middle of storing the interrupted trial: a traceback, exit code 1, and the trial left RUNNING."""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """ffablate's own warnings printed as one line each, like its errors; other libraries' keep Python's format.
    Only the format changes: a caller recording warnings (``catch_warnings(record=True)``) still gets them."""
    default = warnings.formatwarning

    def format_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
        if issubclass(category, FFablateWarning):
            return f"ffablate: warning: {message}\n"
        return default(message, category, *args, **kwargs)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would name `ffablate --help`; the command's own help lists the options it takes
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with one_line_warnings():
            code = args.func(args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not in the interpreter's exit flush
        return code
    except FFablateError as exc:
        stderr.print(f"ffablate: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        stderr.print(
            f"ffablate: interrupted; {getattr(args, 'on_interrupt', NOTHING_KEPT)}", markup=False, highlight=False
        )
        return 130
    except BrokenPipeError:
        silence_stdout()
        return 1
    except Exception as exc:
        # A study's storage that fails mid-command (its server down or restarted for longer than a retry): one line,
        # and the finished trials, each stored as it ended, stay where they are.
        if not hasattr(args, "storage") or "sqlalchemy" not in sys.modules:
            raise
        from ffablate.study import DEFAULT_STORAGE, shown_url, storage_failure

        cause = storage_failure(exc)
        if cause is None:
            raise
        stderr.print(
            f"ffablate: error: the storage {shown_url(args.storage or DEFAULT_STORAGE)} failed: {cause}; "
            f"{args.on_interrupt} once it answers again",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
