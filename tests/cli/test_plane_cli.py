"""``loft serve``, ``loft plane bootstrap`` and the API's commands (``loft tenant``, ``volume``,
``token``, ``nodegroup``, ``audit``), driven through the real ``loft`` program against a real
control plane: ``loft serve`` in a subprocess on a loopback port, with a SQLite database and file
storage in a temporary directory. Tokens must never appear in any output but the one that
creates them.

Every test talks to the one server of this module, so each uses tenant names of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from loftcli import LOFT, Run, check_clean_error, loft, loft_process, ok

from loftfs.plane.client import PlaneClient, PlaneError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running ``loft serve`` and the operator token ``loft plane bootstrap`` made for it."""

    url: str
    config: Path
    root: Path
    log: Path
    operator: str
    secrets: set[str] = field(default_factory=set)
    # (command, everything it printed) of every command run, but the ones that print a token
    outputs: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def running_server(
    args: list[str], log: Path, health_url: str, verify: ssl.SSLContext | bool = True
) -> Iterator[None]:
    """``loft serve ARGS`` in a subprocess, answering /healthz, stopped by SIGTERM at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LOFT, "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"loft serve exited {proc.returncode}: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=2, verify=verify).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"loft serve did not answer within 60s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def bootstrap(*args: str) -> str:
    """``loft plane bootstrap ARGS``: the token alone on stdout, the notice on stderr."""
    run = ok(loft_process("plane", "bootstrap", *args))
    secret = run.stdout.strip()
    assert secret.startswith("loft_") and len(secret) == 48, run.stdout
    assert secret not in run.stderr and "not shown again" in run.stderr
    return secret


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server configured by a file, whose listen address a flag overrides."""
    root = tmp_path_factory.mktemp("plane")
    port = free_port()
    config = root / "plane.toml"
    config.write_text(
        "[server]\n"
        'listen = "127.0.0.1:1"\n'  # replaced by --listen
        f'database = "sqlite:///{root}/plane.db"\n'
        f'master_key_file = "{root}/master.key"\n'
        f'state_dir = "{root}/state"\n'
        "usage_interval = 0\n"
        "[storage]\n"
        'kind = "file"\n'
        f'root = "{root}/data"\n'
    )
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    args = ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
    with running_server(args, log, f"{url}/healthz"):
        operator = bootstrap("--config", str(config), "--name", "first")
        yield Server(url, config, root, log, operator, {operator})


@dataclass
class Plane:
    """The CLI pointed at ``server`` through ``LOFT_CONTROL_URL`` and ``LOFT_TOKEN``."""

    server: Server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def operator(self) -> str:
        return self.server.operator

    def run(self, *args: str, token: str | None = None, input: str | None = None) -> Run:
        env = {"LOFT_CONTROL_URL": self.url, "LOFT_TOKEN": token or self.operator}
        result = loft(*args, input=input, env=env)
        self.server.outputs.append((" ".join(args), result.stdout + result.stderr))
        return result

    def json(self, *args: str, token: str | None = None) -> Any:
        return json.loads(ok(self.run(*args, "--json", token=token)).stdout)

    def ok(self, *args: str, token: str | None = None) -> Run:
        return ok(self.run(*args, token=token))

    def error(self, *args: str, token: str | None = None) -> str:
        """The one error line of a command that must fail with exit code 1."""
        return check_clean_error(self.run(*args, token=token))

    def new_token(self, *args: str, token: str | None = None) -> str:
        """``token create`` (table output): its stdout is the secret and nothing else."""
        env = {"LOFT_CONTROL_URL": self.url, "LOFT_TOKEN": token or self.operator}
        result = ok(loft("token", "create", *args, env=env))
        secret = result.stdout.strip()
        assert secret.startswith("loft_") and "\n" not in secret, result.stdout
        assert "not shown again" in result.stderr and secret not in result.stderr
        self.server.secrets.add(secret)
        return secret

    def tenant(self, name: str) -> str:
        self.ok("tenant", "create", name)
        return name


@pytest.fixture
def plane(server: Server) -> Iterator[Plane]:
    """The CLI against the module's server; after the test no token may have been printed."""
    start = len(server.outputs)
    yield Plane(server)
    for command, output in server.outputs[start:]:
        for secret in server.secrets:
            assert secret not in output, f"'loft {command}' printed a token"


def token_id(plane: Plane, secret: str) -> str:
    """The id of a token, from the server's own answer to it."""
    with PlaneClient(plane.url, secret) as client:
        return str(client.whoami()["token_id"])


# --- tenants ---------------------------------------------------------------------------------


def test_tenant_lifecycle(plane: Plane) -> None:
    run = plane.ok("tenant", "create", "acme", "--display-name", "Acme Corp")
    assert "acme" in run.stdout
    assert "already" in plane.error("tenant", "create", "acme")

    listed = plane.json("tenant", "ls")
    assert isinstance(listed, list)
    assert [t["display_name"] for t in listed if t["name"] == "acme"] == ["Acme Corp"]
    table = plane.ok("tenant", "ls").stdout
    assert "acme" in table and "Acme Corp" in table and "active" in table

    shown = plane.json("tenant", "show", "acme")
    assert isinstance(shown, dict)
    assert shown["state"] == "active" and shown["volumes"] == 0
    assert shown["id"] in plane.ok("tenant", "show", "acme").stdout

    admin = plane.new_token("--kind", "tenant-admin", "--tenant", "acme")
    assert plane.json("volume", "ls", "acme", token=admin) == []

    suspended = plane.json("tenant", "suspend", "acme")
    assert isinstance(suspended, dict) and suspended["state"] == "suspended"
    assert "suspended" in plane.error("volume", "ls", "acme", token=admin)
    assert "resumed" in plane.ok("tenant", "resume", "acme").stdout
    assert plane.json("volume", "ls", "acme", token=admin) == []
    assert "suspended" in plane.ok("tenant", "suspend", "acme").stdout
    assert plane.json("tenant", "resume", "acme") == {**shown, "state": "active"}

    assert "deleted" in plane.ok("tenant", "rm", "acme").stdout
    assert "not found" in plane.error("tenant", "show", "acme")
    assert "acme" not in [t["name"] for t in plane.json("tenant", "ls")]


def test_tenant_rm_json(plane: Plane) -> None:
    plane.tenant("gone")
    assert plane.json("tenant", "rm", "gone") == {"tenant": "gone", "deleted": True}


# --- volumes ---------------------------------------------------------------------------------


def test_volume_lifecycle(plane: Plane) -> None:
    plane.tenant("vols")
    created = plane.json(
        "volume", "create", "vols/data", "--capacity", "10G", "--inodes", "1000",
        "--block-size", "1M", "--compress", "lz4", "--trash-days", "2",
    )  # fmt: skip
    assert isinstance(created, dict)
    assert (created["tenant"], created["name"], created["state"]) == ("vols", "data", "active")
    assert created["capacity"] == 10 << 30 and created["inodes"] == 1000
    assert created["block_size"] == 1 << 20 and created["compress"] == "lz4"
    assert created["trash_days"] == 2 and created["engine"] == "sqlite"
    assert "already" in plane.error("volume", "create", "vols/data")

    run = plane.ok("volume", "create", "vols/plain")
    assert "vols/plain" in run.stdout and "unlimited" in run.stdout

    table = plane.ok("volume", "ls", "vols").stdout
    assert "data" in table and "plain" in table and "10.0 GiB" in table
    listed = plane.json("volume", "ls", "vols")
    assert sorted(v["name"] for v in listed) == ["data", "plain"]

    shown = plane.ok("volume", "show", "vols/data").stdout
    for text in (created["uuid"], created["id"], "10.0 GiB", "1.0 MiB", "lz4", "1000"):
        assert str(text) in shown
    assert plane.json("volume", "show", "vols/data") == created

    changed = plane.json("volume", "set", "vols/data", "--capacity", "20G")
    assert isinstance(changed, dict)
    assert changed["capacity"] == 20 << 30 and changed["inodes"] == 1000
    run = plane.ok("volume", "set", "vols/data", "--inodes", "0", "--capacity", "512M")
    assert "512.0 MiB" in run.stdout and "unlimited" in run.stdout
    assert "nothing to change" in plane.error("volume", "set", "vols/data")

    usage = plane.json("volume", "usage", "vols", "--refresh")
    assert isinstance(usage, dict) and usage["tenant"] == "vols"
    assert sorted(v["name"] for v in usage["volumes"]) == ["data", "plain"]
    assert usage["inodes"] >= 2  # each volume's root directory at least
    table = plane.ok("volume", "usage", "vols").stdout
    assert "total" in table and "data" in table

    # rm asks first; anything but yes keeps the volume
    run = plane.run("volume", "rm", "vols/data", input="n\n")
    question, error = run.error_lines
    assert run.code == 1 and question.startswith("Delete volume 'vols/data'?")
    assert error.startswith("loft: error: aborted")
    assert plane.json("volume", "show", "vols/data")["state"] == "active"

    run = plane.run("volume", "rm", "vols/data", input="yes\n")
    assert "restore" in ok(run).stdout
    deleted = plane.json("volume", "show", "vols/data")
    assert isinstance(deleted, dict)
    assert deleted["state"] == "deleting" and deleted["delete_after"]
    assert "deleting" in plane.ok("volume", "ls", "vols").stdout
    # a volume in its grace period still belongs to the tenant
    assert "volume" in plane.error("tenant", "rm", "vols")

    restored = plane.json("volume", "restore", "vols/data")
    assert isinstance(restored, dict)
    assert restored["state"] == "active" and restored["delete_after"] is None
    assert "restored" in plane.ok("volume", "restore", "vols/data").stdout

    gone = plane.json("volume", "rm", "vols/plain", "--yes")
    assert isinstance(gone, dict) and gone["state"] == "deleting"
    assert "destroyed" in plane.ok("volume", "rm", "vols/data", "--yes", "--purge").stdout
    assert "not found" in plane.error("volume", "show", "vols/data")
    plane.ok("volume", "rm", "vols/plain", "--yes", "--purge")
    plane.ok("tenant", "rm", "vols")


def test_volume_bad_input(plane: Plane) -> None:
    plane.tenant("badvol")
    assert "TENANT/NAME" in plane.error("volume", "create", "badvol")
    assert "TENANT/NAME" in plane.error("volume", "show", "badvol/a/b")
    assert "TENANT/NAME" in plane.error("volume", "rm", "/x", "--yes")
    line = plane.error("volume", "create", "badvol/v1", "--capacity", "10X")
    assert "--capacity" in line and "invalid size" in line
    assert "--inodes" in plane.error("volume", "create", "badvol/v1", "--inodes", "-1")
    assert "--compress" in plane.error("volume", "create", "badvol/v1", "--compress", "gzip")
    # the server's validation: one line naming the field
    line = plane.error("volume", "create", "badvol/v1", "--block-size", "1K")
    assert "block_size" in line
    line = plane.error("volume", "create", "badvol/Bad_Name")
    assert line.startswith("loft: error: name: ")
    assert "not found" in plane.error("volume", "ls", "nosuchtenant")
    assert "not found" in plane.error("volume", "show", "badvol/nosuchvolume")
    assert plane.json("volume", "ls", "badvol") == []
    plane.ok("tenant", "rm", "badvol")


# --- tokens ----------------------------------------------------------------------------------


def test_tokens(plane: Plane) -> None:
    plane.tenant("tok")
    plane.tenant("other")
    plane.ok("volume", "create", "tok/vol")
    plane.ok("volume", "create", "other/vol")

    admin = plane.new_token("--kind", "tenant-admin", "--tenant", "tok", "--name", "ci")
    mount = plane.new_token(
        "--kind", "mount", "--volume", "tok/vol", "--read-only", "--expires", "30d"
    )
    # a tenant admin makes mount tokens of its own tenant without naming it
    mount_rw = plane.new_token("--kind", "mount", "--volume", "vol", token=admin)
    operator2 = plane.new_token("--kind", "operator", "--name", "second")

    tokens = plane.json("token", "ls", "--tenant", "tok")
    assert isinstance(tokens, list)
    by_id = {t["id"]: t for t in tokens}
    admin_id, mount_id = token_id(plane, admin), token_id(plane, mount)
    assert by_id[admin_id]["kind"] == "tenant-admin" and by_id[admin_id]["name"] == "ci"
    m = by_id[mount_id]
    assert (m["kind"], m["tenant"], m["volume"], m["read_only"]) == ("mount", "tok", "vol", True)
    expires = dt.datetime.fromisoformat(m["expires_at"])
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    assert abs((expires - expected).total_seconds()) < 120
    assert by_id[token_id(plane, mount_rw)]["read_only"] is False
    assert token_id(plane, operator2) not in by_id

    table = plane.ok("token", "ls").stdout
    for text in (admin_id, mount_id, "tenant-admin", "mount (ro)", "tok/vol", "active"):
        assert text in table
    # a tenant admin sees its own tenant's tokens only, and nothing of another tenant
    own = plane.json("token", "ls", token=admin)
    assert {t["tenant"] for t in own} == {"tok"}
    assert "not found" in plane.error("volume", "ls", "other", token=admin)
    assert "not found" in plane.error("token", "ls", "--tenant", "other", token=admin)
    assert "operator" in plane.error("tenant", "create", "sneaky", token=admin)
    assert "operator" in plane.error("token", "create", "--kind", "operator", token=admin)
    # a mount token does nothing but fetch its mount configuration
    assert plane.error("volume", "ls", "tok", token=mount)
    with PlaneClient(plane.url, mount) as client:
        config = client.mount_config("tok", "vol")
    assert config["read_only"] is True and len(config["encryption_key"]) == 64

    # the operator token made by 'token create' is a working operator token
    plane.ok("tenant", "ls", token=operator2)

    assert "revoked" in plane.ok("token", "revoke", mount_id).stdout
    assert "invalid or revoked" in plane.error("volume", "ls", "tok", token=mount)
    assert plane.json("token", "revoke", admin_id) == {"id": admin_id, "revoked": True}
    assert "invalid or revoked" in plane.error("volume", "ls", "tok", token=admin)
    states = {t["id"]: t["revoked_at"] for t in plane.json("token", "ls")}
    assert states[mount_id] and states[admin_id]
    assert "revoked" in plane.ok("token", "ls", "--tenant", "tok").stdout
    assert "not found" in plane.error("token", "revoke", "tok_0000000000000000")

    token_json = json.loads(
        ok(
            loft(
                "token", "create", "--kind", "tenant-admin", "--tenant", "tok", "--json",
                env={"LOFT_CONTROL_URL": plane.url, "LOFT_TOKEN": plane.operator},
            )
        ).stdout
    )  # fmt: skip
    assert token_json["token"].startswith("loft_") and token_json["kind"] == "tenant-admin"
    plane.server.secrets.add(token_json["token"])

    for ref in ("tok/vol", "other/vol"):
        plane.ok("volume", "rm", ref, "--yes", "--purge")
    plane.ok("tenant", "rm", "tok")
    plane.ok("tenant", "rm", "other")


def test_token_bad_input(plane: Plane) -> None:
    assert "--kind" in plane.error("token", "create", "--kind", "root")
    assert "duration" in plane.error("token", "create", "--kind", "operator", "--expires", "soon")
    assert "--expires" in plane.error("token", "create", "--kind", "operator", "--expires", "0d")
    assert "disagree" in plane.error(
        "token", "create", "--kind", "mount", "--tenant", "a", "--volume", "b/c"
    )
    plane.tenant("tokbad")
    assert "needs a volume" in plane.error(
        "token", "create", "--kind", "mount", "--tenant", "tokbad"
    )
    assert "not found" in plane.error(
        "token", "create", "--kind", "mount", "--volume", "nosuch/vol"
    )
    plane.ok("tenant", "rm", "tokbad")
    assert "operator token has no" in plane.error(
        "token", "create", "--kind", "operator", "--read-only"
    )
    run = plane.run("token", "create")
    assert run.code == 2 and "--kind" in run.stderr


# --- node groups -----------------------------------------------------------------------------


SPEC: dict[str, Any] = {
    "nodes": ["gpu-01", "gpu-02"],
    "mounts": [
        {
            "tenant": "ngt",
            "volume": "data",
            "mountpoint": "/mnt/data",
            "read_only": True,
            "options": {"cache_size": "100G", "writeback": True},
        }
    ],
}


def test_nodegroups(plane: Plane, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    plane.tenant("ngt")
    assert "ngt/data not found" in plane.error("nodegroup", "apply", "train", "--file", str(spec))
    plane.ok("volume", "create", "ngt/data")
    run = plane.ok("nodegroup", "apply", "train", "--file", str(spec))
    assert "generation 1" in run.stdout and "2 nodes" in run.stdout and "1 mount" in run.stdout

    spec2 = {**SPEC, "nodes": ["gpu-03"]}
    result = ok(
        plane.run("nodegroup", "apply", "train", "--file", "-", "--json", input=json.dumps(spec2))
    )
    group = json.loads(result.stdout)
    assert group["generation"] == 2 and group["nodes"] == ["gpu-03"]
    assert group["mounts"][0]["mountpoint"] == "/mnt/data"

    listed = plane.json("nodegroup", "ls")
    assert [g["name"] for g in listed] == ["train"]
    table = plane.ok("nodegroup", "ls").stdout
    assert "train" in table
    shown = plane.ok("nodegroup", "show", "train").stdout
    for text in ("gpu-03", "/mnt/data", "ngt/data", "ro", "cache_size=100G"):
        assert text in shown
    assert plane.json("nodegroup", "show", "train") == group

    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [}')
    assert "not valid JSON" in plane.error("nodegroup", "apply", "x", "--file", str(bad))
    bad.write_text("[1, 2]")
    assert "JSON object" in plane.error("nodegroup", "apply", "x", "--file", str(bad))
    assert "does not exist" in plane.error(
        "nodegroup", "apply", "x", "--file", str(tmp_path / "missing.json")
    )
    bad.write_text(json.dumps({"mounts": [{**SPEC["mounts"][0], "mountpoint": "relative"}]}))
    assert "mountpoint" in plane.error("nodegroup", "apply", "x", "--file", str(bad))
    bad.write_text(json.dumps({"nodes": [], "colour": "blue"}))
    assert "colour" in plane.error("nodegroup", "apply", "x", "--file", str(bad))

    assert "deleted" in plane.ok("nodegroup", "rm", "train").stdout
    assert "not found" in plane.error("nodegroup", "show", "train")
    assert plane.json("nodegroup", "ls") == []
    plane.ok("volume", "rm", "ngt/data", "--yes", "--purge")
    plane.ok("tenant", "rm", "ngt")


# --- audit -----------------------------------------------------------------------------------


def test_audit(plane: Plane) -> None:
    plane.tenant("aud")
    plane.ok("volume", "create", "aud/vol1")
    plane.ok("volume", "set", "aud/vol1", "--capacity", "1G")
    rows = plane.json("audit", "--tenant", "aud")
    assert isinstance(rows, list)
    actions = [r["action"] for r in rows]
    assert "tenant.create" in actions and "volume.create" in actions
    assert all(r["tenant"] == "aud" for r in rows)
    operator_id = token_id(plane, plane.operator)
    assert {r["actor"] for r in rows} == {operator_id}

    only = plane.json("audit", "--action", "tenant.create", "--tenant", "aud")
    assert [r["action"] for r in only] == ["tenant.create"]
    assert len(plane.json("audit", "--limit", "1")) == 1
    assert plane.json("audit", "--tenant", "aud", "--since", "1h") == rows
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert plane.json("audit", "--tenant", "aud", "--since", later) == []
    assert plane.json("audit", "--actor", operator_id, "--tenant", "aud") == rows

    table = plane.ok("audit", "--tenant", "aud").stdout
    assert "tenant.create" in table and "volume.create" in table and "aud/vol1" in table

    assert "--since" in plane.error("audit", "--since", "yesterday")
    assert "--limit" in plane.error("audit", "--limit", "0")
    admin = plane.new_token("--kind", "tenant-admin", "--tenant", "aud")
    assert "operator" in plane.error("audit", token=admin)

    plane.ok("volume", "rm", "aud/vol1", "--yes", "--purge")
    plane.ok("tenant", "rm", "aud")


# --- connection and credentials --------------------------------------------------------------


def test_credentials_and_connection_errors(plane: Plane) -> None:
    unset = {"LOFT_CONTROL_URL": "", "LOFT_TOKEN": ""}
    line = check_clean_error(loft("tenant", "ls", env=unset))
    assert "--control" in line and "LOFT_CONTROL_URL" in line
    line = check_clean_error(loft("tenant", "ls", "--control", plane.url, env=unset))
    assert "--token" in line and "LOFT_TOKEN" in line
    # flags instead of the environment
    run = ok(loft("tenant", "ls", "--control", plane.url, "--token", plane.operator, env=unset))
    assert plane.operator not in run.stdout + run.stderr
    assert "Tenants" in run.stdout

    wrong = "loft_" + "x" * 43
    line = plane.error("tenant", "ls", token=wrong)
    assert line == "loft: error: invalid or revoked token"
    line = check_clean_error(
        loft("tenant", "ls", "--control", plane.url, "--token", wrong, env=unset)
    )
    assert wrong not in line

    dead = f"http://127.0.0.1:{free_port()}"
    line = check_clean_error(
        loft("tenant", "ls", env={"LOFT_CONTROL_URL": dead, "LOFT_TOKEN": wrong})
    )
    assert line == f"loft: error: cannot reach the control plane at {dead}: connection refused"
    line = check_clean_error(
        loft("tenant", "ls", "--control", "ftp://h", env={"LOFT_TOKEN": wrong})
    )
    assert "ftp://h" in line and "http" in line
    missing_ca = ["--ca-file", "/nonexistent/ca.pem"]
    line = check_clean_error(
        loft(
            "tenant",
            "ls",
            "--control",
            "https://127.0.0.1:1",
            *missing_ca,
            env={"LOFT_TOKEN": wrong},
        )
    )
    assert "/nonexistent/ca.pem" in line

    # the real program: same line, exit code 1
    run = loft_process(
        "tenant",
        "show",
        "nosuchtenant",
        env={"LOFT_CONTROL_URL": plane.url, "LOFT_TOKEN": plane.operator},
    )
    assert "not found" in check_clean_error(run)
    run = loft_process("volume", "ls", "x", env={"LOFT_CONTROL_URL": dead, "LOFT_TOKEN": wrong})
    assert "connection refused" in check_clean_error(run)


def test_client_errors(plane: Plane) -> None:
    """PlaneError carries the status and the server's sentence; no token in any message."""
    with PlaneClient(plane.url, plane.operator) as client:
        assert plane.operator not in repr(client)
        with pytest.raises(PlaneError) as info:
            client.get_tenant("nosuch")
        assert info.value.status == 404 and "nosuch" in info.value.detail
        with pytest.raises(PlaneError) as info:
            client.create_tenant("No_Good")
        assert info.value.status == 422 and str(info.value).startswith("name: ")
        assert "\n" not in str(info.value)
        assert client.healthz()["status"] == "ok"
        assert client.whoami()["kind"] == "operator"
    with PlaneClient(plane.url, "loft_nope") as client, pytest.raises(PlaneError) as info:
        client.list_tenants()
    assert info.value.status == 401 and "loft_nope" not in str(info.value)


# --- the server commands ---------------------------------------------------------------------


def test_serve_bad_input(tmp_path: Path) -> None:
    line = check_clean_error(loft("serve", "--tls-cert", str(tmp_path / "cert.pem")))
    assert "--tls-key" in line
    line = check_clean_error(loft("serve", "--config", str(tmp_path / "missing.toml")))
    assert "missing.toml" in line
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    assert "bad.toml" in check_clean_error(loft("serve", "--config", str(bad)))


def test_bootstrap_tokens_work(plane: Plane) -> None:
    """A second bootstrap token is another operator token; the server log never names one."""
    secret = bootstrap("--config", str(plane.server.config))
    assert secret != plane.operator
    plane.server.secrets.add(secret)
    plane.ok("tenant", "ls", token=secret)
    log = plane.server.log.read_text(errors="replace")
    assert "/v1/tenants" in log  # requests are logged, by path
    for known in plane.server.secrets:
        assert known not in log


def make_tls_files(where: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("loft test CA"))
        .issuer_name(name("loft test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = where / "ca.pem", where / "cert.pem", where / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    """``loft serve --tls-cert/--tls-key`` with every other path derived from ``--state-dir``;
    the CLI trusts the server only through ``--ca-file``."""
    ca, cert, key = make_tls_files(tmp_path)
    state = tmp_path / "state"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    args = ["--state-dir", str(state), "--listen", f"127.0.0.1:{port}"]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with running_server(
        [*args, *tls],
        tmp_path / "server.log",
        f"{url}/healthz",
        verify=ssl.create_default_context(cafile=ca),
    ):
        assert (state / "plane.db").exists() and (state / "master.key").exists()
        operator = bootstrap("--state-dir", str(state))
        env = {"LOFT_CONTROL_URL": url, "LOFT_TOKEN": operator}
        ok(loft("tenant", "create", "tls", "--ca-file", str(ca), env=env))
        listed = json.loads(
            ok(loft("tenant", "ls", "--json", "--ca-file", str(ca), env=env)).stdout
        )
        assert [t["name"] for t in listed] == ["tls"]
        line = check_clean_error(loft("tenant", "ls", env=env))
        assert url in line and "certificate" in line and "--ca-file" in line
        line = check_clean_error(loft("tenant", "ls", "--ca-file", str(cert), env=env))
        assert "certificate" in line  # the server's own certificate is no CA
        bad_ca = tmp_path / "bad.pem"
        bad_ca.write_text("not a certificate")
        assert "bad.pem" in check_clean_error(
            loft("tenant", "ls", "--ca-file", str(bad_ca), env=env)
        )


def test_serve_refuses_an_address_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = loft_process(
            "serve", "--state-dir", str(tmp_path / "plane"), "--listen", f"127.0.0.1:{port}"
        )
    line = check_clean_error(run)
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line
