"""Recurrent LMs through the same training loop, checkpoints and decoder as the Transformer:
stateful truncated BPTT on the real Shakespeare corpus, with a tiny LSTM."""
import functools
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import generation, models, sharding, state as state_lib, steps, train
from lmjax import workdir as workdir_lib
from lmjax.data import pipeline, tokenizers
from lmjax.errors import UserError
from lmjax.models import rnn
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(variant='tiny', **train_overrides):
  config = rnn_shakespeare_char.get_config(variant)
  if variant != 'tiny':  # the tiny shapes on another cell
    tiny = rnn_shakespeare_char.get_config('tiny')
    config.unlock()
    config.model.update({k: v for k, v in tiny.model.items() if k != 'name'})
    config.opt.update(tiny.opt)
    config.train.update(tiny.train)
  config.unlock()
  config.train.update(train_overrides)
  config.lock()
  return config


def _restore(workdir, step):
  """(params, carry) of a stateful checkpoint, on the host."""
  _, _, state, _ = workdir_lib.restore_state(workdir, step)
  return jax.device_get(state.params), jax.device_get(state.carry)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny stateful LSTM: 60 steps on one device, checkpoints every 20."""
  workdir = str(tmp_path_factory.mktemp('lstm'))
  config = tiny_config(checkpoint_every=20, keep_checkpoints=5)
  metrics = train.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_stateful_lstm_learns_below_the_unigram_entropy(trained):
  config, workdir, metrics = trained
  tokenizer = tokenizers.load_tokenizer(workdir)
  tokens = pipeline.load_tokens(config.data, 'validation', tokenizer)
  freq = np.bincount(tokens, minlength=tokenizer.vocab_size) / len(tokens)
  unigram_entropy = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))
  assert metrics['loss'] < unigram_entropy - 0.3, (metrics, unigram_entropy)
  assert 'bits_per_char' in metrics


def test_carry_lowers_the_loss_on_contiguous_text(trained):
  """The same parameters score the validation split better when each window starts from
  the carry of the one before than when every window starts from zero."""
  config, workdir, metrics = trained
  tokenizer = tokenizers.load_tokenizer(workdir)
  params, _ = _restore(workdir, 60)
  model = models.build_model(config.model, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  t = config.train
  tokens = pipeline.load_tokens(config.data, 'validation', tokenizer)
  batch_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    stream = pipeline.stream_eval_set(tokens, seq_len=t.seq_len, batch_size=t.eval_batch_size,
                                      eos_id=tokenizer.eos_id)
    carried = steps.evaluate(jax.jit(functools.partial(steps.stateful_eval_step, model=model)),
                             params, stream, batch_sharding, True,
                             state_lib.eval_carry(model, mesh, t.eval_batch_size))
    windows = pipeline.eval_set(tokens, seq_len=t.seq_len, batch_size=t.eval_batch_size)
    reset = steps.evaluate(jax.jit(lambda p, b: steps.eval_step(p, b, model=model)), params,
                           windows, batch_sharding, True)
  assert carried['loss'] == pytest.approx(metrics['loss'], abs=1e-4)  # what training reported
  assert carried['loss'] < reset['loss'] - 0.02, (carried, reset)


def test_stateful_resume_is_exact_params_and_carry(trained, tmp_path, capsys):
  config, workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  for step in ('40', '60'):  # as if the run had died after step 20's checkpoint
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  train.train_and_evaluate(config, resumed)
  assert 'Resuming from step 20' in capsys.readouterr().out
  (params_a, carry_a), (params_b, carry_b) = _restore(workdir, 60), _restore(resumed, 60)
  for a, b in zip(jax.tree.leaves((params_a, carry_a)), jax.tree.leaves((params_b, carry_b)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.abs(carry_a['layer_0']['h']).max() > 0.1  # a real carry was saved


def test_independent_windows_mode_trains_without_a_carry(tmp_path):
  # No end-of-run sample: its decoder would compile and prove nothing here.
  config = tiny_config('rnn', num_steps=4, eval_every=4, checkpoint_every=4, stateful=False,
                       sample_tokens=0)
  config.opt.warmup_steps = 1
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics['loss'])
  _, _, state, _ = workdir_lib.restore_state(str(tmp_path), 4)
  assert 'recurrent_kernel' in state.params['layer_0']
  # No carry passes from batch to batch: the saved state holds none ...
  assert state.carry is None
  # ... and the evaluation started every validation window from a zero carry: the loss
  # the run reported is that of the windows scored each on its own, not that of the split
  # read as contiguous streams with the carry passed along.
  tokenizer = tokenizers.load_tokenizer(str(tmp_path))
  model = models.build_model(config.model, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  t = config.train
  tokens = pipeline.load_tokens(config.data, 'validation', tokenizer)
  with jax.set_mesh(mesh):
    windows = pipeline.eval_set(tokens, seq_len=t.seq_len, batch_size=t.eval_batch_size)
    alone = steps.evaluate(jax.jit(lambda p, b: steps.eval_step(p, b, model=model)),
                           jax.device_get(state.params), windows,
                           sharding.batch_sharding(mesh), True)
  assert metrics['loss'] == pytest.approx(alone['loss'], abs=1e-5), (metrics, alone)


def _decode(*flags):
  env = dict(os.environ, XLA_FLAGS=xla.flags())
  return subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'decode.py'), *flags],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_decode_script_beam_searches_an_lstm_checkpoint_past_its_training_window(trained):
  _, workdir, _ = trained
  # No context bound: a recurrent model decodes past its training window (seq_len 32).
  done = _decode(f'--workdir={workdir}', '--prompt=ROMEO:', '--max_new_tokens=60',
                 '--strategy=beam', '--beam_size=3', '--num_samples=2')
  assert done.returncode == 0, done.stderr
  assert 'step 60' in done.stdout and done.stdout.count('ROMEO:') == 2
  # Each beam holds the 60 characters asked for, nearly twice the window: none ended early.
  ends = re.findall(r'^-- (\w+), score \S+, (\d+) tokens --$', done.stdout, re.MULTILINE)
  assert ends == [('length', '60')] * 2, done.stdout


def test_stateful_needs_a_recurrent_model(tmp_path):
  config = shakespeare_char.get_config('tiny')
  config.unlock()
  config.train.stateful = True
  with pytest.raises(UserError, match="train.stateful=True .* model.name='transformer'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_stream_too_short_for_the_batch_is_named(tmp_path):
  config = tiny_config()
  config.train.batch_size = 1 << 18
  config.train.eval_batch_size = 8
  with pytest.raises(UserError, match='train.batch_size=262144 contiguous streams'):
    train.train_and_evaluate(config, str(tmp_path))


def test_greedy_decoding_of_the_checkpoint_equals_stepping_the_lstm_by_hand(trained):
  _, workdir, _ = trained
  config, tokenizer, params, _ = workdir_lib.load_trained(workdir)
  prompt = 'ROMEO:\n'
  result, = generation.generate_texts(config, params, tokenizer, [prompt], max_new_tokens=40,
                                 strategy='greedy')
  model = models.build_model(config.model, tokenizer.vocab_size)
  logits, carry = model.apply({'params': params}, jax.numpy.asarray([tokenizer.encode(prompt)]),
                              rnn.model_initial_carry(model, 1))
  tokens = []
  for _ in range(40):  # no EOS in 40 greedy characters of this model (checked below)
    token = int(np.argmax(logits[0, -1]))
    tokens.append(token)
    logits, carry = model.apply({'params': params}, jax.numpy.asarray([[token]]), carry)
  assert tokenizer.eos_id not in tokens
  assert result[0]['tokens'] == tokens and result[0]['text'] == tokenizer.decode(tokens)
