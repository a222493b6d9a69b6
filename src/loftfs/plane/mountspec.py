"""What ``loft mount --control`` fetches from the control plane and how it travels.

The control plane answers ``mount-config`` with the volume's metadata URL (its own credentials
inside), its storage credentials and its encryption key. None of it is ever put on a command
line, into an environment that ``/proc/PID/environ`` shows, or into a file: the background
mount's child receives the whole spec through a pipe, and the storage keys are set in the
mount process's own environment only after it started.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from loftfs.errors import ConfigError
from loftfs.object.encrypt import KEY_SIZE, VolumeSecret

# storage_options of a mount-config -> the variables open_volume_storage reads
_STORAGE_ENV = {
    "access_key": "LOFT_ACCESS_KEY",
    "secret_key": "LOFT_SECRET_KEY",
    "session_token": "LOFT_SESSION_TOKEN",
}
CONTROL_PREFIX = "control:"


def parse_volume_ref(ref: str) -> tuple[str | None, str]:
    """``TENANT/VOLUME`` -> (tenant, volume); a bare ``VOLUME`` -> (None, volume): the tenant
    of the token then."""
    ref = ref.strip()
    if ref.startswith(CONTROL_PREFIX):
        ref = ref[len(CONTROL_PREFIX) :]
    tenant, sep, volume = ref.rpartition("/")
    if (sep and not tenant) or not volume or "/" in tenant:
        raise ConfigError(f"invalid volume {ref!r}: give TENANT/VOLUME (or VOLUME)")
    return (tenant or None), volume


@dataclass(frozen=True)
class ControlSpec:
    """A volume's mount configuration as fetched from the control plane."""

    label: str  # control:TENANT/VOLUME, what the command line and the mount record show
    meta_url: str = field(repr=False)
    secret: VolumeSecret = field(repr=False)
    storage_env: dict[str, str] = field(repr=False, default_factory=dict)
    read_only: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ControlSpec:
        """From the API's MountConfig; ``ConfigError`` when it is malformed."""
        try:
            key = bytes.fromhex(str(config["encryption_key"]))
            if len(key) != KEY_SIZE:
                raise ValueError("bad key size")
            options = config.get("storage_options") or {}
            env = {_STORAGE_ENV[k]: str(v) for k, v in options.items() if k in _STORAGE_ENV and v}
            return cls(
                label=f"{CONTROL_PREFIX}{config['tenant']}/{config['volume']}",
                meta_url=str(config["meta_url"]),
                secret=VolumeSecret("key", key, "the control plane"),
                storage_env=env,
                read_only=bool(config.get("read_only", False)),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(
                f"the control plane sent a malformed mount configuration ({e})"
            ) from None

    def to_wire(self) -> bytes:
        return json.dumps(
            {
                "label": self.label,
                "meta_url": self.meta_url,
                "secret": self.secret.to_wire().decode(),
                "storage_env": self.storage_env,
                "read_only": self.read_only,
            }
        ).encode()

    @classmethod
    def from_wire(cls, data: bytes) -> ControlSpec:
        try:
            obj = json.loads(data)
            return cls(
                label=str(obj["label"]),
                meta_url=str(obj["meta_url"]),
                secret=VolumeSecret.from_wire(obj["secret"].encode()),
                storage_env={str(k): str(v) for k, v in obj["storage_env"].items()},
                read_only=bool(obj["read_only"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"malformed mount spec from the parent process ({e})") from None

    def apply_env(self) -> None:
        """The storage credentials into this process's environment (after exec: invisible
        in /proc/PID/environ), replacing any the caller had set."""
        for name in _STORAGE_ENV.values():
            os.environ.pop(name, None)
        os.environ.update(self.storage_env)


def fetch_spec(
    control: str,
    token: str | None,
    volume_ref: str,
    *,
    read_only: bool = False,
    ca_file: str | None = None,
) -> ControlSpec:
    """The mount spec of ``TENANT/VOLUME`` (or ``VOLUME`` of the token's tenant)."""
    from loftfs.plane.client import connect

    tenant, volume = parse_volume_ref(volume_ref)
    with connect(control, token, ca_file=ca_file) as client:
        if tenant is None:
            tenant = client.whoami().get("tenant")
            if not tenant:
                raise ConfigError(f"give the volume as TENANT/{volume}: this token has no tenant")
        return ControlSpec.from_config(client.mount_config(tenant, volume, read_only=read_only))
