"""The control plane API in process (FastAPI's TestClient) over a real Plane: SQLite database,
the embedded default backends (SQLite metadata files, a local directory store).

Isolation is tried as an attacker would: with tenant A's tokens, every way of reaching tenant
B's tenant, volumes and tokens, and every way a mount token could reach beyond its volume.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from loftfs.meta import open_meta
from loftfs.plane.api import create_app
from loftfs.plane.config import load_config
from loftfs.plane.models import Volume, utcnow
from loftfs.plane.server import Plane, bootstrap_token
from servers import PostgresServer


class Api:
    def __init__(self, client: TestClient, plane: Plane, operator: str) -> None:
        self.c = client
        self.plane = plane
        self.operator = operator

    def call(self, method: str, path: str, token: str | None, body: Any = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.c.request(method, path, headers=headers, json=body, **kw)

    def ok(self, method: str, path: str, token: str | None, body: Any = None) -> Any:
        r = self.call(method, path, token, body)
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json() if r.content else None

    def token(self, token: str | None = None, **body: Any) -> str:
        return self.ok("POST", "/v1/tokens", token or self.operator, body)["token"]


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """The API over a control plane database on SQLite (the default) or PostgreSQL."""
    overrides: dict[str, object] = {
        "state_dir": str(tmp_path / "plane"),
        "delete_grace": "1h",
        "usage_interval": 0,
    }
    if request.param == "postgres":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        overrides["database"] = pg.url(pg.new_database())
    config = load_config(None, overrides, environ={})
    plane = Plane(config)
    plane.start(worker=False)
    operator = bootstrap_token(config, "test")
    try:
        with TestClient(create_app(plane)) as client:
            yield Api(client, plane, operator)
    finally:
        plane.close()


@pytest.fixture
def two_tenants(api: Api) -> dict[str, str]:
    """Tenants a and b with a volume each (a also has v2), an admin token each, a mount token
    for a/v1."""
    for t in ("acme", "bravo"):
        api.ok("POST", "/v1/tenants", api.operator, {"name": t})
        api.ok("POST", f"/v1/tenants/{t}/volumes", api.operator, {"name": "vol1"})
    api.ok("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "vol2"})
    return {
        "a_admin": api.token(kind="tenant-admin", tenant="acme"),
        "b_admin": api.token(kind="tenant-admin", tenant="bravo"),
        "a_mount": api.token(kind="mount", tenant="acme", volume="vol1"),
        "a_mount_ro": api.token(kind="mount", tenant="acme", volume="vol1", read_only=True),
    }


def test_health_and_openapi(api: Api) -> None:
    assert api.c.get("/healthz").json() == {"status": "ok", "database": "ok"}
    spec = api.c.get("/openapi.json").json()
    for path in (
        "/v1/tenants",
        "/v1/tenants/{tenant}/volumes",
        "/v1/tokens",
        "/v1/nodegroups/{name}",
        "/v1/audit",
    ):
        assert path in spec["paths"]


def test_tokens_are_required_and_checked(api: Api) -> None:
    assert api.call("GET", "/v1/tenants", None).status_code == 401
    r = api.call("GET", "/v1/tenants", "loft_" + "x" * 43)
    assert r.status_code == 401 and "invalid" in r.json()["detail"]
    assert api.c.get("/v1/tenants", headers={"Authorization": "Basic abc"}).status_code == 401
    assert api.ok("GET", "/v1/whoami", api.operator)["kind"] == "operator"


def test_volume_lifecycle_on_the_embedded_default(api: Api) -> None:
    api.ok("POST", "/v1/tenants", api.operator, {"name": "acme", "display_name": "Acme Corp"})
    v = api.ok(
        "POST",
        "/v1/tenants/acme/volumes",
        api.operator,
        {"name": "train", "capacity": 1 << 30, "inodes": 1000},
    )
    assert v["state"] == "active" and v["engine"] == "sqlite" and len(v["uuid"]) == 36
    cfg = api.ok("POST", "/v1/tenants/acme/volumes/train/mount-config", api.operator)
    meta = open_meta(cfg["meta_url"])
    try:
        settings = meta.load_settings()
        assert settings.uuid == v["uuid"] and settings.name == "train"
        assert settings.capacity == 1 << 30 and settings.inodes == 1000
        assert settings.encryption  # every volume has its own key
        # quotas change at once
        api.ok("PATCH", "/v1/tenants/acme/volumes/train", api.operator, {"capacity": 5 << 20})
        assert meta.load_settings().capacity == 5 << 20
    finally:
        meta.close()
    assert api.ok("GET", "/v1/tenants/acme", api.operator)["volumes"] == 1
    r = api.call("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "train"})
    assert r.status_code == 409
    # delete: grace period, restore, delete again, purge
    gone = api.ok("DELETE", "/v1/tenants/acme/volumes/train", api.operator)
    assert gone["state"] == "deleting" and gone["delete_after"]
    r = api.call("POST", "/v1/tenants/acme/volumes/train/mount-config", api.operator)
    assert r.status_code == 409
    assert api.call("DELETE", "/v1/tenants/acme", api.operator).status_code == 409
    assert (
        api.ok("POST", "/v1/tenants/acme/volumes/train/restore", api.operator)["state"] == "active"
    )
    api.ok("DELETE", "/v1/tenants/acme/volumes/train", api.operator)
    db_file = Path(cfg["meta_url"].split("://", 1)[1].split("?")[0])
    assert db_file.exists()
    api.ok("DELETE", "/v1/tenants/acme/volumes/train?purge=true", api.operator)
    assert not db_file.exists()
    assert api.call("GET", "/v1/tenants/acme/volumes/train", api.operator).status_code == 404
    assert api.call("DELETE", "/v1/tenants/acme", api.operator).status_code == 204
    assert api.call("GET", "/v1/tenants/acme", api.operator).status_code == 404


def test_grace_period_purge_by_the_worker(api: Api) -> None:
    api.ok("POST", "/v1/tenants", api.operator, {"name": "acme"})
    api.ok("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "scratch"})
    api.ok("DELETE", "/v1/tenants/acme/volumes/scratch", api.operator)
    api.plane._purge_due()  # not due yet: the grace is an hour
    assert api.ok("GET", "/v1/tenants/acme/volumes/scratch", api.operator)["state"] == "deleting"
    with api.plane.db.session() as s:
        (v,) = s.scalars(select(Volume))
        v.state = "purging"  # as a destruction that failed half way leaves it
    r = api.call("POST", "/v1/tenants/acme/volumes/scratch/restore", api.operator)
    assert r.status_code == 409 and "too late" in r.json()["detail"]
    api.plane._purge_due()  # retried regardless of the grace
    assert api.call("GET", "/v1/tenants/acme/volumes/scratch", api.operator).status_code == 404
    actions = [e["action"] for e in api.ok("GET", "/v1/audit?tenant=acme", api.operator)]
    assert actions[:3] == ["volume.purge", "volume.delete", "volume.create"]
    purge = api.ok("GET", "/v1/audit?action=volume.purge", api.operator)[0]
    assert purge["actor"] == "system"


def test_an_abandoned_creation_is_removed(api: Api) -> None:
    """A control plane killed half way through a creation left its pieces and a "creating"
    row: the worker removes both once the row is old enough, and the name is free again."""
    from loftfs.plane.provision import VolumeSpec

    tenant = api.ok("POST", "/v1/tenants", api.operator, {"name": "acme"})
    volume_id = "v" + "ab" * 8
    secrets, _ = api.plane.provisioner.create_volume(
        VolumeSpec(volume_id=volume_id, name="half", engine="sqlite")
    )
    pieces = [Path(secrets.bucket), Path(secrets.meta_url.split("://", 1)[1].split("?")[0])]
    assert all(p.exists() for p in pieces)
    with api.plane.db.session() as s:
        s.add(
            Volume(
                id=volume_id,
                tenant_id=tenant["id"],
                name="half",
                engine="sqlite",
                state="creating",
                block_size=4 << 20,
                compress="none",
                created_at=utcnow() - dt.timedelta(seconds=60),
                updated_at=utcnow(),
            )
        )
    api.plane._sweep_abandoned()  # too young: another process may still be creating it
    assert all(p.exists() for p in pieces)
    assert (
        api.call("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "half"}).status_code
        == 409
    )
    with api.plane.db.session() as s:
        v = s.get(Volume, volume_id)
        assert v is not None
        v.created_at = utcnow() - dt.timedelta(hours=1)
    api.plane._sweep_abandoned()
    assert not any(p.exists() for p in pieces)
    assert (
        api.ok("GET", "/v1/audit?action=volume.abandoned", api.operator)[0]["target"] == "acme/half"
    )
    assert (
        api.ok("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "half"})["state"]
        == "active"
    )


def test_tenant_admin_cannot_reach_another_tenant(api: Api, two_tenants: dict[str, str]) -> None:
    a = two_tenants["a_admin"]
    b_token = api.ok("GET", "/v1/tokens?tenant=bravo", api.operator)[0]["id"]
    not_found = [
        ("GET", "/v1/tenants/bravo", None),
        ("GET", "/v1/tenants/bravo/volumes", None),
        ("GET", "/v1/tenants/bravo/volumes/vol1", None),
        ("PATCH", "/v1/tenants/bravo/volumes/vol1", {"capacity": 1}),
        ("DELETE", "/v1/tenants/bravo/volumes/vol1", None),
        ("POST", "/v1/tenants/bravo/volumes/vol1/restore", None),
        ("POST", "/v1/tenants/bravo/volumes/vol1/mount-config", None),
        ("POST", "/v1/tenants/bravo/volumes", {"name": "mine"}),
        ("GET", "/v1/tenants/bravo/usage", None),
        ("POST", "/v1/tokens", {"kind": "mount", "tenant": "bravo", "volume": "vol1"}),
        ("POST", "/v1/tokens", {"kind": "tenant-admin", "tenant": "bravo"}),
        ("GET", "/v1/tokens?tenant=bravo", None),
        ("GET", f"/v1/tokens/{b_token}", None),
        ("DELETE", f"/v1/tokens/{b_token}", None),
        # a name that does not exist answers exactly the same
        ("GET", "/v1/tenants/nosuch", None),
    ]
    for method, path, body in not_found:
        r = api.call(method, path, a, body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    forbidden = [
        ("POST", "/v1/tenants", {"name": "evil"}),
        ("POST", "/v1/tenants/acme/suspend", None),
        ("DELETE", "/v1/tenants/acme", None),
        ("POST", "/v1/tokens", {"kind": "operator"}),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/nodegroups", None),
        ("PUT", "/v1/nodegroups/gpu-a", {"nodes": [], "mounts": []}),
        ("POST", "/v1/usage/refresh", None),
        ("DELETE", "/v1/tenants/acme/volumes/vol1?purge=true", None),
    ]
    for method, path, body in forbidden:
        r = api.call(method, path, a, body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    # what it can see is its own only
    assert [t["name"] for t in api.ok("GET", "/v1/tenants", a)] == ["acme"]
    assert {t["tenant"] for t in api.ok("GET", "/v1/tokens", a)} == {"acme"}
    # b is untouched
    assert api.ok("GET", "/v1/tenants/bravo/volumes/vol1", api.operator)["state"] == "active"
    assert api.ok("GET", f"/v1/tokens/{b_token}", api.operator)["revoked_at"] is None


def test_mount_token_reaches_its_volume_only(api: Api, two_tenants: dict[str, str]) -> None:
    m = two_tenants["a_mount"]
    cfg = api.ok("POST", "/v1/tenants/acme/volumes/vol1/mount-config", m)
    assert cfg["read_only"] is False and len(cfg["encryption_key"]) == 64
    for path in (
        "/v1/tenants/acme/volumes/vol2/mount-config",
        "/v1/tenants/bravo/volumes/vol1/mount-config",
    ):
        assert api.call("POST", path, m).status_code == 404
    for method, path in (
        ("GET", "/v1/tenants/acme"),
        ("GET", "/v1/tenants/acme/volumes"),
        ("GET", "/v1/tenants/acme/volumes/vol1"),
        ("DELETE", "/v1/tenants/acme/volumes/vol1"),
        ("GET", "/v1/tokens"),
    ):
        assert api.call(method, path, m).status_code == 403, (method, path)
    r = api.call("POST", "/v1/tokens", m, {"kind": "mount", "tenant": "acme", "volume": "vol1"})
    assert r.status_code == 403
    ro = api.ok("POST", "/v1/tenants/acme/volumes/vol1/mount-config", two_tenants["a_mount_ro"])
    assert ro["read_only"] is True
    # a read-only token cannot ask for read-write
    ro = api.ok(
        "POST",
        "/v1/tenants/acme/volumes/vol1/mount-config",
        two_tenants["a_mount_ro"],
        {"read_only": False},
    )
    assert ro["read_only"] is True
    # volumes are disjoint: other metadata file, other key, other bucket
    other = api.ok("POST", "/v1/tenants/bravo/volumes/vol1/mount-config", api.operator)
    assert other["meta_url"] != cfg["meta_url"]
    assert other["encryption_key"] != cfg["encryption_key"]
    assert other["bucket"] != cfg["bucket"]


def test_revoked_expired_and_suspended_tokens_stop_at_once(
    api: Api, two_tenants: dict[str, str]
) -> None:
    m = two_tenants["a_mount"]
    token_id = api.ok("GET", "/v1/whoami", m)["token_id"]
    api.ok("DELETE", f"/v1/tokens/{token_id}", two_tenants["a_admin"])
    r = api.call("POST", "/v1/tenants/acme/volumes/vol1/mount-config", m)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    short = api.token(kind="mount", tenant="acme", volume="vol1", expires_in=1)
    api.ok("POST", "/v1/tenants/acme/volumes/vol1/mount-config", short)
    time.sleep(1.2)
    r = api.call("POST", "/v1/tenants/acme/volumes/vol1/mount-config", short)
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    api.ok("POST", "/v1/tenants/acme/suspend", api.operator)
    for token in (two_tenants["a_admin"], two_tenants["a_mount_ro"]):
        r = api.call("GET", "/v1/whoami", token)
        assert r.status_code == 403 and "suspended" in r.json()["detail"]
    assert api.call("GET", "/v1/whoami", two_tenants["b_admin"]).status_code == 200
    r = api.call("POST", "/v1/tenants/acme/volumes", api.operator, {"name": "vol3"})
    assert r.status_code == 409
    api.ok("POST", "/v1/tenants/acme/resume", api.operator)
    api.ok("GET", "/v1/whoami", two_tenants["a_admin"])


def test_tenant_admin_manages_its_own_tenant(api: Api, two_tenants: dict[str, str]) -> None:
    a = two_tenants["a_admin"]
    api.ok("POST", "/v1/tenants/acme/volumes", a, {"name": "data", "capacity": 10 << 20})
    token = api.ok("POST", "/v1/tokens", a, {"kind": "mount", "volume": "data", "name": "job-1"})
    assert token["tenant"] == "acme" and token["volume"] == "data" and token["name"] == "job-1"
    assert token["token"].startswith("loft_")
    listed = api.ok("GET", "/v1/tokens", a)
    assert all("token" not in t for t in listed)  # the secret is shown once only
    api.ok("PATCH", "/v1/tenants/acme/volumes/data", a, {"inodes": 10})
    usage = api.ok("GET", "/v1/tenants/acme/usage?refresh=true", a)
    assert {v["name"] for v in usage["volumes"]} == {"vol1", "vol2", "data"}
    assert all(v["refreshed_at"] for v in usage["volumes"])
    assert usage["inodes"] == sum(v["inodes"] for v in usage["volumes"]) >= 3


def test_nodegroups(api: Api, two_tenants: dict[str, str]) -> None:
    spec = {
        "nodes": ["gpu-01", "gpu-02"],
        "mounts": [
            {
                "tenant": "acme",
                "volume": "vol1",
                "mountpoint": "/mnt/acme/vol1",
                "options": {"cache_size": "100G", "writeback": True},
            },
            {
                "tenant": "bravo",
                "volume": "vol1",
                "mountpoint": "/mnt/bravo/vol1",
                "read_only": True,
            },
        ],
    }
    g = api.ok("PUT", "/v1/nodegroups/h100-pool", api.operator, spec)
    assert g["generation"] == 1 and g["nodes"] == ["gpu-01", "gpu-02"]
    assert api.ok("PUT", "/v1/nodegroups/h100-pool", api.operator, spec)["generation"] == 1
    spec["nodes"].append("gpu-03")
    assert api.ok("PUT", "/v1/nodegroups/h100-pool", api.operator, spec)["generation"] == 2
    assert [x["name"] for x in api.ok("GET", "/v1/nodegroups", api.operator)] == ["h100-pool"]
    bad = dict(spec, mounts=[{"tenant": "acme", "volume": "nosuch", "mountpoint": "/mnt/x"}])
    r = api.call("PUT", "/v1/nodegroups/h100-pool", api.operator, bad)
    assert r.status_code == 400 and "acme/nosuch" in r.json()["detail"]
    twice = dict(spec, mounts=[spec["mounts"][0], spec["mounts"][0]])
    assert api.call("PUT", "/v1/nodegroups/h100-pool", api.operator, twice).status_code == 400
    assert api.call("PUT", "/v1/nodegroups/Bad_Name", api.operator, spec).status_code == 400
    assert api.call("DELETE", "/v1/nodegroups/h100-pool", api.operator).status_code == 204
    assert api.call("GET", "/v1/nodegroups/h100-pool", api.operator).status_code == 404


def test_bad_input_gets_4xx_with_a_clear_message(api: Api) -> None:
    h = {"Authorization": f"Bearer {api.operator}", "Content-Type": "application/json"}
    r = api.c.post("/v1/tenants", content=b'{"name": "acme",', headers=h)
    assert r.status_code == 422 and "JSON" in json.dumps(r.json())
    r = api.c.post("/v1/tenants", json={"name": 12}, headers=h)
    assert r.status_code == 422
    r = api.c.post("/v1/tenants", json={"name": "acme", "colour": "red"}, headers=h)
    assert r.status_code == 422 and "colour" in json.dumps(r.json())
    r = api.c.post("/v1/tenants", json={"name": "Not A DNS Name"}, headers=h)
    assert r.status_code == 422
    r = api.c.post("/v1/tenants", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    api.ok("POST", "/v1/tenants", api.operator, {"name": "acme"})
    for body in (
        {"name": "vol1", "block_size": 3 << 20},
        {"name": "vol1", "capacity": -1},
        {"name": "vol1", "engine": "mysql"},
    ):
        r = api.call("POST", "/v1/tenants/acme/volumes", api.operator, body)
        assert r.status_code == 422, body
    r = api.call(
        "POST", "/v1/tenants/acme/volumes", api.operator, {"name": "vol1", "engine": "redis"}
    )
    assert r.status_code == 400 and "not configured" in r.json()["detail"]
    r = api.call("POST", "/v1/tokens", api.operator, {"kind": "mount", "tenant": "acme"})
    assert r.status_code == 400 and "needs a volume" in r.json()["detail"]


def test_audit_records_every_change_and_no_secret(
    api: Api, two_tenants: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = api.ok("POST", "/v1/tenants/acme/volumes/vol1/mount-config", two_tenants["a_mount"])
    events = api.ok("GET", "/v1/audit?limit=1000", api.operator)
    actions = {e["action"] for e in events}
    assert {"tenant.create", "volume.create", "token.create", "volume.mount-config"} <= actions
    fetch = api.ok("GET", "/v1/audit?action=volume.mount-config", api.operator)[0]
    assert fetch["tenant"] == "acme" and fetch["target"] == "acme/vol1"
    assert fetch["actor"] == api.ok("GET", "/v1/whoami", two_tenants["a_mount"])["token_id"]
    # neither the tokens nor the volume key appear in the database, the audit or the logs
    secrets = [*two_tenants.values(), api.operator, cfg["encryption_key"]]
    dump = _dump_tables(api.plane)
    text = json.dumps(events) + caplog.text
    for s in secrets:
        assert s not in dump and s not in text
    assert cfg["encryption_key"].upper() not in dump


def _dump_tables(plane: Plane) -> str:
    """Every row of every table of the control plane's database, as text."""
    from sqlalchemy import text

    from loftfs.plane.models import Base

    rows = []
    with plane.db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows += [repr(tuple(r)) for r in conn.execute(text(f"SELECT * FROM {table.name}"))]
    assert len(rows) > 10
    return "\n".join(rows)


def test_migrations_match_the_models(api: Api) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from loftfs.plane.models import Base

    with api.plane.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
