"""A throwaway PostgreSQL cluster for the tests that need a real one, and a fresh empty
database per test on it. KAPI_TEST_POSTGRES_URL names a server to use instead."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.support.node import HOST, free_port

URL_ENV = "KAPI_TEST_POSTGRES_URL"
USER = "kapi"
DATABASE = "kapi"
# The system user that runs the cluster when the tests run as root (postgres refuses root).
SYSTEM_USER = "postgres"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 120
# Signs in the server log that a port picked as free was taken before postgres bound it.
_PORT_TAKEN = ("could not bind", "address already in use")
_BINARIES = ("initdb", "pg_ctl", "postgres")
# Names fresh databases: unique within a run, and across runs on a shared server.
_RUN = secrets.token_hex(3)
_DATABASES = itertools.count(1)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here, or the cluster would not start (the reason says)."""


@contextlib.contextmanager
def running_postgres(base_dir: Path) -> Iterator[str]:
    """The SQLAlchemy URL of a PostgreSQL server for the `with` block: a cluster of its own,
    stopped and removed at the end (its log is kept in `base_dir`), or the server that
    KAPI_TEST_POSTGRES_URL names. Raises PostgresUnavailable when there is none."""
    external = os.environ.get(URL_ENV)
    if external:
        yield external
        return
    bindir = find_bindir()
    prefix, owner = _runner()
    # Not in base_dir itself: pytest's are 0700 under root's, where `postgres` cannot reach,
    # and a short path keeps the unix socket's under its length limit.
    cluster = Path(tempfile.mkdtemp(prefix="kapi-postgres-", dir=_temp_root()))
    data = cluster / "data"
    log = cluster / "postgres.log"
    try:
        if owner is not None:
            os.chown(cluster, owner.pw_uid, owner.pw_gid)
        _run(
            [
                *prefix, str(bindir / "initdb"),
                "--pgdata", str(data),
                "--username", USER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-sync",
            ],
            cluster,
            "initdb",
        )  # fmt: skip
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
        )
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\ninclude 'kapi.conf'\n")
        port = _start(bindir, prefix, owner, cluster, data, log)
        try:
            _create_database(_url(port, "postgres"), DATABASE)
            yield _url(port, DATABASE)
        finally:
            _stop(bindir, prefix, cluster, data)
    finally:
        with contextlib.suppress(OSError):
            shutil.copyfile(log, base_dir / "postgres.log")
        shutil.rmtree(cluster, ignore_errors=True)


def find_bindir() -> Path:
    """Where initdb, pg_ctl and postgres are: `pg_config --bindir`, else the highest version
    under /usr/lib/postgresql (Debian's layout), else PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(found.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _BINARIES):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL is not installed: no initdb, pg_ctl and postgres in `pg_config --bindir`,"
        f" /usr/lib/postgresql/*/bin or PATH (install it, or set {URL_ENV})"
    )


def fresh_database(url: str) -> str:
    """Creates a new, empty database on the server of `url` and returns its URL."""
    name = f"test_{_RUN}_{next(_DATABASES)}"
    _create_database(url, name)
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, database_url: str) -> None:
    """Drops the database of `database_url` (from fresh_database), connected through `url`;
    connections still open to it are ended."""
    name = make_url(database_url).database
    _execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _create_database(url: str, name: str) -> None:
    _execute(url, f'CREATE DATABASE "{name}"')


def _execute(url: str, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run in a transaction block.
    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def _url(port: int, database: str) -> str:
    return f"postgresql+psycopg://{USER}@{HOST}:{port}/{database}"


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _temp_root() -> str:
    root = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    if os.geteuid() == 0 and not os.stat(root).st_mode & stat.S_IXOTH:
        raise PostgresUnavailable(f"{root} is not traversable by the {SYSTEM_USER} user")
    return root


def _runner() -> tuple[list[str], pwd.struct_passwd | None]:
    """The prefix that runs a command as the cluster's owner, and that owner when it is not
    the current user (as root: the `postgres` system user)."""
    if os.geteuid() != 0:
        return [], None
    try:
        owner = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, and there is no {SYSTEM_USER!r} user to run PostgreSQL as"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable(f"running as root, and no runuser to run as {SYSTEM_USER}")
    return [runuser, "-u", SYSTEM_USER, "--"], owner


def _start(
    bindir: Path,
    prefix: Sequence[str],
    owner: pwd.struct_passwd | None,
    cluster: Path,
    data: Path,
    log: Path,
    attempts: int = 3,
) -> int:
    """Starts the cluster on a free loopback port and returns the port; picks another when
    the one it picked was taken before postgres bound it."""
    for attempt in range(attempts):
        port = free_port()
        settings = data / "kapi.conf"
        settings.write_text(
            f"listen_addresses = '{HOST}'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{data}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n",
            encoding="utf-8",
        )
        if owner is not None:
            os.chown(settings, owner.pw_uid, owner.pw_gid)
        logged = log.stat().st_size if log.exists() else 0
        command = [
            *prefix, str(bindir / "pg_ctl"), "start",
            "--pgdata", str(data),
            "--log", str(log),
            "--wait", "--timeout", str(START_TIMEOUT_S),
        ]  # fmt: skip
        try:
            _run(command, cluster, "pg_ctl start")
        except PostgresUnavailable as error:
            server_log = _read_from(log, logged)
            if attempt + 1 < attempts and any(s in server_log.lower() for s in _PORT_TAKEN):
                continue
            raise PostgresUnavailable(f"{error}\nserver log:\n{server_log}") from None
        return port
    raise AssertionError("unreachable")


def _stop(bindir: Path, prefix: Sequence[str], cluster: Path, data: Path) -> None:
    """Stops the cluster; its data is thrown away, so with no shutdown checkpoint."""
    command = [
        *prefix, str(bindir / "pg_ctl"), "stop",
        "--pgdata", str(data),
        "--mode", "immediate",
        "--wait", "--timeout", str(STOP_TIMEOUT_S),
    ]  # fmt: skip
    try:
        _run(command, cluster, "pg_ctl stop")
    except PostgresUnavailable:
        # Not stopped: kill the postmaster (the first line of its pid file) outright.
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)


def _run(command: Sequence[str], cwd: Path, what: str) -> None:
    # In the cluster's directory: the `postgres` user may not reach the current one.
    try:
        subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as error:
        output = (error.stdout + error.stderr).strip()
        raise PostgresUnavailable(f"{what} failed ({error.returncode}):\n{output}") from None
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PostgresUnavailable(f"{what} failed: {error}") from None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return "(none)"
