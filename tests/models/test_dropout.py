"""lmjax's dropout draws exactly the masks flax's nn.Dropout and jax.random draw."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import dropout

# Odd sizes (Threefry pairs up counters; an odd count is where a port would slip), a
# scalar-free 1-D shape, and the attention-probability shape of a small model.
SHAPES = [(7,), (3, 5), (2, 3, 4, 5), (2, 6, 64, 64), (1, 1, 1)]


@pytest.mark.parametrize('shape', SHAPES)
def test_bits_equal_jax_random_bits(shape):
  for key in (jax.random.key(0), jax.random.fold_in(jax.random.key(123), 7),
              jax.random.PRNGKey(5)):
    ours = jax.jit(lambda k: dropout.random_bits(k, shape))(key)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.bits(key, shape)))


# (4, 333) is drawn as it is; (3, 64) goes through the bytes of a packed mask.
@pytest.mark.parametrize('p,shape', [(0.8, (4, 333)), (0.5, (4, 333)), (0.1, (4, 333)),
                                     (1e-3, (4, 333)), (0.8, (3, 64)), (0.3, (2, 5, 16))])
def test_bernoulli_equals_jax_random_bernoulli(p, shape):
  key = jax.random.key(3)
  ours = dropout.bernoulli(key, p, shape)
  theirs = jax.random.bernoulli(key, p, shape)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert abs(float(ours.mean()) - p) < 0.02 + 3 * np.sqrt(p * (1 - p) / ours.size)


def test_other_key_kinds_fall_back_to_jax_random():
  key = jax.random.key(0, impl='rbg')
  np.testing.assert_array_equal(np.asarray(dropout.random_bits(key, (3, 4))),
                                np.asarray(jax.random.bits(key, (3, 4))))


@pytest.mark.parametrize('rate,broadcast_dims,shape', [
    (0.2, (), (3, 5, 7)), (0.5, (1,), (3, 5, 7)), (0.3, (-1,), (3, 5, 7)), (0.0, (), (3, 5, 7)),
    (1.0, (), (3, 5, 7)), (0.2, (), (3, 5, 16)), (0.5, (1,), (3, 5, 16))])
def test_module_equals_flax_dropout(rate, broadcast_dims, shape):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

  # Equal auto-names would give equal make_rng streams; applied alone, each is Dropout's.
  ours = dropout.Dropout(rate, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=False, rngs={'dropout': jax.random.key(9)})
  theirs = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=False, rngs={'dropout': jax.random.key(9)})
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  if 0 < rate < 1:
    assert 0 < float((ours == 0).mean()) < 1
  np.testing.assert_array_equal(
      np.asarray(dropout.Dropout(rate).apply({}, x, deterministic=True)), np.asarray(x))


def test_sharded_mask_equals_unsharded():
  """On a mesh each device hashes only its rows' counters; together they are the whole."""
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  shape = (8, 6, 16, 16)
  key = jax.random.key(1)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), 'tensor'))
  ours = jax.jit(lambda k: dropout.bernoulli(k, 0.8, shape), out_shardings=spec)(key)
  assert ours.sharding.is_equivalent_to(spec, len(shape))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.bernoulli(key, 0.8, shape)))


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_a_window_of_the_bits_is_that_slice_of_the_whole(impl):
  key = jax.random.key(11, impl=impl)
  whole = np.asarray(dropout.random_bits(key, (2, 3, 10, 10)))
  window = dropout.random_bits(key, (2, 3, 10, 10), window_start=(0, 1, 4, 0),
                               window_shape=(2, 2, 3, 7))
  np.testing.assert_array_equal(np.asarray(window), whole[:, 1:3, 4:7, :7])
  with pytest.raises(ValueError, match='does not fit'):
    dropout.random_bits(key, (2, 3), window_start=(1, 0), window_shape=(2, 3))


def test_the_backward_pass_reuses_the_forward_mask():
  """A mask feeding a matmul forward and backward is hashed once, not once per use: the
  compiled gradient holds one copy of Threefry's rounds (20 shift-lefts), where a mask that
  is not packed, drawn from the same bits, holds two."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 64)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 64)), jnp.float32)
  key = jax.random.key(2)

  def unpacked(key, p, shape):
    bits = dropout.random_bits(key, shape)
    uniform = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32)
    return uniform - 1.0 < p

  def shift_lefts(mask_fn):
    def loss(x):
      mask = mask_fn(key, 0.8, x.shape)
      return jnp.sum((jnp.where(mask, x @ w / 0.8, 0.0) @ w) ** 2)
    grad = jax.jit(jax.grad(loss))
    return grad(x), grad.lower(x).compile().as_text().count(' shift-left(')

  ours, ours_count = shift_lefts(dropout.bernoulli)
  theirs, theirs_count = shift_lefts(unpacked)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert theirs_count >= 40, theirs_count
  assert ours_count < 40 - 16, ours_count


@pytest.mark.parametrize('broadcast_dims', [(), (1,), (0,)])
def test_each_device_of_a_shard_map_draws_its_rows_of_the_whole_mask(broadcast_dims):
  """Inside `rows_of_batch`, a shard_map over 4 devices, each holding 2 of the batch's 8
  rows, drops them as the whole batch would be dropped; a mask shared by all rows
  (broadcast over dim 0) stays one mask."""
  mesh = jax.make_mesh((4,), ('data',))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3, 16)), jnp.float32)
  drop = dropout.Dropout(0.5, broadcast_dims=broadcast_dims)
  rngs = {'dropout': jax.random.key(4)}

  def local(x):
    with dropout.rows_of_batch('data'):
      return drop.apply({}, x, deterministic=False, rngs=rngs)

  spec = jax.sharding.PartitionSpec('data')
  rows = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  ours = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))(rows)
  whole = drop.apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(whole))
