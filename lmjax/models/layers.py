"""Layers the Transformer and the recurrent models share."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class GatheredEmbed(nn.Embed):
  """nn.Embed whose lookup reads the table whole along its width: SPMD has no cheap way to
  gather rows of a table split along 'embed' (FSDP) into activations split by batch (XLA
  warns, then replicates everything); gathering the table first is what FSDP does for
  every other weight anyway. Parameters and results are nn.Embed's."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    table_VxE = nn.with_logical_constraint(self.embedding, ('vocab', None))
    (table_VxE,) = nn.dtypes.promote_dtype(table_VxE, dtype=self.dtype, inexact=False)
    return jnp.take(table_VxE, inputs, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_NxI: jax.Array, w_IxK: jax.Array, out_dtype=None) -> jax.Array:
  """x W, with `preferred_element_type` `out_dtype` (None: the inputs'). Its VJP is JAX's
  own but for the order of dL/dW: JAX computes (g^T x)^T, for which XLA:CPU (jax 0.10.2)
  copies g [N, K] into a transposed layout; where x is the narrower (I < K), this computes
  x^T g instead, and the copy is x's. For an LSTM layer's input projection (K = 4H) that
  made the recipe's step 5% faster; for the Transformer's MLP input (K = 4E) the copy was
  2% of the step in a profile."""
  return lax.dot_general(x_NxI, w_IxK, (((1,), (0,)), ((), ())),
                         preferred_element_type=out_dtype)


def _matmul_fwd(x_NxI, w_IxK, out_dtype):
  return matmul(x_NxI, w_IxK, out_dtype), (x_NxI, w_IxK)


def _matmul_bwd(out_dtype, saved, g_NxK):
  x_NxI, w_IxK = saved
  d_x = lax.dot_general(g_NxK, w_IxK, (((1,), (1,)), ((), ())),
                        preferred_element_type=out_dtype)
  if w_IxK.shape[0] < w_IxK.shape[1]:
    d_w = lax.dot_general(x_NxI, g_NxK, (((0,), (0,)), ((), ())),
                          preferred_element_type=out_dtype)
  else:  # JAX's order
    d_w = lax.dot_general(g_NxK, x_NxI, (((0,), (0,)), ((), ())),
                          preferred_element_type=out_dtype).T
  return d_x.astype(x_NxI.dtype), d_w.astype(w_IxK.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
