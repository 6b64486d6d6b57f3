"""Training end to end on the real Shakespeare corpus, with tiny models."""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import train, workdir as workdir_lib
from lmjax.events import read_scalars
from lmjax.data import pipeline, tokenizers
from lmjax.errors import UserError
from tests import script_cases, xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
  config = shakespeare_char.get_config('tiny')
  config.unlock()
  config.train.update(train_overrides)
  config.lock()
  return config


def _restore_params(workdir, step):
  _, _, params, _ = workdir_lib.load_trained(workdir, step)
  return jax.device_get(params)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One tiny run of 80 steps on all 8 devices, checkpoints every 20 steps, evaluations
  at 40 and 80, a profiler trace of steps 3 and 4, and 8 steps a dispatch where nothing
  cuts it short (steps 1-4 and 37-40 run one by one: the trace starts at 3 and ends at 4,
  a checkpoint is due at 40)."""
  workdir = str(tmp_path_factory.mktemp('tiny'))
  config = tiny_config(checkpoint_every=20, eval_every=40, keep_checkpoints=5,
                       profile_steps=(3, 4), steps_per_dispatch=8)
  config.mesh.cpu_devices = 0  # all of the process's devices, where the recipe takes one
  metrics = train.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_loss_falls_well_below_the_unigram_entropy(trained):
  config, workdir, metrics = trained
  tokenizer = tokenizers.load_tokenizer(workdir)
  tokens = pipeline.load_tokens(config.data, 'validation', tokenizer)
  freq = np.bincount(tokens, minlength=tokenizer.vocab_size) / len(tokens)
  unigram_entropy = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))
  assert metrics['loss'] < unigram_entropy - 0.5, (metrics, unigram_entropy)
  assert metrics['bits_per_char'] == pytest.approx(metrics['loss'] / math.log(2))
  assert metrics['perplexity'] == pytest.approx(math.exp(metrics['loss']))


def test_workdir_holds_config_tokenizer_checkpoints_and_events(trained):
  config, workdir, _ = trained
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == json.loads(config.to_json())
  assert os.path.exists(os.path.join(workdir, 'tokenizer.json'))
  assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == 80
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, events[0]))
  acc.Reload()
  tags = set(acc.Tags()['scalars']) | set(acc.Tags()['tensors'])
  for tag in ('train/loss', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_sec',
              'train/mfu',
              'eval/loss', 'eval/perplexity', 'eval/accuracy', 'eval/bits_per_char'):
    assert tag in tags, (tag, tags)


def test_run_logs_samples_config_profile_and_a_result_file(trained):
  config, workdir, metrics = trained
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  texts = {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
           for tag in ('sample', 'config')}
  # A sample of the decoder at each evaluation, each a continuation of the prompt.
  assert sorted(texts['sample']) == [40, 80]
  assert all(t.startswith(config.train.sample_prompt) and len(t) > len('ROMEO:\n') + 5
             for t in texts['sample'].values())
  assert texts['sample'][40] != texts['sample'][80]  # same seed, a model that learned
  assert json.loads(texts['config'][0]) == json.loads(config.to_json())
  # The profiler trace of steps 3-4, where TensorBoard's profile tab looks for it.
  traces = [f for _, _, files in os.walk(os.path.join(workdir, 'plugins', 'profile'))
            for f in files if f.endswith('.xplane.pb')]
  assert len(traces) == 1
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  eval_loss = read_scalars(workdir, ['eval/loss'])['eval/loss']
  assert result['step'] == 80 and result['eval'] == metrics
  assert result['best_eval_loss'] == min(eval_loss.values())
  assert result['best_eval_step'] == min(eval_loss, key=eval_loss.get)
  assert result['num_params'] > 0 and result['train_seconds'] > 0


def test_resumed_run_ends_with_the_same_parameters(trained, tmp_path, capsys):
  config, workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  # As if the run had died after writing the checkpoint of step 40.
  for step in ('60', '80'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  train.train_and_evaluate(config, resumed)
  assert 'Resuming from step 40' in capsys.readouterr().out
  expected, got = _restore_params(workdir, 80), _restore_params(resumed, 80)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)


# Slow (two runs), and its parts are in `make test`: a stateful LSTM's train step on meshes
# against one device (tests/test_sharding.py), its evaluation on 8 devices against 1
# (tests/test_evaluation.py), the whole loop with its carry on 2 devices (tests/test_golden.py).
@pytest.mark.slow
def test_eight_device_stateful_lstm_matches_one_device(tmp_path):
  """The whole loop, stateful evaluation included, with the carry split over the devices.
  (The Transformer's: tests/test_multihost.py.)"""
  # Few steps: Adam amplifies reduction-order rounding as training goes on.
  config = rnn_shakespeare_char.get_config('tiny')
  config.train.update(num_steps=6, eval_every=6, checkpoint_every=6, sample_tokens=0)
  config.opt.warmup_steps = 2
  results = {}
  for count in (8, 1):
    workdir = str(tmp_path / str(count))
    metrics = train.train_and_evaluate(config, workdir, devices=jax.devices()[:count])
    _, _, state, _ = workdir_lib.restore_state(workdir, 6)
    results[count] = metrics, jax.device_get((state.params, state.carry))
  (metrics_8, state_8), (metrics_1, state_1) = results[8], results[1]
  assert metrics_8['loss'] == pytest.approx(metrics_1['loss'], abs=1e-5)
  for a, b in zip(jax.tree.leaves(state_8), jax.tree.leaves(state_1), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rerunning_a_finished_run_resumes_and_does_not_retrain(trained, capsys):
  config, workdir, metrics = trained
  again = train.train_and_evaluate(config, workdir)
  assert 'Resuming from step 80 of 80' in capsys.readouterr().out
  assert again['loss'] == pytest.approx(metrics['loss'], abs=1e-6)


@pytest.mark.parametrize('overrides, message', [
    (dict(model=dict(d_model=30, num_heads=4)), 'model.d_model=30 does not divide'),
    (dict(train=dict(seq_len=64)), 'train.seq_len=64 is longer than the position table'),
    (dict(train=dict(batch_size=12), mesh=dict(cpu_devices=8)),
     'train.batch_size=12 does not divide by the 8'),
    (dict(data=dict(tokenizer='bytes')), 'data.tokenizer'),
    (dict(model=dict(name='mamba')), "model.name='mamba'; known models: transformer"),
    (dict(data=dict(name='wikitext')), "data.name='wikitext'; known datasets: shakespeare"),
    (dict(train=dict(nonfinite='ignore')), "train.nonfinite='ignore'; use one of stop, skip"),
    (dict(train=dict(profile_steps=(5, 90))), r'train.profile_steps=\(5, 90\); give the first'),
    (dict(model=dict(num_heads=0)), r'model.num_heads=0; it must be at least 1'),
    (dict(model=dict(dtype='float16')), r"model.dtype='float16'; use one of float32, bfloat16"),
    (dict(train=dict(keep_checkpoints=0)), r'train.keep_checkpoints=0; keep at least 1'),
])
def test_bad_config_is_named_before_anything_runs(overrides, message, tmp_path):
  config = shakespeare_char.get_config('tiny')
  for section, fields in overrides.items():
    config[section].update(fields)
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


# Every option's check is in tests/test_decode.py; here, that the script reports each
# without a traceback, once the checkpoint is read. (Mistakes found before that are in
# tests/test_bad_inputs.py.)
BAD_DECODE_FLAGS = {
    'temperature': (['--strategy=sample', '--temperature=0'], 'temperature'),
    'no_new_tokens': (['--max_new_tokens=0'], 'max_new_tokens=0'),
    'unknown_char': (['--prompt=ROMEO: \u00e9t\u00e9', '--max_new_tokens=5'], "'\u00e9'"),
    'unknown_stop_char': (['--stop=\u00e9', '--max_new_tokens=5'], "'\u00e9'"),
    'empty_stop': (['--stop=', '--max_new_tokens=5'], 'a stop string is empty'),
    'top_k': (['--top_k=-1'], 'top_k=-1'),
    'top_p': (['--top_p=1.5'], 'top_p=1.5'),
    'repetition_penalty': (['--repetition_penalty=0'], 'repetition_penalty=0.0'),
    'num_samples': (['--num_samples=0'], 'num_samples=0'),
    'beam_size': (['--strategy=beam', '--beam_size=0'], 'beam_size=0'),
    'beams_returned': (['--strategy=beam', '--beam_size=2', '--num_samples=3'],
                       'num_samples=3 beams asked for but beam_size=2'),
    'length_penalty': (['--strategy=beam', '--length_penalty=-1'], 'length_penalty=-1.0'),
    'output': (['--output={unwritable}'], 'cannot be written'),
}


@pytest.fixture(scope='module')
def decoded(trained, tmp_path_factory):
  """experiments/decode.py on the trained run: a greedy continuation, a beam search over a
  prompt file written as JSON lines, and every case of BAD_DECODE_FLAGS; and
  experiments/tot.py on it ('tot')."""
  _, workdir, _ = trained
  prompts = tmp_path_factory.mktemp('prompts')
  prompt_file = prompts / 'prompts.txt'
  prompt_file.write_text('KING:\\nWhat\nFirst Citizen:\n\nHAMLET:\n', encoding='utf-8')
  cases = {
      'greedy': [f'--workdir={workdir}', '--prompt=ROMEO:', '--max_new_tokens=20',
                 '--strategy=greedy'],
      'beam': [f'--workdir={workdir}', f'--prompt_file={prompt_file}', '--prompt=To be',
               '--strategy=beam', '--beam_size=4', '--num_samples=2', '--max_new_tokens=12',
               '--stop=\n\n', '--batch_size=2', '--output=-'],
      **{key: [f'--workdir={workdir}', '--prompt=ROMEO:',
               *[flag.format(unwritable=prompts) for flag in flags]]
         for key, (flags, _) in BAD_DECODE_FLAGS.items()},
  }
  runs = {key: ('decode.py', flags) for key, flags in cases.items()}
  # Tree search on a model that never saw a puzzle: its vocabulary lacks '>'.
  task_file = prompts / 'puzzles.txt'
  task_file.write_text('4 7 8 9 -> 34\n')
  runs['tot'] = ('tot.py', [f'--workdir={workdir}', f'--task_file={task_file}'])
  return script_cases.run(runs, env=dict(os.environ, XLA_FLAGS=xla.flags()))


def test_decode_script_continues_the_prompt(decoded):
  done = decoded['greedy']
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines[0].startswith('# ') and 'step 80' in lines[0]
  assert lines[1].startswith('ROMEO:')
  assert lines[-1].startswith('-- ') and ' tokens --' in lines[-1]


def test_decode_script_beam_search_over_a_prompt_file_to_jsonl(decoded):
  done = decoded['beam']
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in done.stdout.splitlines()]
  prompts = ['To be', 'KING:\nWhat', 'First Citizen:', 'HAMLET:']
  assert [r['prompt'] for r in rows] == [p for p in prompts for _ in range(2)]
  for first, second in zip(rows[::2], rows[1::2], strict=True):
    assert (first['sample'], second['sample']) == (0, 1)
    assert first['score'] >= second['score']
  for r in rows:
    assert r['finish'] in ('eos', 'stop', 'length')
    assert '\n\n' not in r['text']
    assert len(r['tokens']) <= 12


@pytest.mark.parametrize('key', BAD_DECODE_FLAGS)
def test_decode_script_names_the_bad_flag(decoded, key):
  bad, message = decoded[key], BAD_DECODE_FLAGS[key][1]
  assert message in script_cases.error_line(bad)


def test_tree_search_names_the_symbols_a_model_never_saw(decoded):
  line = script_cases.error_line(decoded['tot'])
  assert 'a puzzle has symbols the model never saw' in line and "'>'" in line
