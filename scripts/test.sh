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
    echo "test: pytest tests/mount with LOFT_FUSE_BINDING=pyfuse3"
    LOFT_FUSE_BINDING=pyfuse3 .venv/bin/pytest -q -p no:cacheprovider -m "not slow" tests/mount
    for stack in redis+s3 postgres+s3; do
        echo "test: pytest tests/mount with LOFT_TEST_STACK=$stack"
        LOFT_TEST_STACK=$stack .venv/bin/pytest -q -p no:cacheprovider -m "not slow" tests/mount
    done
fi
