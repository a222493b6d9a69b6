#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine for loftfs: system packages (FUSE 3, a C toolchain for
# pyfuse3, Python 3.11+) and a virtual environment in .venv with loftfs installed in it.
#
#   bash scripts/setup.sh          # to run loftfs
#   bash scripts/setup.sh --test   # plus the test tools (pytest, ruff, mypy, hypothesis)
#
# Safe to run again: packages already present are not reinstalled, and pip runs only when
# pyproject.toml changed since the last install. Needs root (or sudo) only to install packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=""
case "${1:-}" in
    "") ;;
    --test) extras="[test]" ;;  # also the servers the tests start: Redis, PostgreSQL
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

packages=(ca-certificates python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev attr)
if [[ -n $extras ]]; then
    # real servers for the backend tests (started by the tests on loopback, never as services)
    packages+=(redis-server postgresql)
fi
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "setup: run as root to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: loftfs needs Python 3.11 or newer; $("$python" --version 2>&1) found (set PYTHON=...)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    "$python" -m venv .venv
fi

# The stamp holds "<sha256 of pyproject.toml> <extras>" lines of past installs; a test install
# also satisfies a plain one.
stamp=".venv/.loftfs-installed"
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -n $extras ]]; then pattern="^$hash \\[test\\]\$"; else pattern="^$hash "; fi
if [[ ! -f $stamp ]] || ! grep -q "$pattern" "$stamp"; then
    echo "setup: installing loftfs${extras} into .venv"
    .venv/bin/python -m pip install --no-input -q -e ".${extras}" </dev/null
    echo "$hash ${extras:-[run]}" >>"$stamp"
fi
