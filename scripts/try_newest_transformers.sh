#!/usr/bin/env bash
# Try the newest transformers release the registry serves, before raising the pin in pyproject.toml.
#
#   bash scripts/try_newest_transformers.sh            # newest release
#   bash scripts/try_newest_transformers.sh 5.25.0     # a given one
#
# Builds a throwaway virtual environment (removed afterwards), installs the project as the README
# does, then that transformers release over the pin, and runs the fast tests (-m "not slow").
# Not part of CI. If it passes: add the version to TESTED_TRANSFORMERS
# (fastmmoe_compile/transformers_compat.py), raise the bound in pyproject.toml, run the full
# suite, and list the version in the README's tested versions.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
version="${1:-}"
if [ -z "$version" ]; then
    version="$(pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')"
    [ -n "$version" ] || { echo "could not ask the registry for transformers' versions" >&2; exit 2; }
fi
echo "trying transformers $version"
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# Over the pin on purpose: this is the trial that decides whether the pin may move.
pip install -q "transformers==$version"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python -m pytest -q -m "not slow" -x -p no:cacheprovider
echo "transformers $version passed the fast tests"
