"""experiments/tot.py end to end: a tiny model trained on Countdown, every strategy run."""
import json
import os

import jax
import pytest

from configs import countdown
from lmjax import train
from tests import script_cases, xla


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('countdown'))
  config = countdown.get_config('tiny')
  # Trained on the validation split's 2,190 puzzles (80k characters, more than the 60
  # steps' 61k tokens), read in a fraction of a second where the train split's 120,833
  # take about 15 s of CPU; its characters, and so the vocabulary, are the train split's.
  # Evaluated on the test split. No end-of-run sample: its decoder would compile here for
  # nothing that tot.py uses.
  config.data.update(train_split='validation', eval_split='test')
  config.train.sample_tokens = 0
  # One device: the search runs on one, and one compiles fastest.
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


BAD_FLAGS = {
    'strategy': (['--strategies=greedy,magic'], "unknown ['magic']"),
    'scorer': (['--strategies=bfs_scorer'], '--scorer_workdir'),
    'task_file': (['--task_file=/nonexistent/puzzles.txt'], 'cannot read'),
    'task_line': (['--task_file={bad_task}'], 'make 24 from 1 2 3 4'),
    # Found once the model is read (the checks before that: tests/test_bad_inputs.py).
    'scorer_workdir': (['--task_file={task}', '--strategies=bfs_scorer',
                        '--scorer_workdir={tmp}/nothing'], '--scorer_workdir='),
    # A puzzle of 63 tokens with its end-of-text id: the first thought has room for one
    # token, the second for none.
    'context': (['--task_file={long_task}', '--strategies=bfs_model', '--breadth=1',
                 '--proposals=1', '--max_depth=2'], 'fills the context (max_len=64)'),
}


@pytest.fixture(scope='module')
def runs(workdir, tmp_path_factory):
  """experiments/tot.py with every strategy on two puzzles, and each case of BAD_FLAGS."""
  tmp = tmp_path_factory.mktemp('tot')
  task, bad_task, out = tmp / 'puzzles.txt', tmp / 'bad.txt', tmp / 'tot.json'
  task.write_text('4 7 8 9 -> 34\n\n1 2 3 4 -> 24\n')  # one batch of 2; a blank line
  bad_task.write_text('4 7 8 9 -> 34\nmake 24 from 1 2 3 4\n')
  long_task = tmp / 'long.txt'
  long_task.write_text(' '.join(['1'] * 28) + ' -> 34\n')
  every = [f'--workdir={workdir}', f'--task_file={task}', '--strategies=' + ','.join([
      'greedy', 'sample', 'beam', 'beam_verified', 'sample_verified', 'bfs_model',
      'bfs_checker', 'bfs_lookahead', 'dfs_checker', 'dfs_lookahead', 'bfs_scorer']),
           f'--scorer_workdir={workdir}', '--proposal=beam', '--beam_size=2', '--samples=3',
           '--breadth=2', '--proposals=2', '--max_expansions=4', '--batch=2', f'--output={out}']
  cases = {'every': ('tot.py', every)}
  for key, (flags, _) in BAD_FLAGS.items():
    flags = [flag.format(bad_task=bad_task, task=task, long_task=long_task, tmp=tmp)
             for flag in flags]
    cases[key] = ('tot.py', [f'--workdir={workdir}', *flags])
  results = script_cases.run(cases, env=dict(os.environ, XLA_FLAGS=xla.flags(),
                                             JAX_PLATFORMS='cpu'))
  return results, json.loads(out.read_text()) if out.exists() else None


def test_every_strategy_runs_and_reports(runs):
  results, report = runs
  done = results['every']
  assert done.returncode == 0, done.stderr
  rows = {r['strategy']: r for r in report['results']}
  assert len(rows) == 11
  for name, row in rows.items():
    assert row['puzzles'] == 2, name
    assert 0 <= row['solved'] <= 2
    assert row['tokens_per_puzzle'] > 0, name
  # Greedy writes one answer; beams, samples and trees write several.
  assert rows['beam']['tokens_per_puzzle'] > rows['greedy']['tokens_per_puzzle']
  assert rows['sample_verified']['tokens_per_puzzle'] > rows['sample']['tokens_per_puzzle']
  assert rows['beam_verified']['solved'] >= rows['beam']['solved']
  assert '| bfs_lookahead |' in done.stdout


@pytest.mark.parametrize('key', BAD_FLAGS)
def test_bad_flags_and_task_lines_are_named(runs, key):
  bad, message = runs[0][key], BAD_FLAGS[key][1]
  assert message in script_cases.error_line(bad)
