"""Layers the Transformer and the recurrent models share."""
import flax.linen as nn
import jax
import jax.numpy as jnp


class GatheredEmbed(nn.Embed):
  """nn.Embed whose lookup reads the table whole along its width: SPMD has no cheap way to
  gather rows of a table split along 'embed' (FSDP) into activations split by batch (XLA
  warns, then replicates everything); gathering the table first is what FSDP does for
  every other weight anyway. Parameters and results are nn.Embed's."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    table_VxE = nn.with_logical_constraint(self.embedding, ('vocab', None))
    (table_VxE,) = nn.dtypes.promote_dtype(table_VxE, dtype=self.dtype, inexact=False)
    return jnp.take(table_VxE, inputs, axis=0)
