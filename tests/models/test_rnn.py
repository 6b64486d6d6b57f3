"""The recurrent LMs against their equations written out in NumPy, and their contracts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import decode, sharding
from lmjax.errors import UserError
from lmjax.models import rnn

VOCAB = 11


def _model(cell, **overrides):
  kwargs = dict(vocab_size=VOCAB, cell=cell, num_layers=2, d_model=6, hidden_size=8,
                tie_embeddings=False)
  kwargs.update(overrides)
  return rnn.RecurrentLM(**kwargs)


def _init(model, seed=0):
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  return nn.meta.unbox(variables['params'])


def _ids(batch=3, length=7, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_forward(cell, params, ids, *, tied, num_layers):
  """The model's equations, one time step and one gate at a time, in float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p['token_embed']['embedding'][np.asarray(ids)]  # [B, T, E]
  batch, length = ids.shape
  for layer in range(num_layers):
    q = p[f'layer_{layer}']
    w_x, w_h, b = q['input_kernel'], q['recurrent_kernel'], q['bias']
    hidden = w_h.shape[0]
    h = np.zeros((batch, hidden))
    c = np.zeros((batch, hidden))
    outputs = []
    for t in range(length):
      xt = x[:, t]
      gate = lambda k: xt @ w_x[:, k] + b[k] + h @ w_h[:, k]
      if cell == 'rnn':
        h = np.tanh(gate(0))
      elif cell == 'lstm':
        i, f, g, o = _sigmoid(gate(0)), _sigmoid(gate(1)), np.tanh(gate(2)), _sigmoid(gate(3))
        c = f * c + i * g
        h = o * np.tanh(c)
      else:  # gru, with r applied to (h W_hn + b_hn) as PyTorch and cuDNN do
        b_h = q['recurrent_bias']
        r = _sigmoid(xt @ w_x[:, 0] + b[0] + h @ w_h[:, 0] + b_h[0])
        z = _sigmoid(xt @ w_x[:, 1] + b[1] + h @ w_h[:, 1] + b_h[1])
        n = np.tanh(xt @ w_x[:, 2] + b[2] + r * (h @ w_h[:, 2] + b_h[2]))
        h = (1 - z) * n + z * h
      outputs.append(h)
    x = np.stack(outputs, axis=1)
  if tied:
    if 'output_projection' in p:
      x = x @ p['output_projection']['kernel']
    return x @ p['token_embed']['embedding'].T
  return x @ p['output_kernel'] + p['output_bias']


# Every cell untied; the tied output (with its projection, hidden 8 != embedding 6) once.
@pytest.mark.parametrize('cell, tied', [('rnn', False), ('lstm', False), ('gru', False),
                                        ('gru', True)])
def test_each_cell_matches_its_equations_in_numpy(cell, tied):
  model = _model(cell, tie_embeddings=tied)
  params = _init(model)
  # Non-zero biases everywhere, so a bias in the wrong place shows.
  params = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(2).standard_normal(a.shape),
                        params)
  ids = _ids()
  expected = _numpy_forward(cell, params, ids, tied=tied, num_layers=2)
  np.testing.assert_allclose(model.apply({'params': params}, ids), expected, atol=1e-5)
  if tied:  # hidden 8 != embedding 6: the projection is there
    assert 'output_projection' in params


def test_lstm_forget_gate_bias_starts_near_one():
  bias = _init(_model('lstm'))['layer_0']['bias']
  assert np.all(np.asarray(bias[1]) > 0.5) and np.all(np.abs(np.asarray(bias[0])) < 0.5)


@pytest.mark.parametrize('cell', rnn.CELLS)
def test_causal_later_tokens_do_not_change_earlier_logits(cell):
  model = _model(cell)
  params = _init(model)
  ids = _ids(batch=1, length=9)
  changed = ids.at[0, 5:].set((ids[0, 5:] + 1) % VOCAB)
  a = model.apply({'params': params}, ids)
  b = model.apply({'params': params}, changed)
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert not np.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize('cell', rnn.CELLS)
def test_carry_continues_a_sequence_split_in_two_calls(cell):
  model = _model(cell)
  params = _init(model)
  ids = _ids(length=10)
  whole = model.apply({'params': params}, ids)
  carry = rnn.model_initial_carry(model, ids.shape[0])
  first, carry = model.apply({'params': params}, ids[:, :4], carry)
  second, _ = model.apply({'params': params}, ids[:, 4:], carry)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=1e-6)


def test_reset_starts_the_rest_of_a_row_from_the_zero_carry():
  model = _model('lstm')
  params = _init(model)
  ids = _ids(batch=2, length=9)
  resets = jnp.zeros(ids.shape, bool).at[0, 4].set(True)
  carry = rnn.model_initial_carry(model, 2)
  logits, _ = model.apply({'params': params}, ids, carry, resets_BxT=resets)
  fresh = model.apply({'params': params}, ids[:, 4:])
  np.testing.assert_allclose(logits[0, 4:], fresh[0], atol=1e-6)  # row 0 restarted at 4
  plain = model.apply({'params': params}, ids)
  np.testing.assert_allclose(logits[1], plain[1], atol=1e-6)  # row 1 untouched
  assert not np.allclose(logits[0, 4:], plain[0, 4:])


def _dropout_outputs(model, params, ids, seed):
  return model.apply({'params': params}, ids, train=True,
                     rngs={'dropout': jax.random.key(seed)})


def test_locked_dropout_drops_the_same_features_at_every_step():
  x = jnp.ones((4, 6, 16))
  out = np.asarray(rnn.sequence_dropout(x, 0.5, jax.random.key(0), locked=True))
  zero = out == 0
  assert zero.any() and not zero.all()
  assert (zero == zero[:, :1]).all()  # step 0's mask is every step's mask
  np.testing.assert_allclose(out[~zero], 2.0)  # kept values scaled by 1 / keep
  plain = np.asarray(rnn.sequence_dropout(x, 0.5, jax.random.key(0), locked=False)) == 0
  assert not (plain == plain[:, :1]).all()


def test_locked_dropout_changes_training_outputs_and_nothing_at_evaluation():
  ids = _ids()
  locked = _model('lstm', locked_dropout=True, embed_dropout=0.3, dropout_rate=0.3)
  params = _init(locked)
  plain = _model('lstm').apply({'params': params}, ids)
  np.testing.assert_array_equal(locked.apply({'params': params}, ids), plain)
  assert not np.allclose(_dropout_outputs(locked, params, ids, 0), plain)


def test_weight_dropout_drops_recurrent_weights_only_in_training():
  model = _model('lstm', weight_dropout=0.5)
  params = _init(model)
  ids = _ids()
  plain = _model('lstm').apply({'params': params}, ids)
  np.testing.assert_array_equal(model.apply({'params': params}, ids), plain)
  a, b = (_dropout_outputs(model, params, ids, s) for s in (0, 1))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, _dropout_outputs(model, params, ids, 0))
  # The first step's output does not depend on W_h (h_0 = 0): only W_h was dropped.
  np.testing.assert_allclose(a[:, 0], plain[:, 0], atol=1e-6)


def test_parameters_carry_logical_axes_and_shard_by_the_rules():
  model = _model('gru', tie_embeddings=True)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  specs = nn.get_partition_spec(boxed)
  assert specs['layer_1']['recurrent_kernel'] == jax.sharding.PartitionSpec(
      'hidden_in', 'gates', 'hidden')
  assert specs['layer_0']['input_kernel'][0] == 'embed'
  rules = dict(sharding.RULES)
  named = {name for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(
      s, jax.sharding.PartitionSpec)) for name in spec if name}
  assert named <= set(rules), named - set(rules)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])  # carries of two leaves and of one
def test_decoding_equals_stepping_the_model_by_hand(cell):
  model = _model(cell)
  params = _init(model, seed=3)
  prompt = [1, 4, 2]
  tokens_to_logits, state = rnn.decode_fns(model, params, batch_size=1)
  candidate, = decode.generate(tokens_to_logits, state, [prompt], max_new_tokens=8,
                               strategy='greedy')[0]
  # By hand: the prompt in one call, then one argmax token at a time through the carry.
  logits, carry = model.apply({'params': params}, jnp.asarray([prompt]),
                              rnn.model_initial_carry(model, 1))
  expected, score = [], 0.0
  for _ in range(8):
    log_probs = jax.nn.log_softmax(logits[0, -1])
    token = int(jnp.argmax(log_probs))
    expected.append(token)
    score += float(log_probs[token])
    logits, carry = model.apply({'params': params}, jnp.asarray([[token]]), carry)
  assert candidate.tokens.tolist() == expected
  assert candidate.score == pytest.approx(score, abs=1e-4)


def test_beam_search_runs_on_the_carry_and_finds_a_likelier_sequence():
  model = _model('lstm')
  params = _init(model, seed=4)
  tokens_to_logits, state = rnn.decode_fns(model, params, batch_size=2)
  prompts = [[1, 2], [3, 4, 5]]
  greedy = decode.generate(tokens_to_logits, state, prompts, max_new_tokens=6)
  beams = decode.generate(tokens_to_logits, state, prompts, max_new_tokens=6,
                          strategy='beam', beam_size=4, length_penalty=0.0)
  for g, b in zip(greedy, beams, strict=True):
    assert b[0].score >= g[0].score - 1e-5


def test_unknown_cell_is_named():
  with pytest.raises(UserError, match="model.name='lru'"):
    rnn.RecurrentLM(vocab_size=5, cell='lru', num_layers=1, d_model=4, hidden_size=4)


@pytest.mark.parametrize('cell', rnn.CELLS)
def test_hand_written_backward_matches_autodiff_of_the_scan(cell):
  """`recurrence`'s VJP against JAX's own differentiation of the same forward scan, with
  resets mid-sequence and cotangents on both the outputs and the final carry."""
  rng = np.random.default_rng(5)
  gates, hidden, batch, length = rnn.NUM_GATES[cell], 6, 3, 7
  args = (jnp.asarray(rng.standard_normal((length, batch, gates, hidden)), jnp.float32),
          jnp.asarray(0.1 * rng.standard_normal((gates, hidden)), jnp.float32),
          jnp.asarray(0.5 * rng.standard_normal((hidden, gates, hidden)), jnp.float32),
          jnp.asarray(0.1 * rng.standard_normal((gates, hidden)), jnp.float32),
          jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32),
                       rnn.initial_carry(cell, 1, hidden, batch)['layer_0']))
  resets = jnp.zeros((length, batch), bool).at[3, 1].set(True)
  weights = jnp.asarray(rng.standard_normal((length, batch, hidden)), jnp.float32)

  def loss(run, x, x_bias, w, b, carry):
    h, final = run(x, x_bias, w, b, carry)
    return jnp.sum(h * weights) + sum(jnp.sum(v ** 2) for v in final.values())

  def custom(x, x_bias, w, b, carry):
    return rnn.recurrence(cell, 1, x, x_bias, w, b, carry, resets)

  def plain(x, x_bias, w, b, carry):
    h, final, _ = rnn._scan(cell, 1, x, x_bias, w, b, carry, resets, keep=False)
    return h, final

  np.testing.assert_allclose(loss(custom, *args), loss(plain, *args), rtol=1e-6)
  got = jax.grad(functools.partial(loss, custom), argnums=(0, 1, 2, 3, 4))(*args)
  expected = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3, 4))(*args)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
  # The reset cuts the path back: what row 1 outputs from step 3 on does not depend on its
  # earlier inputs, while row 0's does.
  later = lambda x: jnp.sum(custom(x, *args[1:])[0][3:] * weights[3:])
  d_x = np.asarray(jax.grad(later)(args[0]))
  assert np.all(d_x[:3, 1] == 0) and np.abs(d_x[:3, 0]).max() > 0
