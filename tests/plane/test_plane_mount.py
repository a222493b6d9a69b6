"""End to end: a real ``loft serve``, one API call that creates a volume, and a real FUSE mount
of it with ``loft mount --control`` and a volume-scoped token, on the embedded default (SQLite +
local directory) and on Redis + SeaweedFS.

Checked as the issue asks: the volume works like any other; the capacity quota gives ENOSPC at
the mount and leaves no corrupt file; a changed quota reaches the running mount; a token of
volume X cannot mount Y; a revoked token stops at once; no secret (token, metadata password,
storage key, volume key) shows in the process list, the mount process's environment, the mount
record, the logs or the CLI's output; one volume's mount credentials cannot read another's
objects even given their keys.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loftfs.errors import ObjectCorrupted, ObjectNotFound
from loftfs.fuse.mount import RECORD_DIR
from loftfs.object import create_storage
from loftfs.object.encrypt import EncryptedStore
from loftfs.plane.provision import VolumeSecrets
from servers import RedisServer, SeaweedServer

pytestmark = pytest.mark.mount

LOFT = [sys.executable, "-m", "loftfs.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    operator: str
    proc: subprocess.Popen[bytes]
    log: Path
    root: Path

    def api(self, method: str, path: str, token: str | None = None, body: object = None) -> dict:
        r = httpx.request(
            method,
            self.url + path,
            headers={"Authorization": f"Bearer {token or self.operator}"},
            json=body,
            timeout=60,
        )
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json() if r.content else {}


def _config(stack: str, root: Path, request: pytest.FixtureRequest) -> str:
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{free_port()}"',
        f'state_dir = "{root}"',
        'delete_grace = "1h"',
        "usage_interval = 0",
    ]
    if stack == "redis-s3":
        redis: RedisServer = request.getfixturevalue("redis_server")
        seaweed: SeaweedServer = request.getfixturevalue("seaweed_server")
        lines += [
            "[storage]",
            'kind = "s3"',
            f'endpoint = "{seaweed.endpoint}"',
            f'access_key = "{seaweed.access_key}"',
            f'secret_key = "{seaweed.secret_key}"',
            f'bucket_prefix = "lt-{os.getpid()}-"',
            "[metadata]",
            'default = "redis"',
            f'redis_url = "{redis.url(0)}"',
        ]
    path = root / "plane.toml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(params=["embedded", "redis-s3"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "plane"
    config = _config(request.param, root, request)
    boot = subprocess.run(
        [*LOFT, "plane", "bootstrap", "--config", config, "--name", "first"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert boot.returncode == 0, boot.stderr
    operator = next(w for w in boot.stdout.split() if w.startswith("loft_"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*LOFT, "serve", "--config", config], stdout=out, stderr=out, stdin=subprocess.DEVNULL
        )
    listen = next(
        ln.split('"')[1] for ln in Path(config).read_text().splitlines() if ln.startswith("listen")
    )
    url = f"http://{listen}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    try:
        yield Served(url, operator, proc, log, tmp_path)
    finally:
        proc.terminate()
        proc.wait(30)


def mount(
    served: Served, token: str, ref: str, mnt: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOFT_")}
    env["LOFT_TOKEN"] = token
    return subprocess.run(
        [
            *LOFT,
            "mount",
            "--control",
            served.url,
            ref,
            str(mnt),
            "-d",
            "--cache-dir",
            str(served.root / "cache"),
            "--log",
            str(served.root / f"mount-{mnt.name}.log"),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def umount(mnt: Path) -> None:
    subprocess.run([*LOFT, "umount", str(mnt)], capture_output=True, timeout=120, check=False)


def mount_pid(mnt: Path) -> int:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True
    )
    assert out.returncode == 0, f"{mnt} is not mounted"
    for rec in RECORD_DIR.glob("*.json"):
        data = json.loads(rec.read_text())
        if data["mountpoint"] == str(mnt):
            return int(data["pid"])
    raise AssertionError(f"no mount record for {mnt}")


def test_volume_from_one_call_mounts_with_a_scoped_token(served: Served) -> None:
    s = served
    s.api("POST", "/v1/tenants", body={"name": "acme"})
    s.api("POST", "/v1/tenants", body={"name": "bravo"})
    vol = s.api("POST", "/v1/tenants/acme/volumes", body={"name": "train", "capacity": 64 << 20})
    s.api("POST", "/v1/tenants/bravo/volumes", body={"name": "train"})
    s.api("POST", "/v1/tenants/acme/volumes", body={"name": "other"})
    token = s.api(
        "POST", "/v1/tokens", body={"kind": "mount", "tenant": "acme", "volume": "train"}
    )["token"]
    a_cfg = s.api("POST", "/v1/tenants/acme/volumes/train/mount-config")
    b_cfg = s.api("POST", "/v1/tenants/bravo/volumes/train/mount-config")
    mnt = s.root / "mnt" / "train"
    done = mount(s, token, "acme/train", mnt)
    assert done.returncode == 0, done.stderr
    try:
        # works like any other volume
        payload = os.urandom(3 << 20) + b"tail"
        (mnt / "data").mkdir()
        (mnt / "data" / "a.bin").write_bytes(payload)
        for i in range(50):
            (mnt / "data" / f"small-{i}.txt").write_text(f"file {i}\n")
        os.rename(mnt / "data" / "small-0.txt", mnt / "data" / "renamed.txt")
        assert (mnt / "data" / "a.bin").read_bytes() == payload
        assert len(os.listdir(mnt / "data")) == 51
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize <= 64 << 20  # df shows the quota

        # no secret anywhere a tenant (or another user) could look
        pid = mount_pid(mnt)
        secrets = [token, s.operator, a_cfg["encryption_key"], a_cfg["meta_url"]]
        secrets += [v for k, v in a_cfg["storage_options"].items() if k == "secret_key"]
        if "@" in a_cfg["meta_url"]:
            secrets.append(a_cfg["meta_url"].split("://", 1)[1].split("@", 1)[0].split(":", 1)[1])
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        record = "".join(p.read_text() for p in RECORD_DIR.glob("*.json"))
        logs = (
            s.log.read_text() + (s.root / "mount-train.log").read_text() + done.stdout + done.stderr
        )
        for secret in secrets:
            for where, text in (
                ("ps", ps),
                ("cmdline", cmdline),
                ("environ", environ),
                ("record", record),
                ("logs", logs),
            ):
                assert secret not in text, f"a secret shows in {where}"
        assert "control:acme/train" in record

        # capacity: ENOSPC at the mount, not a corrupt file
        big = os.urandom(1 << 20)
        with pytest.raises(OSError) as info, open(mnt / "fill.bin", "wb") as f:
            for _ in range(80):
                f.write(big)
                f.flush()
            os.fsync(f.fileno())
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
        size = (mnt / "fill.bin").stat().st_size
        assert size < 64 << 20
        data = (mnt / "fill.bin").read_bytes()
        assert len(data) == size and all(
            data[i : i + len(big)] == big[: len(data) - i] for i in range(0, len(data), len(big))
        )
        os.unlink(mnt / "fill.bin")
        # a changed quota reaches the running mount within seconds: no capacity limit any
        # more, and an inode quota 5 above what is used
        used = s.api("GET", "/v1/tenants/acme/usage?refresh=true")["volumes"]
        inodes = next(v for v in used if v["name"] == "train")["inodes"]
        s.api("PATCH", "/v1/tenants/acme/volumes/train", body={"capacity": 0, "inodes": inodes + 5})
        time.sleep(6)
        with open(mnt / "fill.bin", "wb") as f:
            for _ in range(80):
                f.write(big)
        assert (mnt / "fill.bin").stat().st_size == 80 << 20
        os.unlink(mnt / "fill.bin")
        made = 0
        with pytest.raises(OSError) as info:
            for i in range(10):
                (mnt / f"n{i}").write_text("x")
                made += 1
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT) and 4 <= made <= 5
        s.api("PATCH", "/v1/tenants/acme/volumes/train", body={"inodes": 0})

        # usage is refreshed from the volume
        usage = s.api("GET", "/v1/tenants/acme/usage?refresh=true")
        train = next(v for v in usage["volumes"] if v["name"] == "train")
        assert train["inodes"] >= 56 and train["bytes"] >= len(payload) and train["objects"] >= 1
    finally:
        umount(mnt)

    # the token of acme/train mounts nothing else
    for ref in ("acme/other", "bravo/train"):
        other = mount(s, token, ref, s.root / "mnt" / "denied")
        assert other.returncode == 1 and "not found" in other.stderr, other.stderr
        assert token not in other.stderr + other.stdout
    # a revoked token stops at once
    token_id = s.api("GET", "/v1/whoami", token)["token_id"]
    s.api("DELETE", f"/v1/tokens/{token_id}")
    again = mount(s, token, "acme/train", s.root / "mnt" / "again")
    assert again.returncode == 1 and "revoked" in again.stderr, again.stderr

    # acme's credentials cannot read bravo's objects, even given their keys
    a = VolumeSecrets.from_json(json.dumps(_secrets(a_cfg)))
    b = VolumeSecrets.from_json(json.dumps(_secrets(b_cfg)))
    b_store = create_storage(b.storage, b.bucket, compress="none", **b.storage_options)
    b_keys = [o.key for o in b_store.list(prefix=f"{b_cfg['uuid']}/")]
    assert b_keys
    a_raw = create_storage(a.storage, a.bucket, compress="none", **a.storage_options)
    for key in b_keys:
        with pytest.raises(ObjectNotFound):
            a_raw.get(key)  # another bucket or prefix: not there
    # and copied into acme's own bucket, bravo's blocks do not open with acme's key
    a_enc = EncryptedStore(a_raw, bytes.fromhex(a_cfg["encryption_key"]), volume="train")
    chunks = [k for k in b_keys if "/chunks/" in k]
    for key in chunks[:3]:
        a_raw.put(key, b_store.get(key))
        with pytest.raises(ObjectCorrupted):
            a_enc.get(key)
        a_raw.delete(key)
    assert vol["uuid"] == a_cfg["uuid"]


def _secrets(cfg: dict) -> dict:
    return {
        "meta_url": cfg["meta_url"],
        "storage": cfg["storage"],
        "bucket": cfg["bucket"],
        "storage_options": cfg["storage_options"],
        "data_key": cfg["encryption_key"],
        "admin": {},
    }


def test_read_only_token_mounts_read_only(served: Served) -> None:
    s = served
    s.api("POST", "/v1/tenants", body={"name": "acme"})
    s.api("POST", "/v1/tenants/acme/volumes", body={"name": "weights"})
    admin = s.api("POST", "/v1/tokens", body={"kind": "tenant-admin", "tenant": "acme"})["token"]
    rw = s.root / "mnt" / "rw"
    assert mount(s, admin, "acme/weights", rw).returncode == 0
    try:
        (rw / "model.bin").write_bytes(b"w" * 100_000)
    finally:
        umount(rw)
    ro_token = s.api(
        "POST",
        "/v1/tokens",
        admin,
        {"kind": "mount", "volume": "weights", "read_only": True},
    )["token"]
    ro = s.root / "mnt" / "ro"
    done = mount(s, ro_token, "weights", ro)  # VOLUME alone: the token's tenant
    assert done.returncode == 0, done.stderr
    try:
        assert (ro / "model.bin").read_bytes() == b"w" * 100_000
        with pytest.raises(OSError) as info:
            (ro / "new.txt").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        umount(ro)
