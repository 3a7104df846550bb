#!/usr/bin/env bash
# Checks the lower bounds pyproject.toml declares: installs the package into a throwaway virtual environment with
# every "name>=X" dependency pinned to exactly X (the others resolve as pip chooses), then runs a subset of the tests
# there. About 4 minutes on 2 cores once the wheels are downloaded (torch's are a few GB).
#
#   bash recipes/check_lowest_dependencies.sh                       # the default subset
#   bash recipes/check_lowest_dependencies.sh tests/test_model.py   # other test files
#
# The environment goes to a temporary folder, deleted at the end, or to $VENV, kept. torch comes from the registry's
# default wheels (with CUDA): PyPI's torchvision does not import next to the CPU-only torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VENV:-}" ]; then
    venv=$VENV
else
    venv=$(mktemp -d "${TMPDIR:-/tmp}/hf_freezecache-lowest.XXXXXX")
    trap 'rm -rf "$venv"' EXIT
fi
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_model.py tests/test_adapters.py tests/test_codecs.py tests/test_hub.py
        tests/test_trainer_integration.py tests/test_user_errors.py tests/test_model_source.py)
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# "name>=X" -> "name==X" for each dependency of [project]; tomllib is Python 3.11+, pip vendors it before that.
"$venv/bin/python" - pyproject.toml >"$venv/lowest.txt" <<'EOF'
import re
import sys

try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for dependency in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dependency)
    if match:
        print(f"{match[1]}=={match[2]}")
EOF
echo "Lowest declared versions:"
sed 's/^/  /' "$venv/lowest.txt"
"$venv/bin/python" -m pip install --quiet -c "$venv/lowest.txt" -e ".[dev]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|transformers|datasets|accelerate|timm|huggingface.hub|numpy) "
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -x -p no:cacheprovider "${tests[@]}"
