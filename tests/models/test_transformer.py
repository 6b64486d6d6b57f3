"""The decoder-only Transformer: causality, KV cache, logical axes, config errors, sizes;
its efficiency options (attention kernel, remat, scanned layers) against the plain model."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

from lmjax import config as config_lib
from lmjax import finetune, models
from lmjax.errors import UserError
from lmjax.models import transformer
from lmjax.models.transformer import Transformer

TINY = dict(vocab_size=11, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_len=16)


def _key(seed):
  # 'rbg' keys: compiling threefry for every initialiser dominates these tiny tests on CPU.
  return jax.random.key(seed, impl='rbg')


def _random_params(model, seed=0, stddev=0.2):
  """Params with every leaf redrawn: GPT-2's init is so small that bugs hide in it."""
  @jax.jit
  def init_and_redraw():
    params = model.init(_key(seed), jnp.zeros((1, 4), jnp.int32))['params']
    leaves, treedef = jax.tree.flatten(nn.unbox(params))
    keys = jax.random.split(_key(seed + 1), len(leaves))
    leaves = [leaf + stddev * jax.random.normal(key, leaf.shape, leaf.dtype)
              for leaf, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)

  return init_and_redraw()


def _random_ids(shape, seed=0, vocab_size=TINY['vocab_size']):
  return jax.random.randint(_key(seed), shape, 0, vocab_size, jnp.int32)


@pytest.fixture(scope='module')
def tiny_params():
  return _random_params(Transformer(**TINY))


def _add_to_embeddings(delta_BxLxE):
  """Interceptor that adds delta to the token embeddings, to differentiate w.r.t. them."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Embed) and context.method_name == '__call__':
      out = out + delta_BxLxE
    return out

  return interceptor


def test_logits_depend_only_on_earlier_positions(tiny_params):
  model = Transformer(**TINY)
  length = 8
  ids_BxL = _random_ids((2, length))
  readout_V = jax.random.normal(_key(3), (TINY['vocab_size'],))

  @jax.jit
  def input_gradient(t):
    def logit_at_t(delta_BxLxE):
      with nn.intercept_methods(_add_to_embeddings(delta_BxLxE)):
        logits_BxLxV = model.apply({'params': tiny_params}, ids_BxL)
      return logits_BxLxV[0, t] @ readout_V

    return jax.grad(logit_at_t)(jnp.zeros((2, length, TINY['d_model'])))

  for t in range(length):
    grad_BxLxE = np.asarray(input_gradient(t))
    norms_L = np.linalg.norm(grad_BxLxE[0], axis=-1)
    assert np.all(norms_L[:t + 1] > 1e-6), (t, norms_L)
    assert np.all(grad_BxLxE[0, t + 1:] == 0.0), (t, norms_L)
    assert np.all(grad_BxLxE[1] == 0.0), 'batch rows must not mix'


def test_kv_cache_prefill_then_steps_matches_full_forward(tiny_params):
  total_len, prompt_len = 12, 5
  ids_BxL = _random_ids((2, total_len), seed=1)
  full_logits_BxLxV = jax.jit(Transformer(**TINY).apply)({'params': tiny_params}, ids_BxL)

  decode_model = Transformer(**TINY, decode=True)
  tokens_to_logits, state = transformer.decode_fns(decode_model, tiny_params, batch_size=2)
  tokens_to_logits = jax.jit(tokens_to_logits)
  logits, state = tokens_to_logits(ids_BxL[:, :prompt_len], state)
  step_logits = [logits]
  for t in range(prompt_len, total_len):
    logits, state = tokens_to_logits(ids_BxL[:, t:t + 1], state)
    step_logits.append(logits)

  np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full_logits_BxLxV,
                             atol=1e-5, rtol=1e-5)
  assert int(state['cache']['index']) == total_len


def test_kv_cache_prefill_in_two_chunks_matches_one(tiny_params):
  ids_BxL = _random_ids((2, 9), seed=2)
  decode_model = Transformer(**TINY, decode=True)
  tokens_to_logits, empty = transformer.decode_fns(decode_model, tiny_params, batch_size=2)
  tokens_to_logits = jax.jit(tokens_to_logits)

  one_logits, one_cache = tokens_to_logits(ids_BxL, empty)
  first_logits, cache = tokens_to_logits(ids_BxL[:, :4], empty)
  second_logits, two_cache = tokens_to_logits(ids_BxL[:, 4:], cache)

  np.testing.assert_allclose(np.concatenate([first_logits, second_logits], axis=1),
                             one_logits, atol=1e-5, rtol=1e-5)
  for one, two in zip(jax.tree.leaves(one_cache), jax.tree.leaves(two_cache), strict=True):
    np.testing.assert_allclose(one, two, atol=1e-5, rtol=1e-5)


def test_decode_fns_state_carries_params_and_cache(tiny_params):
  ids_BxL = _random_ids((1, 6), seed=4)
  full_logits_BxLxV = jax.jit(Transformer(**TINY).apply)({'params': tiny_params}, ids_BxL)
  decode_model = Transformer(**TINY, decode=True)
  tokens_to_logits, state = transformer.decode_fns(decode_model, tiny_params, batch_size=1)
  again, _ = transformer.decode_fns(Transformer(**TINY, decode=True), tiny_params, batch_size=1)
  assert again is tokens_to_logits, 'equal models must share one function (jit cache)'

  prefill_logits, state = jax.jit(tokens_to_logits)(ids_BxL[:, :5], state)
  step_logits, state = jax.jit(tokens_to_logits)(ids_BxL[:, 5:], state)
  np.testing.assert_allclose(np.concatenate([prefill_logits, step_logits], axis=1),
                             full_logits_BxLxV, atol=1e-5, rtol=1e-5)
  assert int(state['cache']['index']) == 6


def _copied_rows(cache, src_NxS):
  """The cache with position s of row n copied from row src_NxS[n, s] (as beam search
  without 'beam_rows' would have copied it), each beam reading its own row."""
  def gather(path, x):
    if x.ndim < 4:  # the index
      return x
    # Positions are the last axis of the keys, the one before of the values.
    axis = -1 if path[-1].key == 'cached_key' else -2
    x_NxSx = jnp.moveaxis(x, axis, 1)
    x_NxSx = x_NxSx[src_NxS, jnp.arange(x_NxSx.shape[1])[None, :]]
    return jnp.moveaxis(x_NxSx, 1, axis)
  rest = {k: v for k, v in cache.items() if k != 'beam_rows'}
  return {**jax.tree_util.tree_map_with_path(gather, rest),
          'beam_rows': jnp.zeros_like(cache['beam_rows'])}


@pytest.mark.parametrize('scan_layers', [False, True])
def test_beams_reading_rows_through_beam_rows_equal_beams_with_copied_rows(scan_layers):
  """Beam search moves beams by rewriting 'beam_rows' instead of copying the cache: the
  logits must be those of a cache whose rows were copied, over two steps (the second
  reads the first's position from each beam's own row)."""
  num_prompts, k, prompt_len = 2, 3, 5
  model = Transformer(**TINY, scan_layers=scan_layers)
  params = _random_params(model)
  tokens_to_logits, state = transformer.decode_fns(model.clone(decode=True), params,
                                                   batch_size=num_prompts * k)
  tokens_to_logits = jax.jit(tokens_to_logits)
  _, state = tokens_to_logits(_random_ids((num_prompts * k, prompt_len), seed=5), state)
  rows_BxKxS = jax.random.randint(_key(6), (num_prompts, k, TINY['max_len']), 0, k)
  src_NxS = (jnp.arange(num_prompts)[:, None, None] * k + rows_BxKxS).reshape(
      num_prompts * k, -1)
  through = {**state, 'cache': {**state['cache'], 'beam_rows': rows_BxKxS}}
  copied = {**state, 'cache': _copied_rows(state['cache'], src_NxS)}
  for step in range(2):
    ids_Nx1 = _random_ids((num_prompts * k, 1), seed=7 + step)
    through_logits, through = tokens_to_logits(ids_Nx1, through)
    copied_logits, copied = tokens_to_logits(ids_Nx1, copied)
    np.testing.assert_allclose(through_logits, copied_logits, atol=1e-5, rtol=1e-5)
  # The two new positions are each beam's own; the rest as given.
  np.testing.assert_array_equal(through['cache']['beam_rows'][:, :, prompt_len:prompt_len + 2],
                                np.broadcast_to(np.arange(k)[None, :, None], (num_prompts, k, 2)))
  np.testing.assert_array_equal(through['cache']['beam_rows'][:, :, :prompt_len],
                                rows_BxKxS[:, :, :prompt_len])
  # Each row reading only its own keys (decode_fns' state as it is) gives other logits:
  # the comparison can tell.
  ids_Nx1 = _random_ids((num_prompts * k, 1), seed=7)
  own_logits, _ = tokens_to_logits(ids_Nx1, state)
  first_logits, _ = tokens_to_logits(
      ids_Nx1, {**state, 'cache': {**state['cache'], 'beam_rows': rows_BxKxS}})
  assert not np.allclose(own_logits, first_logits, atol=1e-3)


def test_cache_starts_empty_and_has_documented_layout():
  decode_model = Transformer(**TINY, decode=True)
  cache = transformer.init_cache(decode_model, batch_size=3)
  assert set(cache) == {'index', 'layer_0', 'layer_1'}
  assert cache['index'].dtype == jnp.int32 and int(cache['index']) == 0
  layer_cache = cache['layer_0']['attention']
  assert set(layer_cache) == {'cached_key', 'cached_value'}
  # [B, H, D, S] and [B, H, S, D]: heads lead, keys transposed (the module docstring).
  assert layer_cache['cached_key'].shape == (3, 4, 8, 16)
  assert layer_cache['cached_value'].shape == (3, 4, 16, 8)
  # Initialising with a full-length dummy (the flax examples' way) also leaves it empty.
  init_cache = jax.jit(decode_model.init)(_key(0), jnp.ones((3, 16), jnp.int32))
  init_cache = init_cache['cache']
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(init_cache))
  assert jax.tree.structure(init_cache) == jax.tree.structure(cache)


def test_writing_past_max_len_gives_nan_logits(tiny_params):
  decode_model = Transformer(**TINY, decode=True)
  tokens_to_logits, state = transformer.decode_fns(decode_model, tiny_params, batch_size=1)
  tokens_to_logits = jax.jit(tokens_to_logits)
  logits, state = tokens_to_logits(_random_ids((1, 16)), state)
  assert np.all(np.isfinite(logits))
  logits, _ = tokens_to_logits(_random_ids((1, 1)), state)
  assert np.all(np.isnan(logits))


def test_a_shorter_cache_gives_the_same_logits_until_it_is_full(tiny_params):
  decode_model = Transformer(**TINY, decode=True)
  ids_BxL = _random_ids((2, 9), seed=5)
  outputs = []
  for cache_len in (None, 8):
    tokens_to_logits, state = transformer.decode_fns(decode_model, tiny_params, batch_size=2,
                                                     cache_len=cache_len)
    tokens_to_logits = jax.jit(tokens_to_logits)
    prefill, state = tokens_to_logits(ids_BxL[:, :5], state)
    steps = [prefill]
    for t in range(5, 9):
      logits, state = tokens_to_logits(ids_BxL[:, t:t + 1], state)
      steps.append(logits)
    outputs.append(np.concatenate(steps, axis=1))
  assert transformer.init_cache(decode_model, 2, 8)['layer_0']['attention'][
      'cached_key'].shape == (2, 4, 8, 8)
  np.testing.assert_allclose(outputs[1][:, :8], outputs[0][:, :8], atol=1e-5, rtol=1e-5)
  assert np.all(np.isnan(outputs[1][:, 8])) and np.all(np.isfinite(outputs[0]))
  with pytest.raises(ValueError, match='cache length 17'):
    transformer.init_cache(decode_model, 1, 17)


def test_params_carry_logical_axis_names():
  model = Transformer(**TINY)
  abstract = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(abstract)['params']
  found = {'/'.join(k.key for k in path): tuple(spec)
           for path, spec in jax.tree_util.tree_leaves_with_path(
               specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}

  expected = {
      'token_embed/embedding': ('vocab', 'embed'),
      'position_embed': ('position', 'embed'),
      'final_norm/scale': ('embed',),
      'final_norm/bias': ('embed',),
  }
  for layer in ('layer_0', 'layer_1'):
    for name in ('query', 'key', 'value'):
      expected[f'{layer}/attention/{name}/kernel'] = ('embed', 'heads', 'head_dim')
      expected[f'{layer}/attention/{name}/bias'] = ('heads', 'head_dim')
    expected[f'{layer}/attention/out/kernel'] = ('heads', 'head_dim', 'embed')
    expected[f'{layer}/attention/out/bias'] = ('embed',)
    expected[f'{layer}/mlp/dense_in/kernel'] = ('embed', 'mlp')
    expected[f'{layer}/mlp/dense_in/bias'] = ('mlp',)
    expected[f'{layer}/mlp/dense_out/kernel'] = ('mlp', 'embed')
    expected[f'{layer}/mlp/dense_out/bias'] = ('embed',)
    for norm in ('attention_norm', 'mlp_norm'):
      expected[f'{layer}/{norm}/scale'] = ('embed',)
      expected[f'{layer}/{norm}/bias'] = ('embed',)
  assert found == expected


def test_initialisation_follows_gpt2():
  num_layers = 4
  model = Transformer(vocab_size=50, num_layers=num_layers, num_heads=4, d_model=64,
                      d_ff=256, max_len=16)
  params = jax.jit(model.init)(_key(0), jnp.zeros((1, 4), jnp.int32))
  params = nn.unbox(params['params'])
  residual_stddev = 0.02 / np.sqrt(2 * num_layers)
  layer = params['layer_3']
  for kernel, stddev in [(params['token_embed']['embedding'], 0.02),
                         (layer['attention']['query']['kernel'], 0.02),
                         (layer['mlp']['dense_in']['kernel'], 0.02),
                         (layer['attention']['out']['kernel'], residual_stddev),
                         (layer['mlp']['dense_out']['kernel'], residual_stddev)]:
    assert np.std(kernel) == pytest.approx(stddev, rel=0.1)
  assert np.all(layer['attention']['key']['bias'] == 0)
  assert np.all(layer['mlp_norm']['scale'] == 1) and np.all(layer['mlp_norm']['bias'] == 0)


def test_sharded_run_matches_unsharded(tiny_params):
  model = Transformer(**TINY)
  ids_BxL = _random_ids((4, 8), seed=5)
  apply = lambda params, ids: model.apply({'params': params}, ids)
  expected = jax.jit(apply)(tiny_params, ids_BxL)
  assert 'sharding_constraint' not in str(jax.make_jaxpr(apply)(tiny_params, ids_BxL))

  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  rules = [('batch', 'data'), ('embed', 'model'), ('mlp', 'model'), ('heads', 'model')]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert 'sharding_constraint' in str(jax.make_jaxpr(apply)(tiny_params, ids_BxL))
    sharded = jax.jit(apply)(tiny_params, ids_BxL)
  np.testing.assert_allclose(sharded, expected, atol=1e-5, rtol=1e-5)


def test_bad_head_count_raises_clear_error():
  with pytest.raises(UserError, match=r'model\.d_model=30.*model\.num_heads=4'):
    Transformer(**{**TINY, 'd_model': 30})


@pytest.mark.parametrize('decode', [False, True])
def test_input_longer_than_max_len_raises_clear_error(decode):
  model = Transformer(**TINY, decode=decode)
  with pytest.raises(UserError, match=r'train\.seq_len.*model\.max_len'):
    jax.eval_shape(model.init, _key(0), jnp.zeros((1, 17), jnp.int32))


def test_dropout_only_when_training(tiny_params):
  model = Transformer(**{**TINY, 'dropout_rate': 0.2})
  ids_BxL = _random_ids((2, 8), seed=6)
  variables = {'params': tiny_params}
  apply = jax.jit(model.apply, static_argnames='train')
  eval_logits = apply(variables, ids_BxL)
  eval_with_rng = apply(variables, ids_BxL, rngs={'dropout': _key(1)})
  np.testing.assert_array_equal(eval_logits, eval_with_rng)
  np.testing.assert_array_equal(eval_logits,
                                jax.jit(Transformer(**TINY).apply)(variables, ids_BxL))

  train_a = apply(variables, ids_BxL, train=True, rngs={'dropout': _key(1)})
  train_b = apply(variables, ids_BxL, train=True, rngs={'dropout': _key(2)})
  assert not np.allclose(train_a, eval_logits)
  assert not np.allclose(train_a, train_b)


def _loss_and_grads(model, params, ids_BxL, *, jaxpr_out=None, **apply_kwargs):
  """(loss, logits, gradients) of next-token cross-entropy, jitted: a train step without
  the optimizer. `jaxpr_out`, a list, gets the step's jaxpr as text."""
  def loss_fn(params):
    logits_BxLxV = model.apply({'params': params}, ids_BxL[:, :-1], **apply_kwargs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, ids_BxL[:, 1:])
    return loss.mean(), logits_BxLxV

  traced = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).trace(params)
  if jaxpr_out is not None:
    jaxpr_out.append(str(traced.jaxpr))
  (loss, logits_BxLxV), grads = traced.lower().compile()(params)
  return loss, logits_BxLxV, grads


def _assert_trees_close(actual, expected, tol=1e-5):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected),
                          strict=True):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


def _train_ids():
  return _random_ids((2, 9), seed=10)


@pytest.fixture(scope='module')
def plain_step(tiny_params):
  """_loss_and_grads of the default model (float32, dot_product attention) on _train_ids:
  the reference of the bfloat16, attention, remat and scan checks."""
  return _loss_and_grads(Transformer(**TINY), tiny_params, _train_ids())


# cuDNN's kernel runs on NVIDIA GPUs only.
@pytest.mark.parametrize('attention', ['dot_product', 'einsum'])
def test_bfloat16_compute_keeps_float32_params_grads_and_loss(tiny_params, plain_step,
                                                              attention):
  model = Transformer(**TINY, dtype=jnp.bfloat16, attention=attention)
  params = jax.eval_shape(model.init, _key(0), _train_ids())['params']
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  loss, logits, grads = _loss_and_grads(model, tiny_params, _train_ids())
  assert loss.dtype == logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  # Close to the float32 model (whose reference is dot_product's; einsum's equals it, as
  # tested below): bfloat16's rounding stays small. The checks after this say where.
  reference_loss, reference_logits, _ = plain_step
  np.testing.assert_allclose(logits, reference_logits, atol=0.2)
  assert abs(loss - reference_loss) <= 2e-2 * reference_loss, (loss, reference_loss)

  ids_BxL = _train_ids()
  equations = list(_equations(
      jax.make_jaxpr(lambda p: model.apply({'params': p}, ids_BxL))(tiny_params).jaxpr))
  # The projections multiply bfloat16 operands ...
  assert any(v.aval.dtype == jnp.bfloat16 for e in equations
             if e.primitive.name == 'dot_general' for v in e.invars)
  # ... while every exponential, here those of each layer's attention softmax, runs in
  # float32.
  exps = [e.invars[0].aval.dtype for e in equations if e.primitive.name == 'exp']
  assert len(exps) >= TINY['num_layers'] and all(d == jnp.float32 for d in exps), exps
  # The logits are the bfloat16 final state times the bfloat16 embedding summed in
  # float32: equal to that product in float64 to float32's precision (bfloat16 logits
  # would be off by about 2^-9 of their size).
  logits, captured = jax.jit(lambda p: model.apply(
      {'params': p}, ids_BxL, capture_intermediates=True, mutable=['intermediates']))(
          tiny_params)
  final_BxLxE, = captured['intermediates']['final_norm']['__call__']
  assert final_BxLxE.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  embedding_VxE = tiny_params['token_embed']['embedding'].astype(jnp.bfloat16)
  expected = np.einsum('ble,ve->blv', np.asarray(final_BxLxE, np.float64),
                       np.asarray(embedding_VxE, np.float64))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in it (jit, custom_jvp, scan)."""
  for equation in jaxpr.eqns:
    yield equation
    for param in equation.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _equations(sub)


def test_bfloat16_attention_scores_and_softmax_are_float32():
  """bfloat16 queries and keys give the softmax, taken in float64, of their exact dot
  products, rounded once to bfloat16. The scores here are about 40 in size, where
  bfloat16's spacing is 0.25: scores or a softmax in bfloat16 would move the
  probabilities by up to about 12%."""
  attention = transformer.CausalSelfAttention(
      num_heads=2, head_dim=4, max_len=8, init_stddev=0.02, out_init_stddev=0.02,
      dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  query_BxTxHxD, key_BxSxHxD = (
      jnp.asarray(rng.normal(scale=5.0, size=(2, 8, 2, 4)), jnp.bfloat16) for _ in range(2))
  probs_BxHxTxS = attention.apply({}, query_BxTxHxD, key_BxSxHxD, jnp.arange(8), None,
                                  method='_attention_probs')
  assert probs_BxHxTxS.dtype == jnp.bfloat16
  scores = np.einsum('bthd,bshd->bhts', np.asarray(query_BxTxHxD, np.float64),
                     np.asarray(key_BxSxHxD, np.float64)) / 2.0  # sqrt(head_dim)
  assert np.abs(scores).max() > 30
  scores = np.where(np.tril(np.ones((8, 8), bool)), scores, -np.inf)
  expected = np.exp(scores - scores.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  # One rounding to bfloat16 (8 significant bits) apart at most.
  np.testing.assert_allclose(np.asarray(probs_BxHxTxS, np.float64), expected,
                             rtol=2.0 ** -8, atol=1e-30)


def test_gpt2_small_parameter_count():
  model = Transformer(vocab_size=50257, num_layers=12, num_heads=12, d_model=768, d_ff=3072,
                      max_len=1024)
  abstract = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 8), jnp.int32))
  assert models.count_params(abstract['params']) == 124_439_808


def _model_config(**overrides):
  config = config_lib.base_config().model
  config.update(name='transformer', num_layers=2, num_heads=4, d_model=32, d_ff=0, max_len=16,
                dropout=0.1, dtype='bfloat16', param_dtype='float32')
  config.update(overrides)
  return config


def test_build_model_from_config():
  model = models.build_model(_model_config(), vocab_size=11, decode=True)
  assert isinstance(model, Transformer)
  assert (model.d_ff, model.dtype, model.param_dtype) == (128, jnp.bfloat16, jnp.float32)
  assert model.dropout_rate == 0.1 and model.decode and model.vocab_size == 11
  params = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4), jnp.int32))['params']
  per_layer = (4 * 32 * 32 + 4 * 32) + (2 * 32 * 128 + 128 + 32) + 2 * 2 * 32
  embeddings_and_final_norm = 11 * 32 + 16 * 32 + 2 * 32
  assert models.count_params(params) == 2 * per_layer + embeddings_and_final_norm


@pytest.mark.parametrize('overrides, message', [
    (dict(name='gpt5'), r"model\.name='gpt5'.*transformer"),
    (dict(dtype='float8'), r'model\.dtype'),
    (dict(num_heads=5), r'model\.num_heads'),
    (dict(attention='flash'), r"model\.attention='flash'.*dot_product, einsum"),
    (dict(remat='all'), r"model\.remat='all'.*none, full, save_dots"),
])
def test_build_model_rejects_bad_config(overrides, message):
  with pytest.raises(UserError, match=message):
    models.build_model(_model_config(**overrides), vocab_size=11)


def test_build_model_reads_the_efficiency_fields_and_defaults_them():
  model = models.build_model(_model_config(attention='einsum', remat='save_dots',
                                           scan_layers=True), vocab_size=11)
  assert (model.attention, model.remat, model.scan_layers) == ('einsum', 'save_dots', True)
  # The schema's defaults, which a config.json saved before these fields existed takes.
  model = models.build_model(_model_config(), vocab_size=11)
  assert (model.attention, model.remat, model.scan_layers) == ('dot_product', 'none', False)


@pytest.mark.parametrize('field, value, message', [
    ('attention', 'flash', r"model\.attention='flash'; use one of dot_product, einsum"),
    ('remat', 'all', r"model\.remat='all'; use one of none, full, save_dots"),
    ('attention_block', -4, r"model\.attention_block=-4; use 0 \(attention whole\)"),
    # On CPU; on a GPU it would pass with model.dtype=bfloat16.
    ('attention', 'cudnn', r"model\.attention='cudnn' is cuDNN's flash attention: it needs an "
     r'NVIDIA GPU \(this is cpu\), model\.dtype=bfloat16 \(it is float32\)'),
])
def test_training_config_validation_names_a_bad_efficiency_field(field, value, message):
  from configs import shakespeare_char
  from lmjax import config as config_lib, sharding
  config = shakespeare_char.get_config('tiny')
  config.model[field] = value
  mesh = jax.make_mesh((8, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(UserError, match=message):
    config_lib.validate_config(config, mesh)


# ----------------------------------------------------------------- efficiency options
# attention='dot_product', remat and scan_layers change how the model computes, never what:
# each is checked against the plain model (attention='einsum', no remat, a Python loop).


def _decode_steps(model, params, ids_BxL, prompt_len):
  """(logits, final cache) of a prefill of `prompt_len` tokens, then one token a call."""
  tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=ids_BxL.shape[0])
  tokens_to_logits = jax.jit(tokens_to_logits)
  logits, state = tokens_to_logits(ids_BxL[:, :prompt_len], state)
  steps = [logits]
  for t in range(prompt_len, ids_BxL.shape[1]):
    logits, state = tokens_to_logits(ids_BxL[:, t:t + 1], state)
    steps.append(logits)
  return np.concatenate(steps, axis=1), state['cache']


@pytest.mark.parametrize('case', ['causal', 'encoder', 'decode', 'dropout'])
def test_dot_product_attention_matches_einsum(tiny_params, plain_step, case):
  ids_BxL = _random_ids((2, 9), seed=8)
  if case == 'causal':  # a training forward and backward
    _assert_trees_close(_loss_and_grads(Transformer(**TINY, attention='einsum'),
                                        tiny_params, _train_ids()), plain_step)
    return
  outputs = []
  for attention in ('dot_product', 'einsum'):
    if case == 'encoder':  # bidirectional, the second row right-padded
      mask_BxL = jnp.arange(9)[None, :] < jnp.array([[9], [5]])
      model = Transformer(**TINY, causal=False, attention=attention)
      outputs.append(jax.jit(model.apply)({'params': tiny_params}, ids_BxL, mask_BxT=mask_BxL))
    elif case == 'decode':  # a prefill, then steps that attend over the cache's head only
      outputs.append(_decode_steps(Transformer(**TINY, decode=True, attention=attention),
                                   tiny_params, ids_BxL, prompt_len=5))
    else:  # the probabilities' dropout: dot_product takes the einsum path to keep it
      model = Transformer(**{**TINY, 'dropout_rate': 0.3}, attention=attention)
      apply = jax.jit(functools.partial(model.apply, train=True))
      outputs.append(apply({'params': tiny_params}, ids_BxL, rngs={'dropout': _key(4)}))
  _assert_trees_close(*outputs)


@pytest.mark.parametrize('block', [4, 5])  # dividing the 12 positions, and not
def test_blocked_causal_attention_matches_whole(tiny_params, block):
  """Blocks skip the masked scores; each draws its window of the whole dropout mask (a
  threefry key, the fast path), so loss, logits and gradients stay the whole model's."""
  ids_BxL = _random_ids((2, 12), seed=3)
  results = []
  for attention_block in (0, block):
    model = Transformer(**{**TINY, 'dropout_rate': 0.3}, attention='einsum',
                        attention_block=attention_block)

    def loss_fn(params, model=model):
      logits = model.apply({'params': params}, ids_BxL, train=True,
                           rngs={'dropout': jax.random.key(4)})
      return jnp.mean(logits**2), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(tiny_params)
    results.append((loss, logits, grads))
  _assert_trees_close(*results)
  # With no dropout too, and the decode path (a cache) ignores the blocks.
  model = Transformer(**TINY, attention='einsum', attention_block=block)
  np.testing.assert_allclose(
      jax.jit(model.apply)({'params': tiny_params}, ids_BxL),
      jax.jit(Transformer(**TINY, attention='einsum').apply)({'params': tiny_params}, ids_BxL),
      rtol=1e-5, atol=1e-6)
  blocked, _ = _decode_steps(Transformer(**TINY, decode=True, attention='einsum',
                                         attention_block=block), tiny_params, ids_BxL, 5)
  whole, _ = _decode_steps(Transformer(**TINY, decode=True, attention='einsum'),
                           tiny_params, ids_BxL, 5)
  np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)


# save_dots inside a scan also covers remat in scan's body (and prevent_cse=False).
@pytest.mark.parametrize('remat, scan_layers', [('full', False), ('save_dots', True)])
def test_remat_policies_give_the_same_loss_and_gradients(tiny_params, plain_step, remat,
                                                         scan_layers):
  loss, logits, grads = plain_step
  params = transformer.stack_layers(tiny_params) if scan_layers else tiny_params
  model = Transformer(**TINY, remat=remat, scan_layers=scan_layers)
  jaxpr = []
  got = _loss_and_grads(model, params, _train_ids(), jaxpr_out=jaxpr)
  _assert_trees_close(got, (loss, logits,
                            transformer.stack_layers(grads) if scan_layers else grads))
  assert 'remat' in jaxpr[0], 'the backward pass does not recompute'


def test_stack_and_unstack_layers_convert_between_the_layouts(tiny_params):
  stacked = transformer.stack_layers(tiny_params)
  assert set(stacked) == {'token_embed', 'position_embed', 'final_norm', 'layers'}
  assert stacked['layers']['mlp']['dense_in']['kernel'].shape == (2, 32, 64)
  np.testing.assert_array_equal(stacked['layers']['attention']['query']['kernel'][1],
                                tiny_params['layer_1']['attention']['query']['kernel'])
  jax.tree.map(np.testing.assert_array_equal, transformer.unstack_layers(stacked),
               tiny_params)
  # The stacked tree is exactly what a scanned model initialises.
  abstract = jax.eval_shape(Transformer(**TINY, scan_layers=True).init, _key(0),
                            jnp.zeros((1, 4), jnp.int32))
  assert (jax.tree.map(jnp.shape, nn.unbox(abstract['params']))
          == jax.tree.map(jnp.shape, stacked))
  with pytest.raises(ValueError, match='layer_0'):
    transformer.stack_layers({'layer_1': {}})


def test_scanned_layers_match_the_plain_model(tiny_params, plain_step):
  loss, logits, grads = plain_step
  model = Transformer(**TINY, scan_layers=True)
  got = _loss_and_grads(model, transformer.stack_layers(tiny_params), _train_ids())
  _assert_trees_close(got, (loss, logits, transformer.stack_layers(grads)))


def test_scanned_decode_matches_the_plain_model(tiny_params):
  ids_BxL = _random_ids((2, 9), seed=11)
  logits, cache = _decode_steps(Transformer(**TINY, decode=True), tiny_params, ids_BxL, 5)
  scanned = Transformer(**TINY, decode=True, scan_layers=True)
  scanned_logits, scanned_cache = _decode_steps(
      scanned, transformer.stack_layers(tiny_params), ids_BxL, 5)
  np.testing.assert_allclose(scanned_logits, logits, atol=1e-5, rtol=1e-5)
  # [B, L, H, D, S]: lmjax.decode repeats and reorders rows along the leading axis.
  assert scanned_cache['layers']['attention']['cached_key'].shape == (2, 2, 4, 8, 16)
  _assert_trees_close(transformer.unstack_layers(scanned_cache, transformer.CACHE_LAYER_AXIS),
                      cache)
  short = transformer.init_cache(scanned, batch_size=3, length=8)
  assert short['layers']['attention']['cached_value'].shape == (3, 2, 4, 8, 8)


def test_scanned_layers_draw_their_own_dropout_masks():
  """With every block's branches constant (zero kernels, unit biases) and zero embeddings,
  the final norm's input is the sum of the four branch dropout masks of two layers: odd
  counts show up only if each layer draws its own masks."""
  model = Transformer(**{**TINY, 'dropout_rate': 0.5}, scan_layers=True)
  params = nn.unbox(jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4), jnp.int32)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params['params'])
  for branch in (params['layers']['attention']['out'], params['layers']['mlp']['dense_out']):
    branch['bias'] = jnp.ones_like(branch['bias'])

  @jax.jit
  def final_norm_input(params):
    seen = []

    def capture(next_fun, args, kwargs, context):
      if context.module.name == 'final_norm':
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      model.apply({'params': params}, _random_ids((2, 8)), train=True,
                  rngs={'dropout': _key(6)})
    return seen[0]

  kept = np.asarray(final_norm_input(params)) * 0.5  # masks scale kept units by 2
  assert set(np.unique(kept)) <= {0, 1, 2, 3, 4}
  assert np.any(kept % 2 == 1), 'the layers share their dropout masks'


def test_scanned_params_carry_the_layers_axis_and_shard(tiny_params):
  model = Transformer(**TINY, scan_layers=True)
  abstract = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(abstract)['params']
  assert specs['layers']['attention']['query']['kernel'] == PartitionSpec(
      'layers', 'embed', 'heads', 'head_dim')
  assert specs['layers']['mlp_norm']['scale'] == PartitionSpec('layers', 'embed')
  assert specs['token_embed']['embedding'] == PartitionSpec('vocab', 'embed')

  ids_BxL = _random_ids((4, 8), seed=5)
  expected = jax.jit(Transformer(**TINY).apply)({'params': tiny_params}, ids_BxL)
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  # The stacked axis stays whole: each scan step reads one layer's slice of every weight.
  rules = [('batch', 'data'), ('layers', None), ('embed', 'model'), ('mlp', 'model'),
           ('heads', 'model')]
  params = jax.device_put(transformer.stack_layers(tiny_params),
                          nn.logical_to_mesh_sharding(specs, mesh, rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.jit(model.apply)({'params': params}, ids_BxL)
  np.testing.assert_allclose(sharded, expected, atol=1e-5, rtol=1e-5)


def test_lora_on_scanned_layers_merges_as_on_plain_ones(tiny_params):
  lora = transformer.LoraSpec(rank=2, alpha=4.0)
  # tiny_params with adapters; random ones (a fresh B is zero and would hide a bad merge).
  abstract = jax.eval_shape(Transformer(**TINY, lora=lora).init, _key(0),
                            jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  plain = finetune.join(tiny_params, jax.tree.map(
      lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32),
      finetune.split(nn.unbox(abstract['params']), finetune.is_lora)[0]))
  merged_plain = transformer.merge_lora(plain, lora)
  _assert_trees_close(transformer.merge_lora(transformer.stack_layers(plain), lora),
                      transformer.stack_layers(merged_plain))
  # The scanned model with adapters computes what the plain merged one does.
  ids_BxL = _random_ids((2, 8), seed=12)
  logits = jax.jit(Transformer(**TINY, lora=lora, scan_layers=True).apply)(
      {'params': transformer.stack_layers(plain)}, ids_BxL)
  expected = jax.jit(Transformer(**TINY).apply)({'params': merged_plain}, ids_BxL)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_scanned_params_export_to_gpt2_like_plain_ones(tiny_params):
  from lmjax import hf
  config = ml_collections.ConfigDict(dict(model=_model_config(
      dropout=0.0, dtype='float32', d_ff=64, scan_layers=True)))
  weights = hf._exportable_weights(config, transformer.stack_layers(tiny_params), 'wd')
  config.model.scan_layers = False
  jax.tree.map(np.testing.assert_array_equal, weights,
               hf._exportable_weights(config, tiny_params, 'wd'))


def test_freezing_single_layers_of_scanned_ones_is_refused_naming_the_field():
  config = config_lib.base_config()
  config.model.scan_layers = True
  config.train.freeze = ('layer_0/',)
  names = finetune.param_names(transformer.stack_layers(
      {f'layer_{i}': {'mlp': {'kernel': np.zeros(2)}} for i in range(2)}))
  with pytest.raises(UserError, match=r"'layer_0/' matches no parameter.*"
                                      r'set model\.scan_layers=False'):
    finetune.check_trainable(config, names)
