"""Model construction from a config: `build_model` picks the class with a plain if/elif."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import flops
from lmjax.errors import UserError
from lmjax.models import rnn, transformer

MODEL_NAMES = ('transformer',) + rnn.CELLS
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DTYPES = tuple(_DTYPES)  # what model.dtype and model.param_dtype may name


def _dtype(name: str, field: str):
  if name not in _DTYPES:
    raise UserError(f'{field}={name!r}; use one of {", ".join(DTYPES)}.')
  return _DTYPES[name]


def build_model(model_config: Any, vocab_size: int, *, decode: bool = False,
                num_classes: int = 0) -> nn.Module:
  """Builds the language model that `model_config` (the config's `model` section) names.

  `decode=True` gives the same parameters with an autoregressive state (the
  Transformer's KV cache) for the decoder. `num_classes` > 0 makes it a sequence
  classifier (class logits from the final state; see heads.py).
  """
  name = model_config.name
  if name == 'transformer':
    return transformer.Transformer(
        vocab_size=vocab_size,
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        d_model=model_config.d_model,
        d_ff=model_config.d_ff or 4 * model_config.d_model,  # 0: GPT-2's 4x expansion
        max_len=model_config.max_len,
        dropout_rate=model_config.dropout,
        dtype=_dtype(model_config.dtype, 'model.dtype'),
        param_dtype=_dtype(model_config.param_dtype, 'model.param_dtype'),
        decode=decode,
        lora=lora_spec(model_config),
        num_classes=num_classes,
        causal=model_config.causal,
        attention=model_config.attention,
        attention_block=model_config.attention_block,
        remat=model_config.remat,
        scan_layers=model_config.scan_layers,
    )
  if name in rnn.CELLS:
    return rnn.RecurrentLM(
        vocab_size=vocab_size,
        cell=name,
        num_layers=model_config.num_layers,
        d_model=model_config.d_model,
        hidden_size=model_config.hidden_size or model_config.d_model,
        tie_embeddings=model_config.tie_embeddings,
        dropout_rate=model_config.dropout,
        embed_dropout=model_config.embed_dropout,
        weight_dropout=model_config.weight_dropout,
        locked_dropout=model_config.locked_dropout,
        scan_unroll=model_config.scan_unroll,
        dtype=_dtype(model_config.dtype, 'model.dtype'),
        param_dtype=_dtype(model_config.param_dtype, 'model.param_dtype'),
        num_classes=num_classes,
    )  # the carry is its decode state: decode=True changes nothing
  raise UserError(f'model.name={name!r} is not a known model; use one of '
                  f'{", ".join(MODEL_NAMES)}.')


def lora_spec(model_config: Any) -> transformer.LoraSpec | None:
  """The LoRA adapters `model_config` asks for (model.lora_rank > 0), else None."""
  if not model_config.lora_rank:
    return None
  return transformer.LoraSpec(rank=model_config.lora_rank, alpha=model_config.lora_alpha,
                              targets=tuple(model_config.lora_targets))


def is_recurrent(model_config: Any) -> bool:
  return model_config.name in rnn.CELLS


def decode_fns(model: nn.Module, params: Any, *, batch_size: int, cache_len: int | None = None):
  """`(tokens_to_logits, state)` for the model-agnostic decoder, for a model that
  `build_model(..., decode=True)` made: the KV-cached Transformer or a recurrent LM."""
  if isinstance(model, rnn.RecurrentLM):
    return rnn.decode_fns(model, params, batch_size=batch_size, cache_len=cache_len)
  return transformer.decode_fns(model, params, batch_size=batch_size, cache_len=cache_len)


def train_flops_per_token(model_config: Any, params: Any, seq_len: int) -> float:
  """Model FLOPs per trained token: 6 per matmul weight (forward + backward), plus the
  Transformer's attention (PaLM's appendix B). Lookup tables (positions; an untied
  embedding) are not matmuls and are left out; a tied embedding is the output layer."""
  num_params = count_params(params)
  if model_config.name == 'transformer':
    return flops.train_flops_per_token(
        num_params, count_params(params.get('position_embed', {})), model_config.num_layers,
        model_config.d_model, seq_len)
  lookup = 0 if model_config.tie_embeddings else count_params(params['token_embed'])
  return 6.0 * (num_params - lookup)


def count_params(params: Any) -> int:
  """Number of scalars in a params tree (arrays, boxed arrays or jax.eval_shape output)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
