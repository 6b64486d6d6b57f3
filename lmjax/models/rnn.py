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
A call given `resets_BxT` zeroes the carry before each marked position. The pipeline
marks the document separators, so every document is read from the state a fresh run
(or a decode) starts in.

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

from lmjax.errors import UserError
from lmjax.models import dropout, heads, layers

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


def sequence_dropout(x_BxTxF: Array, rate: float, rng: Array, *, locked: bool) -> Array:
  """Inverted dropout on [B, T, F]; `locked` draws one mask per row for all time steps."""
  keep = 1.0 - rate
  mask_shape = (x_BxTxF.shape[0], 1, x_BxTxF.shape[2]) if locked else x_BxTxF.shape
  mask = dropout.batch_bernoulli(rng, keep, mask_shape)
  return jnp.where(mask, x_BxTxF / keep, 0.0).astype(x_BxTxF.dtype)


# ------------------------------------------------------------------- the recurrence
#
# Autodiff of a scan would accumulate dL/dW_h inside the backward loop, one thin
# [H, B] x [B, G*H] product per step. `recurrence` has a hand-written VJP instead: the
# backward loop only carries dL/dh (and dL/dc) back through h W_h, and dL/dW_h is one
# large matmul over all steps afterwards, as cuDNN and oneDNN arrange it. The gradients
# are checked against autodiff of the plain scan in the tests.


def _step_with_residuals(cell, x_bias_GxH, w_h_HxGxH, b_h_GxH, carry, x_gates_BxGxH,
                         reset_B):
  """One step from the (reset) carry: (new carry, what the backward step needs)."""
  carry = jax.tree.map(lambda c: jnp.where(reset_B[:, None], 0.0, c), carry)
  h_prev = carry['h']
  h_gates = jnp.einsum('bh,hgk->bgk', h_prev.astype(w_h_HxGxH.dtype), w_h_HxGxH,
                       preferred_element_type=jnp.float32) + b_h_GxH.astype(jnp.float32)
  x_gates = x_gates_BxGxH.astype(jnp.float32) + x_bias_GxH.astype(jnp.float32)
  if cell == 'rnn':
    h = jnp.tanh(x_gates[:, 0] + h_gates[:, 0])
    return {'h': h}, (h_prev, h)
  if cell == 'lstm':
    pre = x_gates + h_gates
    i, f, o = (jax.nn.sigmoid(pre[:, k]) for k in (0, 1, 3))
    g = jnp.tanh(pre[:, 2])
    c = f * carry['c'] + i * g
    tanh_c = jnp.tanh(c)
    return {'h': o * tanh_c, 'c': c}, (h_prev, carry['c'], i, f, g, o, tanh_c)
  r = jax.nn.sigmoid(x_gates[:, 0] + h_gates[:, 0])
  z = jax.nn.sigmoid(x_gates[:, 1] + h_gates[:, 1])
  n = jnp.tanh(x_gates[:, 2] + r * h_gates[:, 2])
  return {'h': (1.0 - z) * n + z * h_prev}, (h_prev, r, z, n, h_gates[:, 2])


def _backward_step(cell, dh, dc, residuals):
  """dL/dh_t (and dL/dc_t) -> (dL/d x_gates, dL/d h_gates, dL/dh_{t-1} less the W_h
  path, dL/dc_{t-1})."""
  if cell == 'rnn':
    _, h = residuals
    d_pre = (dh * (1.0 - h * h))[:, None]
    return d_pre, d_pre, None, None
  if cell == 'lstm':
    _, c_prev, i, f, g, o, tanh_c = residuals
    do = dh * tanh_c
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    d_pre = jnp.stack([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                       dc * i * (1.0 - g * g), do * o * (1.0 - o)], axis=1)
    return d_pre, d_pre, None, dc * f
  h_prev, r, z, n, n_h = residuals
  dn_pre = dh * (1.0 - z) * (1.0 - n * n)
  dr_pre = dn_pre * n_h * r * (1.0 - r)
  dz_pre = dh * (h_prev - n) * z * (1.0 - z)
  d_x = jnp.stack([dr_pre, dz_pre, dn_pre], axis=1)
  d_h = jnp.stack([dr_pre, dz_pre, dn_pre * r], axis=1)
  return d_x, d_h, dh * z, None


def _scan(cell, unroll, x_gates_TxBxGxH, x_bias_GxH, w_h_HxGxH, b_h_GxH, carry, resets_TxB,
          keep):
  def step(carry, inputs):
    new, residuals = _step_with_residuals(cell, x_bias_GxH, w_h_HxGxH, b_h_GxH, carry,
                                          *inputs)
    return new, (new['h'], residuals if keep else None)
  carry, (h_TxBxH, residuals) = jax.lax.scan(step, carry, (x_gates_TxBxGxH, resets_TxB),
                                             unroll=unroll)
  return h_TxBxH, carry, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(cell: str, unroll: int, x_gates_TxBxGxH: Array, x_bias_GxH: Array,
               w_h_HxGxH: Array, b_h_GxH: Array, carry: dict,
               resets_TxB: Array) -> tuple[Array, dict]:
  """Runs `cell` over time: (h at every step [T, B, H], final carry). `x_gates` is the
  input side of the gates, x W_x, and `x_bias` its bias, added step by step inside the
  loop: added outside, the sum was a [T, B, G, H] array written and read once more (31 ms
  of the LSTM recipe's 1.08 s step on a CPU, in a profile). A carry row is zeroed before
  each step whose `resets` is True."""
  h_TxBxH, carry, _ = _scan(cell, unroll, x_gates_TxBxGxH, x_bias_GxH, w_h_HxGxH, b_h_GxH,
                            carry, resets_TxB, keep=False)
  return h_TxBxH, carry


def _recurrence_fwd(cell, unroll, x_gates_TxBxGxH, x_bias_GxH, w_h_HxGxH, b_h_GxH, carry,
                    resets_TxB):
  h_TxBxH, final, residuals = _scan(cell, unroll, x_gates_TxBxGxH, x_bias_GxH, w_h_HxGxH,
                                    b_h_GxH, carry, resets_TxB, keep=True)
  return (h_TxBxH, final), (x_bias_GxH, w_h_HxGxH, b_h_GxH, resets_TxB, residuals)


def _recurrence_bwd(cell, unroll, saved, cotangents):
  x_bias_GxH, w_h_HxGxH, b_h_GxH, resets_TxB, residuals = saved
  dh_out_TxBxH, d_final = cotangents
  w_h = w_h_HxGxH
  # W_h transposed once, before the loop: given [H, G, H] itself, XLA:CPU copied it into
  # this layout at every step (jax 0.10.2; 7% of the LSTM recipe's step).
  w_h_GxHxH = jnp.transpose(w_h, (1, 2, 0))

  def step(d_carry, inputs):
    dh_out, reset_B, res = inputs
    dh = d_carry['h'] + dh_out
    d_x, d_h, dh_prev, dc_prev = _backward_step(cell, dh, d_carry.get('c'), res)
    through_w = jnp.einsum('bgk,gkh->bh', d_h.astype(w_h.dtype), w_h_GxHxH,
                           preferred_element_type=jnp.float32)
    dh_prev = through_w if dh_prev is None else dh_prev + through_w
    # A reset step started from zeros: nothing flows back past it.
    new = {'h': jnp.where(reset_B[:, None], 0.0, dh_prev)}
    if dc_prev is not None:
      new['c'] = jnp.where(reset_B[:, None], 0.0, dc_prev)
    return new, (d_x, d_h if cell == 'gru' else None)

  d_carry = {k: v.astype(jnp.float32) for k, v in d_final.items()}
  d_carry0, (d_x_TxBxGxH, d_h_TxBxGxH) = jax.lax.scan(
      step, d_carry, (dh_out_TxBxH.astype(jnp.float32), resets_TxB, residuals), reverse=True,
      unroll=unroll)
  if d_h_TxBxGxH is None:
    d_h_TxBxGxH = d_x_TxBxGxH
  h_prev_TxBxH = residuals[0]
  # dL/dW_h for all steps at once: one [H, T*B] x [T*B, G*H] matmul.
  t, b, g, k = d_h_TxBxGxH.shape
  h_prev_HxN = jnp.transpose(h_prev_TxBxH.astype(w_h.dtype).reshape(t * b, -1))
  d_w_h = jnp.dot(h_prev_HxN, d_h_TxBxGxH.astype(w_h.dtype).reshape(t * b, g * k),
                  preferred_element_type=jnp.float32).reshape(-1, g, k)
  d_b_h = jnp.sum(d_h_TxBxGxH, axis=(0, 1))
  d_x_bias = jnp.sum(d_x_TxBxGxH, axis=(0, 1))
  return (d_x_TxBxGxH, d_x_bias.astype(x_bias_GxH.dtype), d_w_h.astype(w_h_HxGxH.dtype),
          d_b_h.astype(b_h_GxH.dtype), d_carry0, None)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


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
      mask = dropout.bernoulli(self.make_rng('dropout'), keep, w_h_HxGxH.shape)
      w_h_HxGxH = jnp.where(mask, w_h_HxGxH / keep, 0.0).astype(self.param_dtype)
    # Under FSDP the recurrent matrix is gathered once, before the time loop, not at every
    # step. It is also a workaround: XLA (jax 0.10.2) differentiates the loop wrongly when
    # the matrix enters it split over both 'fsdp' and 'tensor' on a mesh whose 'data'
    # axis is also above 1 (gradients off by ~1e-3 on mesh (2, 2, 2); the mesh test in
    # tests/test_sharding.py catches it).
    w_h_HxGxH = nn.with_logical_constraint(w_h_HxGxH, (None, 'gates', 'hidden'))

    # Time-major from the start, so the scan reads its inputs without a transpose. The
    # layer's input is transposed, not the gates (4x wider): given 'bti,igh->tbgh', XLA:CPU
    # wrote the gates in token order and then copied them into time order, forward and
    # backward (jax 0.10.2; 5% of the LSTM recipe's step).
    length, batch, width = x_BxTxI.shape[1], x_BxTxI.shape[0], x_BxTxI.shape[2]
    x_NxI = jnp.swapaxes(x_BxTxI, 0, 1).astype(self.dtype).reshape(length * batch, width)
    # layers.matmul orders dL/dW_x to transpose x, 4x narrower than the gates.
    x_gates_TxBxGxH = layers.matmul(x_NxI, w_x_IxGxH.astype(self.dtype).reshape(width, -1),
                                    jnp.float32).reshape(length, batch, num_gates, hidden)
    if b_h_GxH is None:
      b_h_GxH = jnp.zeros((num_gates, hidden), self.param_dtype)
    if resets_BxT is None:
      resets_BxT = jnp.zeros(x_BxTxI.shape[:2], bool)
    h_TxBxH, carry = recurrence(self.cell, self.scan_unroll, x_gates_TxBxGxH, bias_GxH,
                                w_h_HxGxH.astype(self.dtype), b_h_GxH, carry,
                                jnp.swapaxes(resets_BxT, 0, 1))
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
  # Above 0: a sequence classifier. The top layer's output at each row's last real
  # position (the carry there) goes through heads.ClassifierHead instead of the output
  # layer.
  num_classes: int = 0

  def __post_init__(self):
    if self.cell not in CELLS:
      raise UserError(f'model.name={self.cell!r} is not a recurrent cell; use one of '
                      f'{", ".join(CELLS)}.')
    super().__post_init__()

  def _dropout(self, rate: float, x_BxTxF: Array, train: bool) -> Array:
    if not train or rate == 0.0:
      return x_BxTxF
    return sequence_dropout(x_BxTxF, rate, self.make_rng('dropout'), locked=self.locked_dropout)

  @nn.compact
  def __call__(self, ids_BxT: Array, carry: PyTree | None = None, *, train: bool = False,
               resets_BxT: Array | None = None, mask_BxT: Array | None = None):
    return_carry = carry is not None
    if carry is None:
      carry = initial_carry(self.cell, self.num_layers, self.hidden_size, ids_BxT.shape[0])
    if self.tie_embeddings:  # small, as it is also the output layer (AWD-LSTM's choice)
      embedding_init = _uniform_init(0.1, ('vocab', 'embed'))
    else:  # N(0, 1), PyTorch's: the gates see the input from the first step
      embedding_init = nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ('vocab', 'embed'))
    embed = layers.GatheredEmbed(
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
    if self.num_classes:
      logits_BxC = heads.ClassifierHead(
          self.num_classes, 'hidden', self.dtype, self.param_dtype,
          name=heads.HEAD_NAME)(heads.last_position(x_BxTxF, mask_BxT))
      return (logits_BxC, new_carry) if return_carry else logits_BxC

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
