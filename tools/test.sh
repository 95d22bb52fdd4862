#!/usr/bin/env bash
# The whole CPU test suite: makes .venv if missing, installs .[dev] with the CPU pins, runs pytest.
# Extra arguments go to pytest (e.g. tools/test.sh tests/models -x). Slow cases run when CI=true or SLOW=1.
set -euo pipefail
. "$(dirname "$0")/env.sh" dev
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
marker=(-m "not slow")
if [ "${CI:-}" = "true" ] || [ "${SLOW:-0}" = "1" ]; then
    marker=()
fi
exec python -m pytest "${marker[@]}" "$@"
