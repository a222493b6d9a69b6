"""Helpers shared by every ``loft`` command: one-line errors, opening a volume, tables, output.

Errors reach the user as one line on stderr (``loft: error: <message>``) with exit code 1, or 2
for usage errors; a traceback is shown only with ``--verbose`` or ``LOFT_DEBUG=1``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from loftfs.cli.child import debug_from_env
from loftfs.cli.child import setup_logging as log_to
from loftfs.errors import ConfigError, LoftError, NotFormatted, one_line
from loftfs.meta import Meta, open_meta
from loftfs.meta.types import SessionInfo, VolumeSettings

PROG = "loft"

# Sessions whose heartbeat is older than this are reported stale (the mount's default
# ``MountOptions.session_timeout_s``; engines clean them after the same delay).
STALE_AFTER_S = 60.0

_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "key")


class _State:
    """Process-wide CLI flags set by the top-level callback."""

    verbose: bool = False


state = _State()


def debug_enabled() -> bool:
    return state.verbose or debug_from_env()


def print_error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {one_line(message)}\n")
    sys.stderr.flush()


def print_warning(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {one_line(message)}\n")
    sys.stderr.flush()


def _describe_os_error(e: OSError) -> str:
    parts = [e.strerror or str(e)]
    if e.filename is not None:
        parts.append(str(e.filename))
    return ": ".join(parts)


class LoftGroup(TyperGroup):
    """The ``loft`` command group, wrapped so that every failure ends as one line and an exit
    code, both through the console script and through test runners that call ``main``."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._run(args, prog_name or PROG, complete_var, windows_expand_args, extra)
        if not standalone_mode:
            return code
        sys.exit(code)

    def _run(
        self,
        args: Sequence[str] | None,
        prog_name: str,
        complete_var: str | None,
        windows_expand_args: bool,
        extra: dict[str, Any],
    ) -> int:
        state.verbose = False
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except typer.Exit as e:
            return e.exit_code
        except typer.Abort:
            print_error("aborted")
            return 1
        except LoftError as e:
            if debug_enabled():
                traceback.print_exc()
            print_error(str(e) or type(e).__name__)
            return 1
        except typer.TyperException as e:  # usage errors and other parser failures
            message = e.format_message()
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
            print_error(message)
            return e.exit_code
        except KeyboardInterrupt:
            print_error("interrupted")
            return 130
        except OSError as e:
            if debug_enabled():
                traceback.print_exc()
            print_error(_describe_os_error(e))
            return 1
        except Exception as e:
            if debug_enabled():
                traceback.print_exc()
                print_error(f"unexpected {type(e).__name__}: {e}")
            else:
                print_error(
                    f"unexpected {type(e).__name__}: {e} "
                    "(run with --verbose or LOFT_DEBUG=1 for the traceback)"
                )
            return 1
        if isinstance(rv, int):
            return rv
        return 0


def confirm(question: str) -> bool:
    """Ask a yes/no question on stderr; anything but yes (EOF included) is no."""
    sys.stderr.write(f"{one_line(question)} [y/N]: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not (answer.endswith("\n") and sys.stdin.isatty()):
        sys.stderr.write("\n")  # the answer was not echoed: end the prompt's line
    return answer.strip().lower() in ("y", "yes")


# --- output ----------------------------------------------------------------------------------


def stdout_console() -> Console:
    """A console bound to the current ``sys.stdout`` (test runners swap it per call)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=False)


def say(message: str) -> None:
    """Print a plain message on stdout: no markup (paths may hold brackets), no wrapping."""
    stdout_console().print(message, markup=False, soft_wrap=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cell(value: Any) -> Text:
    """A table cell shown literally (user data is never read as markup)."""
    return Text(str(value))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, cell(value))
    return table


def print_table(table: Table) -> None:
    stdout_console().print(table)


# --- secrets ---------------------------------------------------------------------------------


def is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


_QUERY_SECRET = re.compile(r"([?&][^=&]*(?:secret|password|passwd|token|key)[^=&]*=)[^&]*", re.I)


def redact_url(url: str) -> str:
    """The URL without its password (``user:****@host``) or secret query values."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return url
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            url = url.replace(netloc, userinfo.split(":", 1)[0] + ":****@" + host, 1)
    return _QUERY_SECRET.sub(r"\1****", url)


def absolute_meta_url(url: str) -> str:
    """``sqlite3://relative/v.db`` made absolute against the current directory, so that a
    mount's record (read by ``loft info`` and ``loft umount`` from anywhere) names one database.
    Other URLs are returned unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.scheme.lower() != "sqlite3" or not parts.netloc:
        return url
    rest = url.split("://", 1)[1]
    return f"{parts.scheme}://{quote(os.getcwd())}/{rest}"


def public_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """Volume ``extra`` settings with secret values masked."""
    return {k: ("****" if is_secret_key(k) else v) for k, v in sorted(extra.items())}


# --- volumes ---------------------------------------------------------------------------------


@contextmanager
def meta_session(meta_url: str) -> Iterator[Meta]:
    """Connect to the metadata engine and always release it."""
    meta = open_meta(meta_url)
    try:
        yield meta
    finally:
        try:
            meta.close()
        except Exception:
            logging.getLogger(__name__).debug("closing the metadata engine failed", exc_info=True)


def load_settings(meta: Meta, meta_url: str) -> VolumeSettings:
    try:
        return meta.load_settings()
    except NotFormatted:
        raise NotFormatted(
            f"no volume at {redact_url(meta_url)} (run 'loft format' first)"
        ) from None


@contextmanager
def open_volume(meta_url: str) -> Iterator[tuple[Meta, VolumeSettings]]:
    """The metadata engine of a formatted volume and its settings."""
    with meta_session(meta_url) as meta:
        yield meta, load_settings(meta, meta_url)


def session_age_s(session: SessionInfo, now_ns: int | None = None) -> float:
    now = time.time_ns() if now_ns is None else now_ns
    return max(0.0, (now - session.heartbeat_ns) / 1e9)


def session_is_stale(session: SessionInfo, now_ns: int | None = None) -> bool:
    return session_age_s(session, now_ns) > STALE_AFTER_S


def format_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def non_negative(value: int, option: str) -> int:
    if value < 0:
        raise ConfigError(f"{option} must be 0 or more, not {value}")
    return value


# --- logging ---------------------------------------------------------------------------------


def setup_logging(log_file: str | None = None) -> None:
    """Log to ``log_file`` (appending) or stderr; DEBUG with --verbose / LOFT_DEBUG."""
    log_to(log_file, debug_enabled())
