"""Meshes: data parallel, FSDP, tensor parallel and their products train the same model as
one device does, with every array split as the rules say; gradient accumulation equals
the whole batch."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import config as config_lib, microbatch, optim, sharding, state as state_lib, steps
from lmjax.data import corpora, pipeline, tokenizers
from lmjax.errors import UserError

NUM_STEPS = 5


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
  """The char tokenizer and the training split's tokens."""
  works = corpora.load_split_texts('shakespeare', 'train')
  tokenizer = tokenizers.build_tokenizer('char', str(tmp_path_factory.mktemp('tok')),
                                         lambda: [text for _, text in works])
  config = shakespeare_char.get_config('tiny')
  return tokenizer, pipeline.load_tokens(config.data, 'train', tokenizer, works)


def _config(family, mesh_shape, **train_overrides):
  config = family.get_config('tiny')
  config.mesh.shape = mesh_shape
  config.train.update(train_overrides)
  config.opt.warmup_steps = 2
  return config


def _train(config, shakespeare, devices=None, compiled_texts=None):
  """NUM_STEPS steps of the real train step on the real data pipeline: (losses, state).
  The compiled step's HLO text is appended to `compiled_texts` if given."""
  tokenizer, tokens = shakespeare
  t = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.validate_config(config, mesh)
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, t.num_steps)
  state, shardings = state_lib.create_train_state(model, tx, mesh, rules, t.seed, t.seq_len,
                                              carry_rows=state_lib.carry_rows(config))
  step_fn, _ = steps.jit_steps(model, tx, mesh, rules, shardings,
                               microbatches=t.microbatches)
  if t.get('stateful', False):
    data = pipeline.stream_dataset(tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                   seed=t.seed, eos_id=tokenizer.eos_id, start_example=0)
  else:
    data = pipeline.train_dataset(tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                  seed=t.seed, start_example=0)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = [pipeline.to_global(batch, batch_sharding)
             for batch in itertools.islice(data.as_numpy_iterator(), NUM_STEPS)]
  # As the training loop does: compiled under the mesh and the logical axis rules.
  step_fn = steps.compile_train_step(step_fn, state, batches[0], jax.random.key(1), mesh,
                                     rules)
  if compiled_texts is not None:
    compiled_texts.append(step_fn.as_text())
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  return losses, state


def _specs(tree):
  return {jax.tree_util.keystr(path): x.sharding.spec
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def one_device(shakespeare):
  return {family: _train(_config(family, (1, 1, 1)), shakespeare, jax.devices()[:1])
          for family in (shakespeare_char, rnn_shakespeare_char)}


# Data parallelism alone is (8, 1, 1), FSDP with tensor parallelism (1, 4, 2), all three
# (2, 2, 2); FSDP alone and data with FSDP run in `make test-slow`.
@pytest.mark.parametrize('family, mesh_shape', [
    (shakespeare_char, (8, 1, 1)),
    pytest.param(shakespeare_char, (1, 8, 1), marks=pytest.mark.slow),
    pytest.param(shakespeare_char, (2, 4, 1), marks=pytest.mark.slow),
    (shakespeare_char, (2, 2, 2)), (shakespeare_char, (1, 4, 2)),
    (rnn_shakespeare_char, (1, 4, 2)), (rnn_shakespeare_char, (2, 2, 2))])
def test_every_mesh_trains_what_one_device_trains(family, mesh_shape, shakespeare, one_device):
  expected_losses, expected = one_device[family]
  losses, state = _train(_config(family, mesh_shape), shakespeare)
  np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get((state.params, state.carry))),
                  jax.tree.leaves(jax.device_get((expected.params, expected.carry))),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # The arrays really are split as the rules say, the optimizer's moments as their
  # parameters, and what a dimension's mesh axes cannot divide stays whole.
  params = _specs(state.params)
  adam, = [x for x in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]
  assert _specs(adam.mu) == params and _specs(adam.nu) == params
  data, fsdp, tensor = mesh_shape
  # The 85-character vocabulary does not split over tensor devices.
  vocab = 'tensor' if tensor == 1 else None
  if family is shakespeare_char:  # 2 layers x 64 wide, 4 heads, MLP 256
    assert params["['token_embed']['embedding']"] == P(vocab, 'fsdp')
    assert params["['position_embed']"] == P(None, 'fsdp')
    assert params["['layer_1']['attention']['query']['kernel']"] == P('fsdp', 'tensor', None)
    assert params["['layer_1']['attention']['out']['kernel']"] == P('tensor', None, 'fsdp')
    assert params["['layer_0']['mlp']['dense_in']['kernel']"] == P('fsdp', 'tensor')
    assert params["['layer_0']['mlp']['dense_out']['bias']"] == P('fsdp')
    kernel = state.params['layer_1']['attention']['query']['kernel']
    assert kernel.addressable_shards[0].data.shape == (64 // fsdp, 4 // tensor, 16)
  else:  # an LSTM of 1 layer, embedding 32, 64 units
    assert params["['layer_0']['recurrent_kernel']"] == P('fsdp', None, 'tensor')
    assert params["['layer_0']['input_kernel']"] == P('fsdp', None, 'tensor')
    assert state.carry['layer_0']['h'].sharding.spec == P(('data', 'fsdp'))
  assert state.step.sharding.is_fully_replicated


@pytest.mark.parametrize('family', [shakespeare_char, rnn_shakespeare_char])
def test_gradient_accumulation_equals_the_whole_batch(family, shakespeare, one_device):
  """Four slices of the batch, on two data-parallel by two FSDP devices; the LSTM's carry
  rows follow their slices."""
  expected_losses, expected = one_device[family]
  losses, state = _train(_config(family, (2, 2, 1), microbatches=4), shakespeare,
                         jax.devices()[:4])
  np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get((state.params, state.carry))),
                  jax.tree.leaves(jax.device_get((expected.params, expected.carry))),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)


def _loop_all_reduces(compiled_text: str) -> int:
  """All-reduces of a compiled step that sit anywhere but its ENTRY computation (in the
  microbatch loop, that is)."""
  count, entry = 0, False
  for line in compiled_text.splitlines():
    if line and not line[0].isspace():
      entry = line.startswith('ENTRY')
    count += (not entry) and ' all-reduce(' in line
  return count


@pytest.mark.parametrize('family', [shakespeare_char, rnn_shakespeare_char])
def test_one_all_reduce_a_step_trains_what_one_a_slice_trains(family, shakespeare,
                                                              monkeypatch):
  """On a data-parallel mesh each device sums its slices' gradients and the step
  all-reduces once. With dropout on, that trains what the all-reduce after every slice
  trains: each device draws its rows of the whole batch's masks."""
  config = _config(family, (8, 1, 1), microbatches=2)
  if 'stateful' in config.train:
    config.train.stateful = False  # a carry from step to step stays with GSPMD
  config.model.dropout = 0.3
  texts = []
  summed, summed_state = _train(config, shakespeare, compiled_texts=texts)
  monkeypatch.setattr(microbatch, 'reduces_once', lambda carry: False)
  per_slice, per_slice_state = _train(config, shakespeare, compiled_texts=texts)
  assert _loop_all_reduces(texts[0]) == 0
  assert _loop_all_reduces(texts[1]) > 0
  # Equal losses with dropout at 0.3 mean equal masks: were `rows_of_batch` left out,
  # every device would draw the first rows' masks, and the losses differ from step 1.
  np.testing.assert_allclose(summed, per_slice, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(summed_state.params)),
                  jax.tree.leaves(jax.device_get(per_slice_state.params)), strict=True):
    # Adam turns the rounding of a gradient near 0 into an update of about lr.
    np.testing.assert_allclose(a, b, atol=2e-5)


def _mesh_config(**fields):
  mesh = config_lib.base_config().mesh
  mesh.update(fields)
  return mesh


def test_bad_mesh_and_microbatch_settings_are_named():
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  config = _config(shakespeare_char, (-1, 1, 1), microbatches=3)
  with pytest.raises(UserError, match=r'train.microbatches=3: the batch of 16 must split'):
    config_lib.validate_config(config, mesh)
  for shape, message in [((3, -1, 1), r'8 devices do not divide by 3'),
                         ((2, 2, 1), r'needs 4 devices but 8 are available'),
                         ((-1, -1, 1), r'at most one may be -1')]:
    with pytest.raises(UserError, match=message):
      sharding.make_mesh(_mesh_config(shape=shape))
  with pytest.raises(UserError, match=r'mesh.dcn_shape=\(2, 1, 1\) asks for 2 processes'):
    sharding.make_mesh(_mesh_config(dcn_shape=(2, 1, 1)))
  with pytest.raises(UserError, match=r"mesh.shape=\('a', 'b', 'c'\): give 3 whole numbers"):
    sharding.make_mesh(_mesh_config(shape=('a', 'b', 'c')))


def test_a_step_that_cannot_fit_is_refused_before_it_runs():
  """XLA's memory analysis of the compiled step, against the device's memory (on CPU, the
  host's shared by its 8 devices): a batch of 2**22 windows needs gigabytes per device."""
  config = _config(shakespeare_char, (-1, 1, 1))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, 85)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  state, shardings = state_lib.create_train_state(model, tx, mesh, rules, 0, 32)
  step_fn, _ = steps.jit_steps(model, tx, mesh, rules, shardings)
  window = jax.ShapeDtypeStruct((2**22, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
  with pytest.raises(UserError, match=r'this config does not fit: the train step needs '
                     r'[\d,.]+ MiB on each cpu device and one has [\d,.]+ MiB\. Lower '
                     r'train.batch_size'):
    steps.compile_train_step(step_fn, state, {'inputs': window, 'targets': window},
                             jax.random.key(0), mesh, rules)


def test_scanned_layers_train_on_a_three_axis_mesh_as_on_one_device(shakespeare):
  """model.scan_layers: the stacked parameters split along each layer's axes, the 'layers'
  axis whole; the scan over the blocks differentiates right on (2, 2, 2), where XLA got a
  scan with split weights wrong (see lmjax/models/rnn.py)."""
  results = {}
  for mesh_shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
    config = _config(shakespeare_char, mesh_shape)
    config.model.scan_layers = True
    results[mesh_shape] = _train(config, shakespeare, devices)
  (expected_losses, expected), (losses, state) = results[(1, 1, 1)], results[(2, 2, 2)]
  np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(expected.params)), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)
  params = _specs(state.params)
  assert params["['layers']['attention']['query']['kernel']"] == P(None, 'fsdp', 'tensor', None)
  assert params["['layers']['mlp']['dense_out']['kernel']"] == P(None, 'tensor', 'fsdp')
