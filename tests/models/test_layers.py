"""The layers both model families share."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import layers


@pytest.mark.parametrize('dtype,out_dtype', [(jnp.float32, None), (jnp.bfloat16, None),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize('width_in,width_out', [(5, 8), (8, 5)])
def test_matmul_differentiates_as_the_plain_product(dtype, out_dtype, width_in, width_out):
  """`layers.matmul` (x W, its dL/dW ordered for XLA:CPU: x^T g where x is the narrower,
  JAX's (g^T x)^T otherwise) has the plain product's value and VJP, dtypes included."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((12, width_in)), dtype)
  w = jnp.asarray(rng.standard_normal((width_in, width_out)), dtype)
  plain = lambda x, w: jnp.einsum('ni,ik->nk', x, w, preferred_element_type=out_dtype)
  out, vjp = jax.vjp(lambda x, w: layers.matmul(x, w, out_dtype), x, w)
  expected_out, expected_vjp = jax.vjp(plain, x, w)
  assert out.dtype == expected_out.dtype
  np.testing.assert_array_equal(out, expected_out)
  g = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
  for got, expected in zip(vjp(g), expected_vjp(g), strict=True):
    assert got.dtype == expected.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=1e-6 if dtype == jnp.float32 else 1e-2)
