"""API documentation checks: docstrings on every public object of solvers/ and models/, a paper cited by every
module that registers a solver, every registered name (and every file it points to) in docs/solvers.md."""
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re

import pytest

import models
import solvers
from solvers import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PAGE = os.path.join(ROOT, "docs", "solvers.md")
PACKAGES = (solvers, models)

# "Song et al. 2021", "Zhang & Chen 2023", "Lu et al. 2022b", "Karras, Aittala, Aila & Laine 2022": a capitalised
# name (or "et al.") right before a year.
AUTHOR_YEAR = re.compile(r"[A-Z][a-z][A-Za-z'-]*(?: et al\.)?,? \(?(?:19|20)\d\d[a-z]?\b")


def _module_names():
  names = []
  for package in PACKAGES:
    for info in pkgutil.iter_modules(package.__path__):
      names.append(f"{package.__name__}.{info.name}")
  return sorted(names)


MODULES = _module_names()


def _is_auto_doc(cls):
  """Whether cls has no docstring of its own (or only the one dataclasses / NamedTuple generate)."""
  doc = cls.__dict__.get("__doc__")
  if not doc or not doc.strip():
    return True
  if hasattr(cls, "_fields") and doc == f"{cls.__name__}({', '.join(cls._fields)})":
    return True
  if dataclasses.is_dataclass(cls):
    try:
      generated = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    except (TypeError, ValueError):
      return False
    return doc == generated
  return False


def _function_of(member):
  """The plain function behind a method, classmethod, staticmethod or property (None for other attributes)."""
  if isinstance(member, property):
    member = member.fget
  member = getattr(member, "__func__", member)
  return member if inspect.isfunction(member) else None


def _documented_in_mro(cls, name):
  """Whether ``cls.name`` or the member it overrides along the MRO has a docstring (a protocol method such as
  ``Solver.init`` is documented once, on the base class)."""
  for klass in cls.__mro__:
    function = _function_of(vars(klass).get(name))
    if function is not None and (function.__doc__ or "").strip():
      return True
  return False


def _ours(obj):
  return (getattr(obj, "__module__", None) or "").split(".")[0] in {p.__name__ for p in PACKAGES}


def undocumented(module):
  """The public functions, classes, methods and properties defined in ``module`` that have no docstring."""
  missing = []
  if not (module.__doc__ or "").strip():
    missing.append(f"{module.__name__} (module docstring)")
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      if not (obj.__doc__ or "").strip():
        missing.append(f"{module.__name__}.{name}")
    elif inspect.isclass(obj):
      if _is_auto_doc(obj):
        missing.append(f"{module.__name__}.{name} (class)")
      for member_name in sorted(dir(obj)):
        if member_name.startswith("_"):
          continue
        owner = next((k for k in obj.__mro__ if member_name in vars(k)), None)
        function = _function_of(vars(owner).get(member_name)) if owner is not None else None
        # Only methods written in a class body of this project (not, e.g., the ``replace`` that
        # ``pytree_dataclass`` attaches, or NamedTuple's ``count``).
        if function is None or not _ours(owner) or "<locals>" in function.__qualname__:
          continue
        if not _documented_in_mro(obj, member_name):
          missing.append(f"{module.__name__}.{name}.{member_name}")
  return missing


@pytest.mark.parametrize("name", MODULES)
def test_every_public_object_has_a_docstring(name):
  missing = undocumented(importlib.import_module(name))
  assert not missing, f"{len(missing)} public objects without a docstring: " + ", ".join(missing)


def test_the_check_catches_a_missing_docstring():
  """The checker itself: an undocumented function, class, method and property are all reported, documented ones
  and inherited protocol docstrings are not, and a dataclass's generated docstring does not count."""
  source = '''
"""A module."""
import dataclasses

def documented():
  """Yes."""

def bare():
  pass

class Base:
  """A base."""
  def step(self):
    """The protocol method, documented once."""

@dataclasses.dataclass
class Data(Base):
  x: int = 0
  def step(self):
    return 1
  def helper(self):
    return 2
  @property
  def size(self):
    return 3
'''
  module = type(os)("models._docstring_probe")
  exec(compile(source, "<probe>", "exec"), module.__dict__)
  for obj in vars(module).values():
    if inspect.isclass(obj) or inspect.isfunction(obj):
      obj.__module__ = module.__name__
  missing = undocumented(module)
  assert missing == ["models._docstring_probe.Data (class)", "models._docstring_probe.Data.helper",
                     "models._docstring_probe.Data.size", "models._docstring_probe.bare"]


def _registering_modules():
  """Every module that registers a solver: where its factory (a class or a function) is defined."""
  return sorted({factory.__module__ for factory in base._REGISTRY.values()})


def test_every_module_that_registers_a_solver_cites_a_paper():
  modules = _registering_modules()
  assert "solvers.ddim" in modules and "solvers.dpm_solver_multistep" in modules
  missing = [name for name in modules if not AUTHOR_YEAR.search(importlib.import_module(name).__doc__ or "")]
  assert not missing, f"module docstrings without an author-year citation: {', '.join(missing)}"


def test_every_registered_solver_class_cites_a_paper():
  classes = {type(solvers.get(name)) for name in solvers.available()}
  missing = sorted(f"{cls.__module__}.{cls.__name__}" for cls in classes if not AUTHOR_YEAR.search(cls.__doc__ or ""))
  assert not missing, f"solver classes whose docstring cites no paper: {', '.join(missing)}"


def test_author_year_pattern():
  for cited in ("Song et al. 2021", "Zhang & Chen 2023", "Lu et al. 2022b", "(Karras, Aittala, Aila & Laine 2022,",
                "Wang & Vastola 2025"):
    assert AUTHOR_YEAR.search(cited), cited
  for uncited in ("ICLR 2024", "order 2", "diffusers PR #1432", "in 2021"):
    assert not AUTHOR_YEAR.search(uncited), uncited


@pytest.fixture(scope="module")
def reference_page():
  with open(REFERENCE_PAGE, encoding="utf-8") as f:
    return f.read()


def test_every_registered_solver_is_on_the_reference_page(reference_page):
  named = set(re.findall(r"`([a-z0-9_]+)`", reference_page))
  # Ranges written as deis_tab1..3 / unipc_bh1_1..3 name every member.
  for stem, first, last in re.findall(r"`([a-z0-9_]*?)(\d)\.\.(\d)`", reference_page):
    named.update(f"{stem}{k}" for k in range(int(first), int(last) + 1))
  missing = [name for name in solvers.available() if name not in named]
  assert not missing, f"registered solvers missing from docs/solvers.md: {', '.join(missing)}"


def test_files_the_reference_page_points_to_exist(reference_page):
  paths = set(re.findall(r"`((?:solvers|models|tests|experiments)/[A-Za-z0-9_/]+\.py)(?:::\w+)?`", reference_page))
  links = set(re.findall(r"\]\(([A-Za-z0-9_./-]+\.md)\)", reference_page))
  assert len(paths) > 30 and links
  missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
  missing += [p for p in links if not os.path.exists(os.path.join(ROOT, "docs", p))]
  assert not missing, f"docs/solvers.md points to files that do not exist: {', '.join(sorted(missing))}"
