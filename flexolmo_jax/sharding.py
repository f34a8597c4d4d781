"""Device meshes and logical axis rules (MaxText style).

Every parameter dimension carries a logical name (model.py); a rule table maps logical names to
mesh axes. Changing the parallelism layout means changing the table or the mesh shape, never the
model code.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. Tokens are split over every axis that does not split the model's
# own dimensions; experts over "expert"; dense weights over "fsdp" (ZeRO-3 style) and "tensor".
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over MESH_AXES; one axis may be -1 to take the remaining devices.

  Axis types are Auto so that jit shardings propagate GSPMD-style.
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if -1 not in sizes and math.prod(sizes) < len(devices):
    devices = devices[:math.prod(sizes)]  # An explicit smaller mesh uses the first devices.
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} are present; set one axis to -1 to absorb the rest")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide evenly (tiny models on many devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*fitted)


def logical_sharding(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh,
                     rules=DEFAULT_RULES) -> NamedSharding:
  """The NamedSharding of one array from its logical axis names."""
  spec = nn.logical_to_mesh_axes(tuple(logical), rules)
  return NamedSharding(mesh, _fit(spec, shape, mesh))


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) with PartitionSpecs of names."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(lambda spec, x: logical_sharding(x.shape, tuple(spec), mesh, rules),
                      logical_tree, abstract_tree, is_leaf=is_spec)


def batch_axes(mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a batch (or token) dimension is split over: the "batch" rule's axes that
  `mesh` (a Mesh or an AbstractMesh) has."""
  rule = dict(rules)["batch"]
  rule = (rule,) if isinstance(rule, str) else tuple(rule or ())
  return tuple(axis for axis in rule if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input: batch split over the data-parallel axes."""
  spec = nn.logical_to_mesh_axes(("batch", "length") + (None,) * (ndim - 2), rules)
  return NamedSharding(mesh, spec)
