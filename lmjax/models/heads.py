"""Sequence classification: pool a model's final hidden states, then one linear layer.

The Transformer and the recurrent models end in the same head, named 'classifier', so a
language model fine-tuned into a classifier keeps every parameter name of its base and
gains only this one (its output layer, if it had its own, goes unused).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

HEAD_NAME = 'classifier'


def last_position(x_BxTxF: Array, mask_BxT: Array | None) -> Array:
  """The state at each row's last real position (rows are padded on the right). For a
  causal model it has read the whole passage and nothing of the padding."""
  if mask_BxT is None:
    return x_BxTxF[:, -1]
  last_B = jnp.maximum(jnp.sum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
  return jnp.take_along_axis(x_BxTxF, last_B[:, None, None], axis=1)[:, 0]


def mean_over_positions(x_BxTxF: Array, mask_BxT: Array | None) -> Array:
  """The mean state over each row's real positions (for a bidirectional encoder)."""
  if mask_BxT is None:
    return jnp.mean(x_BxTxF, axis=1)
  weights_BxT = mask_BxT.astype(x_BxTxF.dtype)
  total_BxF = jnp.einsum('btf,bt->bf', x_BxTxF, weights_BxT)
  return total_BxF / jnp.maximum(jnp.sum(weights_BxT, axis=1, keepdims=True), 1)


class ClassifierHead(nn.Module):
  """[B, F] pooled states -> float32 class logits [B, C]."""

  num_classes: int
  input_axis: str  # logical name of the pooled width: 'embed' or 'hidden'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled_BxF: Array) -> Array:
    # N(0, 0.02): GPT-2's initialisation, which Hugging Face's sequence-classification
    # heads also use; the first step's predictions are close to uniform.
    kernel_FxC = self.param(
        'kernel', nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                               (self.input_axis, 'classes')),
        (pooled_BxF.shape[-1], self.num_classes), self.param_dtype)
    bias_C = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ('classes',)),
                        (self.num_classes,), self.param_dtype)
    logits_BxC = jnp.einsum('bf,fc->bc', pooled_BxF.astype(self.dtype),
                            kernel_FxC.astype(self.dtype), preferred_element_type=jnp.float32)
    return logits_BxC + bias_C.astype(jnp.float32)
