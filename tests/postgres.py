"""A throwaway PostgreSQL server for tests (the sweep's Optuna RDB storage test): Debian's binaries, a fresh
cluster, listening only on 127.0.0.1 at a free port, trust authentication on local and loopback connections.

Where things live: the cluster (data directory and Unix socket) goes into a fresh
``tempfile.mkdtemp(prefix="keeltune-pg-")`` under the temp directory, not into the caller's folder. The tests
run as root, and PostgreSQL refuses to run as root: the server then runs as the ``postgres`` OS user (through
``runuser``), which cannot pass pytest's ``/tmp/pytest-of-root`` (mode 0700; pytest resets it to 0700 each
session, so opening it up is not durable) and must own its cluster. A short path also keeps the Unix socket
under the kernel's 107-byte limit, which a deep pytest folder may not. The caller's ``folder`` holds the
server log, ``postgres.log``, written live (the file is opened here, by the test's own user, and handed to the
server as its stdout), so it stays with the test's other files after ``stop()`` removes the cluster.

Binaries come from ``/usr/lib/postgresql/<newest>/bin``; ``scripts/install-postgres.sh`` installs them."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_SCRIPT = "scripts/install-postgres.sh"
PG_ROOT = Path("/usr/lib/postgresql")
OS_USER = "postgres"  # the server's OS user when the tests run as root
SUPERUSER = "postgres"  # the database superuser initdb creates
HOST = "127.0.0.1"
LOG_NAME = "postgres.log"
# no password (trust, set in pg_hba.conf), UTF-8, C locale, and no fsync of the new files
INITDB_OPTIONS = ("-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries under /usr/lib/postgresql."""


class PostgresError(RuntimeError):
    """The test server failed to set up, start or stop; the message ends with the server log's tail."""


@dataclass(frozen=True)
class PostgresBinaries:
    """The programs of one installed PostgreSQL version."""

    version: str
    initdb: Path
    pg_ctl: Path
    postgres: Path
    createdb: Path


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


def find_postgres(root: Path = PG_ROOT) -> PostgresBinaries:
    """The binaries of the newest PostgreSQL version under ``root`` that has them all; raise
    ``PostgresNotInstalled`` (naming the install script) when there is none."""
    names = ("initdb", "pg_ctl", "postgres", "createdb")
    versions = sorted(
        (d for d in root.glob("*") if d.is_dir()), key=lambda d: _version_key(d.name), reverse=True
    )
    for version in versions:
        paths = [version / "bin" / name for name in names]
        if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
            return PostgresBinaries(version.name, *paths)
    raise PostgresNotInstalled(
        f"no PostgreSQL server found ({root}/<version>/bin/{{{','.join(names)}}}); "
        f"install Debian's with `bash {INSTALL_SCRIPT}` (root or sudo)"
    )


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no server log: {error})"
    return "\n".join(text.splitlines()[-lines:]) or "(server log empty)"


def _as_server_user(command: list[str | Path]) -> list[str]:
    """``command`` run as the server's OS user: ``runuser -u postgres --`` when we are root, else as is."""
    args = [str(a) for a in command]
    return ["runuser", "-u", OS_USER, "--", *args] if os.getuid() == 0 else args


@dataclass
class PostgresServer:
    """A running test server; ``stop()`` shuts it down (fast mode) and removes its cluster, idempotently."""

    port: int
    folder: Path  # the caller's folder: holds the server log
    cluster: Path  # the temp folder with the data directory and the Unix socket; gone after stop()
    binaries: PostgresBinaries
    database: str = "keeltune"
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database, over TCP on loopback."""
        return f"postgresql+psycopg2://{SUPERUSER}@{HOST}:{self.port}/{self.database}"

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.cluster / "data"

    @property
    def log(self) -> Path:
        """The server log."""
        return self.folder / LOG_NAME

    def stop(self, timeout: float = 60) -> None:
        """Stop the server (``pg_ctl stop -m fast``, waiting until it is gone) and remove the cluster; a second
        call does nothing. Raise ``PostgresError`` (with the log's tail) when the server does not stop."""
        if self._stopped:
            return
        if (self.data / "postmaster.pid").exists():
            command = [
                self.binaries.pg_ctl,
                "stop",
                "-D",
                self.data,
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
            ]
            result = subprocess.run(
                _as_server_user(command),
                cwd=self.cluster,
                capture_output=True,
                text=True,
                timeout=timeout + 30,
            )
            if result.returncode != 0 and (self.data / "postmaster.pid").exists():
                raise PostgresError(
                    f"pg_ctl stop failed (exit {result.returncode}): {result.stdout}{result.stderr}\n"
                    f"--- {self.log} (tail) ---\n{_tail(self.log)}"
                )
        self._stopped = True
        atexit.unregister(self.stop)
        shutil.rmtree(self.cluster, ignore_errors=True)


def _initdb(binaries: PostgresBinaries, cluster: Path, socket_dir: Path) -> None:
    """A fresh cluster in ``cluster/data``: trust on the Unix socket and 127.0.0.1 only, loopback-only
    listening, the socket in ``socket_dir``, no fsync."""
    data = cluster / "data"
    command = [binaries.initdb, "-D", data, *INITDB_OPTIONS]
    result = subprocess.run(
        _as_server_user(command), cwd=cluster, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise PostgresError(f"initdb failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    # files initdb made stay owned by the server's user when rewritten in place
    (data / "pg_hba.conf").write_text(
        "# keeltune test server: trust, local socket and loopback only\n"
        "local all all trust\n"
        f"host all all {HOST}/32 trust\n"
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# keeltune test server\n"
            f"listen_addresses = '{HOST}'\n"
            f"unix_socket_directories = '{socket_dir}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "logging_collector = off\n"
        )


def start_postgres(folder: Path, database: str = "keeltune", timeout: float = 60) -> PostgresServer:
    """Start a fresh server (see the module's docstring for where its files go) with an empty database
    ``database``; wait up to ``timeout`` s for it. Raise ``PostgresNotInstalled`` without the binaries and
    ``PostgresError`` (with the server log's tail) when it fails; nothing is left running then."""
    binaries = find_postgres()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cluster = Path(tempfile.mkdtemp(prefix="keeltune-pg-"))
    if os.getuid() == 0:
        try:
            user = pwd.getpwnam(OS_USER)
        except KeyError:
            shutil.rmtree(cluster, ignore_errors=True)
            raise PostgresNotInstalled(
                f"running as root, the test server needs the OS user {OS_USER!r}, which Debian's package "
                f"creates: `bash {INSTALL_SCRIPT}`"
            ) from None
        os.chown(cluster, user.pw_uid, user.pw_gid)
    server = PostgresServer(port=0, folder=folder, cluster=cluster, binaries=binaries, database=database)
    try:
        _initdb(binaries, cluster, socket_dir=cluster)
        for _attempt in range(3):  # another process may take the free port before the server binds it
            server.port = free_port()
            with server.log.open("a") as log:  # the server keeps this as its stdout and stderr
                log.write(f"=== keeltune: pg_ctl start, port {server.port}\n")
                log.flush()
                command = [
                    binaries.pg_ctl, "start", "-D", server.data, "-w", "-t", str(int(timeout)),
                    "-o", f"-p {server.port}",
                ]  # fmt: skip
                result = subprocess.run(
                    _as_server_user(command),
                    cwd=cluster,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout + 30,
                )
            if result.returncode == 0:
                break
            if "could not bind" not in _tail(server.log, 20):
                raise PostgresError(f"pg_ctl start failed (exit {result.returncode})")
        else:
            raise PostgresError("pg_ctl start failed three times: no free port")
        command = [binaries.createdb, "-h", HOST, "-p", str(server.port), "-U", SUPERUSER, database]
        result = subprocess.run(command, cwd=cluster, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise PostgresError(f"createdb {database} failed (exit {result.returncode}): {result.stderr}")
    except BaseException as error:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(cluster, ignore_errors=True)
        if isinstance(error, PostgresError | subprocess.TimeoutExpired):
            raise PostgresError(f"{error}\n--- {server.log} (tail) ---\n{_tail(server.log)}") from error
        raise
    atexit.register(server.stop)  # a safety net for a test run that ends without calling stop()
    return server
