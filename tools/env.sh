# Sourced by tools/test.sh and tools/demo.sh: make .venv if missing and install the project into it.
# Usage: . tools/env.sh EXTRAS   (e.g. "dev"; empty for the core package)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c tools/constraints-cpu.txt)  # no GPU: the CPU build of torch
fi
spec=".${extras:+[$extras]}"
stamp=".venv/.installed-$(cat pyproject.toml tools/constraints-cpu.txt | sha256sum | cut -c1-16)-${extras:-core}"
if [ ! -f "$stamp" ]; then
    echo "installing pretrain$spec into .venv ..."
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${constraints[@]}" -e "$spec"
    touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
