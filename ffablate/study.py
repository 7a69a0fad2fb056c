"""Running a study: the Optuna study in an RDB storage, one trial per (configuration, seed), resumable.

Resumption rules (the reason this module exists instead of a bare ``study.optimize``):
- a grid point is *done* once a trial for it is COMPLETE, PRUNED, or FAILED for a reason that would repeat
  (divergence, a configuration error); ``ResumableGridSampler`` never hands a done point out again;
- a RUNNING trial whose process is gone (killed on this host, or its heartbeat went stale on another one) is
  marked FAILED as stale, and its point is run again;
- baselines are trials too (``role`` attr), so they resume the same way; under TPE they are enqueued trials;
- a plan that only adds seeds after the stored ones resumes the study and runs the new points (``added_seeds``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import socket
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.samplers import GridSampler, TPESampler
from optuna.trial import FrozenTrial, Trial, TrialState

from ffablate import results
from ffablate import spec as specs
from ffablate.config import RunConfig, did_you_mean
from ffablate.errors import CheckpointError, ConfigError, DataError, FFablateError, PluginContractError

if TYPE_CHECKING:  # torch's modules: a report, which trains nothing, does not import them
    from ffablate.checkpoint import EpochWriter
    from ffablate.train.common import RunData, TrainingState

DEFAULT_STORAGE = "sqlite:///ffablate.db"
HEARTBEAT_S, GRACE_S = 20, 120
NO_POINT, CLAIM_TRIES = -1, 50  # a grid trial's released claim; claims one trial tries
CONNECT_TIMEOUT_S = 30  # a database server's time to answer a new connection, unless the URL sets connect_timeout
OPEN_TRIES = 6  # openings of a new database other workers are creating too (3.1 s of waits between)
# User attrs every trial carries; reports read only these (and the study's own user attrs).
ROLE, CELL, SEED, FAIL_REASON, PERMANENT = "role", "cell", "seed", "fail_reason", "fail_permanent"
CHECKPOINT = "checkpoint"  # the file in --checkpoints DIR a trial kept its epochs in
PLUGINS = "plugins_used"  # a study's attr: what its plugins from outside ffablate were (plugins_used)


@dataclass
class StudyRun:
    study: optuna.Study
    plan: specs.Plan
    storage_url: str
    ran: int
    skipped: int


def shown_url(url: str) -> str:
    """``url`` with its password (if any) as ``***``: banners, errors and rerun hints end up in terminals, CI logs
    and issue reports."""
    url = (_PASSWORD if "://" in url else _SCHEMELESS_PASSWORD).sub(r"\1***@", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


# "scheme://user:PASSWORD@" as SQLAlchemy reads it: the user ends at the first ":" or "/", the password at the "@"
# ("/", "?" and "#" are part of it).
_PASSWORD = re.compile(r"^([^:/]*://[^:/]*:)[^@]*@")
_SCHEMELESS_PASSWORD = re.compile(r"^([^:/@]*:)[^@/]*@")  # "user:PASSWORD@host/db", the scheme forgotten
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")  # "?password=...", which SQLAlchemy hands to the driver


def storage_for(url: str | None, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so a trial whose worker died is noticed by the next worker. With ``create``
    False a database without Optuna's tables is refused instead of given them (commands that only read)."""
    url = url or DEFAULT_STORAGE
    if "://" not in url:
        raise FFablateError(
            f"--storage {shown_url(url)!r} is not a database URL; e.g. sqlite:///ffablate.db or postgresql://user@host/db"
        )
    if _in_memory(url):
        # Each opening gets a fresh empty database: a study would keep nothing, and Optuna's heartbeat thread,
        # on a connection of its own, finds no tables and fails with a traceback every beat.
        raise FFablateError(f"--storage {shown_url(url)!r}: in-memory storage keeps nothing; use sqlite:///FILE.db")
    db = sqlite_file(url)
    new = db is not None and (not db.exists() or db.stat().st_size == 0)
    # A server restarted (or a connection dropped) while a trial trains leaves dead connections in the pool: the
    # trial's next write failed on one although the server was back, and the trial was lost. A ping on checkout
    # replaces them (Optuna does this itself for MySQL only).
    engine: dict[str, Any] = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if _libpq(url) and "connect_timeout" not in url:
        # libpq waits for ever on a host that takes the connection and never answers (a wrong port behind a
        # firewall or a proxy): the study printed nothing and never started.
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
                return _Storage(
                    url,
                    engine_kwargs=engine,
                    skip_table_creation=not create,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                )
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or an unreachable server
            attempt += 1
            if attempt < OPEN_TRIES and _created_meanwhile(exc, new):
                time.sleep(0.1 * 2 ** (attempt - 1))
                continue
            if not create and _no_tables(exc):
                raise NoStudyStorage(
                    f"no study storage at {shown_url(url)}: the database holds no Optuna tables; pass the --storage "
                    "your study ran with"
                ) from None
            raise FFablateError(f"cannot open storage {shown_url(url)}: {_why_not_opened(url, exc)}") from None


class NoStudyStorage(FFablateError):
    """A database with no Optuna tables, opened by a command that only reads."""


def _libpq(url: str) -> bool:
    """Whether ``url`` opens through libpq (psycopg or psycopg2, one of them SQLAlchemy's default for PostgreSQL),
    which takes ``connect_timeout``."""
    return url.split("://", 1)[0] in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, whose heartbeat outlives a moment without its database."""

    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna's heartbeat thread ends at its first failed beat, with a traceback, and the trial trains on without
        # one: GRACE_S later another worker fails it as stale and runs its point again. A beat missed while the
        # server restarts is made up by the next one.
        from sqlalchemy.exc import SQLAlchemyError

        with contextlib.suppress(optuna.exceptions.StorageInternalError, SQLAlchemyError):
            super().record_heartbeat(trial_id)


# The pip package of a database driver module SQLAlchemy imports, where the two names differ.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def _why_not_opened(url: str, exc: BaseException) -> str:
    """Why ``url`` did not open, and what to do next, for ``cannot open storage URL: ...``."""
    from sqlalchemy.exc import NoSuchModuleError

    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        # Optuna's "An exception is raised during the commit. This typically happens due to invalid data ..." over
        # the driver's reason: opening without creating tables (report, --recipe-from) reads through it first.
        exc = exc.__cause__
    backend = url.split("://", 1)[0].split("+", 1)[0]
    missing = exc.__cause__
    if isinstance(exc, ImportError) and isinstance(missing, ImportError) and missing.name:
        # Optuna's "Failed to import DB access module ... Please install appropriate one." named no module. Which
        # one a plain postgresql:// needs depends on SQLAlchemy's version (psycopg2 before 2.1, psycopg since).
        package = DRIVER_PACKAGES.get(missing.name, missing.name)
        instead = {"psycopg": "postgresql+psycopg2://", "psycopg2": "postgresql+psycopg://"}.get(missing.name)
        other = f", or name an installed driver in the URL (e.g. {instead})" if instead else ""
        return f"its driver, the Python module {missing.name}, is not installed; pip install '{package}'{other}"
    if isinstance(exc, NoSuchModuleError):  # "Can't load plugin: sqlalchemy.dialects:postgres"
        if backend == "postgres":  # as Heroku and others write it
            return "SQLAlchemy calls PostgreSQL postgresql://, not postgres://; write the URL with postgresql://"
        return f"SQLAlchemy knows no database {backend!r}; e.g. sqlite:///ffablate.db or postgresql://user@host/db"
    cause = str(exc).splitlines()[0]
    if isinstance(exc, ValueError) and "invalid literal for int()" in cause:  # SQLAlchemy's parse of the port
        return f"its port is not a number ({cause}); write the URL as {backend}://user:password@host:5432/database"
    if "database is locked" in cause:  # the URL is fine: another process holds the file
        return "another process holds it locked; wait for it, or pass another --storage"
    if backend == "sqlite":
        return f"{cause}; check that its folder exists and is writable"
    if "timeout expired" in cause:  # libpq's connect_timeout, ours or the URL's
        from sqlalchemy.engine import make_url

        seconds = make_url(url).query.get("connect_timeout", CONNECT_TIMEOUT_S)
        return (
            f"{cause}; no answer in {seconds} s: check the URL's host and port, or wait longer with "
            "?connect_timeout=SECONDS in the URL"
        )
    if "permission denied" in cause:  # Optuna creates its tables on first use, and checks them on every opening
        return (
            f"{cause}; the database user needs the right to create tables there: grant it CREATE on the schema, or "
            "use a database it owns"
        )
    return f"{cause}; check that the server is up and reachable, and the URL's host, port, user, password and database"


def storage_failure(exc: BaseException) -> str | None:
    """The first line of the database error behind ``exc`` (its server went down, its connection was cut, a lock
    outlasted SQLite's wait), or None when there is none. Optuna hides it: a trial whose result could not be stored
    ends in Optuna's own UnboundLocalError ('updated_state'), raised over the StorageInternalError it caused."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, FFablateError):  # already one line that says what to do
            return None
        if isinstance(link, (OperationalError, InterfaceError)):
            return str(link).splitlines()[0]
        seen.add(id(link))
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return None


def _no_tables(exc: Exception) -> bool:
    """Optuna's first read of its tables found none (PostgreSQL's UndefinedTable, SQLite's "no such table")."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if isinstance(exc, optuna.exceptions.StorageInternalError):  # Optuna's wrapping of the database's error
        exc = exc.__cause__ or exc
    text = str(exc)
    return isinstance(exc, (OperationalError, ProgrammingError)) and (
        "no such table" in text or ("relation" in text and "does not exist" in text)
    )


def _created_meanwhile(exc: Exception, new: bool) -> bool:
    """Another worker opening the same new database is creating Optuna's tables while this one does: the tables
    it meets half-made, or (SQLite) its lock on a file that was new, are gone once it is done. A lock on a database
    that existed before is somebody else's: no wait for it beyond SQLite's own. A table made meanwhile is an
    OperationalError on SQLite and a ProgrammingError (DuplicateTable) on PostgreSQL."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(exc)
    return (
        isinstance(exc, IntegrityError)
        or (isinstance(exc, (OperationalError, ProgrammingError)) and "already exists" in text)
        or (isinstance(exc, OperationalError) and new and "database is locked" in text)
    )


def _in_memory(url: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy can parse (ValueError: its port): opening it says why
        return False
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def describe_storage(url: str | None) -> str:
    url = url or DEFAULT_STORAGE
    db = sqlite_file(url)
    return f"{url} ({db.resolve()})" if db is not None and not db.is_absolute() else shown_url(url)


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL (``sqlite:///relative`` or ``sqlite:////absolute``)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def default_study_name(spec: specs.Spec, budget: str, recipe_from: str | None = None) -> str:
    # One study per budget: a smoke study's trials must never be averaged with a quick study's. A study run
    # on another study's winning recipe is another study too.
    name = f"{spec.name}-{budget}"
    return f"{name}@{recipe_from}" if recipe_from else name


def winning_recipe(storage_url: str | None, name: str) -> tuple[dict[str, Any], str]:
    """The FF recipe keys (plugins, their parameters, schedule, threshold) of the best-scoring FF configuration
    of a stored study, and the study's full name."""
    study = load_study(storage_url, name)
    left = points_left(study)
    if left:
        raise FFablateError(
            f"study {study.study_name} is not finished ({left} of its runs are still to do), so its winner could "
            f"still change; finish it first (`{rerun_command(study, storage_url)}`)"
        )
    best = results.summarize(study).best()
    if best is None:
        raise FFablateError(
            f"study {study.study_name} has no completed FF trial to take a recipe from; run it first "
            f"(`{rerun_command(study, storage_url)}`)"
        )
    # The winner's recipe is the source's shared settings plus its own overrides, FF keys only.
    settings = {**study.user_attrs.get("base", {}), **best.overrides}
    recipe = {k: v for k, v in settings.items() if specs.is_recipe_key(k)}
    return recipe, study.study_name


def points_left(study: optuna.Study) -> int:
    """The (configuration, seed) points a stored grid study has not finished; 0 for a search."""
    attrs = study.user_attrs
    if attrs.get("sampler") != "grid":
        return 0
    done = {point_of(t) for t in study.get_trials(deepcopy=False) if is_done(t)}
    return sum((cell, seed) not in done for cell in attrs.get("cells", []) for seed in results.planned_seeds(attrs))


def rerun_command(study: optuna.Study, storage_url: str | None) -> str:
    """The ``ffablate study`` command that made (and resumes) ``study``: the same spec, budget and storage, and
    its name or recipe source where they are not the defaults, since any other name is another study."""
    attrs = study.user_attrs
    spec_name, budget = attrs.get("ffablate_spec", study.study_name), attrs.get("budget", "quick")
    # A study whose seeds grew resumes from the spec that added its latest ones.
    path = attrs.get(results.GROWN + json.dumps(results.planned_seeds(attrs)), attrs.get("spec_path"))
    command = f"ffablate study {_spec_argument(spec_name, path)} --budget {budget}"
    # Studies made before the recipe's source was stored have it only in their default name.
    recipe = attrs["recipe_from"] if "recipe_from" in attrs else study.study_name.partition("@")[2] or None
    if recipe:
        command += f" --recipe-from {recipe}"
    if storage_url:
        command += f" --storage {shown_url(storage_url)}"
    if study.study_name != f"{spec_name}-{budget}" + (f"@{recipe}" if recipe else ""):
        command += f" --study-name {study.study_name}"
    return command


def _spec_argument(name: str, path: str | None) -> str:
    """The spec's name where `ffablate study NAME` finds that very file, else its path."""
    if path is None:
        return name
    try:
        found = specs.resolve(name)
    except specs.SpecError:
        return path
    return name if found.resolve() == Path(path).resolve() else path


# ----------------------------------------------------------------------------------------------------
# Which trials count as done


def point_of(trial: FrozenTrial) -> tuple[str, int] | None:
    attrs = trial.user_attrs
    if CELL in attrs and SEED in attrs:
        return str(attrs[CELL]), int(attrs[SEED])
    if "cell" in trial.params and "seed" in trial.params:
        return str(trial.params["cell"]), int(trial.params["seed"])
    return None


def is_done(trial: FrozenTrial) -> bool:
    """Finished for good: completed, pruned, or failed for a reason a rerun would repeat."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(PERMANENT))


class ResumableGridSampler(GridSampler):
    """GridSampler over {"cell", "seed"} that hands out only points without a done or running trial.

    Optuna's GridSampler counts any finished trial (including one failed because its process was killed) as
    visited, and gives trial number i grid point i whatever was run before; both break resumption.
    Points go out in seed-major order (each configuration's first seed, baselines first, then the second
    seed), so a study cut short still has one result per configuration.

    A claimed point is recorded in the trial's user attrs, not as Optuna params: Optuna fixes a categorical
    parameter's choices at its first trial, so "seed" params would keep the study from ever adding a seed. Trials
    stored before carry both (``point_of`` reads either).
    """

    def __init__(self, cells: list[str], seeds: list[int]):
        super().__init__({"cell": cells, "seed": seeds}, seed=0)
        rank = {(c, s): (si, ci) for si, s in enumerate(seeds) for ci, c in enumerate(cells)}
        names = self._param_names  # sorted: ["cell", "seed"]
        self._order = sorted(
            range(len(self._all_grids)),
            key=lambda g: rank[tuple(self._all_grids[g][names.index(k)] for k in ("cell", "seed"))],
        )

    def _point(self, grid_id: int) -> tuple[str, int]:
        values = self._all_grids[grid_id]
        return values[self._param_names.index("cell")], values[self._param_names.index("seed")]

    def _taken(self, study: optuna.Study, besides: int | None = None) -> set[tuple[str, int]]:
        """Points with a done trial or a running one, leaving out the trial with id ``besides``."""
        taken = set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            if t._trial_id == besides or t.user_attrs.get(results.SURPLUS):
                continue
            if not (is_done(t) or t.state == TrialState.RUNNING):
                continue
            point = point_of(t)
            if point is None and t.system_attrs.get("grid_id", NO_POINT) != NO_POINT:
                point = self._claimed(t)
            if point is not None:
                taken.add(point)
        return taken

    def _claimed(self, trial: FrozenTrial) -> tuple[str, int]:
        """The point a trial holds by its grid_id alone (a claim not yet recorded), read in the grid it was claimed
        in: a worker started before the study's seeds grew numbers the points of a smaller grid."""
        space = trial.system_attrs.get("search_space", self._search_space)
        grid = self if space == self._search_space else ResumableGridSampler(space["cell"], space["seed"])
        return grid._point(trial.system_attrs["grid_id"])

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        taken = self._taken(study)
        return [g for g in self._order if self._point(g) not in taken]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        storage, me = study._storage, trial._trial_id
        # Before the claim: a worker killed while it holds a point leaves a trial that fail_dead_trials can free.
        mark_worker(storage, me)
        storage.set_trial_system_attr(me, "search_space", self._search_space)
        # Claim, then look. Two workers can read the same free point at once; each looks only after its own
        # claim is stored, so the later of the two sees the earlier's claim, and a worker that sees another
        # claim on its point releases it. At most one keeps a point; when both release, each waits a moment
        # and tries a random free point, so they part.
        rng = random.Random(me)
        for attempt in range(CLAIM_TRIES):
            taken = self._taken(study, besides=me)
            free = [g for g in self._order if self._point(g) not in taken]
            if not free:
                break
            grid_id = free[0] if attempt == 0 else rng.choice(free)
            storage.set_trial_system_attr(me, "grid_id", grid_id)
            cell, seed = self._point(grid_id)
            if (cell, seed) not in self._taken(study, besides=me):
                storage.set_trial_user_attr(me, CELL, cell)
                storage.set_trial_user_attr(me, SEED, seed)
                return
            storage.set_trial_system_attr(me, "grid_id", NO_POINT)
            time.sleep(rng.uniform(0.0, 0.05))
        # Every point is done or running elsewhere (or other workers kept winning): this trial runs nothing.
        storage.set_trial_system_attr(me, "grid_id", self._order[-1])  # Optuna's sampling needs one
        storage.set_trial_user_attr(me, results.SURPLUS, True)


def mark_worker(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Record which process runs the trial, for ``fail_dead_trials``."""
    storage.set_trial_user_attr(trial_id, "worker", {"host": socket.gethostname(), "pid": os.getpid()})


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials FAILED (stale) when their process on this host no longer exists, or when their
    heartbeat stopped more than ``GRACE_S`` seconds ago (another host's, or a reused pid's).

    Optuna fails heartbeat-stale trials itself only as a new trial starts, and a grid study counts a running
    trial's point as taken: with a dead trial on the last free point no trial would ever start, and the study
    could never finish. Those trials keep Optuna's empty reason (reported as a worker that died).
    """
    failed = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        if not results.died(t):
            continue
        # Two runs started together may both find it; the second's write then meets a finished trial.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study._storage.set_trial_user_attr(t._trial_id, FAIL_REASON, results.STALE)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed.append(t.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
        optuna.storages.fail_stale_trials(study)
    for t in running:
        if t.number not in failed and study._storage.get_trial(t._trial_id).state == TrialState.FAIL:
            failed.append(t.number)
    return sorted(failed)


# ----------------------------------------------------------------------------------------------------
# Data reuse


class DataCache:
    """Loaded datasets keyed by everything that shapes them, so 40 trials on one dataset load it twice."""

    def __init__(self, data_root: str | None, size: int = 3):
        self.data_root, self.size = data_root, size
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, config: RunConfig) -> Any:
        from ffablate.train.common import prepare_data, resolve_device

        key = self.key(config)
        if key not in self._items:
            self._items[key] = prepare_data(config, resolve_device(config.device), self.data_root, False)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    @staticmethod
    def key(config: RunConfig) -> str:
        return json.dumps(
            [
                config.dataset,
                config.classes,
                config.labels,
                config.limit_train,
                config.limit_test,
                config.val_images,
                config.seed,
                config.batch_size,
                config.augment,
                config.device,
                config.params_of("datasets"),
            ],
            sort_keys=True,
            default=str,
        )


def preflight(plan: specs.Plan, device: str, data: DataCache) -> None:
    """Build every configuration's trainer on its data, as a trial would, score two test images and take one
    training step per phase on two training images (the trainer is thrown away after). Some mistakes show only
    with the data (a batch larger than the training split, more halvings than the image has pixels, fewer channels
    than classes) or in training (a fusion whose loss fails): inside a trial each would fail its trial for good,
    one by one, and the study, made under this spec's fingerprint, would refuse the fixed spec."""
    from ffablate.train import TrainingDiverged, build_trainer

    checks = [(cell, plan.config(cell.overrides, plan.budget.seeds[0], device)) for cell in plan.configurations()]
    first_use = list(dict.fromkeys(data.key(config) for _, config in checks))
    # One data variant after another, each loaded once, the one the first trials need last, so the cache is left
    # holding what they load first.
    checks.sort(key=lambda check: -first_use.index(data.key(check[1])))
    broken: set[str] = set()
    for cell, config in checks:
        if data.key(config) in broken:
            continue
        try:
            trainer = build_trainer(config, data=data.get(config))
            x, y = next(iter(trainer.data.test))
            # A forward pass runs the checks made on activations; evaluate only iterates what it is given.
            trainer.evaluate([(x[:2], y[:2])])
            x, y = next(iter(trainer.data.train))
            trainer.rehearse(x[:2], y[:2])
        except TrainingDiverged:
            pass  # a property of the run (its lr, its data), which its trial records
        except DataError:
            # Left to the first trial on this data, which stops the study and keeps its point for a rerun.
            broken.add(data.key(config))
        except ConfigError as exc:
            raise plan.error(cell, exc) from None


# ----------------------------------------------------------------------------------------------------
# The objective


class Surplus(FFablateError):
    """Other workers have taken this trial's place (a grid's last points, see ``surplus`` for searches): it ends
    without a result."""


def surplus(trial: Trial, n_trials: int) -> bool:
    """Whether other workers have taken this search trial's place: its FF trials done or running ahead of it
    number ``n_trials`` already, or (a baseline) its point is done or running ahead of it.

    Workers started together each fix their count of trials when they start, and each enqueues the baselines it
    finds missing; this check, made by each trial once it exists, holds the study to its plan. "Ahead" is by trial
    number, which Optuna hands out one by one, so of several trials racing for one place the first takes it.
    """
    attrs, number = trial.user_attrs, trial.number
    baseline = (attrs[CELL], int(attrs[SEED])) if attrs.get(ROLE) == "baseline" else None
    taken = 0
    for t in trial.study._storage.get_all_trials(trial.study._study_id, deepcopy=False):
        if t.number == number or t.user_attrs.get(results.SURPLUS):
            continue
        if not (is_done(t) or (t.state == TrialState.RUNNING and t.number < number)):
            continue
        if baseline is not None:
            if point_of(t) == baseline:
                return True
        elif t.user_attrs.get(ROLE) != "baseline":
            taken += 1
    return baseline is None and taken >= n_trials


class StopStudy(Exception):
    """Raised out of ``study.optimize`` (not an FFablateError, so Optuna does not catch it) to end the study."""

    def __init__(self, error: FFablateError):
        super().__init__(str(error))
        self.error = error


class Objective:
    def __init__(
        self,
        plan: specs.Plan,
        device: str,
        data: DataCache,
        on_epoch_progress: Callable | None = None,
        checkpoints: Path | None = None,
        log: Callable[[str], None] = lambda message: None,
    ):
        self.plan, self.device, self.data = plan, device, data
        self.progress = on_epoch_progress
        self.checkpoints, self.log = checkpoints, log  # run_study's ``checkpoints`` folder, checked writable
        self.announce: Callable[[int, str, int], None] | None = None
        self.started = 0  # trials this objective was called for
        self.trial_id: int | None = None  # the latest one's
        # The latest trial's exception that Optuna does not catch (an interrupt, StopStudy, a bug): when another run
        # has failed that trial meanwhile, Optuna raises "Cannot tell a FAIL trial" in its place.
        self.escaping: BaseException | None = None
        self.kept: Path | None = None  # the latest trial's checkpoint file in ``checkpoints``, once it has one

    def __call__(self, trial: Trial) -> float:
        self.started += 1
        self.trial_id, self.escaping, self.kept = trial._trial_id, None, None
        try:
            return self._run(trial)
        except (optuna.TrialPruned, FFablateError):  # Optuna's to store (``catch``)
            raise
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            # Another run failed this trial meanwhile, and storing its result or its failure's reason was refused: a
            # takeover (``run_study``), unless an interrupt or a bug was being recorded when it was refused.
            cause = exc.__context__
            if cause is not None and not isinstance(cause, (optuna.TrialPruned, FFablateError)):
                self.escaping = cause
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI's handler: the point is left to a rerun
            self.escaping = exc
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(FAIL_REASON, "interrupted")
            raise
        except BaseException as exc:
            self.escaping = exc
            raise
        finally:
            # The folder holds interrupted points only. Any other end leaves nothing a rerun should go on from: a
            # result, a pruning, a failure that would repeat, or a bug or broken data whose fix changes what trains.
            if self.kept is not None and not isinstance(self.escaping, KeyboardInterrupt):
                self.kept.unlink(missing_ok=True)

    def _run(self, trial: Trial) -> float:
        mark_worker(trial.study._storage, trial._trial_id)
        # The grid sampler's verdict, read from the storage: ``trial.user_attrs`` predates the sampler's writes.
        grid_full = trial.study._storage.get_trial_user_attrs(trial._trial_id).get(results.SURPLUS, False)
        if grid_full or (self.plan.spec.sampler == "tpe" and surplus(trial, self.plan.budget.n_trials)):
            trial.set_user_attr(results.SURPLUS, True)
            trial.set_user_attr(FAIL_REASON, "surplus: other workers had taken this point or the study's last ones")
            if trial.user_attrs.get(ROLE) != "baseline":  # nothing left for this worker (a duplicate baseline: go on)
                trial.study.stop()
            raise Surplus
        role, label, overrides, seed, match, group = self._choose(trial)
        for key, value in (
            (ROLE, role),
            (CELL, label),
            (SEED, seed),
            ("match", match),
            ("group", group),
            ("overrides", overrides),
        ):
            trial.set_user_attr(key, value)
        if self.announce is not None:
            self.announce(trial.number, label, seed)
        try:
            config = self.plan.config(overrides, seed, self.device)
            trial.set_user_attr("config", config.to_dict())
            result = self._train(trial, config, role)
        except optuna.TrialPruned:
            raise
        except (DataError, PluginContractError) as exc:
            # Missing or broken data files fail every trial alike, and a plugin that broke its contract is a bug
            # (as if it raised): stop the study and leave this point to the rerun after the fix.
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, PluginContractError):
                exc = PluginContractError(f"{exc}; fix the plugin and rerun: the study goes on where it stopped")
            raise StopStudy(exc) from None
        except FFablateError as exc:
            # Divergence (NaN) and configuration clashes would happen again on a rerun: record and move on.
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}")
            trial.set_user_attr(PERMANENT, True)
            raise
        except Exception as exc:  # a bug (a plugin's, say) ends the study; the rerun after its fix retries the point
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}")
            raise
        metrics = {
            "test_accuracy": result.test_accuracy,
            "val_accuracy": result.val_accuracy,
            "per_layer_accuracy": result.per_layer_accuracy,
            "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
            "peak_memory_bytes": result.peak_memory_bytes,
        }
        trial.set_user_attr("metrics", metrics)
        # A one-epoch trial skips the per-epoch evaluation; its final accuracy is its one-point curve.
        final = {"test_accuracy": result.test_accuracy}
        if result.val_accuracy is not None:
            final["val_accuracy"] = result.val_accuracy
        history = result.history or [{"epoch": config.epochs - 1, **final}]
        trial.set_user_attr("history", history)
        trial.set_user_attr("kernel_backend", result.kernel_backend)
        trial.set_user_attr("versions", result.versions)
        trial.set_user_attr("cpu_threads", result.cpu_threads)
        trial.set_user_attr("plugin_params", result.plugin_params)
        trial.set_user_attr("plugin_sources", result.plugin_sources)
        trial.set_user_attr("data_source", result.data_source)
        trial.set_user_attr("images", result.images)  # what a limit or a held-out split left, counted
        # What Optuna maximizes, prunes on and ranks by: validation accuracy when the budget holds images out,
        # so no configuration is chosen on the test images it is then reported on.
        return results.selection_score(final)

    def _choose(self, trial: Trial) -> tuple[str, str, dict[str, Any], int, str, str]:
        if trial.user_attrs.get(ROLE) == "baseline" or self.plan.spec.sampler == "grid":
            # An enqueued baseline (TPE studies) or the grid point the sampler claimed, which it wrote to the
            # storage after ``trial.user_attrs`` was read.
            claim = trial.study._storage.get_trial_user_attrs(trial._trial_id)
            cell = self.plan.cell(claim[CELL])
            return cell.role, cell.label, cell.overrides, int(claim[SEED]), cell.match, cell.group
        return self._sample(trial)

    def _sample(self, trial: Trial) -> tuple[str, str, dict[str, Any], int, str, str]:
        """A TPE trial: the categorical axes, the spec's numeric space, then the chosen plugins' spaces."""
        from ffablate.plugins import registry

        plan = self.plan
        cells = [c for c in plan.cells if c.role == "ff"]
        # The planned levels (a budget's subset, the datasets available here), not the spec's whole axes.
        axes = {k: list(dict.fromkeys(c.overrides[k] for c in cells)) for k in plan.spec.groups[0].axes}
        levels = {key: trial.suggest_categorical(key, values) for key, values in axes.items()}
        # The FF cell of the sampled levels: a sampled setting the baseline shares (norm, dataset) has a baseline of
        # its own, and the cell's match names it.
        cell = next(c for c in cells if all(c.overrides[k] == v for k, v in levels.items()))
        overrides: dict[str, Any] = dict(cell.overrides)
        for key, dist in plan.spec.space.items():
            overrides[key] = suggest(trial, key, dist)
        for kind in plan.spec.space_plugins:
            name = plan.plugin_name(overrides, kind)
            for param, dist in registry().get(kind, name).space.items():
                overrides[f"{kind}.{param}"] = suggest(trial, f"{kind}:{name}.{param}", dist)
        sampled = " ".join(
            f"{k}={_short(v)}"
            for k, v in overrides.items()
            if k in trial.params
            or any(p.startswith(f"{k.split('.')[0]}:") and p.endswith(f".{k.split('.', 1)[-1]}") for p in trial.params)
        )
        label = f"#{trial.number} {sampled}".strip()
        return "ff", label, overrides, plan.budget.seeds[0], cell.match, cell.group

    def _train(self, trial: Trial, config: RunConfig, role: str) -> Any:
        from ffablate.train import trained_run

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            # Baselines report nothing: their accuracy must not move the median FF trials are pruned against. Nor
            # does a greedy schedule: until its last phase its later blocks are untrained, so its accuracy at a step
            # is not comparable with a simultaneous trial's, and a median rule would prune it for its schedule.
            if role != "ff" or config.schedule == "greedy":
                return
            score = results.selection_score(record)
            trial.report(score, epoch)
            if trial.should_prune():
                trial.set_user_attr("history_at_prune", [record])
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with {results.selection_key(record)} {score:.4f}")

        data = self.data.get(config)
        # One epoch has no curve to prune on: skipping the per-epoch evaluation saves a test pass per trial.
        epoch_hook = on_epoch if config.epochs > 1 else None
        resume, keep = None, None
        # Only a point a rerun runs again is worth keeping: a grid point or a baseline. A search's sampled trial is
        # replaced by a newly sampled one, whose config (and file) differs.
        if self.checkpoints is not None and (role == "baseline" or self.plan.spec.sampler == "grid"):
            named = f"trial {trial.number} ({trial.user_attrs[CELL]}, seed {trial.user_attrs[SEED]})"
            resume, keep = self._checkpoint(self.checkpoints, trial.study.study_name, config, data, named)
            trial.set_user_attr(CHECKPOINT, str(keep.path.resolve()))  # a rerun without this folder says so
        if resume is not None and epoch_hook is not None:
            # The epochs the interrupted trial trained, reported again in order: the pruner sees (and may prune on)
            # the curve an uninterrupted trial shows.
            for record in resume.history:
                epoch_hook(record["epoch"], record)
        return trained_run(
            config, data=data, progress=self.progress, on_epoch=epoch_hook, resume=resume, keep=keep
        ).result

    def _checkpoint(
        self, folder: Path, study_name: str, config: RunConfig, data: RunData, named: str
    ) -> tuple[TrainingState | None, EpochWriter]:
        """The trial's state to go on from, where an interrupted trial of this very point left one in ``folder``
        that resumes here (else None, with a line saying why when there was a file), and the writer that keeps its
        file after every epoch."""
        from ffablate import checkpoint

        point = {"study": study_name, "config": config.to_dict()}
        path = folder / checkpoint_file(study_name, point)
        self.kept = path
        writer = checkpoint.EpochWriter(path, extra={STUDY_POINT: point})
        if not path.exists():
            return None, writer
        try:
            found = resumable(path, point, data)
        except CheckpointError as exc:  # not fatal: the point trains as if the file were not there, and replaces it
            self.log(f"{named}: not resumed, training it from the start: {exc}")
            return None, writer
        state, threads = checkpoint.training_state(found), checkpoint.thread_change(found)
        rounding = (
            f" (at {checkpoint.cpu_threads(threads[1])} where it trained at {threads[0]}: within noise of "
            "an uninterrupted trial, not bit for bit)"
            if threads
            else ""
        )
        self.log(f"{named} resumes from {path} after epoch {state.epochs_done} of {state.epochs_total}{rounding}")
        return state, writer


STUDY_POINT = "study"  # the key of a study trial's checkpoint that names its point (``checkpoint``'s docstring)


def checkpoint_file(study_name: str, point: dict[str, Any]) -> str:
    """The file name of ``point``'s checkpoint (``{"study", "config"}``): the study's name as far as it is safe in a
    file name, for people, and a digest of the study's name and the trial's whole resolved config (seed and
    overrides included), so that only a rerun of the same point finds it."""
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', study_name)[:80]}-{digest}.pt"


def resumable(path: Path, point: dict[str, Any], data: RunData) -> dict[str, Any]:
    """The study checkpoint at ``path`` (``checkpoint.read``'s) where ``point`` resumes from it with ``data``; a
    CheckpointError says why it cannot go on here (damaged, not ffablate's, finished, another point's, another
    ffablate or plugin version, other data), as ``ffablate train --resume`` refuses it. Unlike ``--resume``, it
    refuses another commit of the same version too: the network or optimizers it restores might no longer fit that
    code, which would fail the trial (for good, as a ConfigError) instead of training its point again, and a
    trial's record names one commit."""
    from ffablate import checkpoint, saved
    from ffablate.plugins import registry
    from ffablate.revision import source_revision

    found = checkpoint.read(path)
    if not checkpoint.unfinished(found):
        raise CheckpointError(f"{path} holds a finished run, not an interrupted trial's")
    if found.get(STUDY_POINT) != checkpoint.plain(point):  # a digest's collision, or a file copied under this name
        raise CheckpointError(f"{path} holds another study's or another configuration's run")
    began, now = found["ffablate"].get("commit"), source_revision()
    if began and now and began != now:
        raise CheckpointError(f"{path} was trained so far by ffablate at commit {began}, this is commit {now}")
    saved.check_same_code(found, path)
    saved.check_plugins(path, found["plugins"], tuple(found["plugins"]), registry())
    saved.check_same_data(found, path, point["config"]["dataset"], data)
    return found


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def suggest(trial: Trial, name: str, dist: dict[str, Any]) -> Any:
    if dist["type"] == "categorical":
        return trial.suggest_categorical(name, dist["choices"])
    if dist["type"] == "int":
        return trial.suggest_int(name, dist["low"], dist["high"], log=dist.get("log", False))
    return trial.suggest_float(name, dist["low"], dist["high"], log=dist.get("log", False))


class FFMedianPruner(optuna.pruners.BasePruner):
    """Optuna's median rule, with ``n_startup_trials`` counting only trials that report per-epoch values.

    MedianPruner counts every completed trial, the BP baselines (which report nothing, and run first) and
    greedy or one-epoch FF trials included: with 4 baselines and n_startup_trials = 20, FF configurations were
    pruned after 16 comparable trials. The median itself already reads only trials that reported the step.
    """

    def __init__(self, n_startup_trials: int, n_warmup_steps: int):
        self.n_startup_trials = n_startup_trials
        self._median = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=n_warmup_steps)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if sum(bool(t.intermediate_values) for t in complete) < self.n_startup_trials:
            return False
        return self._median.prune(study, trial)


def make_pruner(spec: specs.Spec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.get("type", "none") == "none":
        return optuna.pruners.NopPruner()
    return FFMedianPruner(n_startup_trials=p.get("n_startup_trials", 5), n_warmup_steps=p.get("n_warmup_steps", 0))


# ----------------------------------------------------------------------------------------------------
# Creating / resuming and running


def available_datasets(data_root: str | None) -> Callable[[str, Mapping[str, Any]], bool]:
    """Whether a configuration's dataset is here, judged with the dataset parameters it passes (imagefolder's files
    are wherever its ``datasets.path`` says, not in the data root)."""
    from ffablate.data import dataset_found
    from ffablate.plugins import registry

    names = {p.name for p in registry().all("datasets")}
    # Asked once per group and level: a plugin's failing locator warns once, not once per question.
    answers: dict[tuple[str, str], bool] = {}

    def available(name: str, params: Mapping[str, Any]) -> bool:
        key = (name, json.dumps(params, sort_keys=True, default=str))
        if key not in answers:
            # Only a dataset known to be missing is skipped; one whose plugin cannot tell (None) loads or says why.
            answers[key] = name in names and dataset_found(name, data_root, params) is not False
        return answers[key]

    return available


class TrialSeededTPESampler(TPESampler):
    """TPE whose random draws for trial n come from seed n. One seed per process replayed a resumed study's first
    samples, and gave workers started together the same ones (the same configuration trained twice); trial numbers
    are unique in a study, and a search is still reproducible."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        mark_worker(study._storage, trial._trial_id)  # as early as the grid's: an interrupt here orphans no trial
        self._rng.rng.seed(trial.number)
        self._random_sampler._rng.rng.seed(trial.number)  # TPE's random start draws from this one
        super().before_trial(study, trial)


def tpe_sampler(plan: specs.Plan) -> TPESampler:
    """TPE for ``plan``. Its random start counts the baselines' trials too (they are complete trials to it), so
    they are added to the FF trials it should start with."""
    return TrialSeededTPESampler(n_startup_trials=max(2, plan.budget.n_trials // 4) + plan.baseline_trials)


def open_study(plan: specs.Plan, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    spec = plan.spec
    sampler = (
        ResumableGridSampler([c.label for c in plan.cells], plan.budget.seeds)
        if spec.sampler == "grid"
        else tpe_sampler(plan)
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=sampler,
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    except optuna.exceptions.StorageInternalError as exc:  # its first write: a read-only file opens, then fails here
        cause = str(exc.__cause__ or exc).splitlines()[0]
        raise FFablateError(
            f"the storage refused a write ({cause}); make it writable, or pass another --storage "
            "(`ffablate report` reads a read-only one)"
        ) from None
    attrs = study.user_attrs
    fingerprint = plan.fingerprint()
    refuse_a_foreign_study(study)
    refuse_another_plan(study, plan)
    if "fingerprint" in attrs:
        # How the results are read, not what they mean: a spec's edited question or analysis applies on resume.
        for key, value in (("question", plan.spec.question), ("analysis", plan.spec.analysis)):
            if attrs.get(key) != value:
                study.set_user_attr(key, value)
        if added_seeds(attrs, plan):  # the only change refuse_another_plan lets through
            study.set_user_attr(results.GROWN + json.dumps(plan.budget.seeds), str(spec.path))
    else:
        meta = {
            "ffablate_spec": spec.name,
            "question": spec.question,
            "analysis": spec.analysis,
            "sampler": spec.sampler,
            "budget": plan.budget.name,
            "seeds": plan.budget.seeds,
            "base": plan.base,
            "baseline_methods": spec.baseline_methods,
            "notes": plan.notes,
            "axes": {k: v for g in spec.groups for k, v in g.axes.items()},
            "groups": [g.label for g in spec.groups],
            "cells": [c.label for c in plan.cells],
            "spec_path": str(spec.path),
            "recipe_from": plan.recipe_source,
            "pruner": spec.pruner,
            "fingerprint": fingerprint,
        }
        for key, value in meta.items():
            study.set_user_attr(key, value)
    if "baseline_untuned" not in study.user_attrs:  # also for studies made before it; {} says "none", not "unknown"
        study.set_user_attr("baseline_untuned", plan.untuned_baseline())
    return study


def refuse_a_foreign_study(study: optuna.Study) -> None:
    """A study of that name made by other code in a shared storage: ffablate's trials beside its own would mix
    objectives, and a study stored to minimize would be searched and pruned backwards."""
    if "ffablate_spec" in study.user_attrs:
        return
    trials = len(study.get_trials(deepcopy=False))
    if trials or study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        directions = ", ".join(d.name.lower() for d in study.directions)
        raise FFablateError(
            f"study {study.study_name!r} in this storage was not made by ffablate ({trials} trial(s), direction "
            f"{directions}); rerun with --study-name NEW"
        )


def refuse_another_plan(study: optuna.Study, plan: specs.Plan) -> None:
    """Resuming a study made from a different plan would mix results that mean different things."""
    attrs = study.user_attrs
    # Studies made before session 8 stored no pruner; the fingerprint leaves it out so that they still resume.
    if "pruner" in attrs and attrs["pruner"] != plan.spec.pruner:
        raise FFablateError(
            f"study {study.study_name!r} was made with pruner {attrs['pruner']} and the spec now says "
            f"{plan.spec.pruner}: its trials were pruned under the old rule; rerun with --study-name NEW (or restore "
            "the pruner)"
        )
    if "fingerprint" not in attrs:
        return
    made, planned, now = attrs.get("seeds"), results.planned_seeds(attrs), plan.budget.seeds
    if not isinstance(made, list) and attrs["fingerprint"] == plan.fingerprint():  # a study stored without seeds
        return
    if isinstance(made, list) and attrs["fingerprint"] == plan.fingerprint(made):  # the same plan but its seeds
        if results.forked_seeds(attrs):
            lists = " and ".join(map(str, results.seed_lists(attrs)[1:]))
            raise FFablateError(
                f"runs added different seeds to study {study.study_name!r} at once ({lists}), so it mixes them; "
                "rerun with --study-name NEW"
            )
        if now[: len(planned)] != planned:
            grew = f" (grown from {made})" if planned != made else ""
            raise FFablateError(
                f"study {study.study_name!r} runs seeds {planned}{grew} and this budget runs {now}; a budget may only "
                f"add seeds after those: give it seeds = {planned} (or more after them), or rerun with --study-name NEW"
            )
        return
    what, remedy = _what_changed(attrs, plan)
    raise FFablateError(
        f"study {study.study_name!r} in this storage was made from a different spec or budget{what}; {remedy}"
    )


def plugins_used(plan: specs.Plan) -> dict[str, dict[str, Any]]:
    """``{"kind name": {"source", "params"[, "space"]}}`` for each plugin from outside ffablate that ``plan``'s
    configurations run: its package and version, the parameter values each configuration runs it with (its
    defaults included, less those a search draws), and under TPE, where the search reads it, its declared space.
    ffablate's own plugins change only with ffablate, whose version every trial records."""
    from ffablate.config import PLUGIN_KINDS
    from ffablate.plugins import plugin_sources, registry, used_params

    reg, used = registry(), {}
    searched = plan.spec.space_plugins if plan.spec.sampler == "tpe" else []
    for cell in plan.cells:
        config = plan.config(cell.overrides, 0)
        for kind, source in plugin_sources(config, reg, PLUGIN_KINDS).items():
            plugin = reg.get(kind, config.plugin_of(kind))
            entry = used.setdefault(f"{kind} {plugin.name}", {"source": source, "params": []})
            drawn = {key.split(".", 1)[1] for key in plan.spec.space if key.startswith(f"{kind}.")}
            if kind in searched:
                entry["space"] = plugin.space
                drawn |= set(plugin.space)
            params = {k: v for k, v in used_params(config, reg, (kind,))[kind].items() if k not in drawn}
            if params not in entry["params"]:
                entry["params"].append(params)
    for entry in used.values():
        entry["params"].sort(key=lambda params: json.dumps(params, sort_keys=True))
    # As the storage keeps them (JSON): a tuple default reads back as a list, and must compare equal.
    return json.loads(json.dumps(used))


def refuse_changed_plugins(study: optuna.Study, now: dict[str, dict[str, Any]]) -> None:
    """Refuses to resume a study whose plugins from outside ffablate changed since it ran: a new version, other
    parameter values or another searched space would be averaged with the old one's seeds into one row. A study
    stored before it recorded them is checked against its trials' recorded sources."""
    then_all = study.user_attrs.get(PLUGINS) or _sources_of_trials(study)
    for key, then in then_all.items():
        if key not in now:  # a plugin the plan no longer runs: the fingerprint says so
            continue
        kind, name = key.split(" ", 1)
        what = next((w for w in ("source", "params", "space") if w in then and now[key].get(w) != then[w]), None)
        if what is None:
            continue
        if what == "source":
            change = f"{kind} plugin {then['source']}, and {now[key]['source']} is installed now"
        else:
            words = "parameters" if what == "params" else "searched space"
            change = f"{kind} plugin {name!r} with {words} {_shown(then[what])}, and {_shown(now[key].get(what))} now"
        raise FFablateError(
            f"study {study.study_name!r} ran {change}: new trials would be averaged with the old; rerun with "
            "--study-name NEW (or restore the plugin it ran)"
        )


def _sources_of_trials(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The plugin sources a study's completed trials recorded (``plugin_sources``, since session 17), keyed as
    ``plugins_used`` keys them."""
    sources = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for kind, source in (t.user_attrs.get("plugin_sources") or {}).items():
            sources[f"{kind} {source.split(' from ', 1)[0]}"] = {"source": source}
    return sources


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def added_seeds(attrs: dict[str, Any], plan: specs.Plan) -> list[int]:
    """The seeds ``plan`` adds to a stored study's (``attrs``), where that is all it changes: its seed list is the
    study's with seeds after it, and on the seeds the study was made with it is the plan the study was made from.
    Empty otherwise.

    Added seeds only add points: every stored trial keeps its meaning. They go after the study's because the first
    seed is the one a search's FF trials run on, and seed-major order then runs the new seeds last."""
    made, planned, now = attrs.get("seeds"), results.planned_seeds(attrs), plan.budget.seeds
    if not isinstance(made, list) or len(now) <= len(planned) or now[: len(planned)] != planned:
        return []
    return now[len(planned) :] if attrs.get("fingerprint") == plan.fingerprint(made) else []


def _what_changed(attrs: dict[str, Any], plan: specs.Plan) -> tuple[str, str]:
    """What changed besides the seeds, and what to do: which configurations came or went, when that is the change
    (a plugin installed or removed since the study was made changes what an axis of "*" expands to, with the spec
    file untouched), or the shared settings, which under --recipe-from include the source study's best recipe."""
    remedy = "rerun with --study-name NEW to start a fresh one (or restore the spec it was made from)"
    base = attrs.get("base")
    if isinstance(base, dict) and base != plan.base:  # [base] or the budget's settings, which every trial shares
        keys = sorted(set(base) | set(plan.base), key=str)
        changed = [k for k in keys if base.get(k) != plan.base.get(k)]
        moved = ", ".join(f"{k} {base.get(k, '(unset)')} -> {plan.base.get(k, '(unset)')}" for k in changed)
        if plan.recipe_source and all(specs.is_recipe_key(k) for k in changed):
            return (
                f": the best configuration of study {plan.recipe_source!r} changed since it was made ({moved}), as "
                "when that study ran more trials or seeds",
                "rerun with --study-name NEW",
            )
        return f": its shared settings changed ({moved})", remedy
    before, now = attrs.get("cells"), [c.label for c in plan.cells]
    if not isinstance(before, list):
        return "", remedy
    added, gone = [c for c in now if c not in before], [c for c in before if c not in now]
    parts = [f"{len(cells)} {word} (e.g. {cells[0]!r})" for cells, word in ((added, "new"), (gone, "gone")) if cells]
    if not parts:
        changes = "; ".join(f"{d}: {what}" for d, what in plan.code_changes().items())
        return (f" (or ffablate changed what its trials compute since: {changes})" if changes else ""), remedy
    why = 'as when the spec\'s axes or [baseline] changed, or an axis of "*" meets a plugin installed or removed since'
    return f": its configurations changed, {' and '.join(parts)}, {why}", remedy


def enqueue_baselines(study: optuna.Study, plan: specs.Plan) -> int:
    """Under TPE, baselines are enqueued fixed trials; enqueue those not done, running or already waiting."""
    missing = _baselines_to_enqueue(study.get_trials(deepcopy=False), plan)
    for label, seed in missing:
        study.enqueue_trial({}, user_attrs={ROLE: "baseline", CELL: label, SEED: seed})
    return len(missing)


def _baselines_to_enqueue(trials: list[FrozenTrial], plan: specs.Plan) -> list[tuple[str, int]]:
    have = {point_of(t) for t in trials if is_done(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)}
    return [
        (cell.label, seed)
        for seed in plan.budget.seeds
        for cell in plan.cells
        if cell.role == "baseline" and (cell.label, seed) not in have
    ]


def remaining(study: optuna.Study, plan: specs.Plan) -> int:
    """How many trials this study still needs to finish its grid (or its TPE budget, with the baselines a run
    enqueues)."""
    return _left(study.get_trials(deepcopy=False), plan)


def planned(plan: specs.Plan, storage_url: str | None, name: str) -> dict[str, Any]:
    """What ``run_study`` would run for ``plan`` as study ``name``, found without training, loading data or making
    a storage: every configuration with its trials planned (None where TPE decides: a search's FF trials share
    ``n_trials``), done (completed, pruned, or failed for good), running, and its completed trials' mean wall
    seconds; the trials left (as a run counts them, a search's baselines to enqueue included), the seconds of one
    worker's time those not running would take at the completed trials' pace (each configuration's own, else all
    of theirs; None before any completed), and ``refused``, the error a run would stop with at the stored study
    (another plan, changed plugins, a study not ffablate's), with no count left then."""
    url = storage_url or DEFAULT_STORAGE
    study = _stored_study(url, name)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    refused = None
    if study is not None:
        try:
            refuse_a_foreign_study(study)
            refuse_another_plan(study, plan)
            if _left(trials, plan):  # as run_study: a finished study averages nothing new
                refuse_changed_plugins(study, plugins_used(plan))
        except FFablateError as exc:
            refused = str(exc)
    grid, seeds = plan.spec.sampler == "grid", plan.budget.seeds
    total = len(plan.cells) * len(seeds) if grid else plan.budget.n_trials + plan.baseline_trials
    done = [t for t in trials if is_done(t)]
    running = [t for t in trials if t.state == TrialState.RUNNING and not results.died(t)]
    done_points = {point_of(t) for t in done}
    running_points = {point_of(t) for t in running} - done_points
    seconds: dict[str, list[float]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and t.duration is not None and point_of(t):
            seconds.setdefault(point_of(t)[0], []).append(t.duration.total_seconds())
    every = [s for durations in seconds.values() for s in durations]
    pace = sum(every) / len(every) if every else None
    rows = []
    for cell in plan.cells:
        if grid or cell.role == "baseline":  # its (configuration, seed) points, each counted once
            points = {(cell.label, seed) for seed in seeds}
            n_done, n_running = len(points & done_points), len(points & running_points)
        else:  # a search's sampled trials: many per point
            n_done = sum(point_of(t) is not None and point_of(t)[0] == cell.label for t in done)
            n_running = sum(point_of(t) is not None and point_of(t)[0] == cell.label for t in running)
        mean = sum(seconds[cell.label]) / len(seconds[cell.label]) if cell.label in seconds else None
        rows.append(
            {
                "configuration": cell.label,
                "method": cell.method,
                "role": cell.role,
                "settings": cell.overrides,
                "planned": len(seeds) if grid or cell.role == "baseline" else None,
                "done": n_done,
                "running": n_running,
                "mean_seconds": mean,
            }
        )
    left = left_seconds = None
    if not refused:
        left = total if study is None else _left(trials, plan)
        if pace is not None:
            rows_left = sum(
                (row["planned"] - row["done"] - row["running"]) * (row["mean_seconds"] or pace)
                for row in rows
                if row["planned"] is not None
            )
            # A search's FF trials not yet started, at the pace of all its completed trials.
            sampled = [row for row in rows if row["planned"] is None]
            started = sum(row["done"] + row["running"] for row in sampled)
            left_seconds = rows_left + (max(0, plan.budget.n_trials - started) * pace if sampled else 0)
    return {
        "study": name,
        "storage": shown_url(url),
        "spec": plan.spec.name,
        "budget": plan.budget.name,
        "sampler": plan.spec.sampler,
        "seeds": seeds,
        "base": plan.base,
        "space": plan.spec.space if not grid else {},
        "space_plugins": plan.spec.space_plugins if not grid else [],
        "notes": plan.notes,
        "configurations": rows,
        "trials": total,
        "stored": study is not None,
        "left": left,
        "running": sum(row["running"] for row in rows),
        "left_seconds": left_seconds,
        "refused": refused,
    }


def _left(trials: list[FrozenTrial], plan: specs.Plan) -> int:
    """``remaining`` of a study with ``trials``: a search's baselines not yet enqueued count as a run enqueues them."""
    if plan.spec.sampler == "grid":
        done = {point_of(t) for t in trials if is_done(t)}
        return sum((c.label, s) not in done for c in plan.cells for s in plan.budget.seeds)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    ff_done = sum(is_done(t) and t.user_attrs.get(ROLE) == "ff" for t in trials)
    return waiting + len(_baselines_to_enqueue(trials, plan)) + max(0, plan.budget.n_trials - ff_done)


def _stored_study(url: str, name: str) -> optuna.Study | None:
    """Study ``name`` in the storage at ``url``, or None where there is none; a storage that does not exist is not
    made (a SQLite file), nor given Optuna's tables. A SQLite file a run could not make is an error now."""
    db = sqlite_file(url)
    if db is not None and (not db.exists() or db.stat().st_size == 0):
        if not db.resolve().parent.is_dir():
            raise FFablateError(
                f"cannot open storage {shown_url(url)}: the folder {db.resolve().parent} does not exist; create it or "
                "give another --storage"
            )
        return None
    try:
        storage = storage_for(url, create=False)
    except NoStudyStorage:
        return None
    with _quiet_optuna():
        if name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=name, storage=storage)


def running_elsewhere(study: optuna.Study) -> int:
    """Trials other workers are running now: after this worker's run, every running trial but a dead worker's
    on this host (which the next run marks as failed)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return sum(not t.user_attrs.get(results.SURPLUS) and not results.died(t) for t in running)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs each caught failure with a traceback; the study prints its own one-line reasons."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def run_study(
    plan: specs.Plan,
    *,
    storage_url: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
    on_ready: Callable[[], None] = lambda: None,
    deadline: float | None = None,
    on_trials: Callable[[float | None], None] = lambda deadline: None,
    checkpoints: str | None = None,
) -> StudyRun:
    """Create or resume the study and run what is left (at most ``n_trials`` trials, none started after
    ``timeout`` seconds or after the ``time.time()`` ``deadline``).

    ``progress`` is an optional object with ``trial_started(label, seed)``, ``steps(done, total, info)`` and
    ``trial_finished(state, value)`` methods (the CLI's rich bars). ``on_ready`` runs once the spec has passed
    its preflight, before any trial (the CLI's banner: a spec that fails leaves one error line, not a banner too).
    ``on_trials(deadline)`` runs just before the first trial, only when there is one to run (the CLI starts its
    other workers there, with this run's deadline).

    ``checkpoints``, a folder, keeps each running grid point's (or baseline's) resumable checkpoint there after
    every epoch; a rerun after an interrupt or a kill goes on from its last epoch, and any other end of the trial
    deletes its file.
    """
    from ffablate.checkpoint import writable_folder
    from ffablate.train.common import resolve_device

    resolve_device(device)
    folder = writable_folder(checkpoints) if checkpoints is not None else None
    storage = storage_for(storage_url)
    name = study_name or default_study_name(plan.spec, plan.budget.name)
    data = DataCache(data_root)
    with _quiet_optuna():
        # Before the study exists, so a spec that fails leaves its name unused; a finished study runs nothing, and
        # resuming it needs no data loaded.
        # Loaded read-only: open_study would stamp this spec on a study the preflight may yet refuse it for.
        existing = (
            optuna.load_study(study_name=name, storage=storage) if name in optuna.get_all_study_names(storage) else None
        )
        stored = existing.user_attrs if existing is not None else {}
        plugins = plugins_used(plan)
        runs = existing is None or remaining(existing, plan)
        if existing is not None:
            refuse_another_plan(existing, plan)
            if runs:  # a finished study averages nothing new: it shows its table whatever is installed now
                refuse_changed_plugins(existing, plugins)
        if runs:
            preflight(plan, device, data)
        on_ready()
        study = open_study(plan, storage, name)
        if runs and study.user_attrs.get(PLUGINS) != plugins:  # also on a study made before: its next resume checks
            study.set_user_attr(PLUGINS, plugins)
        added = added_seeds(stored, plan)
        if added:
            log(f"seeds {added} added to the study's {results.planned_seeds(stored)}: its finished trials are kept")
        stale = fail_dead_trials(study)
        if stale:
            log(
                f"marked {len(stale)} trial(s) of a dead process as failed (stale); their points run again: "
                f"{', '.join(map(str, stale))}"
            )
        if plan.spec.sampler == "tpe":
            enqueue_baselines(study, plan)
        todo = remaining(study, plan)
        if todo:
            _note_other_devices(study, device, log)
            _note_kept_epochs(study, folder, log)
        limit = todo if n_trials is None else min(n_trials, todo)
        if isinstance(study.sampler, ResumableGridSampler):
            # Points another live worker is running are its to finish: with none free, the sampler could only
            # hand out one of those again.
            limit = min(limit, len(study.sampler._get_unvisited_grid_ids(study)))
        before = len(study.trials)
        if deadline is not None:
            timeout = min(timeout or math.inf, deadline - time.time())
        if limit > 0 and (timeout is None or timeout > 0):
            on_trials(None if timeout is None else time.time() + timeout)
            steps = progress.steps if progress is not None else None
            objective = Objective(plan, device, data, steps, checkpoints=folder, log=log)
            callbacks = [lambda s, t: _log_failure(t, log)]
            if progress is not None:
                progress.start(limit)
                objective.announce = progress.trial_started
                callbacks.append(lambda s, t: progress.trial_finished(t))
            start = time.perf_counter()
            while objective.started < limit:
                left = None if timeout is None else timeout - (time.perf_counter() - start)
                if left is not None and left <= 0:
                    break
                try:
                    study.optimize(
                        objective,
                        n_trials=limit - objective.started,
                        timeout=left,
                        catch=(FFablateError,),
                        callbacks=callbacks,
                        gc_after_trial=False,
                    )
                    break
                except StopStudy as stop:  # the trials done so far stay in the storage; a rerun resumes after them
                    raise stop.error from None
                except ValueError as exc:
                    if isinstance(objective.escaping, StopStudy):
                        raise objective.escaping.error from None
                    if objective.escaping is not None:
                        raise objective.escaping from None
                    if not _taken_over(study, objective.trial_id, exc):
                        raise
                    log(
                        f"note: trial {study._storage.get_trial(objective.trial_id).number} was failed as stale "
                        f"while this process was stopped (no heartbeat for over {GRACE_S} s) and its point went to "
                        "another run; its result is dropped"
                    )
            study.set_user_attr(f"wall_seconds_{before}", time.perf_counter() - start)
    return StudyRun(study, plan, storage_url or DEFAULT_STORAGE, len(study.trials) - before, todo - limit)


def _taken_over(study: optuna.Study, trial_id: int | None, exc: ValueError) -> bool:
    """Whether ``exc`` is Optuna refusing to store the result of a trial another run has already failed as stale
    ("Cannot tell a FAIL trial."): its heartbeat stopped while this process was suspended, and the other run
    reran its point. Any other ValueError is a bug and propagates."""
    return (
        str(exc).startswith("Cannot tell a ")
        and trial_id is not None
        and study._storage.get_trial(trial_id).state.is_finished()
    )


def _note_other_devices(study: optuna.Study, device: str, log: Callable[[str], None]) -> None:
    """Say so when a resumed study's finished trials ran on another device: the fingerprint leaves the device out
    (a study may move to a GPU), but CUDA trains under bf16 autocast, so the two devices' numbers differ."""
    others = Counter(
        t.user_attrs["config"].get("device")
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "config" in t.user_attrs
    )
    others.pop(device, None)
    if others:
        ran = " and ".join(f"{n} on {d}" for d, n in sorted(others.items(), key=lambda item: str(item[0])))
        log(
            f"note: finished trials of this study ran on another device ({ran}) than this run ({device}); CUDA "
            "trains under bf16 autocast, so the devices' numbers differ"
        )


def _note_kept_epochs(study: optuna.Study, folder: Path | None, log: Callable[[str], None]) -> None:
    """Say so, before anything trains, when interrupted trials of points still to run kept their epochs in a
    checkpoint folder this run does not use (no ``--checkpoints``, or another): this run trains those points from
    the start, where a rerun with that folder would go on from their last epoch."""
    trials = study.get_trials(deepcopy=False)
    done = {point_of(t) for t in trials if is_done(t)}
    here = folder.resolve() if folder is not None else None
    elsewhere: dict[Path, set[tuple[str, int] | None]] = {}
    for t in trials:
        kept = t.user_attrs.get(CHECKPOINT)
        if t.state != TrialState.FAIL or not kept or point_of(t) in done:
            continue
        kept = Path(kept)
        if kept.parent != here and kept.is_file():
            elsewhere.setdefault(kept.parent, set()).add(point_of(t))
    for where, points in sorted(elsewhere.items()):
        log(
            f"note: {len(points)} interrupted trial(s) kept their epochs in {where}, which this run does not use: it "
            f"trains their points from the start; to go on from those epochs, stop it and rerun with --checkpoints "
            f"{where}"
        )


def _log_failure(trial: FrozenTrial, log: Callable[[str], None]) -> None:
    if trial.state == TrialState.FAIL and not trial.user_attrs.get(results.SURPLUS):
        reason = trial.user_attrs.get(FAIL_REASON, "see the trial's attributes")
        log(
            f"trial {trial.number} ({trial.user_attrs.get(CELL, '?')}, "
            f"seed {trial.user_attrs.get(SEED, '?')}) "
            f"failed: {reason}"
        )


def load_study(storage_url: str | None, name: str) -> optuna.Study:
    """An existing study with ffablate trials, read-only in spirit: nothing is run. ``name`` may omit the budget
    suffix."""
    db = sqlite_file(storage_url or DEFAULT_STORAGE)
    if db is not None and not db.exists():  # opening it would leave an empty database behind
        raise FFablateError(f"no study storage at {db.resolve()}; pass the --storage your study ran with")
    # Nor may it give Optuna's tables to a database that has none: `report --storage postgresql://me@db/postgres`
    # made 12 tables in the server's default database.
    storage = storage_for(storage_url, create=False)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    names = [s.study_name for s in summaries]
    if name not in names:
        # NAME-budget and NAME-budget@source only: "fusion" must not find "fusion-deep-quick".
        # Or any study made from the spec NAME: one started with --study-name after a refused resume is one too.
        own = re.compile(rf"{re.escape(name)}-({'|'.join(specs.BUDGETS)})(@.+)?")
        matches = [
            s.study_name for s in summaries if own.fullmatch(s.study_name) or s.user_attrs.get("ffablate_spec") == name
        ]
        where = shown_url(storage_url or DEFAULT_STORAGE)
        if len(matches) > 1:  # a quick and a full run of one spec: reporting either silently would mislead
            raise FFablateError(f"{name!r} matches several studies in {where}: {', '.join(matches)}; name one of them")
        if not matches:
            # Only a spec's name makes a study by that name; "god-smoke" for "good-smoke" is a typo.
            run = f"ffablate study {name}" + (f" --storage {shown_url(storage_url)}" if storage_url else "")
            hint = did_you_mean(name, names)
            make = f" (to make it: `{run}`)" if name in specs.available_names() else ""
            there = ", ".join(names) or "none"
            raise FFablateError(f"no study {name!r} in {where}{hint}; studies there: {there}{make}")
        name = matches[0]
    with _quiet_optuna():
        study = optuna.load_study(study_name=name, storage=storage)
    if not any(CELL in t.user_attrs for t in study.get_trials(deepcopy=False)):
        if "ffablate_spec" not in study.user_attrs:
            ours = [s.study_name for s in summaries if "ffablate_spec" in s.user_attrs]
            where = f" --storage {shown_url(storage_url)}" if storage_url else ""
            hint = f"ffablate studies there: {', '.join(ours)}" if ours else f"run `ffablate study NAME{where}`"
            raise FFablateError(f"study {name} has no ffablate trials (`ffablate study` did not make it); {hint}")
        raise FFablateError(f"study {name} has no ffablate trials; run `{rerun_command(study, storage_url)}`")
    return study


class StudyProgress:
    """Two bars of one rich ``Progress``: trials of this run, and the steps of the trial in flight."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.trials = self.steps_task = None

    def __enter__(self) -> StudyProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def start(self, total: int) -> None:
        self.trials = self.bar.add_task("trials", total=total, info="")
        self.steps_task = self.bar.add_task("  steps", total=None, info="")

    def trial_started(self, number: int, label: str, seed: int) -> None:
        self.bar.update(self.steps_task, completed=0, total=None, description=f"  #{number} {label} s{seed}"[:60])

    def steps(self, done: int, total: int, info: dict[str, float]) -> None:
        self.bar.update(
            self.steps_task,
            completed=done,
            total=total,
            info=" ".join(f"{k} {v:.3g}" for k, v in info.items()),
        )

    def trial_finished(self, trial: FrozenTrial) -> None:
        key = results.selection_key(trial.user_attrs.get("metrics", {})).removesuffix("_accuracy")
        value = f"last {key} {trial.value:.4f}" if trial.value is not None else f"last {trial.state.name.lower()}"
        self.bar.update(self.trials, advance=1, info=value)
