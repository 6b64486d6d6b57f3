"""Recurrent language models: Elman RNN, LSTM and GRU, embedding -> stack -> softmax.

Each layer runs over the whole sequence before the next one starts, so the input side
of every gate (x_t W_x + b for all t) is one large matmul, and only h_{t-1} W_h is
left inside the `lax.scan` over time, as cuDNN's RNNs do. The cells, for one step:

  rnn   h = tanh(x W_x + b + h W_h)
  lstm  i, f, g, o = x W_x + b + h W_h   (gate order of the weights' 'gates' axis)
        c = sigmoid(f) * c + sigmoid(i) * tanh(g);  h = sigmoid(o) * tanh(c)
  gru   r, z, n_x = x W_x + b;  r_h, z_h, n_h = h W_h + b_h
        r = sigmoid(r + r_h);  z = sigmoid(z + z_h);  n = tanh(n_x + r * n_h)
        h = (1 - z) * n + z * h            (PyTorch's and cuDNN's form of the GRU)

The carry is a dict {'layer_<i>': {'h': float32[B, H]} (+ 'c' for the LSTM)}. It is the
decode state (`decode_fns` puts it in state['cache'], one row per sequence, which is all
the model-agnostic decoder needs) and, in stateful training, part of the train state.
A call given `resets_BxT` zeroes the carry before each marked position: the first token
of a new document starts from the same state as the first token of the run.

Regularisation, the AWD-LSTM recipe's pieces: dropout on the embeddings, between layers
and on the output; `locked_dropout` uses one mask per sequence for all time steps
(variational dropout); `weight_dropout` drops entries of every W_h once per call
(DropConnect), so the recurrence stays one matmul per step.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
PyTree = Any

CELLS = ('rnn', 'lstm', 'gru')
NUM_GATES = {'rnn': 1, 'lstm': 4, 'gru': 3}


def _uniform_init(limit: float, axes: tuple[str, ...], forget_bias: float = 0.0):
  """U(-limit, limit) (PyTorch's RNN default), plus `forget_bias` on the LSTM's f gate."""
  def init(key, shape, dtype=jnp.float32):
    values = jax.random.uniform(key, shape, dtype, -limit, limit)
    if forget_bias:  # shape [4, H]: the bias of gates i, f, g, o
      values = values.at[1].add(forget_bias)
    return values
  return nn.with_logical_partitioning(init, axes)


def initial_carry(cell: str, num_layers: int, hidden_size: int, batch_size: int) -> PyTree:
  """The all-zero carry every sequence starts from."""
  zeros = jnp.zeros((batch_size, hidden_size), jnp.float32)
  layer = {'h': zeros, 'c': zeros} if cell == 'lstm' else {'h': zeros}
  return {f'layer_{i}': dict(layer) for i in range(num_layers)}


def cell_step(cell: str, carry: dict, x_gates_BxGxH: Array, w_h_HxGxH: Array,
              b_h_GxH: Array | None) -> dict:
  """One time step of `cell`: carry at t-1 and the input side of the gates -> carry at t.

  Matmul inputs are cast to w_h's dtype; the gate arithmetic and the carry are float32.
  """
  h_BxH = carry['h']
  h_gates_BxGxH = jnp.einsum('bh,hgk->bgk', h_BxH.astype(w_h_HxGxH.dtype), w_h_HxGxH,
                             preferred_element_type=jnp.float32)
  if b_h_GxH is not None:
    h_gates_BxGxH = h_gates_BxGxH + b_h_GxH.astype(jnp.float32)
  x_gates_BxGxH = x_gates_BxGxH.astype(jnp.float32)
  if cell == 'rnn':
    return {'h': jnp.tanh(x_gates_BxGxH[:, 0] + h_gates_BxGxH[:, 0])}
  if cell == 'lstm':
    gates = x_gates_BxGxH + h_gates_BxGxH
    i, f, g, o = (gates[:, k] for k in range(4))
    c_BxH = jax.nn.sigmoid(f) * carry['c'] + jax.nn.sigmoid(i) * jnp.tanh(g)
    return {'h': jax.nn.sigmoid(o) * jnp.tanh(c_BxH), 'c': c_BxH}
  if cell == 'gru':
    r = jax.nn.sigmoid(x_gates_BxGxH[:, 0] + h_gates_BxGxH[:, 0])
    z = jax.nn.sigmoid(x_gates_BxGxH[:, 1] + h_gates_BxGxH[:, 1])
    n = jnp.tanh(x_gates_BxGxH[:, 2] + r * h_gates_BxGxH[:, 2])
    return {'h': (1.0 - z) * n + z * h_BxH}
  raise ValueError(f'cell={cell!r}; use one of {CELLS}.')


def sequence_dropout(x_BxTxF: Array, rate: float, rng: Array, *, locked: bool) -> Array:
  """Inverted dropout on [B, T, F]; `locked` draws one mask per row for all time steps."""
  keep = 1.0 - rate
  mask_shape = (x_BxTxF.shape[0], 1, x_BxTxF.shape[2]) if locked else x_BxTxF.shape
  mask = jax.random.bernoulli(rng, keep, mask_shape)
  return jnp.where(mask, x_BxTxF / keep, 0.0).astype(x_BxTxF.dtype)


class RecurrentLayer(nn.Module):
  """One recurrent layer over a whole sequence: x [B, T, I] -> h for every t [B, T, H]."""

  cell: str
  hidden_size: int
  input_axis: str  # logical name of the input width: 'embed' (layer 0) or 'hidden_in'
  weight_dropout: float = 0.0
  scan_unroll: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxI: Array, carry: dict, resets_BxT: Array | None, *,
               train: bool) -> tuple[Array, dict]:
    num_gates, hidden = NUM_GATES[self.cell], self.hidden_size
    limit = hidden ** -0.5
    w_x_IxGxH = self.param('input_kernel',
                           _uniform_init(limit, (self.input_axis, 'gates', 'hidden')),
                           (x_BxTxI.shape[-1], num_gates, hidden), self.param_dtype)
    w_h_HxGxH = self.param('recurrent_kernel',
                           _uniform_init(limit, ('hidden_in', 'gates', 'hidden')),
                           (hidden, num_gates, hidden), self.param_dtype)
    # A forget-gate bias of 1 lets gradients through early in training (Jozefowicz et
    # al., 2015).
    bias_GxH = self.param('bias', _uniform_init(limit, ('gates', 'hidden'),
                                                forget_bias=1.0 if self.cell == 'lstm' else 0),
                          (num_gates, hidden), self.param_dtype)
    b_h_GxH = None
    if self.cell == 'gru':  # r multiplies h W_h + b_h, so that bias cannot fold into b
      b_h_GxH = self.param('recurrent_bias', _uniform_init(limit, ('gates', 'hidden')),
                           (num_gates, hidden), self.param_dtype)

    if train and self.weight_dropout > 0:
      keep = 1.0 - self.weight_dropout
      mask = jax.random.bernoulli(self.make_rng('dropout'), keep, w_h_HxGxH.shape)
      w_h_HxGxH = jnp.where(mask, w_h_HxGxH / keep, 0.0).astype(self.param_dtype)

    x_gates_BxTxGxH = jnp.einsum('bti,igh->btgh', x_BxTxI.astype(self.dtype),
                                 w_x_IxGxH.astype(self.dtype),
                                 preferred_element_type=jnp.float32) + bias_GxH
    w_h = w_h_HxGxH.astype(self.dtype)
    if resets_BxT is None:
      resets_BxT = jnp.zeros(x_BxTxI.shape[:2], bool)

    def step(carry, inputs):
      x_gates_BxGxH, reset_B = inputs
      carry = jax.tree.map(lambda c: jnp.where(reset_B[:, None], 0.0, c), carry)
      carry = cell_step(self.cell, carry, x_gates_BxGxH, w_h, b_h_GxH)
      return carry, carry['h']

    carry, h_TxBxH = jax.lax.scan(
        step, carry, (jnp.swapaxes(x_gates_BxTxGxH, 0, 1), jnp.swapaxes(resets_BxT, 0, 1)),
        unroll=self.scan_unroll)
    return jnp.swapaxes(h_TxBxH, 0, 1).astype(self.dtype), carry


class RecurrentLM(nn.Module):
  """Embedding -> `num_layers` recurrent layers -> float32 next-token logits.

  `model.apply(variables, ids_BxT)` starts every row from the zero carry and returns the
  logits; given `carry` (and optionally `resets_BxT`) it returns (logits, new carry).
  With `tie_embeddings` the output layer is the embedding transposed, after a linear
  projection from hidden_size to d_model when the two differ.
  """

  vocab_size: int
  cell: str
  num_layers: int
  d_model: int  # embedding width
  hidden_size: int
  tie_embeddings: bool = True
  dropout_rate: float = 0.0  # between layers and on the output
  embed_dropout: float = 0.0
  weight_dropout: float = 0.0
  locked_dropout: bool = False
  scan_unroll: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.cell not in CELLS:
      raise ValueError(f'model.name={self.cell!r} is not a recurrent cell; use one of {CELLS}.')
    super().__post_init__()

  def _dropout(self, rate: float, x_BxTxF: Array, train: bool) -> Array:
    if not train or rate == 0.0:
      return x_BxTxF
    return sequence_dropout(x_BxTxF, rate, self.make_rng('dropout'), locked=self.locked_dropout)

  @nn.compact
  def __call__(self, ids_BxT: Array, carry: PyTree | None = None, *, train: bool = False,
               resets_BxT: Array | None = None):
    return_carry = carry is not None
    if carry is None:
      carry = initial_carry(self.cell, self.num_layers, self.hidden_size, ids_BxT.shape[0])
    if self.tie_embeddings:  # small, as it is also the output layer (AWD-LSTM's choice)
      embedding_init = _uniform_init(0.1, ('vocab', 'embed'))
    else:  # N(0, 1), PyTorch's: the gates see the input from the first step
      embedding_init = nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ('vocab', 'embed'))
    embed = nn.Embed(
        num_embeddings=self.vocab_size, features=self.d_model,
        embedding_init=embedding_init,
        dtype=self.dtype, param_dtype=self.param_dtype, name='token_embed')
    x_BxTxF = self._dropout(self.embed_dropout, embed(ids_BxT), train)

    new_carry = {}
    for i in range(self.num_layers):
      name = f'layer_{i}'
      if i > 0:
        x_BxTxF = self._dropout(self.dropout_rate, x_BxTxF, train)
      x_BxTxF, new_carry[name] = RecurrentLayer(
          cell=self.cell, hidden_size=self.hidden_size,
          input_axis='embed' if i == 0 else 'hidden_in',
          weight_dropout=self.weight_dropout, scan_unroll=self.scan_unroll,
          dtype=self.dtype, param_dtype=self.param_dtype, name=name,
      )(x_BxTxF, carry[name], resets_BxT, train=train)
    x_BxTxF = self._dropout(self.dropout_rate, x_BxTxF, train)

    if self.tie_embeddings:
      if self.hidden_size != self.d_model:
        x_BxTxF = nn.DenseGeneral(
            self.d_model, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ('hidden', 'embed')),
            name='output_projection')(x_BxTxF)
      # float32 logits from `dtype` inputs, as the Transformer's tied output does.
      logits_BxTxV = jnp.einsum('btd,vd->btv', x_BxTxF, embed.embedding.astype(self.dtype),
                                preferred_element_type=jnp.float32)
    else:
      kernel_HxV = self.param(
          'output_kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                        ('hidden', 'vocab')),
          (self.hidden_size, self.vocab_size), self.param_dtype)
      bias_V = self.param('output_bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('vocab',)), (self.vocab_size,), self.param_dtype)
      logits_BxTxV = jnp.einsum('bth,hv->btv', x_BxTxF, kernel_HxV.astype(self.dtype),
                                preferred_element_type=jnp.float32) + bias_V
    return (logits_BxTxV, new_carry) if return_carry else logits_BxTxV


def model_initial_carry(model: RecurrentLM, batch_size: int) -> PyTree:
  return initial_carry(model.cell, model.num_layers, model.hidden_size, batch_size)


@functools.lru_cache(maxsize=None)
def _state_tokens_to_logits(model: RecurrentLM) -> Callable[[Array, PyTree], tuple[Array, PyTree]]:
  # One function per (hashable) model, so a jit taking it as static compiles once.
  def tokens_to_logits(ids_BxT: Array, state: PyTree) -> tuple[Array, PyTree]:
    logits_BxTxV, carry = model.apply({'params': state['params']}, ids_BxT, state['cache'])
    return logits_BxTxV, {'params': state['params'], 'cache': carry}

  return tokens_to_logits


def decode_fns(model: RecurrentLM, params: PyTree, *, batch_size: int,
               cache_len: int | None = None):
  """`(tokens_to_logits, state)` for the decoder; state = {'params', 'cache': the carry}.

  `cache_len` is accepted for the decoder's common signature and ignored: a recurrent
  model's state does not grow with the sequence.
  """
  del cache_len
  state = {'params': params, 'cache': model_initial_carry(model, batch_size)}
  return _state_tokens_to_logits(model), state
