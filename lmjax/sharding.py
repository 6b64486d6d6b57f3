"""Device mesh from the config, and logical-axis shardings for params and batches."""
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
# Mesh axes that split the batch: the data-parallel width is their product.
BATCH_AXES = ('data', 'fsdp')
# Logical axis -> mesh axes for pure data parallelism, the configs' default `mesh.rules`:
# the batch splits over data and fsdp, every parameter is replicated.
DATA_PARALLEL_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('vocab', None),
    ('embed', None),
    ('position', None),
    ('heads', None),
    ('head_dim', None),
    ('mlp', None),
    ('hidden', None),  # recurrent models: carry width
    ('hidden_in', None),  # ... as the input side of a recurrent or projection matrix
    ('gates', None),  # ... the gates of a cell (4 for the LSTM)
    ('classes', None),  # a classifier's outputs
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 entry of `mesh.shape` and checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise UserError(f'mesh.shape={shape} must have {len(MESH_AXES)} entries, one per '
                     f'mesh axis {MESH_AXES}.')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f'mesh.shape={shape}: entries must be positive, and at most one '
                     'may be -1 (meaning "the remaining devices").')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f'mesh.shape={shape}: {num_devices} devices do not divide by {known}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise UserError(f'mesh.shape={shape} needs {math.prod(shape)} devices but '
                     f'{num_devices} are available; set --config.mesh.shape.')
  return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  # Auto axes: GSPMD propagates shardings from the ones we state at jit boundaries.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the batch axes, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may carry logical axis names."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_as_tuples(rules))


def rules_as_tuples(rules) -> tuple:
  """Config rules arrive as nested sequences (lists after JSON); flax wants tuples."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, (list, tuple)):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)
