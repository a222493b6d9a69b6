#!/usr/bin/env bash
# The whole check, as CI runs it: setup with the test tools, lint, type check, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/cli -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Passes that run side by side: `start_pass TITLE COMMAND [ARGS...]` starts one in the
# background (COMMAND gets a temp root of its own as its last argument: pytest resets the mode
# of its shared one at start, which would lock another pass's PostgreSQL, running as the
# postgres user, out of its directory); `wait_passes` waits for all, shows their output one
# after the other and fails if any failed. Each pass has its own servers, ports and mountpoints.
pids=()
dirs=()
start_pass() {
    local title=$1 dir
    shift
    dir=$(mktemp -d /tmp/loftfs-pass.XXXXXX)
    dirs+=("$dir")
    (
        echo "test: pytest $title"
        "$@" "$dir/tmp"
    ) >"$dir/log" 2>&1 &
    pids+=($!)
}
wait_passes() {
    local i status=0
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=1
        cat "${dirs[$i]}/log"
        rm -rf "${dirs[$i]}"
    done
    pids=()
    dirs=()
    return $status
}
pytest_pass() { # pytest_pass ARGS... TEMP_ROOT
    .venv/bin/pytest -q -p no:cacheprovider --basetemp="${*: -1}" "${@:1:$#-1}"
}
stack_pass() { # stack_pass STACK TEMP_ROOT
    LOFT_TEST_STACK=$1 pytest_pass -m "not slow" \
        -k "not venv_and_pip and not python_stdlib and not tar_extract" tests/mount "$2"
}

bash scripts/setup.sh --test
echo "test: ruff check"
.venv/bin/ruff check .
echo "test: mypy"
.venv/bin/mypy
if [ $# -gt 0 ]; then
    echo "test: pytest $*"
    exec .venv/bin/pytest -q -p no:cacheprovider "$@"
fi

# Everything, as two lanes side by side: the FUSE mount suite (mostly waiting on its mounts),
# and the rest (meta, object, chunk, cli, control plane... against real servers) followed by
# the mount-level suite once more through the second FUSE binding (the longer mount suite
# leaves that lane the time). The binding pass covers the request handlers (POSIX files,
# permissions, locks, xattrs); its state machine runs 60 examples (120 in the main pass).
binding_pass() { # binding_pass TEMP_ROOT
    LOFT_MODEL_EXAMPLES=60 LOFT_FUSE_BINDING=pyfuse3 pytest_pass -m "not slow" \
        tests/mount/test_posix_basic.py tests/mount/test_posix_model.py \
        tests/mount/test_mount_permissions.py tests/mount/test_file_locks.py \
        tests/mount/test_xattr_quota.py "$1"
}
rest_then_binding() { # rest_then_binding TEMP_ROOT
    mkdir -p "$1"
    pytest_pass --ignore=tests/mount tests "$1/rest" || return 1
    echo "test: pytest tests/mount with LOFT_FUSE_BINDING=pyfuse3"
    binding_pass "$1/binding"
}
start_pass "tests/mount" pytest_pass tests/mount
start_pass "tests (all but tests/mount)" rest_then_binding
wait_passes

# Then the production stacks: Redis or PostgreSQL metadata with S3 (SeaweedFS) data, servers
# on loopback; everything but the three longest workloads (a venv with pip, a copy of the
# Python standard library, 2,000 files from a tar), which exercise no engine code the others
# do not. The state machine runs 60 examples in these passes.
export LOFT_MODEL_EXAMPLES=60
start_pass "tests/mount with LOFT_TEST_STACK=redis+s3" stack_pass redis+s3
start_pass "tests/mount with LOFT_TEST_STACK=postgres+s3" stack_pass postgres+s3
wait_passes
