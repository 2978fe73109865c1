"""Command-line helpers shared by the experiment scripts."""


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
