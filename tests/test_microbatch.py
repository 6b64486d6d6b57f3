"""lmjax/microbatch.py: the row order of the slices, and a step over k slices equal to the
step over the whole batch, with the gradients all-reduced once a step or after every slice."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import shakespeare_char
from lmjax import microbatch, sharding, state as state_lib, steps

VOCAB = 16
BATCH, SEQ_LEN = 8, 8


def test_slice_j_holds_rows_j_j_plus_k_and_so_on():
  x = jnp.arange(8 * 3).reshape(8, 3)
  sliced = microbatch.split_rows(x, 4)
  assert sliced.shape == (4, 2, 3)
  for j in range(4):
    np.testing.assert_array_equal(sliced[j], x[j::4])


def test_join_rows_undoes_split_rows_for_any_slice_count():
  x = jnp.arange(12 * 2 * 5).reshape(12, 2, 5)
  for k in (1, 2, 3, 4, 6, 12):
    np.testing.assert_array_equal(microbatch.join_rows(microbatch.split_rows(x, k)), x)


def test_a_device_holding_a_block_of_rows_holds_its_share_of_every_slice():
  """Why the order: with 8 rows on 2 devices (rows 0-3 and 4-7), each of 2 slices takes 2
  rows from each device, so slicing moves nothing between devices."""
  sliced = microbatch.split_rows(jnp.arange(8), 2)
  for j in range(2):
    assert sorted(int(r) // 4 for r in sliced[j]) == [0, 0, 1, 1]


def _mesh(shape):
  config = ml_collections.ConfigDict({'shape': shape, 'dcn_shape': (1, 1, 1)})
  return sharding.make_mesh(config, jax.devices()[:2])


def test_gradients_are_reduced_once_only_on_a_data_parallel_mesh_without_a_carry():
  assert not microbatch.reduces_once(None)  # no mesh at all
  with jax.set_mesh(_mesh((2, 1, 1))):
    assert microbatch.reduces_once(None)
    assert not microbatch.reduces_once({'h': jnp.zeros((8, 4))})  # a stateful carry
  with jax.set_mesh(_mesh((1, 2, 1))):  # FSDP: the parameters are split
    assert not microbatch.reduces_once(None)


@pytest.fixture(scope='module')
def setup():
  """A tiny Transformer replicated on a 2-device data-parallel mesh and a batch split over
  it whose slices differ in weight. Plain SGD with rate 1: new params = params - grads."""
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ_LEN)
  mesh = _mesh((2, 1, 1))
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, VOCAB)
  tx = optax.sgd(1.0)
  # Parameters of the model's shapes drawn by NumPy: compiling the initialisers would
  # dominate this test.
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))['params']))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), abstract)
  state = jax.device_put(state_lib.TrainState(step=np.int32(0), params=params,
                                              opt_state=tx.init(params)),
                         sharding.replicated(mesh))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ_LEN + 1), 0, VOCAB)
  weights = jnp.ones((BATCH, SEQ_LEN)).at[1].set(0.0).at[5, 3:].set(0.0).at[6, :2].set(0.0)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                          'weights': weights}, sharding.batch_sharding(mesh))

  def step(microbatches, reduce_once=None):
    fn = functools.partial(steps.train_step, model=model, tx=tx, microbatches=microbatches,
                           reduce_once=reduce_once)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      new_state, metrics = jax.jit(fn)(state, batch, jax.random.key(2))
    grads = jax.tree.map(lambda old, new: old - new, state.params, new_state.params)
    return jax.device_get(grads), jax.device_get(metrics)

  return step, step(1)


@pytest.mark.parametrize('microbatches, reduce_once', [(2, False), (4, True)])
def test_slices_give_the_gradients_of_the_whole_batch(setup, microbatches, reduce_once):
  step, (whole_grads, whole_metrics) = setup
  grads, metrics = step(microbatches, reduce_once)
  for key in ('loss', 'accuracy', 'grad_norm'):
    assert float(metrics[key]) == pytest.approx(float(whole_metrics[key]), rel=1e-5), key
  assert float(metrics['nonfinite']) == 0.0
  for path, a in jax.tree_util.tree_leaves_with_path(grads):
    b = functools.reduce(lambda tree, key: tree[key.key], path, whole_grads)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-7, err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # not all zero
