"""Learned schedules as named, reloadable artifacts: one small JSON file per model + schedule + solver + NFE.

An ``Artifact`` records what a learned (or searched) sampling schedule is for and what it is:
- ``name``: the file's stem, [A-Za-z0-9._-]+ (``default_name`` builds one from the fields below);
- ``model``: a string key of the model, e.g. ``gmm-dim8-k4-seed0`` for the analytic mixture, or a training
  workdir's name + ``config_fingerprint`` of its training config + step for a trained network;
- ``schedule``: the noise schedule's class and parameters (``schedule_to_json``), so the times mean the same;
- ``solver`` (a registered name) and ``solver_options`` (a dict: the registered solver's options, DC-Solver's
  ``ratios`` (one per step), or USF's per-step choices under ``steps`` / ``afs`` as ``usf.choices_to_json``);
- ``nfe`` (model evaluations of one sample), ``num_steps``, ``final`` (grids' final-step policy) and ``times``
  (the decreasing grid times, without the sigma = 0 node of ``final='zero'``);
- ``method``: how it was found (``gradient``: ``learned_grids.optimize``; ``evolution``:
  ``evolutionary_search.search``; ``hybrid``: the gradient started from the evolution's grid; ``usf``:
  ``solver_schedule_search.search``), ``metrics`` (a dict, e.g. the
  calibration and held-out RMSE) and ``created`` (ISO 8601 time).
``artifact.grid()`` rebuilds the grid (times round-trip exactly: JSON floats are written with repr), so a reloaded
artifact samples bit-identically to the one saved; ``artifact.solver()`` the solver with its options.

``load(name_or_path)`` finds an artifact by name in a search path: the given directory (or directories), then those
in $DOS_SCHEDULES (os.pathsep-separated), then the bundled folder ``experiments/schedules/`` (committed artifacts
for the default GMM). An unknown name raises a ValueError listing the available ones. ``save`` writes atomically.
"""
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import tempfile
from typing import Any, Dict, Tuple

import jax.numpy as jnp
import numpy as np

from solvers import base
from solvers import grids as grids_lib
from solvers import schedules as schedules_lib

METHODS = ("gradient", "evolution", "hybrid", "usf")
ENV_VAR = "DOS_SCHEDULES"
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "schedules")
SUFFIX = ".json"
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_SCHEDULE_CLASSES = {cls.__name__: cls for cls in (schedules_lib.VPLinear, schedules_lib.VPCosine,
                                                   schedules_lib.DiscreteVP, schedules_lib.VE, schedules_lib.EDM,
                                                   schedules_lib.Flow)}
_FIELDS = ("name", "model", "schedule", "solver", "solver_options", "nfe", "num_steps", "final", "times", "method",
           "metrics", "created")


# ----------------------------------------------------------------------------------------------------
# Schedules as JSON.


def schedule_to_json(schedule):
  """{"class": ..., "params": {...}} of a schedule of ``solvers.schedules`` (tables as lists of floats)."""
  cls = type(schedule)
  if _SCHEDULE_CLASSES.get(cls.__name__) is not cls:
    raise ValueError(f"schedule {cls.__name__} cannot be stored; valid: {', '.join(sorted(_SCHEDULE_CLASSES))}")
  params = {}
  for field in dataclasses.fields(schedule):
    value = getattr(schedule, field.name)
    if isinstance(value, str):
      params[field.name] = value
    elif np.ndim(value) == 0:
      params[field.name] = float(value)
    else:
      params[field.name] = [float(v) for v in np.asarray(value, np.float64)]
  return {"class": cls.__name__, "params": params}


def schedule_from_json(data):
  """The schedule ``schedule_to_json`` wrote; a bad class or parameter raises a ValueError naming it."""
  if not isinstance(data, dict) or set(data) != {"class", "params"} or not isinstance(data["params"], dict):
    raise ValueError(f"schedule must be a dict with the keys 'class' and 'params', got {data!r}")
  cls = _SCHEDULE_CLASSES.get(data["class"])
  if cls is None:
    raise ValueError(f"schedule class {data['class']!r} is unknown; valid: {', '.join(sorted(_SCHEDULE_CLASSES))}")
  params = {k: jnp.asarray(v, schedules_lib.table_dtype()) if isinstance(v, list) else v
            for k, v in data["params"].items()}
  try:
    return cls(**params)
  except TypeError as e:
    raise ValueError(f"schedule {data['class']} parameters {sorted(data['params'])} do not fit: {e}") from None


def config_fingerprint(config):
  """The first 12 hex digits of the SHA-256 of ``config`` (a JSON-able dict) as canonical JSON: a model key part."""
  text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_name(model, solver, method, nfe, final="zero"):
  """``<model>-<solver>-<method>-nfe<nfe>`` (``-tend`` appended for final='t_end'), with characters outside
  [A-Za-z0-9._-] replaced by '_'."""
  name = f"{model}-{solver}-{method}-nfe{nfe}" + ("" if final == "zero" else "-tend")
  return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# ----------------------------------------------------------------------------------------------------
# The artifact.


def _json_value(value, where):
  """``value`` checked to be plain JSON (finite numbers); tuples become lists."""
  if isinstance(value, (list, tuple)):
    return [_json_value(v, where) for v in value]
  if isinstance(value, dict):
    return {str(k): _json_value(v, where) for k, v in value.items()}
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(value):
      raise ValueError(f"{where} holds the non-finite number {value!r}; store only finite numbers")
    return float(value)
  raise ValueError(f"{where} holds {type(value).__name__} {value!r}: only JSON values (numbers, strings, lists, dicts)")


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A learned schedule (module doc). Validated on construction: a bad field raises a ValueError naming it."""
  name: str
  model: str
  schedule: Dict[str, Any]
  solver: str
  solver_options: Dict[str, Any]
  nfe: int
  num_steps: int
  final: str
  times: Tuple[float, ...]
  method: str
  metrics: Dict[str, Any]
  created: str

  def __post_init__(self):
    if not isinstance(self.name, str) or not _NAME.match(self.name):
      raise ValueError(f"name={self.name!r}: use letters, digits, '.', '_' and '-' only")
    if not isinstance(self.model, str) or not self.model:
      raise ValueError(f"model={self.model!r} must be a non-empty string (a model key)")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is unknown; valid: {', '.join(METHODS)}")
    if self.final not in grids_lib.FINAL_POLICIES:
      raise ValueError(f"final={self.final!r} is unknown; valid: {', '.join(grids_lib.FINAL_POLICIES)}")
    for field in ("nfe", "num_steps"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field}={value!r} must be an integer >= 1")
    base.get(self.solver)  # an unknown solver raises a ValueError listing the registered ones
    if not isinstance(self.solver_options, dict) or not isinstance(self.metrics, dict):
      raise ValueError("solver_options and metrics must be dicts")
    object.__setattr__(self, "solver_options", _json_value(self.solver_options, "solver_options"))
    object.__setattr__(self, "metrics", _json_value(self.metrics, "metrics"))
    object.__setattr__(self, "nfe", int(self.nfe))
    object.__setattr__(self, "num_steps", int(self.num_steps))
    schedule = schedule_from_json(self.schedule)
    times = np.asarray(self.times, np.float64)
    expected = self.num_steps + (0 if self.final == "zero" else 1)
    if times.shape != (expected,):
      raise ValueError(f"times has {times.size} entries; {self.num_steps} steps with final={self.final!r} need {expected}")
    grids_lib.from_times(schedule, times, final=self.final)  # monotone, finite, inside the schedule's range
    if times.size > 1 and times[1] > times[0]:
      raise ValueError(f"times must decrease (sampling direction), got {times.tolist()}")
    object.__setattr__(self, "times", tuple(float(t) for t in times))

  def make_schedule(self):
    """The noise schedule the times refer to."""
    return schedule_from_json(self.schedule)

  def grid(self, capacity=None):
    """The grid through the stored times with the stored final policy; ``capacity`` None: unpadded (the node
    count, as ``learned_grids`` samples it)."""
    times = np.asarray(self.times, np.float64)
    nodes = times.size + (1 if self.final == "zero" else 0)
    return grids_lib.from_times(self.make_schedule(), times, final=self.final,
                                capacity=nodes if capacity is None else capacity)

  def solver_object(self, capacity=None):
    """The registered solver with the stored options: USF choices (``steps`` / ``afs``) through
    ``usf.choices_from_json``, DC-Solver ``ratios`` (one per step; padded with 1 to ``capacity`` - 1 when the grid
    is padded), any other option passed to ``solvers.get`` (lists as tuples)."""
    options = dict(self.solver_options)
    if self.solver == "usf" and "steps" in options:
      from solvers import usf
      choices = usf.choices_from_json({"steps": options.pop("steps"), "afs": options.pop("afs", False)})
      return usf.with_choices(base.get("usf", **_tuples(options)), choices)
    ratios = options.pop("ratios", None)
    solver = base.get(self.solver, **_tuples(options))
    if ratios is not None:
      from solvers import dc_solver
      ratios = np.asarray(ratios, np.float64)
      if capacity is not None:
        ratios = np.pad(ratios, (0, capacity - 1 - ratios.size), constant_values=1.0)
      solver = dc_solver.with_ratios(solver, jnp.asarray(ratios, schedules_lib.table_dtype()))
    return solver

  def to_json(self):
    """The artifact as a JSON-able dict (the file's content)."""
    out = {field: getattr(self, field) for field in _FIELDS}
    out["times"] = list(self.times)
    return out

  @classmethod
  def from_json(cls, data, source="<dict>"):
    """The artifact of a dict ``to_json`` wrote; missing or unknown keys raise a ValueError naming ``source``."""
    if not isinstance(data, dict):
      raise ValueError(f"{source}: an artifact is a JSON object, got {type(data).__name__}")
    missing, unknown = sorted(set(_FIELDS) - set(data)), sorted(set(data) - set(_FIELDS))
    if missing or unknown:
      raise ValueError(f"{source}: missing keys {missing}, unknown keys {unknown}; an artifact has {', '.join(_FIELDS)}")
    try:
      return cls(**data)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None


def _tuples(options):
  return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def make(*, model, schedule, solver, times, final, nfe, method, metrics=None, solver_options=None, name=None):
  """An ``Artifact`` from objects: ``schedule`` a schedule object, ``times`` an array; ``name`` defaults to
  ``default_name``; ``created`` is now (UTC)."""
  times = np.asarray(times, np.float64)
  num_steps = times.size - (0 if final == "zero" else 1)
  created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return Artifact(name=name or default_name(model, solver, method, nfe, final), model=model,
                  schedule=schedule_to_json(schedule), solver=solver, solver_options=dict(solver_options or {}),
                  nfe=nfe, num_steps=num_steps, final=final, times=tuple(times.tolist()), method=method,
                  metrics=dict(metrics or {}), created=created)


# ----------------------------------------------------------------------------------------------------
# Files.


def save(artifact, directory):
  """Writes ``artifact`` to ``directory/<name>.json`` (created if missing) atomically; returns the path."""
  if not isinstance(artifact, Artifact):
    raise ValueError(f"save needs an Artifact, got {type(artifact).__name__}")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, artifact.name + SUFFIX)
  text = json.dumps(artifact.to_json(), indent=1, allow_nan=False) + "\n"
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{artifact.name}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "w") as f:
      f.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.unlink(temporary)
    raise
  return path


def search_dirs(directories=None):
  """The folders searched, in order: ``directories`` (a path or a list of them), $DOS_SCHEDULES, the bundled one."""
  if isinstance(directories, (str, os.PathLike)):
    directories = [directories]
  env = [d for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d]
  return [os.fspath(d) for d in (directories or [])] + env + [BUNDLED]


def available(directories=None):
  """{name: path} of every artifact in the search path (the first folder holding a name wins)."""
  found = {}
  for folder in search_dirs(directories):
    if os.path.isdir(folder):
      for entry in sorted(os.listdir(folder)):
        stem = entry[: -len(SUFFIX)]
        if entry.endswith(SUFFIX) and _NAME.match(stem) and stem not in found:
          found[stem] = os.path.join(folder, entry)
  return found


def load(name_or_path, search_path=None):
  """The artifact at a path (a .json file) or found by name in the search path (module doc); an unknown name
  raises a ValueError listing the available ones."""
  if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
    raise ValueError(f"name_or_path={name_or_path!r}: pass an artifact name or the path of its .json file")
  text = os.fspath(name_or_path)
  if text.endswith(SUFFIX) or os.sep in text:
    if not os.path.isfile(text):
      raise ValueError(f"schedule artifact {text!r} does not exist")
    path = text
  else:
    found = available(search_path)
    if text not in found:
      names = ", ".join(sorted(found)) or "none"
      raise ValueError(f"schedule artifact {text!r} is unknown; available: {names} (searched "
                       f"{os.pathsep.join(search_dirs(search_path))})")
    path = found[text]
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  return Artifact.from_json(data, path)


# ----------------------------------------------------------------------------------------------------
# Artifacts named in a grid option (experiments: --grid=learned:<name>).

LEARNED_PREFIX = "learned:"


def learned_name(grid):
  """The artifact name in a grid option ``learned:<name>``; None for any other grid name."""
  if isinstance(grid, str) and grid.startswith(LEARNED_PREFIX):
    name = grid[len(LEARNED_PREFIX):]
    if not name:
      raise ValueError(f"grid={grid!r}: name an artifact after '{LEARNED_PREFIX}' (e.g. {LEARNED_PREFIX}<name>)")
    return name
  return None


def check_compatible(artifact, *, schedule=None, num_steps=None, final=None):
  """Raises a ValueError naming what differs when ``artifact`` does not fit the given schedule (its times would
  mean other noise levels), step count or final policy (None: not checked)."""
  if schedule is not None and schedule_to_json(schedule) != artifact.schedule:
    raise ValueError(f"artifact {artifact.name!r} was learned on the schedule {artifact.schedule['class']} "
                     f"{_short(artifact.schedule['params'])}, not on this {type(schedule).__name__} "
                     f"{_short(schedule_to_json(schedule)['params'])}: its times would mean other noise levels")
  if num_steps is not None and int(num_steps) != artifact.num_steps:
    raise ValueError(f"steps={num_steps} differs from the {artifact.num_steps} steps of artifact {artifact.name!r}: "
                     "leave steps unset (the artifact's) or pick an artifact for that many steps")
  if final is not None and final != artifact.final:
    raise ValueError(f"final={final!r} differs from final={artifact.final!r} of artifact {artifact.name!r}: leave "
                     "final unset (the artifact's)")


def _short(params):
  return {k: (f"<{len(v)} values>" if isinstance(v, list) else v) for k, v in params.items()}
