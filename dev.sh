#!/usr/bin/env bash
# One entry point behind the README's commands:
#   bash dev.sh train [flags]   install if needed, then run the main job
#   bash dev.sh test  [pytest args]   install if needed, then run the whole test suite
#   bash dev.sh docs  [mkdocs build args]   install the docs extra if needed, then build
#                     the documentation site into site/ (strict: any warning fails)
# Where Python already has torch (the GPU machines: torch 2.11 + triton 3.6) that torch is
# used as it is; elsewhere a virtual environment .venv gets the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)

py_ok() { "$1" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; }
base=${PYTHON:-python3}
py_ok "$base" || { echo "dev.sh: Python 3.11+ is needed (tried '$base')" >&2; exit 2; }

if [ -x .venv/bin/python ]; then
    PY=$root/.venv/bin/python
elif "$base" -c 'import torch' 2>/dev/null; then
    PY=$(command -v "$base")
else
    echo "dev.sh: creating .venv with the CPU build of torch 2.13.0" >&2
    "$base" -m venv .venv
    PY=$root/.venv/bin/python
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
fi

stamp=.venv-stamp-$("$PY" -c 'import sys; print(sys.prefix.replace("/", "_"))')
if ! "$PY" -c 'import adaptive_moe, msgpack, pytest, pytest_timeout' 2>/dev/null \
        || [ pyproject.toml -nt ".git/$stamp" ]; then
    if [ "$PY" = "$root/.venv/bin/python" ]; then
        # torch is already there, so pip keeps it and never pulls a CUDA build.
        "$PY" -m pip install -q 'triton==3.6.0; platform_system == "Linux"' \
            -e ".[test,transformers]"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
            || echo "dev.sh: could not install into $PY; running from the source tree" >&2
    fi
    touch ".git/$stamp" 2>/dev/null || true
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

cmd=${1:-}
shift || true
case "$cmd" in
    test)
        # Two pytest workers (pytest-xdist, in the test extra) keep both CPU cores busy
        # while spawned gloo ranks start up; without xdist the suite runs in one process.
        workers=()
        "$PY" -c 'import xdist' 2>/dev/null && workers=(-n 2)
        exec "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" "$@" ;;
    docs)
        # The docs extra of pyproject.toml is the one list of what the build needs.
        if ! "$PY" -c 'import mkdocs, mkdocstrings_handlers.python' 2>/dev/null; then
            mapfile -t docs_deps < <("$PY" -c 'import tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]:
    print(d)')
            "$PY" -m pip install -q "${docs_deps[@]}" || {
                echo "dev.sh: could not install the docs extra (${docs_deps[*]}) into $PY" >&2
                exit 2
            }
        fi
        exec "$PY" -m mkdocs build --strict "$@" ;;
    train) exec "$PY" -m adaptive_moe train "$@" ;;
    *)     exec "$PY" -m adaptive_moe "$cmd" "$@" ;;
esac
