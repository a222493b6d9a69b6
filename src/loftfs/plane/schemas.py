"""Request and response bodies of the API (pydantic), which the OpenAPI document describes.

Request models forbid unknown fields: a misspelt ``capcity`` is a 422 naming it, never a silent
default. Limits are explicit, so a fuzzer (or an attacker) cannot push oversized values through.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


def valid_name(name: str) -> bool:
    """A tenant, volume or node group name: 3-63 characters a-z, 0-9 and '-', starting and
    ending with a letter or digit."""
    return re.fullmatch(NAME_PATTERN, name) is not None


MAX_U63 = (1 << 63) - 1
TokenKind = Literal["operator", "tenant-admin", "mount"]
Engine = Literal["sqlite", "redis", "postgres"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """Every error that is not a validation error: one clear sentence."""

    detail: str


class Health(BaseModel):
    status: str
    database: str


class WhoAmI(BaseModel):
    token_id: str
    kind: TokenKind
    tenant: str | None
    volume: str | None
    read_only: bool
    expires_at: dt.datetime | None


class TenantCreate(Strict):
    name: Name
    display_name: Annotated[str, Field(max_length=200)] = ""


class TenantOut(BaseModel):
    id: str
    name: str
    display_name: str
    state: Literal["active", "suspended"]
    created_at: dt.datetime
    volumes: int


class VolumeCreate(Strict):
    name: Name
    engine: Engine | None = None
    capacity: Annotated[int, Field(ge=0, le=MAX_U63)] = 0
    inodes: Annotated[int, Field(ge=0, le=MAX_U63)] = 0
    block_size: Annotated[int, Field(ge=64 << 10, le=64 << 20)] = 4 << 20
    compress: Literal["none", "lz4", "zstd"] = "none"
    trash_days: Annotated[int, Field(ge=0, le=3650)] = 0

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("block_size must be a power of two (64 KiB to 64 MiB)")
        return value


class VolumeUpdate(Strict):
    capacity: Annotated[int, Field(ge=0, le=MAX_U63)] | None = None
    inodes: Annotated[int, Field(ge=0, le=MAX_U63)] | None = None


class UsageOut(BaseModel):
    bytes: int
    inodes: int
    objects: int
    refreshed_at: dt.datetime | None


class VolumeOut(BaseModel):
    id: str
    tenant: str
    name: str
    uuid: str
    engine: Engine
    state: Literal["creating", "active", "deleting", "purging"]
    capacity: int
    inodes: int
    block_size: int
    compress: str
    trash_days: int
    created_at: dt.datetime
    delete_after: dt.datetime | None
    usage: UsageOut


class MountRequest(Strict):
    read_only: bool = False


class MountConfig(BaseModel):
    """Everything a mount needs; the only response that carries secrets."""

    volume: str
    tenant: str
    uuid: str
    meta_url: str
    storage: str
    bucket: str
    storage_options: dict[str, str]
    encryption_key: str
    read_only: bool


class VolumeUsage(BaseModel):
    name: str
    bytes: int
    inodes: int
    objects: int
    refreshed_at: dt.datetime | None


class TenantUsage(BaseModel):
    tenant: str
    bytes: int
    inodes: int
    objects: int
    volumes: list[VolumeUsage]


class RefreshOut(BaseModel):
    volumes: int


class TokenCreate(Strict):
    kind: TokenKind
    tenant: Name | None = None
    volume: Name | None = None
    read_only: bool = False
    expires_in: Annotated[int, Field(ge=1, le=10 * 365 * 86400)] | None = None
    name: Annotated[str, Field(max_length=200)] = ""


class TokenOut(BaseModel):
    id: str
    kind: TokenKind
    name: str
    tenant: str | None
    volume: str | None
    read_only: bool
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


class TokenCreated(TokenOut):
    token: str


MountOption = Annotated[str, Field(max_length=256)] | int | float | bool


class NodeMount(Strict):
    tenant: Name
    volume: Name
    mountpoint: Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$", max_length=4096)]
    read_only: bool = False
    options: Annotated[
        dict[Annotated[str, Field(max_length=64)], MountOption], Field(max_length=64)
    ] = {}


class NodeGroupSpec(Strict):
    nodes: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=253)]], Field(max_length=10000)
    ] = []
    mounts: Annotated[list[NodeMount], Field(max_length=1000)] = []


class NodeGroupOut(BaseModel):
    name: str
    nodes: list[str]
    mounts: list[NodeMount]
    generation: int
    created_at: dt.datetime
    updated_at: dt.datetime


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    actor_kind: str
    tenant: str
    action: str
    target: str
    detail: dict[str, object]
    status: int
