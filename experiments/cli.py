"""Command-line helpers shared by the experiment scripts."""
import dataclasses


def numbers(values, flag, kind, minimum=None, exclusive=False):
  """Parses the entries of the comma-list flag ``--flag`` as ``kind`` (int or float), each >= ``minimum``
  (> when ``exclusive``); a bad or missing entry raises ValueError naming it and what is allowed."""
  noun = "an integer" if kind is int else "a number"
  out = []
  for v in values:
    try:
      n = kind(v)
    except ValueError:
      raise ValueError(f"--{flag}: {v!r} is not {noun}") from None
    if minimum is not None and (n <= minimum if exclusive else n < minimum):
      raise ValueError(f"--{flag}: {n} must be {'>' if exclusive else '>='} {minimum}")
    out.append(n)
  if not out:
    raise ValueError(f"--{flag} is empty: list at least one")
  return tuple(out)


def dataclass_config(config_class, config):
  """``config`` as an instance of the frozen dataclass ``config_class``: None gives the defaults, a dict
  overrides them (an unknown key raises ValueError listing the valid ones), an instance passes through."""
  if config is None:
    return config_class()
  if isinstance(config, dict):
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(names))}")
    return config_class(**config)
  if not isinstance(config, config_class):
    raise ValueError(f"config must be a dict or a {config_class.__name__}, got {type(config).__name__}")
  return config


def validate_flags_with(resolve_config, flag_holders):
  """Registers one absl validator over the flags of ``flag_holders`` ({config field: FlagHolder}): the
  ValueError of ``resolve_config`` (naming the bad value and what is allowed) becomes a flag error."""
  from absl import flags

  def validate(values):
    try:
      resolve_config({field: values[holder.name] for field, holder in flag_holders.items()})
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True

  flags.register_multi_flags_validator([holder.name for holder in flag_holders.values()], validate)
