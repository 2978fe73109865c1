"""A frozen-dataclass decorator that registers the class as a JAX pytree.

Fields marked ``static_field()`` are pytree metadata (hashable, part of the jit cache key); every other
field is a leaf (traced under jit, so new values never recompile).
"""
import dataclasses

import jax


def static_field(**kwargs):
  """A dataclass field that is pytree metadata rather than a leaf."""
  return dataclasses.field(metadata={"static": True}, **kwargs)


def pytree_dataclass(cls):
  """Freezes ``cls`` as a dataclass and registers it with ``jax.tree_util``."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = dataclasses.fields(cls)
  meta = [f.name for f in fields if f.metadata.get("static", False)]
  data = [f.name for f in fields if not f.metadata.get("static", False)]
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
  return cls
