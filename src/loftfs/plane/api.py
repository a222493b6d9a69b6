"""The control plane's HTTP API (FastAPI). ``create_app(plane)`` builds it over a ``Plane``
(database, provisioner, master key: see ``server.py``).

Scoping rules, applied by every route through ``_tenant`` / ``_volume`` / ``_token``:
- an operator token reaches everything;
- a tenant-admin token reaches its own tenant only: anything of another tenant is a 404, exactly
  as if it did not exist, so names never leak;
- a mount token reaches only ``mount-config`` of its own volume (anything else: 403, its own
  volume's siblings: 404);
- a missing, unknown, expired or revoked token is a 401; a suspended tenant's tokens get 403.
Every change writes one audit row in the same transaction as the change itself.
"""

import datetime as dt
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loftfs import __version__
from loftfs.errors import LoftError
from loftfs.plane import schemas as S
from loftfs.plane.auth import (
    LAST_USED_EVERY_S,
    MOUNT,
    OPERATOR,
    TENANT_ADMIN,
    Principal,
    new_id,
    new_token,
    token_hash,
)
from loftfs.plane.models import AuditEvent, NodeGroup, Tenant, Token, Volume, utcnow

if TYPE_CHECKING:
    from loftfs.plane.server import Plane

log = logging.getLogger("loftfs.plane")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.Problem} for code in (400, 401, 403, 404, 409, 413)
}


# --- helpers ---------------------------------------------------------------------------------


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _not_found(what: str, name: str) -> HTTPException:
    return _fail(404, f"{what} {name!r} not found")


def insert(s: Session, row: object, conflict: str) -> None:
    """Add ``row`` now; a unique key taken meanwhile (a concurrent create) is a 409."""
    s.add(row)
    try:
        s.flush()
    except IntegrityError:
        raise _fail(409, conflict) from None


def audit(
    s: Session,
    who: Principal | None,
    action: str,
    *,
    tenant: str = "",
    target: str = "",
    detail: dict[str, Any] | None = None,
    status: int = 200,
) -> None:
    s.add(
        AuditEvent(
            at=utcnow(),
            actor=who.token_id if who else "system",
            actor_kind=who.kind if who else "system",
            tenant=tenant,
            action=action,
            target=target,
            detail=json.dumps(detail or {}, sort_keys=True),
            status=status,
        )
    )


def tenant_out(s: Session, t: Tenant, count: int | None = None) -> S.TenantOut:
    """``count``: its number of volumes when the caller counted them already."""
    if count is None:
        count = s.scalar(select(func.count()).select_from(Volume).where(Volume.tenant_id == t.id))
    return S.TenantOut(
        id=t.id,
        name=t.name,
        display_name=t.display_name,
        state=t.state,  # type: ignore[arg-type]
        created_at=t.created_at,
        volumes=count or 0,
    )


def volume_out(v: Volume, tenant_name: str) -> S.VolumeOut:
    return S.VolumeOut(
        id=v.id,
        tenant=tenant_name,
        name=v.name,
        uuid=v.uuid,
        engine=v.engine,  # type: ignore[arg-type]
        state=v.state,  # type: ignore[arg-type]
        capacity=v.capacity,
        inodes=v.inodes,
        block_size=v.block_size,
        compress=v.compress,
        trash_days=v.trash_days,
        created_at=v.created_at,
        delete_after=v.delete_after,
        usage=S.UsageOut(
            bytes=v.usage_bytes,
            inodes=v.usage_inodes,
            objects=v.usage_objects,
            refreshed_at=v.usage_at,
        ),
    )


def token_out(s: Session, t: Token) -> S.TokenOut:
    tenant = s.get(Tenant, t.tenant_id) if t.tenant_id else None
    volume = s.get(Volume, t.volume_id) if t.volume_id else None
    return S.TokenOut(
        id=t.id,
        kind=t.kind,  # type: ignore[arg-type]
        name=t.name,
        tenant=tenant.name if tenant else None,
        volume=volume.name if volume else None,
        read_only=t.read_only,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked_at=t.revoked_at,
        last_used_at=t.last_used_at,
    )


def nodegroup_out(g: NodeGroup) -> S.NodeGroupOut:
    spec = S.NodeGroupSpec.model_validate_json(g.spec)
    return S.NodeGroupOut(
        name=g.name,
        nodes=spec.nodes,
        mounts=spec.mounts,
        generation=g.generation,
        created_at=g.created_at,
        updated_at=g.updated_at,
    )


def create_token_row(
    s: Session,
    *,
    kind: str,
    created_by: str,
    tenant_id: str | None = None,
    volume_id: str | None = None,
    read_only: bool = False,
    expires_in: int | None = None,
    name: str = "",
) -> tuple[Token, str]:
    """A new token row and its secret (which is not stored)."""
    secret = new_token()
    now = utcnow()
    row = Token(
        id=new_id("tok"),
        token_hash=token_hash(secret),
        kind=kind,
        name=name,
        tenant_id=tenant_id,
        volume_id=volume_id,
        read_only=read_only,
        created_by=created_by,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=expires_in) if expires_in else None,
    )
    s.add(row)
    return row, secret


# --- middleware ------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether announced by
    Content-Length or streamed, before any route reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced < 0 or announced > self.limit:
                    await self._refuse(send, announced)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send: Send, size: int) -> None:
        body = json.dumps(
            {"detail": f"request body too large (limit {self.limit} bytes)"}
            if size >= 0
            else {"detail": "invalid Content-Length header"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413 if size >= 0 else 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --- the app ---------------------------------------------------------------------------------


def create_app(plane: "Plane") -> FastAPI:
    app = FastAPI(
        title="loftfs control plane",
        version=__version__,
        description="Tenants, volumes, scoped tokens, quotas, node groups, usage and audit of "
        "a loftfs installation. Authenticate with `Authorization: Bearer <token>`.",
        responses=_ERRORS,
    )
    bearer = HTTPBearer(auto_error=False, description="A loftfs token (loft_...)")

    @app.middleware("http")
    async def _log_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = uuidlib.uuid4().hex[:16]
        request.state.request_id = request_id
        request.state.actor = "-"
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-Id"] = request_id
            return response
        finally:
            log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": request.method,
                        "path": request.url.path,
                        "status": status,
                        "ms": round((time.perf_counter() - start) * 1000, 2),
                        "actor": request.state.actor,
                        "client": request.client.host if request.client else "",
                    }
                },
            )

    @app.exception_handler(LoftError)
    async def _loft_error(request: Request, e: LoftError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.error(
            "unexpected error",
            exc_info=e,
            extra={"fields": {"request_id": request_id, "path": request.url.path}},
        )
        return JSONResponse(
            {"detail": f"internal error (request {request_id}); the server log has the details"},
            status_code=500,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err["type"]}
            for err in e.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_middleware(BodyLimit, limit=plane.config.server.max_body)

    def db() -> Iterator[Session]:
        with plane.db.session() as s:
            yield s

    Db = Annotated[Session, Depends(db, scope="function")]

    def principal(
        request: Request,
        s: Db,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise HTTPException(
                401,
                "missing token: send Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )
        row = s.scalar(select(Token).where(Token.token_hash == token_hash(creds.credentials)))
        now = utcnow()
        if row is None or row.revoked_at is not None:
            raise HTTPException(401, "invalid or revoked token", {"WWW-Authenticate": "Bearer"})
        if row.expires_at is not None and row.expires_at <= now:
            raise HTTPException(401, "token expired", {"WWW-Authenticate": "Bearer"})
        tenant = s.get(Tenant, row.tenant_id) if row.tenant_id else None
        volume = s.get(Volume, row.volume_id) if row.volume_id else None
        if tenant is not None and tenant.state == "suspended":
            raise _fail(403, f"tenant {tenant.name!r} is suspended")
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_EVERY_S:
            row.last_used_at = now
        request.state.actor = row.id
        return Principal(
            token_id=row.id,
            kind=row.kind,
            tenant_id=row.tenant_id,
            tenant_name=tenant.name if tenant else None,
            volume_id=row.volume_id,
            volume_name=volume.name if volume else None,
            read_only=row.read_only,
            expires_at=row.expires_at,
        )

    Who = Annotated[Principal, Depends(principal)]

    def operator_only(who: Principal) -> None:
        if not who.is_operator:
            raise _fail(403, "this needs an operator token")

    def not_mount(who: Principal) -> None:
        if who.kind == MOUNT:
            raise _fail(403, "a mount token can only fetch its volume's mount configuration")

    def find_tenant(s: Session, who: Principal, name: str, *, lock: bool = False) -> Tenant:
        query = select(Tenant).where(Tenant.name == name)
        if lock and not plane.db.is_sqlite:
            query = query.with_for_update()
        t = s.scalar(query)
        if t is None or not who.can_see_tenant(t.id):
            raise _not_found("tenant", name)
        return t

    def find_volume(s: Session, who: Principal, t: Tenant, name: str) -> Volume:
        v = s.scalar(select(Volume).where(Volume.tenant_id == t.id, Volume.name == name))
        if v is None or v.state == "creating":
            raise _not_found("volume", f"{t.name}/{name}")
        if who.kind == MOUNT and v.id != who.volume_id:
            raise _not_found("volume", f"{t.name}/{name}")
        return v

    # --- health, identity ---------------------------------------------------------------------

    @app.get(
        "/healthz", response_model=S.Health, tags=["health"], responses={503: {"model": S.Health}}
    )
    def healthz() -> Any:
        if plane.db.ping():
            return S.Health(status="ok", database="ok")
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)

    @app.get("/v1/whoami", response_model=S.WhoAmI, tags=["tokens"])
    def whoami(who: Who) -> S.WhoAmI:
        return S.WhoAmI(
            token_id=who.token_id,
            kind=who.kind,  # type: ignore[arg-type]
            tenant=who.tenant_name,
            volume=who.volume_name,
            read_only=who.read_only,
            expires_at=who.expires_at,
        )

    # --- tenants -------------------------------------------------------------------------------

    @app.post("/v1/tenants", response_model=S.TenantOut, status_code=201, tags=["tenants"])
    def create_tenant(body: S.TenantCreate, who: Who, s: Db) -> S.TenantOut:
        operator_only(who)
        if s.scalar(select(Tenant).where(Tenant.name == body.name)) is not None:
            raise _fail(409, f"tenant {body.name!r} already exists")
        now = utcnow()
        t = Tenant(
            id=new_id("ten"),
            name=body.name,
            display_name=body.display_name,
            state="active",
            created_at=now,
            updated_at=now,
        )
        insert(s, t, f"tenant {body.name!r} already exists")
        audit(s, who, "tenant.create", tenant=t.name, target=t.name, status=201)
        return tenant_out(s, t)

    @app.get("/v1/tenants", response_model=list[S.TenantOut], tags=["tenants"])
    def list_tenants(who: Who, s: Db) -> list[S.TenantOut]:
        not_mount(who)
        query = select(Tenant).order_by(Tenant.name)
        if not who.is_operator:
            query = query.where(Tenant.id == who.tenant_id)
        grouped = select(Volume.tenant_id, func.count()).group_by(Volume.tenant_id)
        counts = {tenant_id: n for tenant_id, n in s.execute(grouped)}
        return [tenant_out(s, t, counts.get(t.id, 0)) for t in s.scalars(query)]

    @app.get("/v1/tenants/{tenant}", response_model=S.TenantOut, tags=["tenants"])
    def get_tenant(tenant: str, who: Who, s: Db) -> S.TenantOut:
        not_mount(who)
        return tenant_out(s, find_tenant(s, who, tenant))

    def set_state(tenant: str, who: Principal, s: Session, state: str) -> S.TenantOut:
        operator_only(who)
        t = find_tenant(s, who, tenant)
        if t.state != state:
            t.state = state
            t.updated_at = utcnow()
            audit(
                s,
                who,
                f"tenant.{'suspend' if state == 'suspended' else 'resume'}",
                tenant=t.name,
                target=t.name,
            )
        return tenant_out(s, t)

    @app.post("/v1/tenants/{tenant}/suspend", response_model=S.TenantOut, tags=["tenants"])
    def suspend_tenant(tenant: str, who: Who, s: Db) -> S.TenantOut:
        return set_state(tenant, who, s, "suspended")

    @app.post("/v1/tenants/{tenant}/resume", response_model=S.TenantOut, tags=["tenants"])
    def resume_tenant(tenant: str, who: Who, s: Db) -> S.TenantOut:
        return set_state(tenant, who, s, "active")

    @app.delete("/v1/tenants/{tenant}", status_code=204, tags=["tenants"])
    def delete_tenant(tenant: str, who: Who, s: Db) -> Response:
        operator_only(who)
        t = find_tenant(s, who, tenant, lock=True)
        count = s.scalar(select(func.count()).select_from(Volume).where(Volume.tenant_id == t.id))
        if count:
            raise _fail(
                409,
                f"tenant {t.name!r} still has {count} volume(s), counting those in their "
                "deletion grace period; delete them (and wait for their purge) first",
            )
        s.execute(delete(Token).where(Token.tenant_id == t.id))
        s.delete(t)
        audit(s, who, "tenant.delete", tenant=t.name, target=t.name)
        return Response(status_code=204)

    # --- volumes -------------------------------------------------------------------------------

    @app.post(
        "/v1/tenants/{tenant}/volumes",
        response_model=S.VolumeOut,
        status_code=201,
        tags=["volumes"],
        responses={502: {"model": S.Problem}},
    )
    def create_volume(tenant: str, body: S.VolumeCreate, who: Who) -> S.VolumeOut:
        not_mount(who)
        engine = body.engine or plane.config.metadata.default
        if engine not in plane.provisioner.engines():
            raise _fail(
                400,
                f"engine {engine!r} is not configured on this control plane "
                f"(available: {', '.join(plane.provisioner.engines())})",
            )
        with plane.db.session() as s:
            t = find_tenant(s, who, tenant)
            if t.state != "active":
                raise _fail(409, f"tenant {t.name!r} is suspended")
            old = s.scalar(select(Volume).where(Volume.tenant_id == t.id, Volume.name == body.name))
            if old is not None:
                why = {"deleting": " and is being deleted (restore it, or wait for its purge)"}
                raise _fail(
                    409, f"volume {t.name}/{body.name} already exists{why.get(old.state, '')}"
                )
            now = utcnow()
            v = Volume(
                id="v" + uuidlib.uuid4().hex[:16],
                tenant_id=t.id,
                name=body.name,
                engine=engine,
                state="creating",
                capacity=body.capacity,
                inodes=body.inodes,
                block_size=body.block_size,
                compress=body.compress,
                trash_days=body.trash_days,
                created_at=now,
                updated_at=now,
            )
            insert(s, v, f"volume {t.name}/{body.name} already exists")
            tenant_name, volume_id = t.name, v.id
        try:
            secrets, volume_uuid = plane.create_volume(v)
        except BaseException as e:
            with plane.db.session() as s:
                s.execute(delete(Volume).where(Volume.id == volume_id))
                if isinstance(e, LoftError):
                    audit(
                        s,
                        who,
                        "volume.create",
                        tenant=tenant_name,
                        target=f"{tenant_name}/{body.name}",
                        detail={"error": str(e)},
                        status=502,
                    )
            if isinstance(e, LoftError):
                raise _fail(
                    502, f"could not create volume {tenant_name}/{body.name}: {e}"
                ) from None
            raise
        with plane.db.session() as s:
            v2 = s.get(Volume, volume_id)
            assert v2 is not None
            v2.uuid = volume_uuid
            v2.secrets = plane.seal(volume_id, secrets)
            v2.state = "active"
            v2.updated_at = utcnow()
            audit(
                s,
                who,
                "volume.create",
                tenant=tenant_name,
                target=f"{tenant_name}/{body.name}",
                detail={
                    "engine": engine,
                    "uuid": volume_uuid,
                    "capacity": body.capacity,
                    "inodes": body.inodes,
                },
                status=201,
            )
            return volume_out(v2, tenant_name)

    @app.get("/v1/tenants/{tenant}/volumes", response_model=list[S.VolumeOut], tags=["volumes"])
    def list_volumes(tenant: str, who: Who, s: Db) -> list[S.VolumeOut]:
        not_mount(who)
        t = find_tenant(s, who, tenant)
        rows = s.scalars(
            select(Volume)
            .where(Volume.tenant_id == t.id, Volume.state != "creating")
            .order_by(Volume.name)
        )
        return [volume_out(v, t.name) for v in rows]

    @app.get("/v1/tenants/{tenant}/volumes/{volume}", response_model=S.VolumeOut, tags=["volumes"])
    def get_volume(tenant: str, volume: str, who: Who, s: Db) -> S.VolumeOut:
        not_mount(who)
        t = find_tenant(s, who, tenant)
        return volume_out(find_volume(s, who, t, volume), t.name)

    @app.patch(
        "/v1/tenants/{tenant}/volumes/{volume}",
        response_model=S.VolumeOut,
        tags=["volumes"],
        responses={502: {"model": S.Problem}},
    )
    def update_volume(
        tenant: str, volume: str, body: S.VolumeUpdate, who: Who, s: Db
    ) -> S.VolumeOut:
        not_mount(who)
        t = find_tenant(s, who, tenant)
        v = find_volume(s, who, t, volume)
        if v.state != "active":
            raise _fail(409, f"volume {t.name}/{v.name} is being deleted")
        capacity = v.capacity if body.capacity is None else body.capacity
        inodes = v.inodes if body.inodes is None else body.inodes
        if (capacity, inodes) != (v.capacity, v.inodes):
            try:
                plane.provisioner.set_quota(plane.unseal(v), capacity, inodes)
            except LoftError as e:
                raise _fail(502, f"could not change the quota of {t.name}/{v.name}: {e}") from None
            changed = {"capacity": [v.capacity, capacity], "inodes": [v.inodes, inodes]}
            v.capacity, v.inodes, v.updated_at = capacity, inodes, utcnow()
            audit(
                s, who, "volume.quota", tenant=t.name, target=f"{t.name}/{v.name}", detail=changed
            )
        return volume_out(v, t.name)

    @app.delete(
        "/v1/tenants/{tenant}/volumes/{volume}",
        response_model=S.VolumeOut,
        tags=["volumes"],
        responses={502: {"model": S.Problem}},
    )
    def delete_volume(
        tenant: str,
        volume: str,
        who: Who,
        purge: Annotated[
            bool, Query(description="Operators: destroy data and metadata now, no grace period")
        ] = False,
    ) -> Response:
        not_mount(who)
        if purge:
            operator_only(who)
        with plane.db.session() as s:
            t = find_tenant(s, who, tenant)
            v = find_volume(s, who, t, volume)
            if v.state == "active":
                v.state = "deleting"
                v.delete_after = utcnow() + dt.timedelta(seconds=plane.config.server.delete_grace)
                v.updated_at = utcnow()
                audit(
                    s,
                    who,
                    "volume.delete",
                    tenant=t.name,
                    target=f"{t.name}/{v.name}",
                    detail={"delete_after": v.delete_after.isoformat()},
                )
            out = volume_out(v, t.name)
            volume_id = v.id
        if purge:
            try:
                plane.purge_volume(volume_id, who)
            except LoftError as e:
                raise _fail(502, f"could not destroy {tenant}/{volume}: {e}") from None
        else:
            plane.wake()
        return JSONResponse(out.model_dump(mode="json"))

    @app.post(
        "/v1/tenants/{tenant}/volumes/{volume}/restore",
        response_model=S.VolumeOut,
        tags=["volumes"],
    )
    def restore_volume(tenant: str, volume: str, who: Who, s: Db) -> S.VolumeOut:
        not_mount(who)
        t = find_tenant(s, who, tenant)
        v = find_volume(s, who, t, volume)
        if v.state == "purging":
            raise _fail(409, f"volume {t.name}/{v.name} is being destroyed: too late to restore")
        if v.state == "deleting":
            v.state, v.delete_after, v.updated_at = "active", None, utcnow()
            audit(s, who, "volume.restore", tenant=t.name, target=f"{t.name}/{v.name}")
        return volume_out(v, t.name)

    @app.post(
        "/v1/tenants/{tenant}/volumes/{volume}/mount-config",
        response_model=S.MountConfig,
        tags=["volumes"],
    )
    def mount_config(
        tenant: str, volume: str, who: Who, s: Db, body: S.MountRequest | None = None
    ) -> S.MountConfig:
        t = find_tenant(s, who, tenant)
        v = find_volume(s, who, t, volume)
        if v.state != "active":
            raise _fail(409, f"volume {t.name}/{v.name} is being deleted: it cannot be mounted")
        read_only = who.read_only or bool(body and body.read_only)
        sec = plane.unseal(v)
        audit(
            s,
            who,
            "volume.mount-config",
            tenant=t.name,
            target=f"{t.name}/{v.name}",
            detail={"read_only": read_only},
        )
        return S.MountConfig(
            volume=v.name,
            tenant=t.name,
            uuid=v.uuid,
            meta_url=sec.meta_url,
            storage=sec.storage,
            bucket=sec.bucket,
            storage_options={k: str(x) for k, x in sec.storage_options.items()},
            encryption_key=sec.data_key,
            read_only=read_only,
        )

    # --- usage ---------------------------------------------------------------------------------

    @app.get("/v1/tenants/{tenant}/usage", response_model=S.TenantUsage, tags=["usage"])
    def tenant_usage(
        tenant: str,
        who: Who,
        refresh: Annotated[bool, Query(description="Refresh from the volumes first")] = False,
    ) -> S.TenantUsage:
        not_mount(who)
        with plane.db.session() as s:
            t = find_tenant(s, who, tenant)
            ids = list(
                s.scalars(
                    select(Volume.id).where(Volume.tenant_id == t.id, Volume.state == "active")
                )
            )
        if refresh:
            for volume_id in ids:
                plane.refresh_usage(volume_id)
        with plane.db.session() as s:
            rows = list(
                s.scalars(
                    select(Volume)
                    .where(Volume.tenant_id == t.id, Volume.state != "creating")
                    .order_by(Volume.name)
                )
            )
            per = [
                S.VolumeUsage(
                    name=v.name,
                    bytes=v.usage_bytes,
                    inodes=v.usage_inodes,
                    objects=v.usage_objects,
                    refreshed_at=v.usage_at,
                )
                for v in rows
            ]
        return S.TenantUsage(
            tenant=t.name,
            bytes=sum(u.bytes for u in per),
            inodes=sum(u.inodes for u in per),
            objects=sum(u.objects for u in per),
            volumes=per,
        )

    @app.post("/v1/usage/refresh", response_model=S.RefreshOut, status_code=202, tags=["usage"])
    def refresh_all(who: Who, s: Db) -> S.RefreshOut:
        operator_only(who)
        count = s.scalar(select(func.count()).select_from(Volume).where(Volume.state == "active"))
        plane.wake(usage=True)
        return S.RefreshOut(volumes=count or 0)

    # --- tokens --------------------------------------------------------------------------------

    @app.post("/v1/tokens", response_model=S.TokenCreated, status_code=201, tags=["tokens"])
    def create_token(body: S.TokenCreate, who: Who, s: Db) -> S.TokenCreated:
        not_mount(who)
        tenant_id: str | None = None
        volume_id: str | None = None
        if body.kind == OPERATOR:
            operator_only(who)
            if body.tenant or body.volume or body.read_only:
                raise _fail(400, "an operator token has no tenant, volume or read-only scope")
        else:
            name = body.tenant or (who.tenant_name if not who.is_operator else None)
            if not name:
                raise _fail(400, f"a {body.kind} token needs a tenant")
            t = find_tenant(s, who, name)
            tenant_id = t.id
            if body.kind == TENANT_ADMIN:
                if body.volume or body.read_only:
                    raise _fail(400, "a tenant-admin token has no volume or read-only scope")
            else:
                if not body.volume:
                    raise _fail(400, "a mount token needs a volume")
                v = find_volume(s, who, t, body.volume)
                if v.state != "active":
                    raise _fail(409, f"volume {t.name}/{v.name} is being deleted")
                volume_id = v.id
        row, secret = create_token_row(
            s,
            kind=body.kind,
            created_by=who.token_id,
            tenant_id=tenant_id,
            volume_id=volume_id,
            read_only=body.read_only,
            expires_in=body.expires_in,
            name=body.name,
        )
        s.flush()
        out = token_out(s, row)
        audit(
            s,
            who,
            "token.create",
            tenant=out.tenant or "",
            target=row.id,
            detail={
                "kind": row.kind,
                "volume": out.volume,
                "read_only": row.read_only,
                "expires_at": row.expires_at.isoformat() if row.expires_at else None,
            },
            status=201,
        )
        return S.TokenCreated(token=secret, **out.model_dump())

    def find_token(s: Session, who: Principal, token_id: str) -> Token:
        row = s.get(Token, token_id)
        if row is None or not (
            who.is_operator or (row.tenant_id and row.tenant_id == who.tenant_id)
        ):
            raise _not_found("token", token_id)
        return row

    @app.get("/v1/tokens", response_model=list[S.TokenOut], tags=["tokens"])
    def list_tokens(
        who: Who, s: Db, tenant: Annotated[str | None, Query(max_length=63)] = None
    ) -> list[S.TokenOut]:
        not_mount(who)
        query = select(Token).order_by(Token.created_at, Token.id)
        if tenant is not None:
            query = query.where(Token.tenant_id == find_tenant(s, who, tenant).id)
        elif not who.is_operator:
            query = query.where(Token.tenant_id == who.tenant_id)
        return [token_out(s, r) for r in s.scalars(query)]

    @app.get("/v1/tokens/{token_id}", response_model=S.TokenOut, tags=["tokens"])
    def get_token(token_id: str, who: Who, s: Db) -> S.TokenOut:
        not_mount(who)
        return token_out(s, find_token(s, who, token_id))

    @app.delete("/v1/tokens/{token_id}", status_code=204, tags=["tokens"])
    def revoke_token(token_id: str, who: Who, s: Db) -> Response:
        not_mount(who)
        row = find_token(s, who, token_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            tenant = s.get(Tenant, row.tenant_id) if row.tenant_id else None
            audit(s, who, "token.revoke", tenant=tenant.name if tenant else "", target=row.id)
        return Response(status_code=204)

    # --- node groups ---------------------------------------------------------------------------

    @app.put("/v1/nodegroups/{name}", response_model=S.NodeGroupOut, tags=["nodegroups"])
    def put_nodegroup(name: str, body: S.NodeGroupSpec, who: Who, s: Db) -> S.NodeGroupOut:
        operator_only(who)
        if not S.valid_name(name):
            raise _fail(400, f"invalid node group name {name!r}: use 3-63 characters a-z, 0-9, '-'")
        for i, m in enumerate(body.mounts, 1):
            t = s.scalar(select(Tenant).where(Tenant.name == m.tenant))
            v = (
                s.scalar(select(Volume).where(Volume.tenant_id == t.id, Volume.name == m.volume))
                if t
                else None
            )
            if v is None or v.state == "creating":
                raise _fail(400, f"mount {i}: volume {m.tenant}/{m.volume} not found")
        points = [m.mountpoint for m in body.mounts]
        if len(set(points)) != len(points):
            raise _fail(400, "two mounts of the node group share a mountpoint")
        now = utcnow()
        g = s.get(NodeGroup, name)
        spec = body.model_dump_json()
        if g is None:
            g = NodeGroup(name=name, spec=spec, generation=1, created_at=now, updated_at=now)
            s.add(g)
            action = "nodegroup.create"
        else:
            if g.spec != spec:
                g.spec, g.generation, g.updated_at = spec, g.generation + 1, now
            action = "nodegroup.update"
        audit(
            s,
            who,
            action,
            target=name,
            detail={"nodes": len(body.nodes), "mounts": len(body.mounts)},
        )
        return nodegroup_out(g)

    @app.get("/v1/nodegroups", response_model=list[S.NodeGroupOut], tags=["nodegroups"])
    def list_nodegroups(who: Who, s: Db) -> list[S.NodeGroupOut]:
        operator_only(who)
        return [nodegroup_out(g) for g in s.scalars(select(NodeGroup).order_by(NodeGroup.name))]

    @app.get("/v1/nodegroups/{name}", response_model=S.NodeGroupOut, tags=["nodegroups"])
    def get_nodegroup(name: str, who: Who, s: Db) -> S.NodeGroupOut:
        operator_only(who)
        g = s.get(NodeGroup, name)
        if g is None:
            raise _not_found("node group", name)
        return nodegroup_out(g)

    @app.delete("/v1/nodegroups/{name}", status_code=204, tags=["nodegroups"])
    def delete_nodegroup(name: str, who: Who, s: Db) -> Response:
        operator_only(who)
        g = s.get(NodeGroup, name)
        if g is None:
            raise _not_found("node group", name)
        s.delete(g)
        audit(s, who, "nodegroup.delete", target=name)
        return Response(status_code=204)

    # --- audit ---------------------------------------------------------------------------------

    @app.get("/v1/audit", response_model=list[S.AuditOut], tags=["audit"])
    def audit_log(
        who: Who,
        s: Db,
        tenant: Annotated[str | None, Query(max_length=63)] = None,
        action: Annotated[str | None, Query(max_length=40)] = None,
        actor: Annotated[str | None, Query(max_length=32)] = None,
        since: dt.datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[S.AuditOut]:
        operator_only(who)
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if tenant is not None:
            query = query.where(AuditEvent.tenant == tenant)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        if actor is not None:
            query = query.where(AuditEvent.actor == actor)
        if since is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=dt.UTC)
            query = query.where(AuditEvent.at >= since)
        return [
            S.AuditOut(
                id=e.id,
                at=e.at,
                actor=e.actor,
                actor_kind=e.actor_kind,
                tenant=e.tenant,
                action=e.action,
                target=e.target,
                detail=json.loads(e.detail),
                status=e.status,
            )
            for e in s.scalars(query)
        ]

    return app
