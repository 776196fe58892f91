#!/usr/bin/env bash
# Install everything the product and its tests need; safe to run again (skips what is there).
#   - uv (with pip) when missing, then the locked Python environment: uv sync --frozen
#   - the hot metric modules compiled by mypyc (scripts/compile_metrics.py; pure Python without a C compiler)
#   - Java 17+ and Maven (apt-get) when missing, then the Kafka jars (mvn, cached in infra/jars)
#   - redis-server (apt-get) when missing
#   - chromium (apt-get) when missing: the dashboard's browser tests drive it with Playwright (no browser download)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '==> %s\n' "$*"; }

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $* missing and apt-get is not available: install it by hand" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        $sudo apt-get update -q
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"
}

# Python environment from the lock.
PYTHON="$(command -v python3 || command -v python)"
if ! command -v uv >/dev/null 2>&1 && ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
    say "installing uv with pip"
    "$PYTHON" -m pip install --quiet uv
    hash -r
fi
# The uv binary may land outside PATH (pip --user, pyenv without rehash): `python -m uv` finds it.
uv() { if type -P uv >/dev/null; then command uv "$@"; else "$PYTHON" -m uv "$@"; fi; }
say "uv sync --frozen"
uv sync --frozen
# A C compiler for them when apt-get can install one; without it they stay pure Python.
if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then apt_install gcc libc6-dev; fi
say "compiled metrics (mypyc)"
uv run --frozen python scripts/compile_metrics.py

# Kafka: Java 17+ and Maven, then the jars.
if ! command -v java >/dev/null 2>&1; then apt_install openjdk-17-jre-headless; fi
if ! command -v mvn >/dev/null 2>&1 && ! uv run --frozen python -c 'import sys; from infra.local import jars_present; sys.exit(0 if jars_present() else 1)'; then
    apt_install maven
fi
say "Kafka jars"
uv run --frozen python -m infra.local jars

# Redis.
if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
# Debian's package starts a system redis on 6379; ours run on their own ports, leave it be.

# Chromium for the dashboard's browser tests: Playwright launches this system build (its own download is not used).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then apt_install chromium; fi

say "bootstrap done: $(uv run --frozen python --version), $(java -version 2>&1 | head -n1), $(redis-server --version | cut -d' ' -f1-3)"
