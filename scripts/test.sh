#!/usr/bin/env bash
# The whole check, as CI runs it: setup with the test tools, lint, type check, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/cli -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --test
echo "test: ruff check"
.venv/bin/ruff check .
echo "test: mypy"
.venv/bin/mypy
echo "test: pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    # The mount-level suite once more through the second FUSE binding, then on the production
    # stacks: Redis or PostgreSQL metadata with S3 (SeaweedFS) data, servers on loopback.
    # The binding pass covers the request handlers (POSIX files, permissions, locks, xattrs);
    # the stack passes everything but the three longest workloads (a venv with pip, a copy of
    # the Python standard library, 2,000 files from a tar), which exercise no engine code the
    # others do not. The state machine runs 60 examples in these passes (120 in the main one).
    export LOFT_MODEL_EXAMPLES=60
    echo "test: pytest tests/mount with LOFT_FUSE_BINDING=pyfuse3"
    LOFT_FUSE_BINDING=pyfuse3 .venv/bin/pytest -q -p no:cacheprovider -m "not slow" \
        tests/mount/test_posix_basic.py tests/mount/test_posix_model.py \
        tests/mount/test_mount_permissions.py tests/mount/test_file_locks.py \
        tests/mount/test_xattr_quota.py
    # The two stack passes run side by side (each mostly waits on its servers and mounts; own
    # servers, ports and mountpoints), their output shown once both are done. Each has a temp
    # root of its own: pytest resets the mode of its shared one at start, which would lock the
    # other pass's PostgreSQL (running as the postgres user) out of its directory.
    pids=()
    dirs=()
    for stack in redis+s3 postgres+s3; do
        dir=$(mktemp -d /tmp/loftfs-stack.XXXXXX)
        dirs+=("$dir")
        (
            echo "test: pytest tests/mount with LOFT_TEST_STACK=$stack"
            LOFT_TEST_STACK=$stack .venv/bin/pytest -q -p no:cacheprovider -m "not slow" \
                --basetemp="$dir/tmp" \
                -k "not venv_and_pip and not python_stdlib and not tar_extract" tests/mount
        ) >"$dir/log" 2>&1 &
        pids+=($!)
    done
    status=0
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=1
        cat "${dirs[$i]}/log"
        rm -rf "${dirs[$i]}"
    done
    exit $status
fi
