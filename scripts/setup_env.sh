# Sourced by the scripts in this folder: makes and activates a virtual environment with the package.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  VENV="${VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  source "$VENV/bin/activate"
fi
if ! python -c "import solvers, pytest, xdist, nbclient" >/dev/null 2>&1 || [ -n "${CI:-}" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test]"
fi
# The parity tests' peers (torch, diffusers; setup.cfg extra 'parity'). torch is pinned so that pip takes
# the CPU wheel (2.13.0+cpu) from the local find-links: a plain `torch` would pull GBs of CUDA packages.
# In CI a failure here fails the run; elsewhere it warns and tests/test_diffusers_parity.py skips.
if ! python -c "import torch, diffusers" >/dev/null 2>&1 || [ -n "${CI:-}" ]; then
  if ! python -m pip install --quiet -e ".[parity]"; then
    if [ -n "${CI:-}" ]; then
      echo "error: could not install the parity peers (pip install -e '.[parity]')" >&2
      return 1 2>/dev/null || exit 1
    fi
    echo "warning: could not install torch / diffusers; the diffusers parity tests will be skipped" >&2
  fi
fi
