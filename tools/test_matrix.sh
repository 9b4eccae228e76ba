#!/usr/bin/env bash
# The suite on every supported Python, each with the newest dependencies that
# install there, in its own .venv-<version>: the end-to-end tests (marker e2e)
# on the newest Python only, there on uvloop (`make test` runs them on 3.11, `make test-oldest`
# on 3.10 at the floors), everything else on each. An interpreter that cannot
# be found is an error, never a silent skip.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # the newest pyenv build of $1, else python$1 from PATH
    local found
    found=$(ls -d "$HOME"/.pyenv/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || found=$(command -v "python$1" || true)
    [ -n "$found" ] || { echo "test-matrix: Python $1 not found (pyenv or PATH)" >&2; return 1; }
    echo "$found"
}

newest="${!#}"
for version in "$@"; do
    python=$(find_python "$version")
    venv=".venv-$version"
    echo "== Python $version ($python)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[dev]'
    if [ "$version" = "$newest" ]; then
        # Its commands on uvloop, as FastAPI's "standard" extra gives users;
        # `make test` and `make test-oldest` run them on asyncio's loop.
        TASKIQ_FASTAPI_TEST_LOOP=uvloop "$venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-3}"
    else
        "$venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-3}" -m "not e2e"
    fi
done
