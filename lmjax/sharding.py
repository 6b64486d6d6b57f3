"""Device mesh from the config, and logical-axis shardings for params and batches."""
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
# Mesh axes that split the batch: the data-parallel width is their product.
BATCH_AXES = ('data', 'fsdp')
# Logical axis -> mesh axes, the configs' default `mesh.rules`. One set serves every
# strategy; the mesh shape picks it, since an axis of size 1 splits nothing:
#   data   (N,1,1): the batch splits, every parameter is replicated;
#   fsdp   (1,N,1): the batch splits, and so do parameters and optimizer state along
#          their model-width axis ('embed', or a recurrent matrix's input side), gathered
#          as each layer needs them (ZeRO-3);
#   tensor (1,1,N): attention heads, the MLP's hidden units, the vocabulary and a
#          recurrent layer's units split (Megatron's layout); the batch does not;
# and any product of these. Rules are tried in order and an array uses each mesh axis
# once, so the residual stream [batch, length, embed] takes 'fsdp' for its batch and
# leaves 'embed' whole. A dimension that its mesh axes do not divide (a 65-character
# vocabulary over 2 tensor devices) stays whole; see `logical_shardings`.
RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('position', None),
    ('heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('layers', None),  # the stacked layer axis of a scanned Transformer
    ('hidden', 'tensor'),  # recurrent models: a layer's units (the carry's width)
    ('hidden_in', 'fsdp'),  # ... the input side of a recurrent or projection matrix
    ('gates', None),  # ... the gates of a cell (4 for the LSTM)
    ('classes', None),  # a classifier's outputs
)


def _whole_numbers(value, field: str) -> tuple[int, ...]:
  """A config field's tuple of integers; UserError naming `field` if it holds anything else."""
  try:
    return tuple(int(s) for s in value)
  except (TypeError, ValueError):
    raise UserError(f'{field}={value!r}: give {len(MESH_AXES)} whole numbers, one per mesh '
                    f'axis {MESH_AXES}, e.g. (-1, 1, 1).') from None


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 entry of `mesh.shape` and checks the product."""
  shape = _whole_numbers(shape, 'mesh.shape')
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
  """The device mesh of `mesh.shape` (within a slice or host) times `mesh.dcn_shape`
  (across them), axes MESH_AXES."""
  devices = jax.devices() if devices is None else list(devices)
  dcn = _whole_numbers(mesh_config.dcn_shape, 'mesh.dcn_shape')
  if len(dcn) != len(MESH_AXES) or any(s < 1 for s in dcn):
    raise UserError(f'mesh.dcn_shape={dcn} must have {len(MESH_AXES)} positive entries, '
                    f'one per mesh axis {MESH_AXES}; (1, 1, 1) for a single slice or host.')
  granules = math.prod(dcn)
  if len(devices) % granules:
    raise UserError(f'mesh.dcn_shape={dcn} asks for {granules} slices or hosts, and '
                    f'{len(devices)} devices do not split into that many.')
  shape = resolve_mesh_shape(mesh_config.shape, len(devices) // granules)
  # Auto axes: GSPMD propagates shardings from the ones we state at jit boundaries.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if granules == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  # Slices where the devices are on several (TPU multislice), otherwise processes (hosts).
  by_process = len({getattr(d, 'slice_index', 0) for d in devices}) == 1
  granule_count = len({d.process_index if by_process else d.slice_index for d in devices})
  if granule_count != granules:
    raise UserError(f'mesh.dcn_shape={dcn} asks for {granules} '
                    f'{"processes" if by_process else "slices"}, and the devices are on '
                    f'{granule_count}; set mesh.dcn_shape to match.')
  array = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices,
                                               process_is_granule=by_process)
  return Mesh(array, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the batch axes, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked on a leading axis (several steps' worth): each one's rows split over
  the batch axes, as `batch_sharding` splits one."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may carry logical axis names.

  A dimension that its mesh axes do not divide is left whole (jit refuses uneven
  shards); `unsplit_dims` lists where that happened."""
  specs, shapes = _mesh_specs(abstract_boxed_tree, rules)
  return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _divisible(spec, leaf.shape, mesh)),
                      specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _mesh_specs(abstract_boxed_tree, rules):
  """(mesh-axis PartitionSpecs by the rules, unboxed shapes) of a tree of boxed leaves."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed_tree), rules_as_tuples(rules))
  return specs, nn.meta.unbox(abstract_boxed_tree)


def rules_without_axis(rules, axis: str) -> tuple:
  """The logical axis rules with the mesh axis `axis` taken out of every entry: inside a
  `shard_map` that makes `axis` manual, a sharding constraint may not name it."""
  return tuple((logical, tuple(a for a in _mesh_axes(mesh_axes) if a != axis) or None)
               for logical, mesh_axes in rules)


def _mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _parts(entry, mesh: Mesh) -> int:
  """How many ways a PartitionSpec entry splits its dimension."""
  return math.prod(mesh.shape[a] for a in _mesh_axes(entry))


def _divisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return PartitionSpec(*[
      entry if size % _parts(entry, mesh) == 0 else None
      for entry, size in zip(entries, shape)])


def unsplit_dims(abstract_boxed_tree, mesh: Mesh, rules) -> list[str]:
  """'path: dim N (size S) stays whole, mesh axes A give K' for each dimension the rules
  would split but its size does not divide."""
  specs, shapes = _mesh_specs(abstract_boxed_tree, rules)
  out = []
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(shapes), strict=True):
    for dim, (entry, size) in enumerate(zip(spec, leaf.shape)):
      parts = _parts(entry, mesh)
      if size % parts:
        out.append(f'{jax.tree_util.keystr(path)} dim {dim} (size {size}) stays whole: '
                   f'{"x".join(_mesh_axes(entry))} would split it {parts} ways')
  return out


def rules_as_tuples(rules) -> tuple:
  """Config rules arrive as nested sequences (lists after JSON); flax wants tuples."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, (list, tuple)):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)
