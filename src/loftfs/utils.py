"""Small helpers shared by the CLI and the library: sizes, time."""

from __future__ import annotations

import re
import time

from loftfs.errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, default_unit: str = "") -> int:
    """Parse a size like ``4M``, ``1.5G``, ``4096``, ``64KiB`` into bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(
            f"invalid size {text!r} (expected a number with an optional K/M/G/T/P suffix)"
        )
    number, unit = m.group(1), (m.group(2) or default_unit).upper()
    return int(float(number) * _UNITS[unit])


def format_size(n: float) -> str:
    """Human-readable binary size: ``4.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def now_ns() -> int:
    return time.time_ns()
