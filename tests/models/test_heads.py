"""lmjax/models/heads.py: pooling over the real positions of right-padded rows, and the
linear classifier head, on inputs small enough to check by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lmjax.models import heads

# [B=3, T=4, F=2]: position t of row b holds (10 b + t, -(10 b + t)).
X = jnp.stack([jnp.arange(4.0)[None] + 10.0 * jnp.arange(3.0)[:, None]] * 2, axis=-1)
X = X * jnp.array([1.0, -1.0])
MASK = jnp.array([[1, 1, 1, 1],   # no padding
                  [1, 1, 0, 0],   # two real positions
                  [0, 0, 0, 0]])  # all padding


def test_last_position_reads_each_rows_last_real_position():
  pooled = heads.last_position(X, MASK)
  assert pooled.shape == (3, 2)
  # Row 0: position 3; row 1: position 1; an all-padding row falls back to position 0.
  np.testing.assert_array_equal(pooled, [[3.0, -3.0], [11.0, -11.0], [20.0, -20.0]])


def test_last_position_without_a_mask_is_the_final_position():
  np.testing.assert_array_equal(heads.last_position(X, None), X[:, -1])


def test_last_position_ignores_what_the_padding_holds():
  garbage = X.at[1, 2:].set(1e6)
  np.testing.assert_array_equal(heads.last_position(garbage, MASK),
                                heads.last_position(X, MASK))


def test_mean_over_positions_averages_only_the_real_positions():
  pooled = heads.mean_over_positions(X, MASK.astype(bool))
  # Row 0: mean of 0..3; row 1: mean of 10, 11; an all-padding row: zeros, not NaN.
  np.testing.assert_allclose(pooled, [[1.5, -1.5], [10.5, -10.5], [0.0, 0.0]])
  garbage = X.at[1, 2:].set(1e6)
  np.testing.assert_array_equal(heads.mean_over_positions(garbage, MASK), pooled)


def test_mean_over_positions_without_a_mask_is_the_plain_mean():
  np.testing.assert_allclose(heads.mean_over_positions(X, None), jnp.mean(X, axis=1))


def test_classifier_head_is_one_affine_map_to_float32_logits():
  head = heads.ClassifierHead(num_classes=3, input_axis='embed')
  pooled = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
  kernel = jnp.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
  bias = jnp.array([0.1, 0.2, 0.3])
  logits = head.apply({'params': {'kernel': kernel, 'bias': bias}}, pooled)
  # Row 0: (1, 2) . columns + bias; row 1: (-1, 0.5) . columns + bias.
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, [[2.6, -0.8, 1.3], [0.1, 1.2, -1.95]], rtol=1e-6)


def test_classifier_head_starts_near_uniform_with_axes_for_sharding():
  head = heads.ClassifierHead(num_classes=5, input_axis='hidden')
  variables = head.init(jax.random.key(0), jnp.ones((2, 64)))
  specs = nn.get_partition_spec(variables)['params']
  assert specs == {'kernel': PartitionSpec('hidden', 'classes'),
                   'bias': PartitionSpec('classes')}
  params = nn.meta.unbox(variables)['params']
  assert params['kernel'].shape == (64, 5) and params['bias'].shape == (5,)
  np.testing.assert_array_equal(params['bias'], np.zeros(5))
  assert float(jnp.std(params['kernel'])) == pytest.approx(0.02, rel=0.25)


def test_classifier_head_in_bfloat16_still_returns_float32_logits():
  head = heads.ClassifierHead(num_classes=2, input_axis='embed', dtype=jnp.bfloat16)
  pooled = jnp.array([[1.0, 3.0]], jnp.bfloat16)
  params = {'kernel': jnp.array([[1.0, 0.0], [0.0, 1.0]]), 'bias': jnp.array([0.25, 0.5])}
  logits = head.apply({'params': params}, pooled)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, [[1.25, 3.5]])
