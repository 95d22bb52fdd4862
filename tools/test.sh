#!/usr/bin/env bash
# The whole CPU test suite: makes .venv if missing, installs .[dev] with the CPU pins, runs pytest.
# Extra arguments go to pytest (e.g. tools/test.sh tests/models -x). Slow cases run when CI=true or SLOW=1.
# Files run in parallel on every core (pytest-xdist, one file per worker at a time); PYTEST_WORKERS=0 runs serially.
set -euo pipefail
. "$(dirname "$0")/env.sh" dev
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
marker=(-m "not slow")
if [ "${CI:-}" = "true" ] || [ "${SLOW:-0}" = "1" ]; then
    marker=()
fi
exec python -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadfile "${marker[@]}" "$@"
