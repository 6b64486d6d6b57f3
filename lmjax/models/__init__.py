"""Model construction from a config: `build_model` picks the class with a plain if/elif."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models import transformer

MODEL_NAMES = ('transformer',)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _dtype(name: str, field: str):
  if name not in _DTYPES:
    raise ValueError(f'{field}={name!r} is not one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def build_model(model_config: Any, vocab_size: int, *, decode: bool = False) -> nn.Module:
  """Builds the language model that `model_config` (the config's `model` section) names.

  `decode=True` gives the same parameters with an autoregressive state (the
  Transformer's KV cache) for the decoder.
  """
  name = model_config.name
  if name == 'transformer':
    return transformer.Transformer(
        vocab_size=vocab_size,
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        d_model=model_config.d_model,
        # 0 or None: GPT-2's 4x expansion.
        d_ff=model_config.get('d_ff') or 4 * model_config.d_model,
        max_len=model_config.max_len,
        dropout_rate=model_config.dropout,
        dtype=_dtype(model_config.dtype, 'model.dtype'),
        param_dtype=_dtype(model_config.param_dtype, 'model.param_dtype'),
        decode=decode,
    )
  raise ValueError(f'model.name={name!r} is not a known model; known: {list(MODEL_NAMES)}.')


def count_params(params: Any) -> int:
  """Number of scalars in a params tree (arrays, boxed arrays or jax.eval_shape output)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
