"""A throwaway PostgreSQL server for tests: `initdb` into a fresh temporary folder, listening only on a Unix
socket in that folder (no TCP port, no network), trust authentication (no password), stopped and deleted when
the `with` block ends. Debian installs the server binaries under /usr/lib/postgresql/<version>/bin, off PATH; both
places are searched. PostgreSQL refuses to run as root, so under root (CI containers) the server runs as the
`postgres` system user that Debian's package creates."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from resnet_lab import tune
from resnet_lab.params import ParamsError


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if binaries() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    try:
        tune.rdb_url("postgresql://")  # the lab's own choice of driver
    except ParamsError as e:
        return str(e)
    return None


@contextlib.contextmanager
def server(database: str = "lab") -> Iterator[str]:
    """A running server with an empty database `database`; yields its URL (`postgresql://…?host=<socket dir>`)."""
    bin_dir = binaries()
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # short: a socket path must stay under 107 bytes
    user = None
    if os.geteuid() == 0:  # the server refuses root: hand the folder to the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    folder.chmod(0o755)
    data, log = folder / "data", folder / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                              user=user.pw_uid if user else None, group=user.pw_gid if user else None)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}{tail}")

    try:
        run("initdb", "-D", str(data), "-U", "lab", "--auth=trust", "--no-sync", "-E", "UTF8")
        run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-c listen_addresses='' -k {folder} -c fsync=off -c max_connections=50", "start")
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(tune.rdb_url(f"postgresql://lab@/postgres?host={folder}"),
                                              isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
            engine.dispose()
            yield f"postgresql://lab@/{database}?host={folder}"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

