# Sourced by the scripts in this folder: makes and activates a virtual environment with the package.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  VENV="${VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  source "$VENV/bin/activate"
fi
if ! python -c "import solvers, pytest, xdist" >/dev/null 2>&1 || [ -n "${CI:-}" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test]"
fi
