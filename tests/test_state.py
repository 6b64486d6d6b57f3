"""lmjax/state.py: the state initialised straight into its shardings equals one device's,
the carry of a stateful run, and the model each kind of config gets."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import authorship, rnn_shakespeare_char, shakespeare_char
from lmjax import optim, sharding, state as state_lib
from lmjax.data import tokenizers

VOCAB = 11  # odd: it cannot split over 2 tensor devices


def _transformer_config():
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=8)
  config.train.update(seq_len=8, batch_size=8)
  config.mesh.shape = (1, 2, 2)  # FSDP x tensor on 4 devices
  return config


def _specs(tree):
  return {jax.tree_util.keystr(path): x.sharding.spec
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_the_sharded_state_is_split_by_the_rules_and_equals_one_devices_init(capsys):
  config = _transformer_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, VOCAB)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  state, shardings = state_lib.create_train_state(model, tx, mesh, rules, seed=3, seq_len=8)

  params = _specs(state.params)
  assert params["['token_embed']['embedding']"] == P(None, 'fsdp')  # 11 rows stay whole
  assert params["['position_embed']"] == P(None, 'fsdp')
  assert params["['layer_0']['attention']['query']['kernel']"] == P('fsdp', 'tensor', None)
  assert params["['layer_0']['attention']['query']['bias']"] == P('tensor', None)
  assert params["['layer_0']['attention']['out']['kernel']"] == P('tensor', None, 'fsdp')
  assert params["['layer_0']['mlp']['dense_in']['kernel']"] == P('fsdp', 'tensor')
  assert params["['layer_0']['mlp']['dense_out']['bias']"] == P('fsdp')
  assert params["['final_norm']['scale']"] == P('fsdp')
  kernel = state.params['layer_0']['attention']['query']['kernel']
  assert kernel.addressable_shards[0].data.shape == (16 // 2, 2 // 2, 8)
  # Adam's moments are split as their parameters; the step is on every device.
  adam, = [x for x in jax.tree.leaves(state.opt_state,
                                      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(x, optax.ScaleByAdamState)]
  assert _specs(adam.mu) == params == _specs(adam.nu)
  assert state.step.sharding.is_fully_replicated and int(state.step) == 0
  assert state.carry is None and state.frozen is None
  assert jax.tree.map(lambda x: x.sharding, state) == shardings
  assert ("note: parameter ['token_embed']['embedding'] dim 0 (size 11) stays whole: "
          'tensor would split it 2 ways.') in capsys.readouterr().out

  # The same numbers as initialising on one device with the same seed.
  one_device = jax.jit(functools.partial(state_lib.init_state, model=model, tx=tx,
                                         seq_len=8))(jax.random.key(3))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(one_device),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_stateful_runs_carry_starts_at_zero_with_its_rows_split_as_the_batch():
  config = rnn_shakespeare_char.get_config('tiny')
  config.model.update(d_model=8, hidden_size=8)
  config.train.update(seq_len=8, batch_size=8)
  config.mesh.shape = (2, 2, 1)
  assert config.train.stateful
  rows = state_lib.carry_rows(config)
  assert rows == 8
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, VOCAB)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  state, _ = state_lib.create_train_state(model, tx, mesh, rules, seed=0, seq_len=8,
                                          carry_rows=rows)
  carry = jax.tree.leaves(state.carry)
  assert carry
  for x in carry:
    assert x.shape == (8, 8) and x.sharding.spec == P(('data', 'fsdp'))
    assert x.addressable_shards[0].data.shape == (2, 8)
    np.testing.assert_array_equal(x, 0)
  # An evaluation's carry: zeros of its own batch, split the same way.
  for x in jax.tree.leaves(state_lib.eval_carry(model, mesh, 12)):
    assert x.shape == (12, 8) and x.sharding.spec == P(('data', 'fsdp'))
    np.testing.assert_array_equal(x, 0)


def test_only_a_stateful_run_keeps_carry_rows():
  stateful = rnn_shakespeare_char.get_config('tiny')
  assert state_lib.carry_rows(stateful) == stateful.train.batch_size
  stateful.train.stateful = False
  assert state_lib.carry_rows(stateful) == 0
  assert state_lib.carry_rows(shakespeare_char.get_config('tiny')) == 0


def _param_shapes(model, seq_len=8):
  params = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, seq_len), jnp.int32)))['params']
  return jax.tree.map(lambda x: x.unbox().shape if hasattr(x, 'unbox') else x.shape, params,
                      is_leaf=lambda x: hasattr(x, 'unbox'))


def test_a_language_model_predicts_every_token_of_its_vocabulary():
  config = shakespeare_char.get_config('tiny')
  model = state_lib.build_model(config, VOCAB)
  shapes = _param_shapes(model)
  assert shapes['token_embed']['embedding'] == (VOCAB, 64)
  assert 'classifier' not in shapes
  logits = jax.eval_shape(lambda: model.apply({'params': model.init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']}, jnp.zeros((3, 8), jnp.int32)))
  assert logits.shape == (3, 8, VOCAB)


@pytest.mark.parametrize('family', ['transformer', 'lstm'])
def test_a_classifier_has_one_output_per_class(family):
  config = authorship.get_config('tiny' if family == 'transformer' else 'lstm')
  model = state_lib.build_model(config, VOCAB)
  shapes = _param_shapes(model)
  assert shapes['classifier']['kernel'][1] == 2 and shapes['classifier']['bias'] == (2,)
  ids = jnp.zeros((3, 8), jnp.int32)
  logits = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.key(0), ids), ids, mask_BxT=jnp.ones((3, 8), bool)))
  assert logits.shape == (3, 2)  # shakespeare, milton


def test_an_encoder_has_one_more_id_for_the_mask_token():
  config = shakespeare_char.get_config('mlm')
  assert state_lib.is_encoder(config)
  tokenizer = tokenizers.CharTokenizer(list('abcdefghij'))  # 11 ids with EOS
  model = state_lib.build_model(config, tokenizer.vocab_size)
  assert _param_shapes(model)['token_embed']['embedding'] == (12, 128)
  masking = state_lib.masking(config, tokenizer)
  assert masking.mask_id == tokenizer.vocab_size == 11
  assert masking.vocab_size == 11 and masking.rate == config.train.mask_rate
  assert state_lib.masking(shakespeare_char.get_config('tiny'), tokenizer) is None


def test_an_encoder_classifier_keeps_the_mask_token_but_masks_nothing():
  """Fine-tuned from a masked LM, it keeps the base's embedding rows."""
  config = authorship.get_config('tiny')
  config.model.causal = False
  tokenizer = tokenizers.CharTokenizer(list('abcdefghij'))
  shapes = _param_shapes(state_lib.build_model(config, tokenizer.vocab_size))
  assert shapes['token_embed']['embedding'][0] == 12 and shapes['classifier']['bias'] == (2,)
  assert state_lib.masking(config, tokenizer) is None
