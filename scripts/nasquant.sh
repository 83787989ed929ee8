#!/usr/bin/env bash
# Run the nasquant CLI from this checkout, creating/reusing .venv first.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec "$NASQUANT_VENV/bin/nasquant" "$@"
