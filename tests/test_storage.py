"""Study storages on a database server (PostgreSQL): opening one, its user mistakes, losing it mid-study.

Tests marked ``postgres`` need a server: set ``FFABLATE_TEST_POSTGRES`` to a URL of a database the user may create
schemas in (e.g. ``postgresql://ff:pw@localhost/ffdb``), with a driver installed (``pip install 'psycopg[binary]'``).
Each test works in a schema of its own, dropped after. Without the variable they are skipped.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import optuna
import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from ffablate import study as studies
from ffablate.cli import main
from ffablate.errors import FFablateError
from tests.test_study import TINY_BUDGET, open_together

SERVER = os.environ.get("FFABLATE_TEST_POSTGRES")
postgres = pytest.mark.skipif(not SERVER, reason="set FFABLATE_TEST_POSTGRES to a PostgreSQL URL to run")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL of ``FFABLATE_TEST_POSTGRES`` whose tables go to a new, empty schema (a new database, as Optuna sees
    it); its connections carry the schema's name as their application_name, which tells them from others'."""
    import sqlalchemy

    schema = f"ffablate_test_{uuid.uuid4().hex[:12]}"
    base = sqlalchemy.make_url(SERVER)
    engine = sqlalchemy.create_engine(base, poolclass=sqlalchemy.pool.NullPool)  # outlives pg_terminate_backend
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    try:
        query = {"options": f"-csearch_path={schema}", "application_name": schema}
        yield base.update_query_dict(query).render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_a_table_another_worker_made_meanwhile_is_waited_for_on_a_server_too():
    # Four workers opening a new PostgreSQL database together: one failed with "(psycopg.errors.DuplicateTable)
    # relation "alembic_version" already exists; check the URL ...". PostgreSQL reports it as a ProgrammingError,
    # SQLite as an OperationalError.
    duplicate = ProgrammingError(
        "CREATE TABLE alembic_version", {}, Exception('relation "alembic_version" already exists')
    )
    assert studies._created_meanwhile(duplicate, new=False)
    unique = IntegrityError("INSERT", {}, Exception("duplicate key value violates unique constraint"))
    assert studies._created_meanwhile(unique, new=False)
    # Other refusals are the user's to fix, not a wait's.
    denied = ProgrammingError("CREATE TABLE studies", {}, Exception("permission denied for schema public"))
    assert not studies._created_meanwhile(denied, new=False)
    refused = OperationalError("connect", {}, Exception("connection refused"))
    assert not studies._created_meanwhile(refused, new=False)


@postgres
def test_workers_opening_a_new_postgres_database_together_all_open_it(pg_url):
    assert open_together(pg_url) == [0] * 4


def test_a_password_in_the_storage_url_is_never_printed(monkeypatch):
    # The banner, "cannot open storage ..." and rerun hints printed postgresql://ff:PASSWORD@host/db as given.
    assert studies.shown_url("postgresql://ff:s3cret@db:5432/ffablate?sslmode=require") == (
        "postgresql://ff:***@db:5432/ffablate?sslmode=require"
    )
    assert studies.shown_url("ff:s3cret@db/ffablate") == "ff:***@db/ffablate"  # the scheme forgotten
    for kept in ("postgresql://ff@db/ffablate", "sqlite:///ffablate.db", "sqlite:////tmp/a:b@c.db"):
        assert studies.shown_url(kept) == kept
    assert studies.describe_storage("postgresql://ff:s3cret@db/ffablate") == "postgresql://ff:***@db/ffablate"
    # SQLAlchemy takes a password up to the "@", "/" and "?" included, and one in the query (psycopg's `password`
    # connection parameter): both were printed as given.
    for url, shown in (
        ("postgresql://ff:s3/cret@db/ffablate", "postgresql://ff:***@db/ffablate"),
        ("postgresql://ff:s3c?ret@db:5432/ffablate", "postgresql://ff:***@db:5432/ffablate"),
        ("postgresql://ff@db/ffablate?password=s3cret", "postgresql://ff@db/ffablate?password=***"),
        (
            "postgresql://ff@db/ffablate?sslmode=require&password=s3cret&x=1",
            "postgresql://ff@db/ffablate?sslmode=require&password=***&x=1",
        ),
    ):
        assert studies.shown_url(url) == shown
    assert make_url("postgresql://ff:s3/cret@db/ffablate").password == "s3/cret"  # as SQLAlchemy reads the URL
    monkeypatch.setitem(sys.modules, "psycopg", None)  # no driver: the error names the URL
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    for url in ("postgresql://ff:s3cret@db/ffablate", "ff:s3cret@db/ffablate"):
        with pytest.raises(FFablateError) as error:
            studies.storage_for(url)
        assert "s3cret" not in str(error.value) and "ff:***@db/ffablate" in str(error.value)


def test_workers_are_given_the_storage_in_their_environment_not_on_the_command_line(monkeypatch, tmp_path, capsys):
    # `--workers` put --storage postgresql://ff:PASSWORD@... on each worker's command line, which `ps` shows to anyone.
    from argparse import Namespace

    from ffablate import workers

    url = "postgresql://ff:s3cret@db/ffablate"
    args = Namespace(name="tiny", budget="smoke", storage=url, study_name=None, n_trials=None, device=None)
    args.data_root = args.recipe_from = args.checkpoints = None
    _, argvs = workers.study_argvs(args, 3)
    assert len(argvs) == 2 and not any("s3cret" in " ".join(argv) for argv in argvs)
    # ... and a worker (any ffablate study or report) takes FFABLATE_STORAGE when no --storage is given.
    given = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("FFABLATE_STORAGE", given)
    assert main(["report", "tiny"]) == 2
    assert f"no study storage at {tmp_path / 'empty.db'}" in capsys.readouterr().err


@postgres
def test_a_password_is_not_printed_by_report(pg_url, capsys):
    from sqlalchemy import make_url

    password = make_url(pg_url).password
    studies.storage_for(pg_url)  # Optuna's tables, and no study
    assert main(["report", "no-such-study", "--storage", pg_url]) == 2
    err = capsys.readouterr().err
    assert "no study 'no-such-study' in postgresql" in err and len(err.strip().splitlines()) == 1
    assert not password or password not in err


def test_a_missing_database_driver_is_named_with_its_package(monkeypatch):
    # "Failed to import DB access module for the specified storage URL. Please install appropriate one.; check the
    # URL ..." named no module: a plain postgresql:// needs psycopg under SQLAlchemy 2.1, psycopg2 before.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(FFablateError) as error:
        studies.storage_for("postgresql://ff@localhost/ffablate")
    assert re.search(
        r"its driver, the Python module psycopg2?, is not installed; pip install 'psycopg", str(error.value)
    )
    with pytest.raises(FFablateError, match=r"module psycopg2, is not installed; pip install 'psycopg2-binary', or "):
        studies.storage_for("postgresql+psycopg2://ff@localhost/ffablate")


def test_a_postgres_scheme_is_told_to_say_postgresql():
    # "Can't load plugin: sqlalchemy.dialects:postgres": the scheme Heroku and others write.
    with pytest.raises(FFablateError, match="write the URL with postgresql://$"):
        studies.storage_for("postgres://ff@localhost/ffablate")
    with pytest.raises(FFablateError, match="SQLAlchemy knows no database 'postgersql'"):
        studies.storage_for("postgersql://ff@localhost/ffablate")


def test_a_server_that_refuses_says_what_to_check(capsys):
    pytest.importorskip("psycopg" if sqlalchemy_version() >= (2, 1) else "psycopg2")
    # Port 1 on this machine: nothing listens there, and no server is needed to test it.
    assert main(["report", "x", "--storage", "postgresql://ff:s3cret@127.0.0.1:1/ffablate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "s3cret" not in err
    assert err.startswith("ffablate: error: cannot open storage postgresql://ff:***@127.0.0.1:1/ffablate: ")
    assert err.endswith(
        "; check that the server is up and reachable, and the URL's host, port, user, password and database"
    )
    # The driver's reason, not the text of Optuna's StorageInternalError wrapped around it ("An exception is raised
    # during the commit. This typically happens due to invalid data in the commit, e.g. exceeding max length."),
    # which `report` gave since it opens the storage without creating tables.
    assert "port 1 failed" in err and "exceeding max length" not in err


def test_a_port_that_is_not_a_number_is_one_line(capsys):
    # SQLAlchemy's int() of the port was a ValueError traceback, in report and study alike.
    url = "postgresql://ff:s3cret@db:54x2/ffablate"
    assert main(["report", "x", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "s3cret" not in err
    assert err == (
        "ffablate: error: cannot open storage postgresql://ff:***@db:54x2/ffablate: its port is not a number "
        "(invalid literal for int() with base 10: '54x2'); write the URL as "
        "postgresql://user:password@host:5432/database"
    )
    with pytest.raises(FFablateError, match="its port is not a number"):
        studies.storage_for(url)


def sqlalchemy_version() -> tuple[int, int]:
    import sqlalchemy

    major, minor = sqlalchemy.__version__.split(".")[:2]
    return int(major), int(minor)


@postgres
def test_a_user_who_may_not_create_tables_is_told_so(pg_url):
    import sqlalchemy

    role = f"ffablate_ro_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(pg_url)
    schema = sqlalchemy.make_url(pg_url).query["options"].split("=")[1]
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
            connection.execute(sqlalchemy.text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
    except ProgrammingError:
        engine.dispose()
        pytest.skip("the FFABLATE_TEST_POSTGRES user may not create roles (CREATEROLE)")
    try:
        url = sqlalchemy.make_url(pg_url).set(username=role, password="pw").render_as_string(hide_password=False)
        with pytest.raises(FFablateError, match="permission denied .*grant it CREATE on the schema, or use a database"):
            studies.storage_for(url)
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"REVOKE ALL ON SCHEMA {schema} FROM {role}"))
            connection.execute(sqlalchemy.text(f"DROP ROLE {role}"))
        engine.dispose()


def test_a_server_storage_pings_its_pooled_connections(monkeypatch):
    # A PostgreSQL restart while a trial trained: the trial's next write met a pooled connection the restart had
    # closed ("terminating connection due to administrator command"), 6 s after the server was back, and the
    # trial was lost with a traceback.
    seen: list[dict] = []

    def opened(self, url, engine_kwargs=None, **kwargs):
        seen.append(dict(engine_kwargs or {}))

    monkeypatch.setattr(optuna.storages.RDBStorage, "__init__", opened)
    studies.storage_for("postgresql://ff@localhost/ffablate")
    studies.storage_for("sqlite:///ffablate.db")
    assert seen[0].get("pool_pre_ping") is True and "pool_pre_ping" not in seen[1]


def test_a_missed_heartbeat_does_not_end_the_heartbeat(tmp_path, monkeypatch):
    # Optuna's heartbeat thread died at the first beat the server missed ("Exception in thread ...
    # (_record_heartbeat)", a traceback mid-study), and the trial, still training, was later failed as stale.
    storage = studies.storage_for(f"sqlite:///{tmp_path / 'beats.db'}")

    def down(self, trial_id):
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.")

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", down)
    storage.record_heartbeat(0)


@postgres
def test_a_postgres_storage_outlives_its_connections(pg_url):
    # As a server restart does: every connection of this test but the killer's own is closed. Only this test's (its
    # application_name): the server may be shared, and its user's other connections (another test run, a study)
    # are not this test's to close.
    import sqlalchemy

    storage = studies.storage_for(pg_url)
    study = optuna.create_study(storage=storage, study_name="s")
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        killed = connection.execute(
            sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()"
            ),
            {"name": sqlalchemy.make_url(pg_url).query["application_name"]},
        ).all()
    engine.dispose()
    assert killed, "the storage's pooled connection was not found"
    study.set_user_attr("after", True)  # on a new connection, not a dead pooled one
    assert optuna.load_study(study_name="s", storage=storage).user_attrs == {"after": True}


SPEC = """
question = "Does the temperature schedule matter on a tiny Fashion-MNIST subset?"
[base]
dataset = "fashion-mnist"
[axes]
temperature = ["constant", "cosine"]
""" + TINY_BUDGET.format(seeds=1)


def test_a_storage_lost_mid_study_is_one_line_and_keeps_the_finished_trials(tmp_path, monkeypatch, capsys):
    # The PostgreSQL server stopped while a trial trained: 310 lines of tracebacks ending in Optuna's own
    # "UnboundLocalError: cannot access local variable 'updated_state'", exit code 1.
    import sqlalchemy

    spec, url = tmp_path / "tiny.toml", f"sqlite:///{tmp_path / 'studies.db'}"
    spec.write_text(SPEC)
    down = threading.Event()
    connect = sqlalchemy.pool.Pool.connect

    def refused(self):
        if down.is_set():
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused"))
        return connect(self)

    train = studies.Objective._train

    def first_then_down(self, trial, config, role):
        result = train(self, trial, config, role)
        if trial.number == 1:  # the second trial trained, then the server went away
            down.set()
        return result

    monkeypatch.setattr(sqlalchemy.pool.Pool, "connect", refused)
    monkeypatch.setattr(studies.Objective, "_train", first_then_down)
    assert main(["study", str(spec), "--budget", "smoke", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"ffablate: error: the storage {url} failed: (builtins.Exception) connection refused; finished trials are "
        "stored: rerun the same command to resume the study once it answers again"
    )
    assert not any("Traceback" in line for line in err)
    down.clear()
    # As the CLI's process would have: gone, leaving the trial it could not store running.
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    study = optuna.load_study(study_name="tiny-smoke", storage=url)
    (stranded,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    study._storage.set_trial_user_attr(stranded._trial_id, "worker", {"host": socket.gethostname(), "pid": gone.pid})
    assert main(["study", str(spec), "--budget", "smoke", "--storage", url]) == 0
    trials = optuna.load_study(study_name="tiny-smoke", storage=url).get_trials()
    states = [(t.number, t.state.name) for t in trials]
    # The first trial is kept; the second, which trained but could not be stored, is failed as stale and rerun.
    assert states == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE")], states


@pytest.mark.parametrize("create", [True, False])  # study; report and --recipe-from
def test_a_server_that_never_answers_is_given_up_on(monkeypatch, create):
    # A port that takes the connection and says nothing (a proxy, a firewall, another service): the study printed
    # nothing and waited for ever (60 s here before it was killed).
    pytest.importorskip("psycopg" if sqlalchemy_version() >= (2, 1) else "psycopg2")
    monkeypatch.setattr(studies, "CONNECT_TIMEOUT_S", 1, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"postgresql://ff@127.0.0.1:{silent.getsockname()[1]}/ffablate"
        raised: list[BaseException] = []

        def open_it() -> None:
            try:
                studies.storage_for(url, create=create)
            except BaseException as exc:
                raised.append(exc)

        opener = threading.Thread(target=open_it, daemon=True)
        opener.start()
        opener.join(20)
        assert not opener.is_alive(), "still waiting for the server"
    assert isinstance(raised[0], FFablateError) and "no answer in 1 s" in str(raised[0])
    assert "?connect_timeout=SECONDS" in str(raised[0])


def test_report_gives_no_tables_to_a_database_without_them(tmp_path, capsys):
    # `ffablate report x --storage postgresql://ff@localhost/empty` created Optuna's 12 tables in that database, then
    # said "no study 'x'"; a SQLite file that exists but is empty got them too.
    import sqlite3

    db = tmp_path / "empty.db"
    db.touch()
    assert main(["report", "x", "--storage", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"ffablate: error: no study storage at sqlite:///{db}: the database holds no Optuna tables; pass the "
        "--storage your study ran with"
    )
    assert sqlite3.connect(db).execute("SELECT name FROM sqlite_master").fetchall() == []


@postgres
def test_report_gives_no_tables_to_a_postgres_database_without_them(pg_url, capsys):
    import sqlalchemy

    assert main(["report", "x", "--storage", pg_url]) == 2
    assert "the database holds no Optuna tables" in capsys.readouterr().err
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    assert sqlalchemy.inspect(engine).get_table_names() == []
