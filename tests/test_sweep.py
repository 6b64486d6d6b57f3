"""Sweeps: points from a config's get_sweep, run as real train.py processes, killed and
resumed, summarized from the event files into a table and a plot."""
import csv
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lmjax import checkpoint as ckpt_lib
from lmjax import events, sweep
from lmjax.errors import UserError
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
         '--config=configs/shakespeare_char.py:tiny']
# The sweep's processes (and so its trainers) on one CPU device: this is about the sweep,
# and one device compiles and steps fastest on 2 cores.
ONE_DEVICE = dict(os.environ, XLA_FLAGS=xla.flags())


def test_grid_is_every_combination_last_field_fastest():
  points = sweep.grid({'opt.lr': [1e-3, 3e-3], 'model.d_model': [32, 64, 128]})
  assert points == [{'opt.lr': lr, 'model.d_model': d} for lr in (1e-3, 3e-3)
                    for d in (32, 64, 128)]
  with pytest.raises(UserError, match='opt.lr needs a non-empty list'):
    sweep.grid({'opt.lr': 1e-3})


def test_random_search_is_seeded_and_stays_in_its_ranges():
  space = {'opt.lr': sweep.log_uniform(1e-4, 1e-1), 'model.dropout': sweep.uniform(0.0, 0.3),
           'model.num_layers': [2, 4, 6]}
  points = sweep.random_search(space, num_points=400, seed=3)
  assert points == sweep.random_search(space, num_points=400, seed=3)
  assert points != sweep.random_search(space, num_points=400, seed=4)
  lrs = np.array([p['opt.lr'] for p in points])
  assert lrs.min() >= 1e-4 * 0.995 and lrs.max() <= 1e-1 * 1.005
  # Log-uniform: each decade holds about a third of the draws.
  per_decade = np.histogram(np.log10(lrs), bins=[-4, -3, -2, -1])[0]
  assert per_decade.min() > 400 / 3 * 0.7, per_decade
  assert all(0.0 <= p['model.dropout'] <= 0.3 for p in points)
  assert {p['model.num_layers'] for p in points} == {2, 4, 6}


def test_point_names_use_the_fields_that_vary():
  points = sweep.grid({'opt.lr': [1e-3, 3e-4], 'model.d_model': [64], 'train.seed': [0, 1]})
  assert sweep.point_names(points) == ['lr=0.001,seed=0', 'lr=0.001,seed=1',
                                       'lr=0.0003,seed=0', 'lr=0.0003,seed=1']
  # Two fields that end alike keep their whole names; odd characters become '_'.
  assert sweep.point_names([{'opt.lr': 1, 'x.lr': 'a b'}, {'opt.lr': 2, 'x.lr': 'c/d'}]) == [
      'opt.lr=1,x.lr=a_b', 'opt.lr=2,x.lr=c_d']


def test_train_commands_give_each_point_its_config():
  """The flags a sweep passes to train.py, parsed as train.py parses them, set the fields."""
  overrides = {'opt.lr': 0.0003, 'model.d_model': 96, 'data.tokenizer': 'char',
               'train.profile_steps': (3, 5)}
  command = sweep.train_command('configs/shakespeare_char.py:tiny', '/tmp/x', overrides)
  argv = ['train.py', *command[2:]]
  flag_values = flags.FlagValues()
  # As in train.py; the override flags are found in argv when the flag is defined.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    flag_values(argv)
    config = flag_values.config
  finally:
    os.chdir(cwd)
  assert (config.opt.lr, config.model.d_model, config.data.tokenizer) == (0.0003, 96, 'char')
  assert tuple(config.train.profile_steps) == (3, 5)
  assert config.model.num_layers == 2  # the rest is the :tiny recipe


def _config_file(tmp_path, sweep_body: str) -> str:
  path = tmp_path / 'my_config.py'
  path.write_text('from configs import shakespeare_char\n\n'
                  'def get_config(arg):\n  return shakespeare_char.get_config("tiny")\n\n'
                  f'def get_sweep(arg):\n  return {sweep_body}\n')
  return str(path)


@pytest.mark.parametrize('body, message', [
    ("[{'opt.lrr': 1e-3}]", r'point lrr=0.001: the config has no field opt.lrr'),
    ("[{'model.d_model': 'wide'}]", r"point d_model=wide: model.d_model='wide' does not fit"),
    ("[{'model.d_model': 66}]", r'point d_model=66: model.d_model=66 does not divide by '
                                r'model.num_heads=4'),
    ("[{'opt.lr': 1e-3}, {'opt.lr': 1e-3}]", 'gives point lr=0.001 more than once'),
    ('[]', 'must return a non-empty list of dicts'),
])
def test_bad_sweeps_are_named_before_anything_trains(tmp_path, body, message):
  with pytest.raises(UserError, match=message):
    sweep.run(_config_file(tmp_path, body) + ':x', str(tmp_path / 'root'))
  assert not (tmp_path / 'root').exists()


def test_a_config_without_a_sweep_is_named():
  with pytest.raises(UserError, match='configs/gpt2.py has no get_sweep'):
    sweep.load_points('configs/gpt2.py')


def _wait_for(predicate, what: str, timeout: float = 180.0):
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.2)


def test_killed_sweep_resumes_skips_finished_points_and_summarizes(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the config is named relative to the repository, as in the README
  root = str(tmp_path / 'sweep')
  names = ['lr=0.003', 'lr=0.01']

  printed = []
  sweep.run('configs/shakespeare_char.py:tiny', root, dry_run=True, echo=printed.append)
  commands = [shlex.split(line) for line in printed]
  assert [c[3] for c in commands] == [f'--workdir={root}/{n}' for n in names]
  assert [c[4] for c in commands] == ['--config.opt.lr=0.003', '--config.opt.lr=0.01']
  assert not os.path.exists(root)  # a dry run runs nothing

  # Both points train at once; the sweep is killed (SIGKILL: no chance to clean up) once
  # each has a checkpoint. Its trainers are told by the kernel and stop cleanly.
  first = subprocess.Popen([*SWEEP, f'--workdir={root}', '--parallel=2'], cwd=REPO,
                           env=ONE_DEVICE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: all(ckpt_lib.complete_steps(os.path.join(root, n)) for n in names),
            'a checkpoint of each point')
  first.send_signal(signal.SIGKILL)
  first.wait()
  logs = [os.path.join(root, n, sweep.LOG_FILE) for n in names]
  _wait_for(lambda: all('Stopped by SIGTERM' in open(log).read() or
                        sweep.point_status(os.path.dirname(log)) == 'finished'
                        for log in logs), 'the orphaned trainers to stop')
  statuses = [sweep.point_status(os.path.join(root, n)) for n in names]
  assert 'interrupted' in statuses, statuses

  second = subprocess.run([*SWEEP, f'--workdir={root}', '--parallel=2'], cwd=REPO,
                          env=ONE_DEVICE, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stdout + second.stderr
  for name, status in zip(names, statuses):
    said = 'resumed' if status == 'interrupted' else 'finished before, skipped'
    assert f'{name}: {said}' in second.stdout, second.stdout
    if status == 'interrupted':
      assert 'Resuming from step' in open(os.path.join(root, name, sweep.LOG_FILE)).read()

  # Once more (in this process: the command line was proven above): nothing left to do.
  printed = []
  assert sweep.run('configs/shakespeare_char.py:tiny', root, echo=printed.append) == {
      n: 'skipped' for n in names}
  assert printed == [f'{n}: finished before, skipped' for n in names]
  assert 'Summary: ' in second.stdout  # the command line wrote the summary read below
  other = _config_file(tmp_path, "[{'opt.lr': 3e-3}, {'opt.lr': 1e-2}]") + ':x'
  with pytest.raises(UserError, match='holds a sweep of configs/shakespeare_char.py:tiny, '
                                      f'not {other}'):
    sweep.run(other, root)

  # The table says what the event files say.
  with open(os.path.join(root, 'summary.csv')) as f:
    rows = {row['point']: row for row in csv.DictReader(f)}
  assert sorted(rows) == names
  for name in names:
    scalars = events.read_scalars(os.path.join(root, name), ['eval/loss', 'train/loss'])
    eval_loss = scalars['eval/loss']
    row = rows[name]
    assert row['status'] == 'finished' and int(row['steps']) == 80
    assert float(row['final_eval_loss']) == eval_loss[80]
    assert float(row['best_eval_loss']) == min(eval_loss.values())
    assert int(row['best_step']) == min(eval_loss, key=eval_loss.get)
    assert float(row['opt.lr']) == float(name.split('=')[1])
    assert float(row['wall_seconds']) > 0
  best_first = [r['point'] for r in csv.DictReader(open(os.path.join(root, 'summary.csv')))]
  assert best_first == sorted(names, key=lambda n: float(rows[n]['best_eval_loss']))
  markdown = open(os.path.join(root, 'summary.md')).read()
  assert all(f'| {n} |' in markdown for n in names)

  # A real PNG, one curve per point: each point's colour is drawn in it.
  from matplotlib import colors as mcolors
  from matplotlib import image
  path = os.path.join(root, 'curves.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pixels = image.imread(path)[..., :3]
  colors = sweep.plot_curves(str(tmp_path / 'again.png'), {n: {} for n in names})
  for name in names:
    rgb = np.array(mcolors.to_rgb(colors[name]))
    drawn = np.sum(np.abs(pixels - rgb).max(axis=-1) < 0.02)
    assert drawn > 500, (name, colors[name], drawn)  # two panels of 2-pixel lines
  assert math.isfinite(float(rows[names[0]]['final_eval_bits_per_char']))
