"""Serve one volume through the low-level binding with ``run_mount``, as ``loft mount`` does.

Run as a script by the fixtures: ``llserve.py META_URL MOUNTPOINT [OPTIONS_JSON]``. Prints
``READY`` on stdout once the mount answers; logs go to stderr. SIGTERM, SIGINT and SIGHUP unmount
cleanly (buffered data committed, session closed); the exit status is 0 then.
"""

from __future__ import annotations

import json
import logging
import sys

from loftfs.fuse.mount import run_mount
from loftfs.vfs.options import MountOptions


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    meta_url, mountpoint = argv[0], argv[1]
    opts = MountOptions(**json.loads(argv[2])) if len(argv) > 2 else MountOptions()
    opts.fuse_binding = "lowlevel"
    run_mount(meta_url, mountpoint, opts, on_ready=lambda: print("READY", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
