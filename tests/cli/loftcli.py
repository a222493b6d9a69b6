"""Helpers for the ``loft`` command-line tests: the real typer app run in process, the real
program run in a subprocess, and checks that every failure is one clean error line.

Imported by this folder's conftest and tests (the folder is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from loftfs.cli.main import app

LOFT = [sys.executable, "-m", "loftfs.cli.main"]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def check_clean_error(run: Run, code: int = 1) -> str:
    """The run failed with ``code`` and exactly one ``loft: error:`` line; returns it."""
    assert run.code == code, f"exit {run.code}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.error_lines
    assert len(lines) == 1, f"expected one error line, got: {run.stderr!r}"
    assert lines[0].startswith("loft: error: "), lines[0]
    return lines[0]


def loft(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``loft`` in process; an exception escaping the app fails the test."""
    result = CliRunner().invoke(app, list(args), input=input, env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"loft {' '.join(args)} raised {result.exception!r}")
    return Run(result.exit_code, result.stdout, result.stderr)


def loft_process(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """Run the real program in a subprocess, with no stdin."""
    proc = subprocess.run(
        [*LOFT, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def ok(run: Run) -> Run:
    assert run.code == 0, f"exit {run.code}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    return run


@dataclass
class Volume:
    meta_url: str
    bucket: Path
    name: str

    def status(self) -> dict:
        return json.loads(ok(loft("status", self.meta_url, "--json")).stdout)

    @property
    def uuid(self) -> str:
        return str(self.status()["settings"]["uuid"])


def bucket_files(bucket: Path) -> set[str]:
    """Every file below ``bucket`` as a relative path."""
    if not bucket.exists():
        return set()
    return {str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file()}


def mount_processes(mountpoint: Path) -> list[int]:
    """Mount processes of ``mountpoint``, found by command line (they may have no record)."""
    target = str(mountpoint).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if target in argv and b"loftfs.cli.child" in argv:
                    found.append(int(entry))
    return found
