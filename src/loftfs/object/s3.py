"""S3 and S3-compatible object storage (AWS, SeaweedFS, MinIO, Ceph RGW...).

Two client libraries, each where it measured best (``docs/backends/s3.md``, measured by
``bench/s3clients.py``):

- **obstore** (Rust ``object_store``) carries the data path: GET (whole or ranged), PUT, HEAD and
  DELETE (one key, or ``DeleteObjects`` batches). It spends a fifth of boto3's CPU per request
  and releases the GIL while it waits, so a mount's upload and fetch threads do not queue
  behind each other's request signing and parsing.
- **boto3** does what obstore cannot: bucket creation, listings with any delimiter and
  start-after, and credential resolution through the whole AWS chain (environment, profiles,
  SSO, web identity, instance roles). obstore gets its credentials from that same chain,
  refreshed as they expire. boto3 is imported on first use only: a mount given its keys (and
  its region, or an endpoint with no AWS config file around) never loads it, which keeps about
  30 MiB (botocore's modules and the S3 service model) out of every mount process.

Neither library retries: ``RetryStore`` (``retry.py``) does, with exponential backoff and
jitter, on the ``ObjectTransientError`` this module raises for throttling (503 SlowDown, 429),
5xx, timeouts and connection errors. Every failure is one of the typed errors of
``loftfs.errors`` with a one-line message naming the operation, the key and the bucket; no
secret ever appears in a message or a log line.

Timeouts: 5 s to connect, 30 s without a byte on a read, 300 s for a whole request (a 64 MiB
block on a slow link). Connections: one bounded pool per library (``max_connections``, 64 by
default: more than a mount's 16 upload + 16 fetch + 8 readahead threads). Thread safe: both
clients are; this class only adds lazily built, lock-guarded state.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import obstore

from loftfs.errors import (
    ConfigError,
    ObjectAuthError,
    ObjectChanged,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransientError,
)
from loftfs.object.interface import ObjectInfo, ObjectStore
from loftfs.object.prefix import PrefixStore

if TYPE_CHECKING:
    import boto3
    from botocore.client import BaseClient
    from obstore import GetOptions
    from obstore.store import S3Credential, S3Store

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
LIST_PAGE = 1000  # the most entries one ListObjectsV2 page holds
TREE_LISTING_SERVERS = ("seaweedfs",)  # ``Server`` headers of tree-listing servers
_CREDENTIAL_CHECK_S = 300  # how often obstore asks again for refreshable credentials

# The options ``open_s3`` takes (strings from the command line are accepted for numbers).
OPTION_NAMES = (
    "access_key",
    "secret_key",
    "session_token",
    "region",
    "endpoint",
    "profile",
    "max_connections",
    "connect_timeout",
    "read_timeout",
    "request_timeout",
)
SECRET_OPTIONS = frozenset({"secret_key", "session_token"})
CREDENTIAL_OPTIONS = ("access_key", "secret_key", "session_token")
# Environment variables whose credentials replace a volume's stored ones (``loft mount``'s
# --access-key/--secret-key/--session-token set them, so a background mount inherits them
# without them ever being on a command line).
ENV_ACCESS_KEY = "LOFT_ACCESS_KEY"
ENV_SECRET_KEY = "LOFT_SECRET_KEY"
ENV_SESSION_TOKEN = "LOFT_SESSION_TOKEN"

# S3 error codes, by what they mean for the caller
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_AUTH = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AccountProblem",
        "403",
        "401",
    }
)
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
    }
)
_WRONG_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch"})
_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "403"})  # valid identity, no right
_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([^<]{1,100})</Code>")
_MESSAGE_RE = re.compile(r"<Message>([^<]{1,300})</Message>")
# obstore's message for a key that a DeleteObjects request did not delete
_KEY_FAILED_RE = re.compile(r"request failed for key .{0,1100}?: (.{0,300}?) \(code: (\w{1,100})\)")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


# --- locations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where a store lives: the bucket, a key prefix inside it (``""`` or ending in ``/``), and
    the endpoint (``None``: AWS, addressed by region). Custom endpoints use path-style URLs."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None

    def describe(self) -> str:
        """The bucket as a URL, without the prefix and without any credential."""
        if self.endpoint:
            return f"{self.endpoint}/{self.bucket}/"
        return f"s3://{self.bucket}/"


def parse_s3_url(url: str, endpoint: str | None = None) -> S3Location:
    """``http(s)://host[:port]/bucket[/prefix]`` (custom endpoint, path-style),
    ``s3://bucket[/prefix]`` (AWS, or ``endpoint`` when given), or a bare bucket name.

    Raises ``ConfigError`` with a one-line message for a malformed URL, bucket name or endpoint,
    and for a URL carrying credentials (``user:password@host``: they belong in options, not in
    a URL that is stored and printed)."""
    text = url.strip()
    if not text:
        raise ConfigError("an s3 bucket is needed, e.g. s3://bucket or http://host:9000/bucket")
    if "://" not in text:
        text = "s3://" + text
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(f"invalid s3 URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise ConfigError(f"invalid s3 URL {url!r}: no '?' or '#' part is allowed")
    if "@" in parts.netloc:
        raise ConfigError(
            "credentials do not go into the bucket URL: use --access-key/--secret-key, "
            "LOFT_SECRET_KEY or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if scheme == "s3":
        bucket, _, rest = (parts.netloc + parts.path).partition("/")
        where = normalize_endpoint(endpoint) if endpoint else None
    elif scheme in ("http", "https"):
        if endpoint:
            raise ConfigError(
                f"{url!r} names its endpoint already; --endpoint goes with s3://bucket URLs"
            )
        if not parts.hostname:
            raise ConfigError(f"invalid s3 URL {url!r}: no host")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"invalid s3 URL {url!r}: bad port") from None
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        where = f"{scheme}://{host}" + (f":{port}" if port else "")
        bucket, _, rest = parts.path.lstrip("/").partition("/")
    else:
        raise ConfigError(
            f"unsupported s3 URL {url!r} (use s3://bucket[/prefix] or "
            "http(s)://host:port/bucket[/prefix])"
        )
    if not bucket:
        raise ConfigError(f"invalid s3 URL {url!r}: no bucket name")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"invalid bucket name {bucket!r}: use 3-63 characters a-z, 0-9, '.', '-' and '_', "
            "starting and ending with a letter or digit"
        )
    return S3Location(bucket, normalize_prefix(rest, url), where)


def canonical_url(url: str) -> str:
    """The one spelling of an s3 location kept in a volume's settings: ``s3://bucket[/prefix]``
    or ``http(s)://host[:port]/bucket[/prefix]``, without a trailing slash (``ConfigError``
    for a malformed one)."""
    loc = parse_s3_url(url)
    base = f"{loc.endpoint}/{loc.bucket}" if loc.endpoint else f"s3://{loc.bucket}"
    return base + ("/" + loc.prefix.rstrip("/") if loc.prefix else "")


def normalize_prefix(prefix: str, url: str = "") -> str:
    """``a/b`` and ``/a/b/`` -> ``a/b/``; ``""`` stays ``""``. Empty, ``.`` and ``..`` segments
    are refused (``ConfigError``): they would not name keys the same way on every store."""
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    for part in prefix.split("/"):
        if part in ("", ".", "..") or "\0" in part:
            raise ConfigError(f"invalid key prefix {prefix!r} in {url or prefix!r}")
    return prefix + "/"


def normalize_endpoint(endpoint: str) -> str:
    """``http(s)://host[:port]`` without a trailing slash (``ConfigError`` otherwise)."""
    try:
        parts = urlsplit(endpoint.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid endpoint {endpoint!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid endpoint {endpoint!r}: use http(s)://host[:port]")
    if parts.path.strip("/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"invalid endpoint {endpoint!r}: use http(s)://host[:port] only")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port else "")


def check_key(key: str) -> str:
    """Keys are ``/``-separated, without empty, ``.`` or ``..`` segments (``ObjectStoreError``):
    the same keys the file backend accepts, and ones every S3 client spells the same way."""
    if not key or key.startswith("/") or key.endswith("/") or "\0" in key:
        raise ObjectStoreError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ObjectStoreError(f"invalid object key {key!r}")
    return key


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Options:
    """Validated backend options. Secrets live here only: never in URLs, messages or logs."""

    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""
    region: str = ""
    endpoint: str = ""
    profile: str = ""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S

    def __repr__(self) -> str:  # a dataclass repr would print the secret key
        shown = {k: v for k, v in vars(self).items() if v and k not in SECRET_OPTIONS}
        return f"S3Options({', '.join(f'{k}={v!r}' for k, v in sorted(shown.items()))})"

    @classmethod
    def from_kw(cls, kw: dict[str, object]) -> S3Options:
        """From ``open_s3``'s keyword options; ``ConfigError`` for unknown names or values."""
        unknown = sorted(set(kw) - set(OPTION_NAMES))
        if unknown:
            raise ConfigError(
                f"unknown s3 option(s) {', '.join(unknown)} (known: {', '.join(OPTION_NAMES)})"
            )
        values: dict[str, Any] = {}
        for name, value in kw.items():
            if value is None or value == "":
                continue
            if name in ("max_connections",):
                values[name] = _positive(name, value, int)
            elif name.endswith("_timeout"):
                values[name] = _positive(name, value, float)
            elif isinstance(value, str):
                values[name] = value.strip()
            else:
                raise ConfigError(f"s3 option {name} must be a string")
        opts = cls(**values)
        if bool(opts.access_key) != bool(opts.secret_key):
            raise ConfigError("give both an access key and a secret key, or neither")
        if opts.session_token and not opts.access_key:
            raise ConfigError("a session token needs an access key and a secret key")
        return opts


def _positive(name: str, value: object, kind: type[int] | type[float]) -> Any:
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError(value)
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"s3 option {name} must be a number, not {value!r}") from None
    if number <= 0:
        raise ConfigError(f"s3 option {name} must be more than 0, not {value!r}")
    return number


def credentials_from_env() -> dict[str, str]:
    """``access_key``/``secret_key`` (and ``session_token``) from ``LOFT_ACCESS_KEY``,
    ``LOFT_SECRET_KEY`` and ``LOFT_SESSION_TOKEN``; ``{}`` when none is set, ``ConfigError``
    when only one key of the pair is."""
    access = os.environ.get(ENV_ACCESS_KEY, "").strip()
    secret = os.environ.get(ENV_SECRET_KEY, "").strip()
    token = os.environ.get(ENV_SESSION_TOKEN, "").strip()
    if not (access or secret or token):
        return {}
    if not (access and secret):
        raise ConfigError(
            f"set both {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} (or --access-key and --secret-key)"
        )
    out = {"access_key": access, "secret_key": secret}
    if token:
        out["session_token"] = token
    return out


# --- error translation ------------------------------------------------------------------------


def _botocore_error(e: Exception, what: str, where: str) -> ObjectStoreError:
    """The typed error of a boto3 failure."""
    import botocore.exceptions as bexc  # boto3 raised it: already loaded

    if isinstance(e, bexc.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "") or "").strip()
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return _status_error(code, status, message, what, where)
    if isinstance(
        e,
        bexc.NoCredentialsError
        | bexc.PartialCredentialsError
        | bexc.CredentialRetrievalError
        | bexc.TokenRetrievalError
        | bexc.ProfileNotFound,
    ):
        return ObjectAuthError(f"{what} in {where}: {_no_credentials_hint(e)}")
    if isinstance(e, bexc.SSLError):
        return ObjectStoreError(f"{what} in {where}: TLS error: {_short(e)}")
    if isinstance(
        e,
        bexc.ConnectionError
        | bexc.HTTPClientError
        | bexc.IncompleteReadError
        | bexc.ResponseStreamingError,
    ):
        cause = str(getattr(e, "kwargs", {}).get("error", "") or e)
        reason = _connection_reason(cause) or "connection failed"
        return ObjectTransientError(f"{what} in {where}: {reason} ({_short(cause, 160)})")
    if isinstance(e, bexc.BotoCoreError):
        return ObjectStoreError(f"{what} in {where}: {_short(e)}")
    return ObjectStoreError(f"{what} in {where}: {type(e).__name__}: {_short(e)}")


def _obstore_error(e: Exception, what: str, where: str) -> ObjectStoreError:
    """The typed error of an obstore failure. obstore types not-found and permission errors;
    for the rest the HTTP status and the S3 error code are read from its message. A failure
    that carries no status (connection refused, reset, timeout, DNS) is transient: retrying
    something permanent costs a few retries, failing something transient costs an I/O error."""
    text = str(e)
    status_m = _STATUS_RE.search(text)
    code_m = _CODE_RE.search(text)
    msg_m = _MESSAGE_RE.search(text)
    status = int(status_m.group(1)) if status_m else 0
    code = code_m.group(1) if code_m else ""
    message = msg_m.group(1) if msg_m else ""
    key_m = _KEY_FAILED_RE.search(text)
    if key_m and not status:  # one key of a batch delete: the request itself succeeded
        return _status_error(key_m.group(2), 0, key_m.group(1), what, where)
    ex = obstore.exceptions
    if isinstance(e, ex.NotFoundError | FileNotFoundError):
        return _status_error(code or "NoSuchKey", status or 404, message, what, where)
    if isinstance(e, ex.PermissionDeniedError | ex.UnauthenticatedError):
        return _status_error(code or "AccessDenied", status or 403, message, what, where)
    if isinstance(e, ValueError | ex.InvalidPathError):
        return ObjectStoreError(f"{what} in {where}: {_short(e)}")
    if status:
        return _status_error(code, status, message, what, where)
    return ObjectTransientError(f"{what} in {where}: {_obstore_cause(text)}")


def _is_invalid_range(e: Exception) -> bool:
    text = str(e)
    return "<Code>InvalidRange</Code>" in text or "status code: 416" in text


def _status_error(code: str, status: int, message: str, what: str, where: str) -> ObjectStoreError:
    detail = f"{code or status}" + (f": {message}" if message else "")
    if code == "NoSuchBucket":
        return ObjectNotFound(f"bucket {where} does not exist ({what})")
    if code in _NOT_FOUND or (status == 404 and not code):
        return ObjectNotFound(f"no such object: {what} in {where}")
    if code in _WRONG_CREDENTIALS:
        return ObjectAuthError(f"{what} in {where}: wrong credentials ({detail})")
    if code in _AUTH or status in (401, 403):
        return ObjectAuthError(f"{what} in {where}: permission denied ({detail})")
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraint"):
        return ObjectStoreError(
            f"{what} in {where}: the bucket is in another region, set --region ({detail})"
        )
    if code in _TRANSIENT or status == 429 or status >= 500:
        return ObjectTransientError(f"{what} in {where}: {detail}")
    return ObjectStoreError(f"{what} in {where}: {detail}")


_CONNECTION_REASONS = (
    ("dns error", "cannot resolve the host"),
    ("failed to lookup address", "cannot resolve the host"),
    ("failed to resolve", "cannot resolve the host"),
    ("name or service not known", "cannot resolve the host"),
    ("connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("connection reset", "connection reset"),
    ("connection closed", "connection closed"),
    ("broken pipe", "connection closed"),
)


def _connection_reason(text: str) -> str:
    """Why a connection failed, in a few words, from a library's message ("" if unknown)."""
    lowered = text.lower()
    for needle, reason in _CONNECTION_REASONS:
        if needle in lowered:
            return reason
    return ""


def _obstore_cause(text: str) -> str:
    """The useful part of an obstore message without a status: what failed and why."""
    first = text.split("\n", 1)[0]
    if " - " in first:
        first = first.split(" - ", 1)[1]
    reason = _connection_reason(text)
    if not reason and "kind: connect" in text.lower():
        reason = "cannot connect"
    return f"{reason} ({_short(first)})" if reason else _short(first)


def _short(e: object, n: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _no_credentials_hint(e: Exception) -> str:
    import botocore.exceptions as bexc

    if isinstance(e, bexc.NoCredentialsError):
        return (
            "no credentials found: give --access-key/--secret-key (or LOFT_ACCESS_KEY/"
            "LOFT_SECRET_KEY), set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or configure an "
            "AWS profile or role"
        )
    return f"cannot load credentials: {_short(e)}"


# --- the store --------------------------------------------------------------------------------


def _credential(
    access_key: str, secret_key: str, token: str | None, expires: datetime | None
) -> S3Credential:
    """obstore's credential record."""
    out: S3Credential = {
        "access_key_id": access_key,
        "secret_access_key": secret_key,
        "expires_at": expires,
    }
    if token:
        out["token"] = token
    return out


def _tree_safe_start(start_after: str) -> str:
    """A start-after for servers that list a directory tree and skip everything under the
    "directory" a start-after names (``a`` and ``a/`` skip ``a/b``): one character before
    that name, so the directory is listed, or none when that ends at a directory boundary
    (which they would skip as well). Callers drop the entries up to the real start-after."""
    earlier = start_after.rstrip("/")[:-1]
    return "" if not earlier or earlier.endswith("/") else earlier


def _list_page(client: BaseClient, kw: dict[str, Any]) -> dict[str, Any]:
    page: dict[str, Any] = client.list_objects_v2(**kw)
    return page


class S3ObjectStore(ObjectStore):
    """One bucket. Key prefixes are ``PrefixStore``'s business (``open_s3`` adds one)."""

    def __init__(self, location: S3Location, options: S3Options | None = None) -> None:
        self.location = location
        self.options = options or S3Options()
        self.bucket = location.bucket
        self._where = location.describe().rstrip("/")
        self._lock = threading.RLock()  # the credential callback may run under it
        self._session: boto3.session.Session | None = None
        self._client: BaseClient | None = None
        self._store: S3Store | None = None
        self._closed = False
        self._tree: bool | None = None  # does the server list a directory tree? (``list``)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.location.describe()!r}, {self.options!r})"

    def describe(self) -> str:
        return self.location.describe()

    # --- clients, built on first use ------------------------------------------------------

    def _region(self, session: boto3.session.Session) -> str:
        return self.options.region or session.region_name or DEFAULT_REGION

    def _static(self) -> bool:
        """True when obstore needs nothing of boto3: keys given (no profile), and the region
        given or with nowhere else to come from (a custom endpoint, no AWS config file, no
        ``AWS_DEFAULT_REGION``), so the answer is the one boto3's chain would give."""
        o = self.options
        if not (o.access_key and o.secret_key) or o.profile:
            return False
        if o.region:
            return True
        config = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
        return (
            self._endpoint() is not None
            and not os.environ.get("AWS_DEFAULT_REGION")
            and not os.environ.get("AWS_PROFILE")
            and not os.path.exists(config)
        )

    def _get_session(self) -> boto3.session.Session:
        """The boto3 session holding the credential chain (caller holds ``_lock``)."""
        if self._session is None:
            import boto3
            import botocore.exceptions as bexc

            o = self.options
            try:
                self._session = boto3.session.Session(
                    aws_access_key_id=o.access_key or None,
                    aws_secret_access_key=o.secret_key or None,
                    aws_session_token=o.session_token or None,
                    region_name=o.region or None,
                    profile_name=o.profile or None,
                )
            except bexc.BotoCoreError as e:
                raise _botocore_error(e, "open", self._where) from None
        return self._session

    def _endpoint(self) -> str | None:
        """A custom endpoint: the location's, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
        (read here, so both clients use the same one); ``None``: AWS, by region."""
        if self.location.endpoint:
            return self.location.endpoint
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var):
                return normalize_endpoint(os.environ[var])
        return None

    def _boto(self) -> BaseClient:
        """The boto3 client (listings, batch deletes, bucket creation)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._closed:
                raise ObjectStoreError(f"{self._where}: the store is closed")
            if self._client is None:
                import botocore.exceptions as bexc
                from botocore.config import Config

                session = self._get_session()
                endpoint = self._endpoint()
                o = self.options
                config = Config(
                    region_name=self._region(session),
                    connect_timeout=o.connect_timeout,
                    read_timeout=o.read_timeout,
                    max_pool_connections=o.max_connections,
                    retries={"total_max_attempts": 1, "mode": "standard"},  # RetryStore retries
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    tcp_keepalive=True,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                try:
                    self._client = session.client("s3", endpoint_url=endpoint, config=config)
                except (bexc.BotoCoreError, ValueError) as e:
                    raise _botocore_error(e, "open", self._where) from None
            return self._client

    def _credentials(self) -> S3Credential:
        """Current credentials from the boto3 chain, for obstore (which calls this itself when
        the ones it holds expire)."""
        o = self.options
        if self._static():
            return _credential(o.access_key, o.secret_key, o.session_token, None)
        import botocore.exceptions as bexc
        from botocore.credentials import RefreshableCredentials

        with self._lock:
            session = self._get_session()
        try:
            creds = session.get_credentials()
            if creds is None:
                raise bexc.NoCredentialsError()
            frozen = creds.get_frozen_credentials()
        except bexc.BotoCoreError as e:
            raise _botocore_error(e, "load credentials", self._where) from None
        expires: datetime | None = None
        if isinstance(creds, RefreshableCredentials):
            expires = datetime.now(UTC) + timedelta(seconds=_CREDENTIAL_CHECK_S)
        return _credential(frozen.access_key, frozen.secret_key, frozen.token, expires)

    def _obstore(self) -> S3Store:
        """The obstore store (the data path). Credentials are resolved here first, so a
        missing or broken credential chain is one clear ``ObjectAuthError``."""
        store = self._store
        if store is not None:
            return store
        self._credentials()  # fail early and clearly
        with self._lock:
            if self._closed:
                raise ObjectStoreError(f"{self._where}: the store is closed")
            if self._store is None:
                from obstore.store import S3Store

                if self._static():
                    region = self.options.region or DEFAULT_REGION
                else:
                    region = self._region(self._get_session())
                endpoint = self._endpoint()
                virtual = False
                if endpoint is None:  # AWS; spelled out so no AWS_* variable changes it
                    virtual = "." not in self.bucket  # dotted names break TLS when virtual
                    host = f"{self.bucket}.s3" if virtual else "s3"
                    endpoint = f"https://{host}.{region}.amazonaws.com"
                o = self.options
                kwargs: dict[str, Any] = {
                    "region": region,
                    "endpoint": endpoint,
                    "virtual_hosted_style_request": virtual,
                    "skip_signature": False,
                    "unsigned_payload": False,  # the body's SHA-256 is signed
                    "request_payer": False,
                }
                try:
                    self._store = S3Store(
                        self.bucket,
                        client_options={
                            "allow_http": endpoint.startswith("http://"),
                            "connect_timeout": timedelta(seconds=o.connect_timeout),
                            "read_timeout": timedelta(seconds=o.read_timeout),
                            "timeout": timedelta(seconds=o.request_timeout),
                            "pool_max_idle_per_host": str(o.max_connections),
                            "pool_idle_timeout": timedelta(seconds=60),
                        },
                        retry_config={  # RetryStore retries
                            "max_retries": 0,
                            "retry_timeout": timedelta(seconds=0),
                        },
                        credential_provider=self._credentials,
                        **kwargs,
                    )
                except Exception as e:
                    raise ObjectStoreError(f"open {self._where}: {_short(e)}") from None
            return self._store

    # --- call wrappers --------------------------------------------------------------------

    def _ob(self, what: str, fn: Callable[[S3Store], T]) -> T:
        store = self._obstore()
        try:
            return fn(store)
        except ObjectStoreError:
            raise
        except Exception as e:
            raise _obstore_error(e, what, self._where) from None

    def _bt(self, what: str, fn: Callable[[BaseClient], T]) -> T:
        client = self._boto()
        try:
            return fn(client)
        except ObjectStoreError:
            raise
        except Exception as e:
            raise _botocore_error(e, what, self._where) from None

    # --- operations -----------------------------------------------------------------------

    def create(self) -> None:
        """Create the bucket unless it exists. A listing tells existence apart from wrong
        credentials (HEAD answers carry no error code); without permission to create, the
        ``ObjectAuthError`` names the bucket. A bucket that exists but may not be listed is left
        to the caller's own checks."""
        client = self._boto()
        import botocore.exceptions as bexc

        try:
            client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            return
        except bexc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code != "NoSuchBucket":
                err = _botocore_error(e, "list", self._where)
                if code in _DENIED:
                    return  # it exists, or may: the caller's probe says what is allowed
                raise err from None
        except Exception as e:
            raise _botocore_error(e, "list", self._where) from None
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = client.meta.region_name
        if self._endpoint() is None and region and region != DEFAULT_REGION:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**kwargs)
        except bexc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "BucketAlreadyOwnedByYou":
                return  # created meanwhile by someone with our credentials
            if code == "BucketAlreadyExists":
                raise ObjectStoreError(
                    f"bucket {self.bucket!r} belongs to another account: choose another name"
                ) from None
            err = _botocore_error(e, "create bucket", self._where)
            if isinstance(err, ObjectAuthError):
                raise ObjectAuthError(
                    f"bucket {self.bucket!r} does not exist at {self._endpoint_name()} and these "
                    "credentials may not create it: create it first, or use credentials "
                    "allowed to"
                ) from None
            raise err from None
        except Exception as e:
            raise _botocore_error(e, "create bucket", self._where) from None

    def _endpoint_name(self) -> str:
        return self.location.endpoint or "AWS S3"

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        """Whole object, or a range. The body's length is checked against the range the server
        says it sent and the object's size: a short body is an ``ObjectTransientError`` (the
        connection broke), never data. A range starting at or past the end is ``b""``."""
        return self._get(key, offset, limit, None)

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        """``get``, checked against the ETag the server sends with the body itself (so the
        bytes returned are of that version, with no window between a check and the read)."""
        return self._get(key, offset, limit, etag)

    def _get(self, key: str, offset: int, limit: int, etag: str | None) -> bytes:
        check_key(key)
        if offset < 0:
            raise ObjectStoreError(f"invalid offset {offset} for {key!r}")
        if limit == 0:
            info = self.head(key)  # the answer is empty, but a missing object is still an error
            if etag is not None and info.etag != etag:
                raise self._changed(key, etag, info.etag)
            return b""
        options: GetOptions = {}
        if limit > 0:
            options["range"] = (offset, offset + limit)
        elif offset:
            options["range"] = {"offset": offset}
        what = f"get {key!r}"
        store = self._obstore()
        try:
            result = obstore.get(store, key, options=options or None)
            start, end = result.range
            size = int(result.meta["size"])
            if etag is not None:
                current = (result.meta.get("e_tag") or "").strip('"')
                if current != etag:
                    raise self._changed(key, etag, current)
            body = bytes(result.bytes())
        except ObjectChanged:
            raise
        except Exception as e:
            if _is_invalid_range(e):
                if etag is not None:  # no body to check: ask for the version
                    info = self.head(key)
                    if info.etag != etag:
                        raise self._changed(key, etag, info.etag) from None
                return b""  # the object exists; the range starts at or past its end
            raise _obstore_error(e, what, self._where) from None
        want_end = size if limit < 0 else min(offset + limit, size)
        if start != offset or end != want_end or len(body) != end - start:
            raise ObjectTransientError(
                f"{what} in {self._where}: short or misplaced body "
                f"({len(body)} bytes for range {offset}-{want_end} of {size})"
            )
        return body

    def _changed(self, key: str, etag: str, current: str) -> ObjectChanged:
        return ObjectChanged(
            f"object {key!r} in {self._where} changed: ETag {etag!r} when recorded, {current!r} now"
        )

    def put(self, key: str, data: bytes) -> None:
        """One PUT (never multipart: blocks are at most 64 MiB); S3 makes it atomic."""
        check_key(key)
        self._ob(
            f"put {key!r}",
            lambda s: obstore.put(s, key, data, use_multipart=False),
        )

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self._ob(f"delete {key!r}", lambda s: obstore.delete(s, key))
        except ObjectNotFound as e:
            if str(e).startswith("bucket "):
                raise
            # S3 answers 204 for a missing key; some servers 404: the same answer

    def delete_many(self, keys: Iterable[str]) -> None:
        """``DeleteObjects`` in batches of 1000; missing keys are not errors. The first key the
        server refuses raises (typed by its error code) after the batch it belongs to."""
        batch: list[str] = []
        for key in keys:
            batch.append(check_key(key))
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        unique = list(dict.fromkeys(keys))  # a key twice in one request is an error on some
        try:
            self._ob(f"delete {len(unique)} objects", lambda s: obstore.delete(s, unique))
        except ObjectNotFound as e:
            if str(e).startswith("bucket "):
                raise
            # A server that reports missing keys as failures (S3 does not): missing is fine,
            # so delete one at a time, where a missing key is no error.
            for key in unique:
                self.delete(key)

    def head(self, key: str) -> ObjectInfo:
        check_key(key)
        meta = self._ob(f"head {key!r}", lambda s: obstore.head(s, key))
        modified = meta.get("last_modified")
        mtime_ns = int(modified.timestamp() * 1e9) if modified else 0
        return ObjectInfo(
            key=key,
            size=int(meta["size"]),
            mtime_ns=mtime_ns,
            etag=(meta.get("e_tag") or "").strip('"'),
        )

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        """ListObjectsV2, one page of up to 1000 entries at a time, fetched as the caller
        iterates. Objects and common prefixes of a page come merged in key order; entries at
        or before ``start_after`` are dropped (a common prefix equal to it included), so a
        listing resumed after its last entry never repeats it.

        Servers that list a directory tree (SeaweedFS, recognised by its ``Server`` header) get
        two corrections: a start-after naming a "directory" would skip the keys under it, so
        the request starts a little earlier and the difference is dropped here; and the
        "directories" their deletes leave behind would show as common prefixes, so each one is
        checked for a key first. What stays theirs: a listing longer than a page comes in tree
        order where a key continues a "directory" name with a character below ``/``
        (``a-b`` next to ``a/b``); loftfs's own keys never do. (For the same reason their pages
        are always asked whole, whatever the ``limit``.)"""
        if limit < 0:
            raise ObjectStoreError(f"invalid listing limit {limit}")
        return self._list(prefix, start_after, delimiter, limit)

    def _tree_listing(self, prefix: str) -> bool:
        """Whether the server lists a directory tree; asked once per store (one small page)."""
        if self._tree is None:
            kw: dict[str, Any] = {"Bucket": self.bucket, "MaxKeys": 1}
            if prefix:
                kw["Prefix"] = prefix
            page = self._bt("list", partial(_list_page, kw=kw))
            server = str(page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", ""))
            self._tree = server.lower().startswith(TREE_LISTING_SERVERS)
        return self._tree

    def _has_keys(self, prefix: str) -> bool:
        kw: dict[str, Any] = {"Bucket": self.bucket, "MaxKeys": 1, "Prefix": prefix}
        page = self._bt(f"list {prefix!r}", partial(_list_page, kw=kw))
        return bool(page.get("Contents"))

    def _list(
        self, prefix: str, start_after: str, delimiter: str, limit: int
    ) -> Iterator[ObjectInfo]:
        returned = 0
        token = ""
        what = f"list {prefix!r}" if prefix else "list"
        tree = self._tree_listing(prefix)
        server_after = start_after
        if tree and start_after:
            server_after = _tree_safe_start(start_after)
        if server_after and server_after < prefix:
            server_after = ""  # every key of the prefix comes after it anyway
        while True:
            kw: dict[str, Any] = {
                "Bucket": self.bucket,
                # a tree-listing server's page is put in key order here: ask for whole ones
                "MaxKeys": min(LIST_PAGE, limit - returned) if limit and not tree else LIST_PAGE,
            }
            if prefix:
                kw["Prefix"] = prefix
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            elif server_after:
                kw["StartAfter"] = server_after
            page: dict[str, Any] = self._bt(what, partial(_list_page, kw=kw))
            entries: list[ObjectInfo] = [
                ObjectInfo(
                    key=o["Key"],
                    size=int(o.get("Size", 0)),
                    mtime_ns=int(o["LastModified"].timestamp() * 1e9)
                    if o.get("LastModified")
                    else 0,
                    etag=str(o.get("ETag", "")).strip('"'),
                )
                for o in page.get("Contents", ())
            ]
            entries += [
                ObjectInfo(key=p["Prefix"], size=0, is_prefix=True)
                for p in page.get("CommonPrefixes", ())
            ]
            entries.sort(key=lambda i: i.key)
            for info in entries:
                if start_after and info.key <= start_after:
                    continue
                if tree and info.is_prefix and not self._has_keys(info.key):
                    continue  # an emptied "directory" the server still shows
                yield info
                returned += 1
                if limit and returned >= limit:
                    return
            token = page.get("NextContinuationToken", "")
            if not page.get("IsTruncated") or not token:
                return

    def close(self) -> None:
        """Release both connection pools; later calls raise ``ObjectStoreError``."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            self._store = None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing is best effort: nothing is lost
                pass


def open_s3(bucket: str, **kw: object) -> ObjectStore:
    """The s3 backend for ``bucket`` (``s3://bucket[/prefix]``, ``http(s)://host:port/bucket
    [/prefix]`` or a bare bucket name) with the options of ``OPTION_NAMES``: ``access_key`` and
    ``secret_key`` (both or neither; else the AWS chain: environment, profile, SSO, web
    identity, instance role), ``session_token``, ``region``, ``endpoint`` (with ``s3://``
    URLs), ``profile``, ``max_connections``, ``connect_timeout``, ``read_timeout`` and
    ``request_timeout`` (seconds). No network I/O happens here; ``ConfigError`` for bad
    input."""
    options = S3Options.from_kw(dict(kw))
    location = parse_s3_url(bucket, options.endpoint or None)
    store: ObjectStore = S3ObjectStore(location, options)
    if location.prefix:
        store = PrefixStore(store, location.prefix)
    return store
