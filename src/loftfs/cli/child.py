"""The process of a background mount: ``python -m loftfs.cli.child META_URL MOUNTPOINT
--ready-fd N --launch-fd M``.

``loft mount -d`` checks the flags, reads secrets and fetches a control-plane spec, then
starts this child with everything it decided in a *launch document* (JSON) written into the
pipe ``--launch-fd``: the mount options, the volume secret or the control-plane spec, and
whether to log at DEBUG. The child answers on ``--ready-fd`` with one line: ``ready`` once the
mount answers, or ``error <message>``.

The child lives as long as the mount, so it loads only what serving needs: no command-line
framework (typer with click, rich and pydantic), which would stay resident for nothing (about
12 MiB on top of what serving loads). ``META_URL`` (the control-plane label for a
control-plane mount, never credentials the parent did not already see on its own command
line) and ``MOUNTPOINT`` are on the command line so that ``ps`` shows which mount a process
serves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

from loftfs.errors import ConfigError, LoftError, one_line
from loftfs.vfs.options import MountOptions

if TYPE_CHECKING:
    from loftfs.object.encrypt import VolumeSecret
    from loftfs.plane.mountspec import ControlSpec

READY = b"ready"
ERROR_PREFIX = b"error "
ENV_DEBUG = "LOFT_DEBUG"


def child_args(meta_url: str, mountpoint: str, ready_fd: int, launch_fd: int) -> list[str]:
    """The command the background mount runs; the rest travels in the launch document."""
    return [
        sys.executable,
        "-m",
        "loftfs.cli.child",
        meta_url,
        os.path.abspath(mountpoint),
        "--ready-fd",
        str(ready_fd),
        "--launch-fd",
        str(launch_fd),
    ]


def launch_document(
    opts: MountOptions,
    *,
    secret: VolumeSecret | None = None,
    spec: ControlSpec | None = None,
    debug: bool = False,
) -> bytes:
    """What the child needs beyond its command line (secrets included: it goes through a
    pipe, never argv, the environment or a file)."""
    doc: dict[str, Any] = {"options": dataclasses.asdict(opts), "debug": debug}
    if spec is not None:
        doc["spec"] = spec.to_wire().decode()
    elif secret is not None:
        doc["secret"] = secret.to_wire().decode()
    return json.dumps(doc).encode()


@dataclasses.dataclass
class Launch:
    opts: MountOptions
    secret: VolumeSecret | None
    spec: ControlSpec | None
    debug: bool


def parse_launch(data: bytes) -> Launch:
    """The launch document read back; ``ConfigError`` if it is not one."""
    try:
        doc = json.loads(data)
        opts = MountOptions(**doc["options"])
        debug = bool(doc.get("debug", False))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"malformed launch document from the parent process ({e})") from None
    secret: VolumeSecret | None = None
    spec: ControlSpec | None = None
    if "spec" in doc:
        from loftfs.plane.mountspec import ControlSpec

        spec = ControlSpec.from_wire(str(doc["spec"]).encode())
    elif "secret" in doc:
        from loftfs.object.encrypt import VolumeSecret

        secret = VolumeSecret.from_wire(str(doc["secret"]).encode())
    return Launch(opts, secret, spec, debug)


def read_pipe(fd: int, what: str) -> bytes:
    """Everything the parent wrote into pipe ``fd`` (then closed); the pipe is closed here."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read {what} from fd {fd}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return b"".join(chunks)


class ReadyPipe:
    """The child's end of the status pipe: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: bytes) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, line + b"\n")
        except OSError:
            pass  # the parent gave up waiting; the log has the story
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def run_foreground(
    meta_url: str,
    mountpoint: str,
    opts: MountOptions,
    pipe: ReadyPipe | None = None,
    secret: VolumeSecret | None = None,
    record_url: str | None = None,
) -> None:
    """Serve the mount in this process; tell the waiting parent (if any) how it went."""
    from loftfs.fuse.mount import run_mount

    pipe = pipe or ReadyPipe(None)

    def on_ready() -> None:
        pipe.send(READY)

    try:
        run_mount(
            meta_url, mountpoint, opts, on_ready=on_ready, secret=secret, record_url=record_url
        )
    except LoftError as e:
        pipe.send(ERROR_PREFIX + one_line(str(e)).encode())
        raise
    except BaseException as e:
        pipe.send(ERROR_PREFIX + one_line(f"unexpected {type(e).__name__}: {e}").encode())
        raise
    pipe.send(ERROR_PREFIX + b"the mount process stopped before the mount was ready")


def setup_logging(log_file: str | None, debug: bool) -> None:
    """Log to ``log_file`` (appending) or stderr, at DEBUG or INFO."""
    handler: logging.Handler
    if log_file:
        parent = os.path.dirname(os.path.abspath(log_file))
        os.makedirs(parent, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def debug_from_env() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loftfs.cli.child", description="The process of a background 'loft mount -d'."
    )
    parser.add_argument("meta_url")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--launch-fd", type=int, required=True)
    args = parser.parse_args(argv)
    ready = ReadyPipe(args.ready_fd)
    debug = debug_from_env()
    try:
        launch = parse_launch(read_pipe(args.launch_fd, "the launch document"))
        debug = debug or launch.debug
        setup_logging(None, debug)  # stderr: the parent pointed it at the log file
        meta_url, record_url = args.meta_url, None
        if launch.spec is not None:
            launch.spec.apply_env()
            meta_url, record_url = launch.spec.meta_url, launch.spec.label
        secret = launch.spec.secret if launch.spec is not None else launch.secret
        run_foreground(meta_url, args.mountpoint, launch.opts, ready, secret, record_url)
    except LoftError as e:
        ready.send(ERROR_PREFIX + one_line(str(e)).encode())  # no-op if already answered
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"loft: error: {one_line(str(e) or type(e).__name__)}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
