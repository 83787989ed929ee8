#!/usr/bin/env bash
# Lint and run the test suite, creating/reusing .venv first. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$NASQUANT_ROOT"
"$NASQUANT_VENV/bin/ruff" check nasquant tests
exec "$NASQUANT_VENV/bin/python" -m pytest -q "$@"
