"""``loft serve``: the control plane process. ``Plane`` holds what the API works with (database,
provisioner, master key) and runs one background worker that purges volumes whose deletion grace
has passed and refreshes usage every ``usage_interval`` seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import sys
import threading
import time
from typing import Any

from sqlalchemy import and_, or_, select

from loftfs.errors import ConfigError, LoftError
from loftfs.plane.auth import OPERATOR, Principal
from loftfs.plane.config import PlaneConfig
from loftfs.plane.db import Database
from loftfs.plane.models import Volume, utcnow
from loftfs.plane.provision import Provisioner, VolumeSecrets, VolumeSpec
from loftfs.plane.secrets import MasterKey, load_master_key

log = logging.getLogger("loftfs.plane")

ABANDONED_AFTER_S = 600.0  # a volume still "creating" after this was abandoned by its process


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "botocore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Plane:
    """The control plane's state, shared by the API and the background worker."""

    def __init__(
        self,
        config: PlaneConfig,
        *,
        db: Database | None = None,
        provisioner: Provisioner | None = None,
        master_key: MasterKey | None = None,
    ) -> None:
        self.config = config
        self.db = db or Database(config.server.database)
        self.master_key = master_key or load_master_key(config.server.master_key_file, create=True)
        self.provisioner = provisioner or Provisioner(config)
        self._wake = threading.Event()
        self._usage_due = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, *, check: bool = True, worker: bool = True) -> None:
        """Migrate the database, check the backends, start the worker."""
        self.db.migrate()
        if check:
            self.provisioner.check()
        if worker:
            self._worker = threading.Thread(target=self._run, name="plane-worker", daemon=True)
            self._worker.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.db.close()

    def _sweep_abandoned(self) -> None:
        """Creations that never finished (their process died half way): after
        ``ABANDONED_AFTER_S`` (far longer than any creation takes, so another control plane
        process that is still creating is never disturbed) the pieces made on the backends are
        removed, found by the volume id, and the name is free again."""
        cutoff = utcnow() - dt.timedelta(seconds=ABANDONED_AFTER_S)
        with self.db.session() as s:
            rows = [
                (v.id, v.engine, v.name, v.tenant.name)
                for v in s.scalars(
                    select(Volume).where(Volume.state == "creating", Volume.created_at < cutoff)
                )
            ]
        for volume_id, engine, name, tenant in rows:
            from loftfs.plane.api import audit

            try:
                self.provisioner.destroy_volume(self.provisioner.leftovers(volume_id, engine))
            except LoftError as e:
                log.error("removing the pieces of abandoned volume %s failed: %s", volume_id, e)
                continue
            with self.db.session() as s:
                v = s.get(Volume, volume_id)
                if v is not None and v.state == "creating":
                    s.delete(v)
                    audit(
                        s,
                        None,
                        "volume.abandoned",
                        tenant=tenant,
                        target=f"{tenant}/{name}",
                        detail={"volume_id": volume_id},
                    )
            log.warning(
                "volume %s/%s (%s): an unfinished creation was removed", tenant, name, volume_id
            )

    # --- secrets -------------------------------------------------------------------------------

    def seal(self, volume_id: str, secrets: VolumeSecrets) -> str:
        return self.master_key.seal(secrets.to_json().encode(), f"volume:{volume_id}")

    def unseal(self, v: Volume) -> VolumeSecrets:
        return VolumeSecrets.from_json(self.master_key.open(v.secrets, f"volume:{v.id}").decode())

    # --- volume work ---------------------------------------------------------------------------

    def create_volume(self, v: Volume) -> tuple[VolumeSecrets, str]:
        spec = VolumeSpec(
            volume_id=v.id,
            name=v.name,
            engine=v.engine,
            block_size=v.block_size,
            compress=v.compress,
            capacity=v.capacity,
            inodes=v.inodes,
            trash_days=v.trash_days,
        )
        return self.provisioner.create_volume(spec)

    def purge_volume(self, volume_id: str, who: Principal | None) -> bool:
        """Destroy a deleting volume's data, metadata and credentials, then forget it. False
        when it is not (or no longer) being deleted. The volume is marked ``purging`` first, so
        a restore racing with the destruction is refused instead of reviving a husk."""
        from loftfs.plane.api import audit

        with self.db.session() as s:
            v = s.get(Volume, volume_id)
            if v is None or v.state not in ("deleting", "purging"):
                return False
            v.state = "purging"  # no restore from here on: the data is going
            secrets = self.unseal(v) if v.secrets else None
            tenant_name, name = v.tenant.name, v.name
        if secrets is not None:
            self.provisioner.destroy_volume(secrets)
        with self.db.session() as s:
            v = s.get(Volume, volume_id)
            if v is None:
                return True
            s.delete(v)
            audit(s, who, "volume.purge", tenant=tenant_name, target=f"{tenant_name}/{name}")
        log.info("volume %s/%s (%s) destroyed", tenant_name, name, volume_id)
        return True

    def refresh_usage(self, volume_id: str) -> None:
        with self.db.session() as s:
            v = s.get(Volume, volume_id)
            if v is None or v.state != "active" or not v.secrets:
                return
            secrets = self.unseal(v)
        usage = self.provisioner.usage(secrets)
        with self.db.session() as s:
            v = s.get(Volume, volume_id)
            if v is None:
                return
            v.usage_bytes, v.usage_inodes, v.usage_objects = (
                usage.bytes,
                usage.inodes,
                usage.objects,
            )
            v.usage_at = utcnow()

    def wake(self, *, usage: bool = False) -> None:
        if usage:
            self._usage_due.set()
        self._wake.set()

    # --- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.server.usage_interval
        next_usage = time.monotonic()
        while not self._stop.is_set():
            try:
                self._sweep_abandoned()
                self._purge_due()
                if self._usage_due.is_set() or (interval > 0 and time.monotonic() >= next_usage):
                    self._usage_due.clear()
                    self._refresh_all()
                    next_usage = time.monotonic() + interval
            except Exception:
                log.exception("control plane worker step failed; retrying")
            self._wake.wait(timeout=min(30.0, interval) if interval > 0 else 30.0)
            self._wake.clear()

    def _purge_due(self) -> None:
        with self.db.session() as s:
            due = list(
                s.scalars(
                    select(Volume.id).where(
                        or_(
                            and_(Volume.state == "deleting", Volume.delete_after <= utcnow()),
                            Volume.state == "purging",  # a destroy that failed: again
                        )
                    )
                )
            )
        for volume_id in due:
            if self._stop.is_set():
                return
            try:
                self.purge_volume(volume_id, None)
            except LoftError as e:
                log.error("destroying volume %s failed (retried later): %s", volume_id, e)

    def _refresh_all(self) -> None:
        with self.db.session() as s:
            ids = list(s.scalars(select(Volume.id).where(Volume.state == "active")))
        for volume_id in ids:
            if self._stop.is_set():
                return
            try:
                self.refresh_usage(volume_id)
            except LoftError as e:
                log.warning("usage of volume %s not refreshed: %s", volume_id, e)


def bootstrap_token(config: PlaneConfig, name: str = "bootstrap") -> str:
    """A new operator token written straight into the database: how the first operator gets in
    (run on the control plane's host, which holds the database). Returned once, never stored."""
    from loftfs.plane.api import audit, create_token_row

    db = Database(config.server.database)
    try:
        db.migrate()
        with db.session() as s:
            row, secret = create_token_row(s, kind=OPERATOR, created_by="bootstrap", name=name)
            who = Principal(token_id="bootstrap", kind="bootstrap")
            audit(s, who, "token.create", target=row.id, detail={"kind": OPERATOR}, status=201)
    finally:
        db.close()
    return secret


def _check_listen(host: str, port: int) -> None:
    """A one-line error now, not a log line later, when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}"
            ) from None


def serve(config: PlaneConfig) -> None:
    """Run the control plane until SIGTERM/SIGINT."""
    import uvicorn

    from loftfs.plane.api import create_app

    setup_json_logging()
    host, port = config.server.host, config.server.port
    tls = bool(config.server.tls_cert)
    if tls != bool(config.server.tls_key):
        raise ConfigError("give both tls_cert and tls_key (or neither)")
    _check_listen(host, port)
    plane = Plane(config)
    plane.start()
    log.info(
        "control plane listening",
        extra={
            "fields": {
                "listen": f"{'https' if tls else 'http'}://{host}:{port}",
                "database": plane.db.describe(),
                "engines": plane.provisioner.engines(),
                "config": config.describe(),
            }
        },
    )
    try:
        uvicorn.run(
            create_app(plane),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            ssl_certfile=config.server.tls_cert or None,
            ssl_keyfile=config.server.tls_key or None,
            server_header=False,
        )
    finally:
        plane.close()
