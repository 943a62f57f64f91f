#!/usr/bin/env sh
# Installs the pinned third-party MCP clients used by tests/mcp_interop.rs:
#   - the official Python SDK (PyPI `mcp`, tests/peers/requirements.txt) into .venv
#   - the MCP Inspector CLI (npm, tests/peers/inspector/package-lock.json) into
#     tests/peers/inspector/node_modules
# Idempotent: re-running only installs what is missing or changed. Run from anywhere.
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/peers/requirements.txt
if [ -f tests/peers/inspector/package-lock.json ]; then
    npm ci --prefix tests/peers/inspector --no-audit --no-fund --loglevel=error
else
    npm install --prefix tests/peers/inspector --no-audit --no-fund --loglevel=error
fi
echo "peers installed: $(.venv/bin/python -c 'import importlib.metadata as m; print("mcp", m.version("mcp"))'), inspector $(node -p 'require("./tests/peers/inspector/node_modules/@modelcontextprotocol/inspector/package.json").version')"
