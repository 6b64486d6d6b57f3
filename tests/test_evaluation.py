"""Evaluating checkpoints of real tiny runs: the numbers training logged, on any number of
devices, bits per byte of the split's text, and the script's JSON."""
import json
import math
import os

import jax
import pytest

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import evaluation, train, workdir as workdir_lib
from lmjax.data import corpora
from lmjax.errors import UserError
from tests import script_cases, xla

KEYS = {'loss', 'perplexity', 'accuracy', 'bits_per_token', 'bits_per_byte', 'num_tokens',
        'num_bytes', 'dataset', 'workdir', 'step', 'split', 'tokenizer', 'num_params'}


def _train(workdir, family, devices=None, **train_overrides):
  config = family.get_config('tiny')
  config.unlock()
  # Training evaluates on the whole split, as evaluate_workdir does.
  config.train.update(sample_tokens=0, eval_batches=0, **train_overrides)
  config.opt.warmup_steps = 1
  config.lock()
  train.train_and_evaluate(config, workdir, devices)
  with open(os.path.join(workdir, workdir_lib.RESULT_FILE)) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny character Transformer, 4 steps on one device, checkpointed at 2 and 4,
  evaluated at 4; and its evaluation of the validation split on all 8 devices."""
  workdir = str(tmp_path_factory.mktemp('tiny'))
  result = _train(workdir, shakespeare_char, num_steps=4, eval_every=4, checkpoint_every=2,
                  log_every=2)
  return workdir, result, evaluation.evaluate_workdir(workdir)


def _assert_same_metrics(got, expected, keys=('loss', 'perplexity', 'accuracy')):
  for key in keys:
    assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def test_latest_checkpoint_gives_what_training_logged(trained):
  workdir, result, evaluated = trained
  assert KEYS | {'bits_per_char'} == set(evaluated)
  assert (evaluated['step'], evaluated['split'], evaluated['tokenizer']) == (
      4, 'validation', 'char')
  assert evaluated['workdir'] == os.path.abspath(workdir)
  assert evaluated['num_params'] == result['num_params']
  _assert_same_metrics(evaluated, result['eval'], ('loss', 'perplexity', 'accuracy',
                                                   'bits_per_char'))
  assert evaluated['bits_per_token'] == evaluated['bits_per_char']


def test_one_device_gives_the_numbers_of_eight(trained):
  workdir, _, on_eight = trained
  on_one = evaluation.evaluate_workdir(workdir, devices=jax.devices()[:1])
  _assert_same_metrics(on_one, on_eight, ('loss', 'perplexity', 'accuracy', 'bits_per_byte'))
  assert (on_one['num_tokens'], on_one['num_bytes']) == (on_eight['num_tokens'],
                                                         on_eight['num_bytes'])


def test_bits_per_byte_divide_the_loss_by_the_texts_bytes(trained):
  _, _, evaluated = trained
  works = corpora.load_split_texts('shakespeare', 'validation')
  # Every token after the first is scored once: each work's characters, then a separator
  # (0 bytes) after it.
  num_chars = sum(len(text) for _, text in works)
  num_bytes = sum(len(text.encode('utf-8')) for _, text in works)
  num_bytes -= len(works[0][1][0].encode('utf-8'))
  assert evaluated['num_tokens'] == num_chars + len(works) - 1
  assert evaluated['num_bytes'] == num_bytes
  loss_bits = evaluated['loss'] * evaluated['num_tokens'] / math.log(2)
  assert evaluated['bits_per_byte'] == pytest.approx(loss_bits / num_bytes, rel=1e-12)
  # More tokens than bytes (the separators), so fewer bits per token than per byte.
  assert evaluated['bits_per_token'] < evaluated['bits_per_byte']


def test_step_picks_an_earlier_checkpoint(trained):
  workdir, _, latest = trained
  earlier = evaluation.evaluate_workdir(workdir, step=2)
  assert earlier['step'] == 2
  assert earlier['loss'] > latest['loss'] + 0.01  # two more steps of a fresh model
  with pytest.raises(UserError, match=r'no checkpoint of step 3 .* steps 2, 4'):
    evaluation.evaluate_workdir(workdir, step=3)


def test_other_batch_sizes_score_the_same_windows(trained):
  workdir, _, evaluated = trained
  # The run's 64 rows do not split over 3 devices: 66 do, two more rows of padding.
  _assert_same_metrics(evaluation.evaluate_workdir(workdir, devices=jax.devices()[:3]),
                       evaluated)
  with pytest.raises(UserError, match=r'--batch_size=12 does not divide over the 8 devices'):
    evaluation.evaluate_workdir(workdir, batch_size=12)
  with pytest.raises(UserError, match=r"--split='dev'.*train, validation, test"):
    evaluation.evaluate_workdir(workdir, split='dev')


def test_script_prints_one_json_object_and_names_a_bad_flag(trained):
  workdir, _, _ = trained
  # One device, as a plain process has.
  runs = script_cases.run({'good': ('evaluate.py', [f'--workdir={workdir}', '--split=test']),
                           'bad': ('evaluate.py', [f'--workdir={workdir}', '--split=tset'])},
                          env=dict(os.environ, XLA_FLAGS=xla.flags()))
  good, bad = runs['good'], runs['bad']
  assert good.returncode == 0, good.stderr
  printed = json.loads(good.stdout)  # the whole of stdout: one object and nothing else
  assert KEYS | {'bits_per_char'} == set(printed)
  assert (printed['split'], printed['step']) == ('test', 4)
  works = corpora.load_split_texts('shakespeare', 'test')
  assert printed['num_tokens'] == sum(len(text) for _, text in works) + len(works) - 1
  assert printed['num_bytes'] == (sum(len(text.encode('utf-8')) for _, text in works) -
                                 len(works[0][1][0].encode('utf-8')))  # the unscored first
  assert printed['bits_per_byte'] == pytest.approx(
      printed['loss'] * printed['num_tokens'] / math.log(2) / printed['num_bytes'])
  assert bad.stdout == '' and '--split' in script_cases.error_line(bad)


def test_stateful_lstm_carries_along_the_split_as_training_did(tmp_path):
  """The carry passes from batch to batch, split over the devices as the rows are.
  Trained on one device (it compiles sooner), evaluated on 8 and on 1."""
  workdir = str(tmp_path)
  # 64 streams rather than the recipe's 8: a shorter walk through the split.
  result = _train(workdir, rnn_shakespeare_char, jax.devices()[:1], num_steps=2, eval_every=2,
                  checkpoint_every=2, log_every=2, eval_batch_size=64)
  on_eight = evaluation.evaluate_workdir(workdir)
  _assert_same_metrics(on_eight, result['eval'], ('loss', 'accuracy', 'bits_per_char'))
  on_one = evaluation.evaluate_workdir(workdir, devices=jax.devices()[:1])
  _assert_same_metrics(on_one, on_eight, ('loss', 'accuracy', 'bits_per_byte'))
  # The rows are streams with their own carries: another count reads other contexts.
  with pytest.raises(UserError, match=r'stateful .*--devices'):
    evaluation.evaluate_workdir(workdir, devices=jax.devices()[:3])
