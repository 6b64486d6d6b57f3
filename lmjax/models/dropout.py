"""Dropout whose masks equal flax's `nn.Dropout` bit for bit, drawn several times faster.

Dropout masks are the one large random array a training step draws: GPT-2's attention
dropout alone is [B, H, T, T] per layer. `jax.random.bits` computes them with the
Threefry-2x32 hash, and on CPU jax 0.10 lowers its 20 rounds as a 5-trip while loop, so
XLA stores and reloads the two 32-bit words of every element at each trip; in the default
recipe's step that was 22% of the time (the JAX profiler trace, 2 CPU cores). Here the same
rounds are written out in jnp, the way jax itself lowers them for GPUs, and XLA fuses hash
and comparison into one pass (then packs the mask, see `bernoulli`). The counters, key
schedule and rotations are Threefry's (Salmon et al. 2011, "Parallel random numbers: as
easy as 1, 2, 3") as `jax.random` arranges them, so for a threefry key the mask is exactly
`jax.random.bernoulli(key, 1 - rate, shape)`; tests/models/test_dropout.py holds it to
that. Any other key (rbg, a non-default implementation) or a setup this does not cover goes
through `jax.random` itself.

Masks do not depend on the mesh. Under GSPMD each device hashes the counters of its own
rows; inside a `shard_map` that splits the batch (the train step's per-device gradient
sums), `rows_of_batch` tells every batch-shaped mask which rows of the whole it holds.
"""
import contextlib
import contextvars
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)  # Threefry's constant for the third key word


# The mesh axis that splits the batch (dim 0) inside a shard_map, while `rows_of_batch`
# is active; None outside it.
_BATCH_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'lmjax_dropout_batch_axis', default=None)


@contextlib.contextmanager
def rows_of_batch(axis_name: str):
  """While tracing the body of a `shard_map` whose `axis_name` splits the batch into equal
  blocks of rows, in device order: every batch mask (`batch_bernoulli`, `Dropout`) draws
  its block's rows of the mask of the whole batch, as it would without the shard_map."""
  token = _BATCH_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_AXIS.reset(token)


def _threefry_words(key: jax.Array) -> jax.Array | None:
  """The key's two uint32 words when `jax.random.bits` would hash them with partitionable
  Threefry-2x32 (jax's default since 0.5), else None."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != 'threefry2x32':
      return None
    key = jax.random.key_data(key)
  elif str(jax.config.jax_default_prng_impl) != 'threefry2x32':
    return None
  if key.shape != (2,) or key.dtype != jnp.uint32:
    return None
  if not jax.config.jax_threefry_partitionable:
    return None
  return key


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(x, np.uint32(32 - bits))


def random_bits(key: jax.Array, shape: Sequence[int], *, window_start: Sequence[int] = (),
                window_shape: Sequence[int] = ()) -> jax.Array:
  """uint32 random bits of `shape`: `jax.random.bits(key, shape)`, with Threefry's rounds
  unrolled when the key is a threefry key (see the module docstring).

  With `window_shape`, only the window of that shape at `window_start` (a corner index)
  of those bits: blocked causal attention draws its mask one block of queries at a time.
  A start may be a traced integer (a device's first row, in `rows_of_batch`); only its
  static entries are checked against `shape`.
  """
  shape = tuple(int(d) for d in shape)
  window = tuple(int(d) for d in window_shape) or shape
  start = tuple(d if isinstance(d, jax.Array) else int(d) for d in window_start)
  start = start or (0,) * len(shape)
  if len(window) != len(shape) or len(start) != len(shape) or any(
      w > d or (not isinstance(s, jax.Array) and (s < 0 or s + w > d))
      for s, w, d in zip(start, window, shape)):
    raise ValueError(f'window {window} at {start} does not fit in {shape}')
  words = _threefry_words(key)
  size = int(np.prod(shape, dtype=np.int64))
  if words is None or size >= 2**32 or not shape:
    return lax.dynamic_slice(jax.random.bits(key, shape, jnp.uint32), start, window)
  k0, k1 = words[0], words[1]
  schedule = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  # The counter of an element is its row-major index (high word 0 below 2**32 elements),
  # built from per-dimension iotas so that SPMD partitions it like any elementwise op.
  strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
  index = sum((lax.convert_element_type(s, jnp.uint32) if isinstance(s, jax.Array)
               else np.uint32(s)) * np.uint32(stride) for s, stride in zip(start, strides))
  index = index + sum(lax.broadcasted_iota(jnp.uint32, window, dim) * np.uint32(stride)
                      for dim, stride in enumerate(strides))
  shape = window
  x0 = jnp.broadcast_to(schedule[0], shape)
  x1 = index + schedule[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0 ^ x1


def bernoulli(key: jax.Array, p: float, shape: Sequence[int], **window) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` (its default mode), through `random_bits` (and
  its window arguments): a float32 uniform from the top 23 bits, True where it is below p.

  When the last axis splits into bytes, the mask is packed 8 elements to a byte and
  unpacked again. The values are the same; what changes is what XLA keeps. A training
  step uses a mask twice, forward and backward, and XLA fuses an elementwise hash into
  each of its consumers, so the hash ran twice. A packed mask comes out of a reduction,
  which XLA computes once and stores (an eighth of a byte per element); the unpacking
  fuses into both consumers. In the :full_cpu recipe's step on 2 CPU cores (8 steps each,
  interleaved in one process) this took 5.47 s against 5.70, with the same loss and gradients.
  """
  bits = random_bits(key, shape, **window)
  uniform = lax.bitcast_convert_type(
      lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
  mask = uniform < jnp.float32(p)
  if mask.ndim and mask.shape[-1] % 8 == 0:
    mask = _unpack_bits(_pack_bits(mask), mask.shape[-1])
  return mask


def batch_bernoulli(key: jax.Array, p: float, shape: Sequence[int],
                    window_start: Sequence[int] = (), window_shape: Sequence[int] = ()):
  """`bernoulli` for a mask whose dim 0 is the batch, or its window: inside
  `rows_of_batch`, `shape` counts this device's rows only, and the mask is their rows of
  the whole batch's mask."""
  axis = _BATCH_AXIS.get()
  if axis is not None:
    window_shape = tuple(window_shape) or tuple(shape)
    window_start = tuple(window_start) or (0,) * len(shape)
    rows = shape[0]
    shape = (rows * lax.axis_size(axis), *shape[1:])
    window_start = (lax.axis_index(axis) * rows + window_start[0], *window_start[1:])
  return bernoulli(key, p, shape, window_start=window_start, window_shape=window_shape)


def _pack_bits(mask: jax.Array) -> jax.Array:
  """bool [..., 8n] -> uint8 [..., n], bit j of byte i holding element 8i + j. A sum
  over the 8 rather than ORs of slices: XLA stores a reduction's result instead of
  fusing it into each consumer."""
  bytes_ = mask.reshape(mask.shape[:-1] + (mask.shape[-1] // 8, 8)).astype(jnp.uint8)
  return jnp.sum(bytes_ << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _unpack_bits(packed: jax.Array, n: int) -> jax.Array:
  """The inverse of `_pack_bits`: uint8 [..., n/8] -> bool [..., n]."""
  bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & np.uint8(1)
  return bits.reshape(packed.shape[:-1] + (n,)).astype(bool)


class Dropout(nn.Module):
  """`nn.Dropout` with the same rng stream, masks and scaling, its mask from `bernoulli`."""

  rate: float
  broadcast_dims: Sequence[int] = ()
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return inputs
    shared = {dim % inputs.ndim for dim in self.broadcast_dims}
    shape = [1 if dim in shared else size for dim, size in enumerate(inputs.shape)]
    return self.apply_window(inputs, self.make_rng(self.rng_collection), shape, (), (),
                             batch=0 not in shared)

  def key(self) -> jax.Array:
    """The key `__call__` would draw its mask from: one call of it, then windows."""
    return self.make_rng(self.rng_collection)

  def apply_window(self, inputs: jax.Array, key: jax.Array, shape: Sequence[int],
                   window_start: Sequence[int], window_shape: Sequence[int], *,
                   batch: bool = True) -> jax.Array:
    """Drops `inputs`, the window at `window_start` of a whole of `shape`, as the whole's
    mask under `key` would (no broadcast dims). `batch`: dim 0 is the batch's rows, not
    one row shared by all of them (see `rows_of_batch`)."""
    if self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = 1.0 - self.rate
    draw = batch_bernoulli if batch else bernoulli
    mask = draw(key, keep, shape, window_start=window_start, window_shape=window_shape)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return lax.select(mask, inputs / keep, jnp.zeros_like(inputs))
