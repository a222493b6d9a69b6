"""PlaneClient: the control plane's HTTP API (``loft serve``) as one method per endpoint.

Used by the ``loft tenant|volume|token|nodegroup|audit`` commands and by ``loft mount
--control``. Every failure is a ``PlaneError`` with a one-line message: the server's ``detail``
for an HTTP error, the URL and the reason when the server cannot be reached. The bearer token
travels only in the ``Authorization`` header; no message or repr ever contains it.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from loftfs.errors import ConfigError, LoftError
from loftfs.plane import ENV_CONTROL_URL, ENV_TOKEN

DEFAULT_TIMEOUT_S = 30.0

# FastAPI validation errors locate a field as ["body", "capacity"]; the first part says only
# where the field was sent
_LOC_ORIGINS = frozenset({"body", "query", "path", "header", "cookie"})


class PlaneError(LoftError):
    """A control-plane request failed. ``status`` is the HTTP status (``None`` when no answer
    came), ``detail`` the server's own sentence (empty when there was none)."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


def check_control_url(url: str) -> str:
    """The control plane's base URL without a trailing slash; anything but an http(s) URL with
    a host is a ``ConfigError``."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"invalid control-plane URL {url!r}: {e}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"invalid control-plane URL {url!r} (expected http://HOST:PORT or https://HOST:PORT)"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError("the control-plane URL must not carry credentials (use the token)")
    if parts.query or parts.fragment:
        raise ConfigError(f"invalid control-plane URL {url!r}: no query or fragment expected")
    return url.rstrip("/")


def _check_token(token: str) -> str:
    token = token.strip()
    if not token:
        raise ConfigError(f"no control-plane token: pass --token or set {ENV_TOKEN}")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError("the control-plane token holds characters no token has")
    return token


def _tls_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """``True`` (system CAs), ``False`` (no check) or a context trusting the CA file ``verify``."""
    if isinstance(verify, bool):
        return verify
    try:
        return ssl.create_default_context(cafile=verify)
    except FileNotFoundError:
        raise ConfigError(f"CA file {verify} does not exist") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the CA file {verify}: {e}") from None


def _segment(value: str) -> str:
    """A name as one path segment: a slash or dot-dot in it cannot reach another endpoint."""
    return quote(str(value), safe="")


def _error_detail(response: httpx.Response) -> str:
    """The server's explanation in one line: ``detail`` as a string, FastAPI's validation list
    as ``field: message; ...``, or the status text when the body is not the API's JSON."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str) and detail.strip():
        return " ".join(detail.split())
    if isinstance(detail, list) and detail:
        items = []
        for item in detail:
            if not isinstance(item, dict):
                items.append(str(item))
                continue
            loc = [str(p) for p in item.get("loc") or []]
            if len(loc) > 1 and loc[0] in _LOC_ORIGINS:
                loc = loc[1:]
            msg = str(item.get("msg") or "invalid value")
            items.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        return " ".join("; ".join(items).split())
    if detail is not None and detail != "":
        return " ".join(str(detail).split())
    return ""


def _connect_reason(exc: BaseException) -> str:
    """Why a connection failed, from the innermost OS or TLS error: ``connection refused``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate is not trusted ({cause.verify_message}); "
                "--ca-file FILE names the CA that signed it"
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or cause})"
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ECONNREFUSED:
                return "connection refused"
            return (cause.strerror or os.strerror(cause.errno)).lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "its TLS certificate is not trusted; --ca-file FILE names the CA that signed it"
    if "Connection refused" in text:
        return "connection refused"
    return " ".join(text.split()) or type(exc).__name__


class PlaneClient:
    """A synchronous client of one control plane, authenticated by one token.

    ``verify`` is ``True`` (system CAs), ``False`` or the path of a PEM CA file (a private CA).
    Usable as a context manager; ``close`` releases the connection pool.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        verify: bool | str = True,
    ) -> None:
        self.url = check_control_url(url)
        tls = _tls_verify(verify)
        self._http = httpx.Client(
            base_url=self.url,
            headers={
                "Authorization": f"Bearer {_check_token(token)}",
                "Accept": "application/json",
            },
            timeout=timeout,
            verify=tls,
            follow_redirects=False,  # a redirect must not carry the token elsewhere
        )
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"PlaneClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request; the parsed JSON answer (``None`` for 204), or a ``PlaneError``."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method,
                path,
                json=body,
                params=query or None,
            )
        except httpx.TimeoutException:
            raise PlaneError(
                f"the control plane at {self.url} did not answer within {self.timeout:g}s"
            ) from None
        except httpx.TransportError as e:
            raise PlaneError(
                f"cannot reach the control plane at {self.url}: {_connect_reason(e)}"
            ) from None
        if response.status_code >= 400:
            raise self._http_error(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise PlaneError(
                f"the control plane at {self.url} answered {method} {path} with a body "
                "that is not JSON (is the URL that of 'loft serve'?)",
                status=response.status_code,
            ) from None

    def _http_error(self, response: httpx.Response) -> PlaneError:
        """A client error is the server's sentence alone; a server error says so first."""
        status = response.status_code
        detail = _error_detail(response)
        if status < 500 and detail:
            message = detail
        elif detail:
            message = f"control plane error (HTTP {status}): {detail}"
        else:
            reason = f"HTTP {status} {response.reason_phrase}".rstrip()
            message = f"the control plane at {self.url} answered {reason}"
        return PlaneError(message, status=status, detail=detail)

    # --- service -----------------------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/healthz")
        return result

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/v1/whoami")
        return result

    # --- tenants -----------------------------------------------------------------------------

    def create_tenant(self, name: str, display_name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if display_name is not None:
            body["display_name"] = display_name
        result: dict[str, Any] = self._request("POST", "/v1/tenants", body=body)
        return result

    def list_tenants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/v1/tenants")
        return result

    def get_tenant(self, tenant: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/tenants/{_segment(tenant)}")
        return result

    def suspend_tenant(self, tenant: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/v1/tenants/{_segment(tenant)}/suspend")
        return result

    def resume_tenant(self, tenant: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/v1/tenants/{_segment(tenant)}/resume")
        return result

    def delete_tenant(self, tenant: str) -> None:
        self._request("DELETE", f"/v1/tenants/{_segment(tenant)}")

    # --- volumes -----------------------------------------------------------------------------

    def _volume_path(self, tenant: str, volume: str) -> str:
        return f"/v1/tenants/{_segment(tenant)}/volumes/{_segment(volume)}"

    def create_volume(
        self,
        tenant: str,
        name: str,
        *,
        engine: str | None = None,
        capacity: int | None = None,
        inodes: int | None = None,
        block_size: int | None = None,
        compress: str | None = None,
        trash_days: int | None = None,
    ) -> dict[str, Any]:
        """Create a volume end to end (storage, metadata, credentials, format); options left
        ``None`` take the server's defaults."""
        body: dict[str, Any] = {"name": name}
        for key, value in (
            ("engine", engine),
            ("capacity", capacity),
            ("inodes", inodes),
            ("block_size", block_size),
            ("compress", compress),
            ("trash_days", trash_days),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self._request(
            "POST", f"/v1/tenants/{_segment(tenant)}/volumes", body=body
        )
        return result

    def list_volumes(self, tenant: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request(
            "GET", f"/v1/tenants/{_segment(tenant)}/volumes"
        )
        return result

    def get_volume(self, tenant: str, volume: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", self._volume_path(tenant, volume))
        return result

    def update_volume(
        self, tenant: str, volume: str, *, capacity: int | None = None, inodes: int | None = None
    ) -> dict[str, Any]:
        """Change the quotas of a volume (applied to the volume at once)."""
        body = {k: v for k, v in (("capacity", capacity), ("inodes", inodes)) if v is not None}
        result: dict[str, Any] = self._request(
            "PATCH", self._volume_path(tenant, volume), body=body
        )
        return result

    def delete_volume(self, tenant: str, volume: str, *, purge: bool = False) -> dict[str, Any]:
        """Mark a volume deleted; it is destroyed after the server's grace period, or at once
        with ``purge`` (operators only)."""
        result: dict[str, Any] = self._request(
            "DELETE",
            self._volume_path(tenant, volume),
            params={"purge": "true"} if purge else None,
        )
        return result

    def restore_volume(self, tenant: str, volume: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST", self._volume_path(tenant, volume) + "/restore"
        )
        return result

    def mount_config(self, tenant: str, volume: str, *, read_only: bool = False) -> dict[str, Any]:
        """Everything a mount needs, secrets included: the one response that carries them."""
        result: dict[str, Any] = self._request(
            "POST",
            self._volume_path(tenant, volume) + "/mount-config",
            body={"read_only": read_only},
        )
        return result

    # --- usage -------------------------------------------------------------------------------

    def tenant_usage(self, tenant: str, *, refresh: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "GET",
            f"/v1/tenants/{_segment(tenant)}/usage",
            params={"refresh": "true"} if refresh else None,
        )
        return result

    def refresh_usage(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/v1/usage/refresh")
        return result

    # --- tokens ------------------------------------------------------------------------------

    def create_token(
        self,
        kind: str,
        *,
        tenant: str | None = None,
        volume: str | None = None,
        read_only: bool = False,
        expires_in: int | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """A new token; the answer's ``token`` is its secret, shown this once."""
        body: dict[str, Any] = {"kind": kind}
        if read_only:
            body["read_only"] = True
        for key, value in (
            ("tenant", tenant),
            ("volume", volume),
            ("expires_in", expires_in),
            ("name", name),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self._request("POST", "/v1/tokens", body=body)
        return result

    def list_tokens(self, tenant: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/v1/tokens", params={"tenant": tenant})
        return result

    def get_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/tokens/{_segment(token_id)}")
        return result

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/v1/tokens/{_segment(token_id)}")

    # --- node groups -------------------------------------------------------------------------

    def put_nodegroup(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a node group."""
        result: dict[str, Any] = self._request("PUT", f"/v1/nodegroups/{_segment(name)}", body=spec)
        return result

    def list_nodegroups(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/v1/nodegroups")
        return result

    def get_nodegroup(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/nodegroups/{_segment(name)}")
        return result

    def delete_nodegroup(self, name: str) -> None:
        self._request("DELETE", f"/v1/nodegroups/{_segment(name)}")

    # --- audit -------------------------------------------------------------------------------

    def audit(
        self,
        *,
        tenant: str | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first as the server orders them; ``since`` is ISO 8601."""
        result: list[dict[str, Any]] = self._request(
            "GET",
            "/v1/audit",
            params={
                "tenant": tenant,
                "action": action,
                "actor": actor,
                "since": since,
                "limit": limit,
            },
        )
        return result


def connect(
    control: str | None,
    token: str | None,
    *,
    ca_file: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PlaneClient:
    """A client from command-line values, falling back to ``LOFT_CONTROL_URL`` and
    ``LOFT_TOKEN``; a missing URL or token is a ``ConfigError`` that says how to give it."""
    control = (control or os.environ.get(ENV_CONTROL_URL, "")).strip()
    if not control:
        raise ConfigError(f"no control-plane URL: pass --control URL or set {ENV_CONTROL_URL}")
    token = (token or os.environ.get(ENV_TOKEN, "")).strip()
    if not token:
        raise ConfigError(f"no control-plane token: pass --token or set {ENV_TOKEN}")
    if ca_file is not None and not ca_file.strip():
        ca_file = None
    return PlaneClient(control, token, timeout=timeout, verify=ca_file or True)
