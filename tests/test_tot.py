"""experiments/tot.py end to end: a tiny model trained on Countdown, every strategy run."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import countdown
from lmjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('countdown'))
  # One device: the search runs on one, and one compiles fastest.
  train.train_and_evaluate(countdown.get_config('tiny'), workdir, devices=jax.devices()[:1])
  return workdir


def _tot(*flags):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'tot.py'), *flags],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_every_strategy_runs_and_reports(workdir, tmp_path):
  task = tmp_path / 'puzzles.txt'
  task.write_text('4 7 8 9 -> 34\n\n1 2 3 4 -> 24\n')  # one batch of 2; a blank line
  out = tmp_path / 'tot.json'
  done = _tot(f'--workdir={workdir}', f'--task_file={task}', '--strategies=' + ','.join([
      'greedy', 'sample', 'beam', 'beam_verified', 'sample_verified', 'bfs_model',
      'bfs_checker', 'bfs_lookahead', 'dfs_checker', 'dfs_lookahead', 'bfs_scorer']),
              f'--scorer_workdir={workdir}', '--proposal=beam',
              '--beam_size=2', '--samples=3', '--breadth=2', '--proposals=2',
              '--max_expansions=4', '--batch=2', f'--output={out}')
  assert done.returncode == 0, done.stderr
  report = json.loads(out.read_text())
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


@pytest.mark.parametrize('flags, message', [
    (['--strategies=greedy,magic'], "unknown ['magic']"),
    (['--strategies=bfs_scorer'], '--scorer_workdir'),
    (['--task_file=/nonexistent/puzzles.txt'], 'cannot read'),
])
def test_bad_flags_are_named(workdir, flags, message):
  bad = _tot(f'--workdir={workdir}', *flags)
  assert bad.returncode != 0
  assert message in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr


def test_a_bad_task_line_is_named(workdir, tmp_path):
  task = tmp_path / 'puzzles.txt'
  task.write_text('4 7 8 9 -> 34\nmake 24 from 1 2 3 4\n')
  bad = _tot(f'--workdir={workdir}', f'--task_file={task}')
  assert bad.returncode != 0
  assert 'make 24 from 1 2 3 4' in bad.stderr and 'Traceback' not in bad.stderr
