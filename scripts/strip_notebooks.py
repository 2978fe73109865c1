"""Strips the outputs of the notebooks in colabs/ (or of the given .ipynb files), in place.

  python scripts/strip_notebooks.py            # strip every colabs/*.ipynb
  python scripts/strip_notebooks.py --check    # list what is not stripped; exit status 1 if anything

Stripped means: every code cell has no outputs and execution_count null, and no cell carries execution
metadata (nbclient's timing, Colab's "executionInfo" / "outputId"). tests/test_colabs.py uses ``problems``.
"""
import argparse
import glob
import os
import sys

import nbformat

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
# Per-cell metadata keys written by running a notebook (Jupyter / nbclient, Colab).
VOLATILE_METADATA = ("execution", "executionInfo", "outputId", "collapsed", "scrolled")


def problems(nb):
  """What keeps ``nb`` (a notebook node) from being stripped: a list of strings, empty when stripped."""
  found = []
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      if cell.get("outputs"):
        found.append(f"cell {index}: {len(cell.outputs)} output(s)")
      if cell.get("execution_count") is not None:
        found.append(f"cell {index}: execution_count {cell.execution_count}")
    volatile = sorted(set(cell.get("metadata", {})) & set(VOLATILE_METADATA))
    if volatile:
      found.append(f"cell {index}: metadata {', '.join(volatile)}")
  return found


def strip(nb):
  """``nb`` with its outputs, execution counts and execution metadata removed (modified in place)."""
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
    for key in VOLATILE_METADATA:
      cell.get("metadata", {}).pop(key, None)
  return nb


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="*", help="notebooks (default: colabs/*.ipynb)")
  parser.add_argument("--check", action="store_true", help="only report; exit 1 if a notebook is not stripped")
  args = parser.parse_args(argv)
  paths = args.paths or sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))
  dirty = 0
  for path in paths:
    if not path.endswith(".ipynb"):
      raise ValueError(f"{path!r} is not a notebook: pass .ipynb files")
    nb = nbformat.read(path, as_version=4)
    found = problems(nb)
    if not found:
      continue
    dirty += 1
    if args.check:
      print(f"{path}: " + "; ".join(found))
    else:
      nbformat.write(strip(nb), path)
      print(f"stripped {path}")
  return 1 if args.check and dirty else 0


if __name__ == "__main__":
  sys.exit(main())
