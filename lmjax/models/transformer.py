"""GPT-2-style decoder-only Transformer language model, with a KV-cache decode mode; the
same stack without the causal mask is the bidirectional encoder of masked-LM pretraining.

Parameters carry logical axis names ('vocab', 'position', 'embed', 'heads',
'head_dim', 'mlp'); the config's rules map them to mesh axes. The layout of every
weight matches GPT-2 up to a reshape (q, k and v are separate, heads are their
own axis), so importing its checkpoints needs no arithmetic.

Training and evaluation may give packed rows, several examples one after another in a row:
`segment_ids_BxT` says which example each token belongs to (attention stays inside it, on
the XLA kernel and the einsum path, blocked or not; cuDNN's is refused) and `positions_BxT`
each token's position in its example (the row of the position table it reads).

Decode mode (`decode=True`) keeps a 'cache' collection:

    {'index': int32[],                       # positions filled so far
     'layer_<i>': {'attention': {'cached_key':   dtype[B, H, D, S],
                                 'cached_value': dtype[B, H, S, D]}}}

Heads lead and the keys are stored transposed, so that both matmuls of a decode step read
the cache as it lies, without a copy into another order at every step (see
`_cached_attention`). With
`scan_layers=True` the per-layer entries are one 'layers' entry instead, each array
stacked on axis 1 (CACHE_LAYER_AXIS), [B, L, H, D, S]: the batch stays the leading axis,
as lmjax.decode expects of every per-row leaf.

A call with T new tokens writes them at [index, index + T), attends causally over
everything filled, and advances `index` by T. The cache length S is max_len unless
`init_cache` is asked for less: a decode that needs 200 positions of GPT-2's 1024 then
attends over a fifth of the memory. `init_cache` and `decode_fns` wrap this for the
model-agnostic decoder; `decode_fns` adds 'beam_rows': int32[B, 1, S], through which beam
search (lmjax.decode) makes each beam read its positions from other rows of its prompt
(`CausalSelfAttention._beam_attention`), so that beams move without copying the cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.errors import UserError
from lmjax.models import dropout, heads, layers

Array = jax.Array
Dtype = Any
PyTree = Any

RESIDUAL_AXES = ('batch', 'length', 'embed')
# GPT-2 uses this LayerNorm epsilon; it matters when importing its weights.
LAYER_NORM_EPSILON = 1e-5


# The projections LoRA adapters may attach to: attention's and the MLP's.
LORA_TARGETS = ('query', 'key', 'value', 'out', 'dense_in', 'dense_out')

# model.attention, for attention from position 0 (training, evaluation, the call that
# creates a decode cache): 'dot_product' is jax.nn.dot_product_attention (the backend picks
# the kernel; jax 0.10 picks XLA's everywhere); 'cudnn' asks it for cuDNN's flash attention
# (NVIDIA GPUs, bfloat16); 'einsum' is the formula written out, the reference the others
# are tested against. A call on an existing cache (a decoder's prefill and its steps)
# attends by the einsums of `_cached_attention`, whatever the setting.
ATTENTION_KINDS = ('dot_product', 'einsum', 'cudnn')
# model.remat: what the backward pass of each decoder block keeps rather than recomputes.
# 'save_dots' keeps the matmuls without batch dimensions (the weight projections) and
# recomputes the attention scores, whose [B, H, T, T] size grows with the context.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# With scan_layers=True the blocks are one module of this name; its parameters (and
# cache) are stacked along a new axis with this logical name.
SCANNED_LAYERS = 'layers'
# The axis of the stacked KV cache that indexes layers: 1, so the batch stays leading.
CACHE_LAYER_AXIS = 1


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections carry LoRA adapters, of what rank and scale (alpha / rank)."""

  rank: int
  alpha: float
  targets: tuple[str, ...] = LORA_TARGETS

  def kwargs(self, name: str) -> dict:
    """ProjectionDense arguments for the projection called `name`."""
    if name not in self.targets:
      return {}
    return {'lora_rank': self.rank, 'lora_alpha': self.alpha}


def _lora_kwargs(lora: LoraSpec | None, name: str) -> dict:
  return lora.kwargs(name) if lora else {}


def _normal_init(stddev: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _zeros_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _symmetric_uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LAYER_NORM_EPSILON,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=_zeros_init(('embed',)),
      name=name,
  )


def _flat_einsum(equation: str, x: Array, kernel: Array) -> Array:
  """`jnp.einsum(equation, x, kernel)` for a projection 'bte,ehd->bthd' or 'bthd,hde->bte'
  (x's last axes contracted with the kernel's first), as one `layers.matmul` against the
  kernel seen as a matrix: [N, in] x [in, out]. The product is the same; the reason is
  XLA:CPU (jax 0.10.2), which, given the kernel with several input or output axes, copied
  it into another layout for the backward pass in every microbatch of every step (2% of
  the :full_cpu recipe's step)."""
  inputs, outputs = equation.split('->')
  x_letters, kernel_letters = inputs.split(',')
  num_in = sum(c in x_letters for c in kernel_letters)
  in_letters, out_letters = kernel_letters[:num_in], kernel_letters[num_in:]
  lead = x_letters[:len(x_letters) - num_in]
  if (x_letters != lead + in_letters or outputs != lead + out_letters
      or any(c in lead for c in kernel_letters)):
    raise ValueError(f'ProjectionDense equation {equation!r}: it must contract the last '
                     "axes of x with the kernel's first, as 'bte,ehd->bthd' does.")
  in_size = math.prod(kernel.shape[:num_in])
  y = layers.matmul(x.reshape(-1, in_size), kernel.reshape(in_size, -1))
  return y.reshape(x.shape[:len(lead)] + kernel.shape[num_in:])


class ProjectionDense(nn.Module):
  """Dense layer over several axes: einsum(x, kernel) + bias, kernel and bias named.

  Stands in for nn.DenseGeneral, which (flax 0.12.8) initialises a flattened
  kernel and unboxes it with the unflattened logical names; under a mesh that
  sharding constraint has the wrong rank and tracing fails.

  With `lora_rank` > 0 it adds a LoRA adapter (Hu et al. 2021): the output gains
  (lora_alpha / lora_rank) * x A B, A of shape [inputs..., rank] and B of shape
  [rank, outputs...]. B starts at zero, so a fresh adapter changes nothing; x goes through
  A then B, never forming the kernel-sized product A B while training.
  """

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]
  init_stddev: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', _normal_init(self.init_stddev, self.kernel_axes),
                        self.kernel_shape, self.param_dtype)
    num_out = len(self.bias_axes)
    bias_shape = self.kernel_shape[len(self.kernel_shape) - num_out:]
    bias = self.param('bias', _zeros_init(self.bias_axes), bias_shape, self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = _flat_einsum(self.equation, x, kernel) + bias
    if not self.lora_rank:
      return y
    in_shape = self.kernel_shape[:len(self.kernel_shape) - num_out]
    # A as LoRA's reference code draws it (uniform, bound 1/sqrt(fan in)); B zero.
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    lora_a = self.param(
        'lora_a', nn.with_logical_partitioning(
            _symmetric_uniform(bound), self.kernel_axes[:-num_out] + (None,)),
        in_shape + (self.lora_rank,), self.param_dtype)
    lora_b = self.param('lora_b', _zeros_init((None,) + self.bias_axes),
                        (self.lora_rank,) + bias_shape, self.param_dtype)
    lora_a, lora_b = nn.dtypes.promote_dtype(lora_a, lora_b, dtype=self.dtype)
    # 'bte,ehd->bthd' becomes 'bte,er->btr' then 'btr,rhd->bthd'.
    inputs, outputs = self.equation.split('->')
    x_letters, kernel_letters = inputs.split(',')
    in_letters = kernel_letters[:len(in_shape)]
    lead = ''.join(c for c in x_letters if c not in in_letters)
    low_rank = jnp.einsum(f'{x_letters},{in_letters}r->{lead}r', x, lora_a)
    delta = jnp.einsum(f'{lead}r,r{kernel_letters[len(in_shape):]}->{outputs}', low_rank,
                       lora_b)
    return y + (self.lora_alpha / self.lora_rank) * delta


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention; in decode mode it reads and extends a KV cache.
  With `causal=False` (the masked-LM encoder) every position sees every real one."""

  num_heads: int
  head_dim: int
  max_len: int
  init_stddev: float
  out_init_stddev: float
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  lora: LoraSpec | None = None
  causal: bool = True
  attention: str = 'dot_product'  # one of ATTENTION_KINDS
  # Above 0, the einsum path computes causal attention from position 0 in blocks of this
  # many queries, each against the keys up to its last query only (see _einsum_attention).
  attention_block: int = 0

  def _project(self, name: str, d_model: int) -> ProjectionDense:
    return ProjectionDense(
        equation='bte,ehd->bthd',
        kernel_shape=(d_model, self.num_heads, self.head_dim),
        kernel_axes=('embed', 'heads', 'head_dim'),
        bias_axes=('heads', 'head_dim'),
        init_stddev=self.init_stddev,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        **_lora_kwargs(self.lora, name),
    )

  @nn.compact
  def __call__(self, x_BxTxE: Array, cache_index: Array | None, *, train: bool,
               mask_BxT: Array | None = None, segment_ids_BxT: Array | None = None,
               beam_rows_BxKxS: Array | None = None) -> Array:
    """`cache_index` is the position of x's first token (decode mode only); `mask_BxT`
    marks real tokens of right-padded rows: an encoder attends to those only (a causal
    model needs no mask, as padding comes after every real token). `segment_ids_BxT`
    (training and evaluation of packed rows) lets a token attend only to tokens of its own
    segment: several examples share a row without reading one another. `beam_rows_BxKxS`
    (beam search, see `_beam_attention`) says which cache row each beam reads each
    position from."""
    batch_size, num_new, d_model = x_BxTxE.shape
    if segment_ids_BxT is not None:
      _check_segments_allowed(self.decode, self.attention)
    query_BxTxHxD = self._project('query', d_model)(x_BxTxE)
    key_BxTxHxD = self._project('key', d_model)(x_BxTxE)
    value_BxTxHxD = self._project('value', d_model)(x_BxTxE)

    if self.decode:
      # Variables that do not exist yet are being created by init: the cache
      # starts empty, so this call attends over its own tokens only.
      cache_exists = self.has_variable('cache', 'cached_key')
      heads = (batch_size, self.num_heads)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros,
                                 (*heads, self.head_dim, self.max_len), self.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   (*heads, self.max_len, self.head_dim), self.dtype)
    if self.decode and cache_exists:
      if cached_key.value.shape[0] != batch_size:
        raise ValueError(f'Decoding a batch of {batch_size} with a cache made for a batch '
                         f'of {cached_key.value.shape[0]}; rebuild it with init_cache.')
      cached_key.value = jax.lax.dynamic_update_slice(
          cached_key.value, jnp.transpose(key_BxTxHxD, (0, 2, 3, 1)).astype(self.dtype),
          (0, 0, 0, cache_index))
      cached_value.value = jax.lax.dynamic_update_slice(
          cached_value.value, jnp.transpose(value_BxTxHxD, (0, 2, 1, 3)).astype(self.dtype),
          (0, 0, cache_index, 0))
      query_positions_T = cache_index + jnp.arange(num_new)
      if beam_rows_BxKxS is None:
        context_BxTxHxD = self._cached_attention(query_BxTxHxD, cached_key.value,
                                                 cached_value.value, query_positions_T)
      else:
        context_BxTxHxD = self._beam_attention(query_BxTxHxD, cached_key.value,
                                               cached_value.value, query_positions_T,
                                               beam_rows_BxKxS)
      # The write above clamps instead of failing when it runs past the cache (the index
      # is traced, so Python cannot check it): poison the output so an overrun is loud.
      # Callers must keep prompt + new tokens within the cache length.
      overrun = cache_index + num_new > cached_key.value.shape[-1]
      context_BxTxHxD = jnp.where(overrun, jnp.nan, context_BxTxHxD)
    elif self.attention != 'einsum' and not (train and self.dropout_rate > 0):
      # Causal from position 0: the queries are the keys (training, evaluation, or the
      # call that creates the cache). jax.nn.dot_product_attention has no dropout on the
      # attention probabilities, so a training step that drops them takes the einsum
      # path: the model stays the same.
      context_BxTxHxD = self._kernel_attention(
          query_BxTxHxD, key_BxTxHxD, value_BxTxHxD, mask_BxT, segment_ids_BxT)
    else:
      context_BxTxHxD = self._einsum_attention(
          query_BxTxHxD, key_BxTxHxD, value_BxTxHxD, mask_BxT, train,
          segment_ids_BxT=segment_ids_BxT)

    out_BxTxE = ProjectionDense(
        equation='bthd,hde->bte',
        kernel_shape=(self.num_heads, self.head_dim, d_model),
        kernel_axes=('heads', 'head_dim', 'embed'),
        bias_axes=('embed',),
        init_stddev=self.out_init_stddev,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='out',
        **_lora_kwargs(self.lora, 'out'),
    )(context_BxTxHxD)
    return dropout.Dropout(self.dropout_rate)(out_BxTxE, deterministic=not train)

  def _kernel_attention(self, query_BxTxHxD: Array, key_BxTxHxD: Array,
                        value_BxTxHxD: Array, mask_BxT: Array | None,
                        segment_ids_BxT: Array | None) -> Array:
    """Attention from position 0 by jax.nn.dot_product_attention (XLA's kernel, or cuDNN's
    flash attention for model.attention='cudnn'), which runs scores and softmax in
    float32 too, whatever the input dtype."""
    mask = None  # causal: is_causal, and a kernel like cuDNN's then skips the masked half
    if not self.causal and mask_BxT is not None:
      mask = mask_BxT.astype(bool)[:, None, None, :]
    if segment_ids_BxT is not None:  # combined with is_causal by the kernel
      same = _same_segment_Bx1xTxS(segment_ids_BxT, segment_ids_BxT)
      mask = same if mask is None else mask & same
    flash = self.attention == 'cudnn' and self.causal
    return jax.nn.dot_product_attention(
        query_BxTxHxD, key_BxTxHxD, value_BxTxHxD, mask=mask, is_causal=self.causal,
        implementation='cudnn' if flash else None)

  def _cached_attention(self, query_BxTxHxD: Array, key_BxHxDxS: Array,
                        value_BxHxSxD: Array, query_positions_T: Array) -> Array:
    """Causal attention of T new queries over the cache, in the cache's own layout: both
    matmuls have the batch and heads as leading axes and contract the second-to-last axis
    of the cache, so XLA reads it where it lies. (From a cache kept as [B, S, H, D], XLA:CPU
    first copied it into that order: one layer's attention over 32 rows of 192 positions,
    6 heads of 64, took 4.3-5.7 ms that way against 0.6-0.8 ms this way.) Scores and
    softmax in float32."""
    scores_BxHxTxS = jnp.einsum('bthd,bhds->bhts', query_BxTxHxD, key_BxHxDxS,
                                preferred_element_type=jnp.float32)
    probs_BxHxTxS = _causal_softmax(scores_BxHxTxS * (1.0 / math.sqrt(self.head_dim)),
                                    query_positions_T, self.dtype)
    return jnp.einsum('bhts,bhsd->bthd', probs_BxHxTxS, value_BxHxSxD)

  def _beam_attention(self, query_NxTxHxD: Array, key_NxHxDxS: Array,
                      value_NxHxSxD: Array, query_positions_T: Array,
                      beam_rows_BxKxS: Array) -> Array:
    """Causal attention of N = B*K beams (K per prompt, rows b*K..b*K+K-1) whose cached
    position s is in row `beam_rows_BxKxS[b, i, s]` of the prompt's K rows, not
    necessarily their own: beam search then moves beams by moving these indices instead
    of copying the cache. Each row n is scored against the queries of all K beams of its
    prompt (the cache read as it lies, as in `_cached_attention`: a reshaped cache would
    make XLA copy it at every step of a decode loop); per position, a beam keeps the score
    from the row that holds its key, and weights that row's value. K times the
    attention's multiply-adds, no copy of the cache."""
    num_prompts, k, num_keys = beam_rows_BxKxS.shape
    num_rows, num_new, num_heads, head_dim = query_NxTxHxD.shape
    # Row n = b*K + j gets the queries of beams i = 0..K-1 of prompt b: Q = K*T of them.
    query_BxHxQxD = jnp.transpose(
        query_NxTxHxD.reshape(num_prompts, k * num_new, num_heads, head_dim), (0, 2, 1, 3))
    query_NxHxQxD = jnp.repeat(query_BxHxQxD, k, axis=0)
    scores_NxHxQxS = jnp.einsum('nhqd,nhds->nhqs', query_NxHxQxD, key_NxHxDxS,
                                preferred_element_type=jnp.float32)
    scores_BxKjxHxKixTxS = scores_NxHxQxS.reshape(num_prompts, k, num_heads, k, num_new,
                                                  num_keys)
    # reads[j][b, 0, i, 0, s]: beam i reads position s from row j.
    reads = [(beam_rows_BxKxS == j)[:, None, :, None, :] for j in range(k)]
    scores_BxHxKxTxS = sum(jnp.where(reads[j], scores_BxKjxHxKixTxS[:, j], 0.0)
                           for j in range(k)) * (1.0 / math.sqrt(head_dim))
    probs_BxHxKxTxS = _causal_softmax(scores_BxHxKxTxS, query_positions_T, self.dtype)
    weights_NxHxQxS = jnp.stack(
        [jnp.where(reads[j], probs_BxHxKxTxS, 0.0) for j in range(k)], axis=1).reshape(
            scores_NxHxQxS.shape)
    context_NxHxQxD = jnp.einsum('nhqs,nhsd->nhqd', weights_NxHxQxS, value_NxHxSxD)
    context_BxKjxHxKixTxD = context_NxHxQxD.reshape(num_prompts, k, num_heads, k, num_new,
                                                    head_dim)
    context_BxHxKxTxD = sum(context_BxKjxHxKixTxD[:, j] for j in range(k))
    return jnp.transpose(context_BxHxKxTxD, (0, 2, 3, 1, 4)).reshape(
        num_rows, num_new, num_heads, head_dim)

  def _einsum_attention(self, query_BxTxHxD: Array, key_BxTxHxD: Array,
                        value_BxTxHxD: Array, mask_BxT: Array | None, train: bool,
                        segment_ids_BxT: Array | None = None) -> Array:
    """Attention from position 0 written out. Causal, with `attention_block` = b,
    queries [i, i + b) attend to keys [0, i + b) only: the
    scores, softmax, dropout and matmuls of the masked upper blocks are never computed
    (at b = T/4, 10 of 16 blocks; fwd + bwd of one layer's attention 19% faster on a CPU
    core). Every block's dropout mask is its window of the whole [B, H, T, T] mask, so the
    model is the same; only the float rounding of the sums differs. With `segment_ids_BxT`
    each block's queries see the keys of their own segments only."""
    num_new = query_BxTxHxD.shape[1]
    block = self.attention_block
    drop = dropout.Dropout(self.dropout_rate)
    drop_key = drop.key() if train and self.dropout_rate > 0 else None
    if not (self.causal and 0 < block < num_new):
      block = num_new
    context = []
    for start in range(0, num_new, block):
      stop = min(start + block, num_new)
      keys = stop if self.causal else num_new
      same_segment = None
      if segment_ids_BxT is not None:
        same_segment = _same_segment_Bx1xTxS(segment_ids_BxT[:, start:stop],
                                             segment_ids_BxT[:, :keys])
      probs_BxHxTxS = self._attention_probs(
          query_BxTxHxD[:, start:stop], key_BxTxHxD[:, :keys], jnp.arange(start, stop),
          mask_BxT, same_segment)
      if drop_key is not None:
        whole = (*probs_BxHxTxS.shape[:2], num_new, num_new)
        probs_BxHxTxS = drop.apply_window(probs_BxHxTxS, drop_key, whole, (0, 0, start, 0),
                                          probs_BxHxTxS.shape)
      context.append(jnp.einsum('bhts,bshd->bthd', probs_BxHxTxS, value_BxTxHxD[:, :keys]))
    return context[0] if len(context) == 1 else jnp.concatenate(context, axis=1)

  def _attention_probs(self, query_BxTxHxD: Array, key_BxSxHxD: Array,
                       query_positions_T: Array, mask_BxT: Array | None,
                       same_segment_Bx1xTxS: Array | None = None) -> Array:
    # Scores and softmax in float32: bfloat16 loses too much in the normaliser.
    scores_BxHxTxS = jnp.einsum('bthd,bshd->bhts', query_BxTxHxD, key_BxSxHxD,
                                preferred_element_type=jnp.float32)
    scores_BxHxTxS = scores_BxHxTxS * (1.0 / math.sqrt(self.head_dim))
    num_new, num_keys = query_BxTxHxD.shape[1], key_BxSxHxD.shape[1]
    if self.causal:
      allowed_BxHxTxS = _causal_mask_1x1xTxS(query_positions_T, num_keys)
    else:
      allowed_BxHxTxS = jnp.ones((1, 1, num_new, num_keys), bool)
      if mask_BxT is not None:
        allowed_BxHxTxS = allowed_BxHxTxS & mask_BxT.astype(bool)[:, None, None, :]
    if same_segment_Bx1xTxS is not None:
      allowed_BxHxTxS = allowed_BxHxTxS & same_segment_Bx1xTxS
    scores_BxHxTxS = jnp.where(allowed_BxHxTxS, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(self.dtype)


def _same_segment_Bx1xTxS(query_segments_BxT: Array, key_segments_BxS: Array) -> Array:
  """True where a query and a key belong to the same segment (the same packed example)."""
  return (query_segments_BxT[:, :, None] == key_segments_BxS[:, None, :])[:, None]


def _check_segments_allowed(decode: bool, attention: str) -> None:
  """Segment ids come with packed training and evaluation rows, on the paths that mask
  by them."""
  if decode:
    raise ValueError('segment ids mark packed examples in training and evaluation rows; a '
                     'decode call continues one sequence per row and takes none.')
  if attention == 'cudnn':
    raise UserError("model.attention='cudnn' masks causally only and cannot keep packed "
                    "examples apart; use model.attention='dot_product' (or 'einsum'), or "
                    'data.pack=False (one example per row).')


def _causal_softmax(scores_xTxS: Array, query_positions_T: Array, dtype: Dtype) -> Array:
  """Softmax over the keys (last axis) of float32 scores [..., T, S], keys after their
  query masked, cast to `dtype`."""
  allowed_1x1xTxS = _causal_mask_1x1xTxS(query_positions_T, scores_xTxS.shape[-1])
  scores_xTxS = jnp.where(allowed_1x1xTxS, scores_xTxS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores_xTxS, axis=-1).astype(dtype)


def _causal_mask_1x1xTxS(query_positions_T: Array, num_keys: int) -> Array:
  """True where a key is at or before its query: key positions past the newest query
  (the unfilled cache tail included) are masked."""
  key_positions_S = jnp.arange(num_keys)
  return (key_positions_S[None, :] <= query_positions_T[:, None])[None, None]


class Mlp(nn.Module):
  """Position-wise feed-forward block: Dense -> GELU (tanh, as GPT-2) -> Dense."""

  d_ff: int
  init_stddev: float
  out_init_stddev: float
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraSpec | None = None

  @nn.compact
  def __call__(self, x_BxTxE: Array, *, train: bool) -> Array:
    d_model = x_BxTxE.shape[-1]
    # ProjectionDense names and initialises its parameters as nn.Dense would.
    hidden_BxTxF = ProjectionDense(
        equation='bte,ef->btf',
        kernel_shape=(d_model, self.d_ff),
        kernel_axes=('embed', 'mlp'),
        bias_axes=('mlp',),
        init_stddev=self.init_stddev,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='dense_in',
        **_lora_kwargs(self.lora, 'dense_in'),
    )(x_BxTxE)
    hidden_BxTxF = nn.gelu(hidden_BxTxF, approximate=True)
    out_BxTxE = ProjectionDense(
        equation='btf,fe->bte',
        kernel_shape=(self.d_ff, d_model),
        kernel_axes=('mlp', 'embed'),
        bias_axes=('embed',),
        init_stddev=self.out_init_stddev,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='dense_out',
        **_lora_kwargs(self.lora, 'dense_out'),
    )(hidden_BxTxF)
    return dropout.Dropout(self.dropout_rate)(out_BxTxE, deterministic=not train)


class DecoderLayer(nn.Module):
  """Pre-LayerNorm block: x + attn(LN(x)), then x + mlp(LN(x)).

  `train` is positional so that nn.remat can mark it static; with `scanned=True` the
  block returns (x, None), the (carry, output) pair nn.scan wants of its body.
  """

  num_heads: int
  head_dim: int
  d_ff: int
  max_len: int
  init_stddev: float
  out_init_stddev: float
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  lora: LoraSpec | None = None
  causal: bool = True
  attention: str = 'dot_product'
  attention_block: int = 0
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BxTxE: Array, cache_index: Array | None, train: bool,
               mask_BxT: Array | None = None, segment_ids_BxT: Array | None = None,
               beam_rows_BxKxS: Array | None = None) -> Array | tuple[Array, None]:
    attention = CausalSelfAttention(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        max_len=self.max_len,
        init_stddev=self.init_stddev,
        out_init_stddev=self.out_init_stddev,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        decode=self.decode,
        lora=self.lora,
        causal=self.causal,
        attention=self.attention,
        attention_block=self.attention_block,
        name='attention',
    )
    normed_BxTxE = _layer_norm(self.dtype, self.param_dtype, 'attention_norm')(x_BxTxE)
    x_BxTxE = x_BxTxE + attention(normed_BxTxE, cache_index, train=train, mask_BxT=mask_BxT,
                                  segment_ids_BxT=segment_ids_BxT,
                                  beam_rows_BxKxS=beam_rows_BxKxS)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, RESIDUAL_AXES)

    mlp = Mlp(
        d_ff=self.d_ff,
        init_stddev=self.init_stddev,
        out_init_stddev=self.out_init_stddev,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        lora=self.lora,
        name='mlp',
    )
    normed_BxTxE = _layer_norm(self.dtype, self.param_dtype, 'mlp_norm')(x_BxTxE)
    x_BxTxE = x_BxTxE + mlp(normed_BxTxE, train=train)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, RESIDUAL_AXES)
    return (x_BxTxE, None) if self.scanned else x_BxTxE


class Transformer(nn.Module):
  """GPT-2-style decoder-only language model: token ids -> float32 next-token logits.

  Embeddings are tied: the output projection is the token embedding transposed.
  With `causal=False` it is a bidirectional encoder (BERT's masked-LM objective): the
  logits at each position are for the token that stands there. With `decode=True` each
  call consumes T new tokens and extends the 'cache' collection (see the module docstring);
  apply with `mutable=['cache']`.
  """

  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  max_len: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  lora: LoraSpec | None = None  # LoRA adapters on the projections it names; None: none
  # Above 0: a sequence classifier. The final state at each row's last real position
  # (an encoder's: the mean over its real positions) goes through heads.ClassifierHead
  # instead of the output projection.
  num_classes: int = 0
  # False: a bidirectional encoder (trained as a masked LM; it cannot decode).
  causal: bool = True
  attention: str = 'dot_product'  # one of ATTENTION_KINDS
  attention_block: int = 0  # CausalSelfAttention.attention_block
  remat: str = 'none'  # a key of REMAT_POLICIES; training only (decode has no backward)
  # True: one nn.scan over the blocks, their parameters stacked under 'layers' (see
  # stack_layers); compiles one block instead of num_layers.
  scan_layers: bool = False

  # GPT-2's initialisation: N(0, 0.02) weights, residual output projections
  # shrunk by 1/sqrt(2 * num_layers) so the residual stream's variance stays
  # flat with depth.
  init_stddev = 0.02

  def __post_init__(self):
    # Checked here so a bad config fails when the model is built, not at trace time.
    if self.num_heads < 1 or self.d_model % self.num_heads != 0:
      raise UserError(f'model.d_model={self.d_model} must be divisible by '
                      f'model.num_heads={self.num_heads}; pick a width that is a multiple '
                      'of the head count.')
    if self.decode and not self.causal:
      raise UserError('a bidirectional encoder (model.causal=False) cannot decode: every '
                      'position reads the ones after it.')
    if self.attention not in ATTENTION_KINDS:
      raise UserError(f'model.attention={self.attention!r} is not one of '
                      f'{", ".join(ATTENTION_KINDS)}.')
    if self.remat not in REMAT_POLICIES:
      raise UserError(f'model.remat={self.remat!r} is not one of '
                      f'{", ".join(REMAT_POLICIES)}.')
    super().__post_init__()

  def _layer_fields(self) -> dict:
    """The hyperparameters every DecoderLayer of this model takes."""
    return dict(
        num_heads=self.num_heads,
        head_dim=self.d_model // self.num_heads,
        d_ff=self.d_ff,
        max_len=self.max_len,
        init_stddev=self.init_stddev,
        out_init_stddev=self.init_stddev / math.sqrt(2 * self.num_layers),
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        decode=self.decode,
        lora=self.lora,
        causal=self.causal,
        attention=self.attention,
        attention_block=self.attention_block,
    )

  def _position_embed(self, num_new: int, start: Array | None,
                      positions_BxT: Array | None) -> Array:
    """The position embeddings to add to the token embeddings: [1, T, E] for positions
    start + [0, T) (start None: 0), or [B, T, E] read at `positions_BxT`."""
    position_table_PxE = self.param(
        'position_embed', _normal_init(self.init_stddev, ('position', 'embed')),
        (self.max_len, self.d_model), self.param_dtype)
    if positions_BxT is not None:
      if start is not None:
        raise ValueError('positions are for training and evaluation rows; a decode call '
                         'continues from the cache index.')
      # Read whole along its width, as GatheredEmbed reads the token table.
      table_PxE = nn.with_logical_constraint(position_table_PxE, ('position', None))
      return jnp.take(table_PxE, positions_BxT, axis=0).astype(self.dtype)
    if start is None:
      position_embed_TxE = position_table_PxE[:num_new]
    else:
      position_embed_TxE = jax.lax.dynamic_slice_in_dim(position_table_PxE, start, num_new)
    return position_embed_TxE.astype(self.dtype)[None]

  def _beam_rows(self, start: Array, num_new: int) -> Array | None:
    """The cache's 'beam_rows' (see lmjax.decode's docstring) when it holds K > 1 beams a
    prompt, with the new positions [start, start + num_new) marked as each beam's own row
    (where this call writes them); None otherwise."""
    if not self.has_variable('cache', 'beam_rows'):
      return None
    rows = self.get_variable('cache', 'beam_rows')
    if rows.shape[1] == 1:
      return None
    own_BxKxT = jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=rows.dtype)[None, :, None],
                                 (*rows.shape[:2], num_new))
    rows = jax.lax.dynamic_update_slice(rows, own_BxKxT, (0, 0, start))
    self.put_variable('cache', 'beam_rows', rows)
    return rows

  def _blocks(self, x_BxTxE: Array, start: Array | None, train: bool,
              mask_BxT: Array | None, segment_ids_BxT: Array | None,
              beam_rows_BxKxS: Array | None = None) -> Array:
    """The decoder blocks, one after another or as one nn.scan (scan_layers)."""
    layer_fields = self._layer_fields()
    block = DecoderLayer
    if REMAT_POLICIES[self.remat] is not None and not self.decode:
      # static_argnums counts self: 3 is `train`. Inside a scan the loop boundary already
      # keeps XLA from merging the recomputation away, so prevent_cse is not needed.
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat],
                       prevent_cse=not self.scan_layers, static_argnums=(3,))
    if self.scan_layers:
      block = nn.scan(
          block,
          variable_axes={'params': 0, 'cache': CACHE_LAYER_AXIS},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,) * 5,
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS},
      )
      x_BxTxE, _ = block(**layer_fields, scanned=True, name=SCANNED_LAYERS)(
          x_BxTxE, start, train, mask_BxT, segment_ids_BxT, beam_rows_BxKxS)
      return x_BxTxE
    for layer in range(self.num_layers):
      x_BxTxE = block(**layer_fields, name=f'layer_{layer}')(
          x_BxTxE, start, train, mask_BxT, segment_ids_BxT, beam_rows_BxKxS)
    return x_BxTxE


  @nn.compact
  def __call__(self, ids_BxT: Array, *, train: bool = False, mask_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None,
               positions_BxT: Array | None = None) -> Array:
    """Next-token logits [B, T, V]; for a classifier, class logits [B, C], with
    `mask_BxT` marking the real positions of right-padded rows (None: all are real).

    Packed rows (training and evaluation only) give `segment_ids_BxT`, the example each
    token belongs to (a token attends to its own example's tokens only), and
    `positions_BxT`, each token's position in its example (the row of the position table
    it reads; None: 0..T-1)."""
    num_new = ids_BxT.shape[1]
    if num_new > self.max_len:
      raise UserError(f'Input length {num_new} exceeds model.max_len={self.max_len}; '
                      f'set train.seq_len <= model.max_len.')

    if self.decode:
      cache_exists = self.has_variable('cache', 'index')
      cache_index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      # While init creates the cache, the input is a dummy that starts at 0.
      start = cache_index.value if cache_exists else jnp.zeros((), jnp.int32)
      beam_rows_BxKxS = self._beam_rows(start, num_new) if cache_exists else None
    else:
      start = beam_rows_BxKxS = None

    token_embed = layers.GatheredEmbed(
        num_embeddings=self.vocab_size,
        features=self.d_model,
        embedding_init=_normal_init(self.init_stddev, ('vocab', 'embed')),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='token_embed',
    )
    position_embed = self._position_embed(num_new, start, positions_BxT)
    x_BxTxE = token_embed(ids_BxT) + position_embed
    x_BxTxE = dropout.Dropout(self.dropout_rate)(x_BxTxE, deterministic=not train)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, RESIDUAL_AXES)
    x_BxTxE = self._blocks(x_BxTxE, start, train, mask_BxT, segment_ids_BxT, beam_rows_BxKxS)
    x_BxTxE = _layer_norm(self.dtype, self.param_dtype, 'final_norm')(x_BxTxE)
    if self.num_classes:
      pool = heads.last_position if self.causal else heads.mean_over_positions
      return heads.ClassifierHead(self.num_classes, 'embed', self.dtype, self.param_dtype,
                                  name=heads.HEAD_NAME)(pool(x_BxTxE, mask_BxT))

    # Tied output projection. Not `token_embed.attend`: it returns logits in
    # `dtype`, and bfloat16 logits are too coarse for the loss. This keeps the
    # matmul's inputs in `dtype` but accumulates and returns float32.
    embedding_VxE = token_embed.embedding.astype(self.dtype)
    logits_BxTxV = jnp.einsum('bte,ve->btv', x_BxTxE, embedding_VxE,
                              preferred_element_type=jnp.float32)

    if self.decode and cache_exists:
      cache_index.value = start + num_new
    return logits_BxTxV


def merge_lora(params: PyTree, lora: LoraSpec) -> PyTree:
  """The parameters with every adapter folded into its kernel (kernel + scale * A B) and
  removed: what a model without LoRA computes the same logits with."""
  if not isinstance(params, dict):
    return params
  merged = {k: merge_lora(v, lora) for k, v in params.items()
            if k not in ('lora_a', 'lora_b', SCANNED_LAYERS)}
  if SCANNED_LAYERS in params:
    # Stacked layers (scan_layers): the same merge, batched over the leading layer axis.
    merged[SCANNED_LAYERS] = jax.vmap(lambda p: merge_lora(p, lora))(params[SCANNED_LAYERS])
  if 'lora_a' in params:
    product = jnp.tensordot(params['lora_a'], params['lora_b'], axes=1)
    merged['kernel'] = (params['kernel'] + (lora.alpha / lora.rank) * product).astype(
        params['kernel'].dtype)
  return merged


_LAYER_NAME = re.compile(r'layer_(\d+)')


def stack_layers(tree: PyTree, axis: int = 0) -> PyTree:
  """`tree` (params, gradients, or with axis=CACHE_LAYER_AXIS a cache) with its
  'layer_0'..'layer_{L-1}' entries stacked along `axis` into one 'layers' entry: the
  layout of scan_layers=True. Leaves are arrays (unboxed); other entries pass through."""
  numbers = sorted(int(m.group(1)) for k in tree if (m := _LAYER_NAME.fullmatch(k)))
  if numbers != list(range(len(numbers))) or not numbers:
    raise ValueError(f'stack_layers needs entries layer_0..layer_{{L-1}}; got layers {numbers}.')
  per_layer = [tree[f'layer_{i}'] for i in numbers]
  rest = {k: v for k, v in tree.items() if not _LAYER_NAME.fullmatch(k)}
  return {**rest, SCANNED_LAYERS: jax.tree.map(lambda *xs: jnp.stack(xs, axis), *per_layer)}


def unstack_layers(tree: PyTree, axis: int = 0) -> PyTree:
  """The inverse of `stack_layers`: the 'layers' entry split into 'layer_<i>' entries."""
  if SCANNED_LAYERS not in tree:
    raise ValueError(f"unstack_layers needs a '{SCANNED_LAYERS}' entry (a model with "
                     'scan_layers=True); got ' + ', '.join(sorted(tree)) + '.')
  stacked = tree[SCANNED_LAYERS]
  num_layers = jax.tree.leaves(stacked)[0].shape[axis]
  rest = {k: v for k, v in tree.items() if k != SCANNED_LAYERS}
  return {**rest, **{f'layer_{i}': jax.tree.map(lambda x: x.take(i, axis), stacked)
                     for i in range(num_layers)}}


def init_cache(model: Transformer, batch_size: int, length: int | None = None) -> PyTree:
  """An empty KV cache (index 0) for `model` (decode=True) holding `length` positions
  (default and at most: model.max_len)."""
  if not model.decode:
    raise ValueError('init_cache needs a model built with decode=True.')
  length = model.max_len if length is None else length
  if not 1 <= length <= model.max_len:
    raise ValueError(f'cache length {length} must be in [1, model.max_len={model.max_len}].')
  dummy_ids = jnp.zeros((batch_size, 1), jnp.int32)
  # eval_shape: only the cache's shapes are needed, not a parameter init. The cache
  # length is max_len, so a clone with max_len=length has the asked-for cache, in
  # whichever layout (per layer or stacked) the model keeps it.
  shapes = jax.eval_shape(model.clone(max_len=length).init, jax.random.key(0),
                          dummy_ids)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _state_tokens_to_logits(model: Transformer) -> Callable[[Array, PyTree], tuple[Array, PyTree]]:
  # Cached per (hashable) model so that equal models give the same function and
  # a jit that takes it as a static argument compiles once.
  def tokens_to_logits(ids_BxT: Array, state: PyTree) -> tuple[Array, PyTree]:
    logits_BxTxV, mutated = model.apply(
        {'params': state['params'], 'cache': state['cache']}, ids_BxT, mutable=['cache'])
    return logits_BxTxV, {'params': state['params'], 'cache': mutated['cache']}

  return tokens_to_logits


def decode_fns(model: Transformer, params: PyTree, *, batch_size: int,
               cache_len: int | None = None) -> tuple[Callable[[Array, PyTree],
                                                            tuple[Array, PyTree]], PyTree]:
  """Returns `(tokens_to_logits, state)` for the decoder, with state = {'params', 'cache'}.

  The params travel in the state rather than in a closure, so a jitted decode loop
  takes them as arguments instead of baking them in as constants. Lengths are the
  caller's to bound: prompt + new tokens must not exceed `cache_len` (default
  model.max_len); the logits of an overrunning call are NaN.
  """
  if not model.decode:
    raise ValueError('decode_fns needs a model built with decode=True.')
  cache = init_cache(model, batch_size, cache_len)
  # Read by beam search (lmjax.decode): beams then move without copying the cache.
  cache['beam_rows'] = jnp.zeros((batch_size, 1, cache_len or model.max_len), jnp.int32)
  return _state_tokens_to_logits(model), {'params': params, 'cache': cache}
