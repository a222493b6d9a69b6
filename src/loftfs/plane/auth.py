"""Tokens: how they are made, stored and checked.

A token is ``loft_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored: with
that much entropy a plain hash cannot be reversed, and a lookup stays one indexed query. The
secret is shown once, in the response that creates it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "loft_"
OPERATOR = "operator"
TENANT_ADMIN = "tenant-admin"
MOUNT = "mount"
KINDS = (OPERATOR, TENANT_ADMIN, MOUNT)
LAST_USED_EVERY_S = 60.0  # last_used_at is written at most this often per token


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(kind: str) -> str:
    """``tok_...``, ``ten_...``: ids that say what they name."""
    return f"{kind}_{secrets.token_hex(8)}"


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id and scope."""

    token_id: str
    kind: str
    tenant_id: str | None = None
    tenant_name: str | None = None
    volume_id: str | None = None
    volume_name: str | None = None
    read_only: bool = False
    expires_at: dt.datetime | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == OPERATOR

    def can_see_tenant(self, tenant_id: str) -> bool:
        return self.is_operator or self.tenant_id == tenant_id
