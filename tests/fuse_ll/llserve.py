"""Serve one volume through the low-level binding, wired as ``run_mount`` wires a mount.

Run as a script by the fixtures: ``llserve.py META_URL MOUNTPOINT [OPTIONS_JSON]``. Prints
``READY`` on stdout once the mount answers; logs go to stderr. SIGTERM, SIGINT and SIGHUP unmount
cleanly (buffered data committed, session closed); the exit status is 0 then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from loftfs.chunk.datapath import DataPath
from loftfs.fuse.adapter import mount_options
from loftfs.fuse.lowlevel import serve_lowlevel
from loftfs.meta import open_meta
from loftfs.meta.base import process_identity
from loftfs.object import open_volume_storage
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import VFS


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    meta_url, mountpoint = argv[0], os.path.realpath(argv[1])
    opts = MountOptions(**json.loads(argv[2])) if len(argv) > 2 else MountOptions()
    meta = open_meta(meta_url)
    settings = meta.load_settings()
    store = open_volume_storage(settings)
    data = DataPath(meta, store, settings, opts)
    vfs = VFS(meta, data, settings, opts)
    meta.new_session(
        {**process_identity(), "mountpoint": mountpoint, "version": "test"},
        heartbeat_s=opts.heartbeat_s,
    )
    try:
        data.start()
        serve_lowlevel(
            vfs,
            opts,
            mountpoint,
            mount_options(settings.name, opts),
            on_ready=lambda: print("READY", flush=True),
        )
    finally:
        try:
            vfs.shutdown()
            data.close()
        finally:
            with contextlib.suppress(Exception):
                meta.close_session()
            meta.close()
        logging.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
