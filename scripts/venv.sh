# Sourced by scripts/nasquant.sh and scripts/test.sh: create or reuse .venv with nasquant installed.
# torch is pinned to the 2.13.0 CPU build first: an unpinned torch pulls several GB of CUDA wheels.
# The venv is rebuilt when pyproject.toml changes (its hash is stamped inside the venv).
set -euo pipefail
NASQUANT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NASQUANT_VENV="${NASQUANT_VENV:-$NASQUANT_ROOT/.venv}"
_stamp="$NASQUANT_VENV/.nasquant-installed"
_want="$(sha256sum "$NASQUANT_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$NASQUANT_VENV/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "setting up $NASQUANT_VENV (first run takes a few minutes; log: $NASQUANT_VENV/install.log)..." >&2
  python3 -m venv "$NASQUANT_VENV"
  _pip() { "$NASQUANT_VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$NASQUANT_VENV/install.log" 2>&1; }
  if ! _pip "torch==2.13.0" || ! _pip -e "$NASQUANT_ROOT[dev]"; then
    tail -n 30 "$NASQUANT_VENV/install.log" >&2
    echo "nasquant: installing into $NASQUANT_VENV failed (full log above: $NASQUANT_VENV/install.log)" >&2
    exit 1
  fi
  echo "$_want" > "$_stamp"
fi
