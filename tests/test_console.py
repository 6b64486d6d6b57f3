"""What a user sees on the console: lmjax's own lines and none of the libraries' logs.

experiments/train.py (building its dataset on first use), then decode.py and evaluate.py on
its workdir, run as a user runs them: real processes, without the variables that quiet the
libraries already in the environment (the scripts must set them themselves), and without
the test run's compilation cache (the scripts keep their programs in the user's cache).
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from lmjax import console, runtime
from lmjax.data import corpora
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What only other programs write: log lines in absl's, glog's and Python's formats, absl's
# note before its C++ logging starts, TensorFlow's C++ sources, TFDS's and tqdm's progress,
# Python warnings and tracebacks.
FOREIGN = re.compile('|'.join([
    r'^[IWEF]\d{4} ',
    r'^WARNING: All log messages',
    r'^(DEBUG|INFO|WARNING|ERROR|CRITICAL):',
    r'tensorflow/',
    r'oneDNN',
    r'absl::',
    r'^Traceback',
    r'Downloading and preparing dataset',
    r'\d+%\|',
    r'\w+Warning: ',
]))
STEPS = 4
# `make train`'s config (the recipe for this CPU), shrunk to a short run of a small model;
# no end-of-run sample (its decoder compiles for seconds; decode.py runs the same generation
# code below).
TRAIN_FLAGS = ['--config.model.d_model=16', '--config.model.hidden_size=32',
               '--config.train.batch_size=8', '--config.train.seq_len=32',
               '--config.train.eval_batch_size=8', '--config.opt.warmup_steps=2',
               f'--config.train.num_steps={STEPS}', '--config.train.log_every=2',
               f'--config.train.eval_every={STEPS}', f'--config.train.checkpoint_every={STEPS}',
               '--config.train.sample_tokens=0']


def _environment(data_dir: str, cache_home: str) -> dict:
  """The test run's environment less what console.quiet_libraries sets and less JAX's
  cache directory; one CPU device; TFDS reading and building in `data_dir`; the user's
  cache directory (XDG_CACHE_HOME) `cache_home`."""
  env = {k: v for k, v in os.environ.items()
         if k not in console.ENVIRONMENT and k != 'JAX_COMPILATION_CACHE_DIR'}
  return dict(env, XLA_FLAGS=xla.flags(), JAX_PLATFORMS='cpu', TFDS_DATA_DIR=data_dir,
              XDG_CACHE_HOME=cache_home)


def _script(name: str, *flags: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'experiments', name), *flags]


def _foreign_lines(done) -> list[str]:
  return [line for line in (done.stdout + done.stderr).splitlines() if FOREIGN.search(line)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """({script: CompletedProcess}, workdir, XDG_CACHE_HOME): train.py on a TFDS directory
  holding only the corpus archive (so it builds the dataset first), then decode.py and
  evaluate.py side by side."""
  tmp = tmp_path_factory.mktemp('console')
  downloads = tmp / 'tfds' / 'downloads'
  downloads.mkdir(parents=True)
  # The archive the test run's datasets were built from (tests/conftest.py).
  built = pathlib.Path(corpora.get_builder('shakespeare').data_dir).parents[1] / 'downloads'
  shutil.copy(corpora.fetch_archive(built), downloads)
  cache_home = str(tmp / 'cache')
  env, workdir = _environment(str(tmp / 'tfds'), cache_home), str(tmp / 'run')
  train = subprocess.run(
      _script('train.py', '--config=configs/shakespeare_char.py', f'--workdir={workdir}',
              *TRAIN_FLAGS),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  # Both at once: each spends seconds importing and compiling on one core.
  started = {
      'decode.py': subprocess.Popen(
          _script('decode.py', f'--workdir={workdir}', '--prompt=ROMEO:',
                  '--max_new_tokens=8'),
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
      'evaluate.py': subprocess.Popen(
          _script('evaluate.py', f'--workdir={workdir}'),
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
  }
  results = {'train.py': train}
  try:
    for name, process in started.items():
      stdout, stderr = process.communicate(timeout=300)
      results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                  stderr)
  finally:
    for process in started.values():
      process.kill()  # nothing to do for one that has finished
  return results, workdir, cache_home


@pytest.mark.parametrize('script', ['train.py', 'decode.py', 'evaluate.py'])
def test_a_normal_run_prints_no_library_log_lines(runs, script):
  results, _, _ = runs
  done = results[script]
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert not _foreign_lines(done), '\n'.join(_foreign_lines(done))
  assert not done.stderr.strip(), done.stderr


def test_the_scripts_say_what_they_do_in_their_own_words(runs):
  results, workdir, _ = runs
  train = results['train.py'].stdout
  lines = train.splitlines()
  # The recipe chosen for this machine (JAX_PLATFORMS=cpu), and why.
  assert lines[0].startswith('Recipe :laptop, for a CPU ('), train
  # The dataset build, which TFDS would have shown with its own lines and progress bars.
  assert lines[1].startswith('Building the shakespeare dataset in '), train
  assert lines[2].startswith(f'Starting a new run in {workdir}: '), train
  # Said before the silence of the compile, and how long it took after.
  assert lines[3] == 'Compiling the train step ...', train
  assert re.match(r'Compiled in \d+\.\d s\. Mesh ', lines[4]), train
  assert f'step {STEPS:>6}/{STEPS}' in train and '\nDone: ' in train, train
  assert results['decode.py'].stdout.startswith(f'# {workdir}, step {STEPS}, sample\nROMEO:')
  assert f'"step": {STEPS}' in results['evaluate.py'].stdout


def test_the_scripts_keep_their_compiled_programs_in_the_users_cache(runs):
  """Each script writes the programs it compiled under XDG_CACHE_HOME/lmjax/xla/HOST_CPU,
  where the next run, decode or evaluation loads them (with the test run's
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, every program; a user's, those that took a
  second or more)."""
  _, _, cache_home = runs
  directory = runtime.compilation_cache_dir({'XDG_CACHE_HOME': cache_home})
  assert directory.startswith(os.path.join(cache_home, 'lmjax', 'xla', ''))
  programs = {name.split('-')[0] for name in os.listdir(directory)}
  # train.py's step, decode.py's sampling loop, the evaluation step (this recipe's GRU
  # carries its state along the split).
  assert {'jit_train_step', 'jit__sample_loop', 'jit_stateful_eval_step'} <= programs, \
      sorted(programs)


def test_the_patterns_catch_what_the_libraries_print():
  """Lines TensorFlow, absl, TFDS and Python print when left alone."""
  seen = [
      'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
      'I0000 00:00:1796213355.990365   13980 port.cc:153] oneDNN custom operations are on.',
      'W1202 12:24:13.515091 140431654247296 file_utils.py:394] Variant folder /tmp/x has no '
      'dataset_info.json',
      'WARNING:absl:Variant folder /tmp/x has no dataset_info.json',
      'Downloading and preparing dataset Unknown size (download: Unknown size, ...',
      'Generating splits...:  33%|###3      | 1/3 [00:00<00:01,  1.52 splits/s]',
      '/x/y.py:3: UserWarning: something',
  ]
  assert all(FOREIGN.search(line) for line in seen)
  assert not FOREIGN.search('step      4/4  loss 4.1207  lr 3.00e-04  61,125 tokens/s')


class _Clock:
  """The progress bar's clock, moved by hand: each item below comes `step` seconds after
  the one before."""

  def __init__(self, step: float):
    self.time, self.step = 0.0, step

  def __call__(self) -> float:
    return self.time

  def items(self, n: int):
    for i in range(n):
      self.time += self.step
      yield i


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
  """On a real terminal (a pseudo-terminal here): the bar drawn in place, then ended."""
  clock = _Clock(0.15)
  monkeypatch.setattr(console, '_now', clock)
  leader, follower = os.openpty()
  with open(follower, 'w') as terminal, console.progress_to(terminal):
    assert list(console.progress(clock.items(5), 'countdown train', 8)) == list(range(5))
  # A pseudo-terminal hands over what was written in pieces; read until the closed follower
  # ends the stream (EIO on Linux).
  chunks = []
  while True:
    try:
      chunk = os.read(leader, 4096)
    except OSError:
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(leader)
  drawn = b''.join(chunks).decode()
  # Redrawn once 0.2 s have passed (after items 2 and 4), and at the end; the terminal
  # turns the final newline into CR LF.
  assert drawn == ('\r  countdown train [#####---------------] 2 / 8 examples'
                   '\r  countdown train [##########----------] 4 / 8 examples'
                   '\r  countdown train [############--------] 5 / 8 examples\r\n'), drawn


def test_progress_in_a_log_is_a_plain_line_now_and_then(monkeypatch, capsys):
  clock = _Clock(4.0)
  monkeypatch.setattr(console, '_now', clock)
  assert list(console.progress(clock.items(6), 'milton test', 6, 'works')) == list(range(6))
  # A line once 10 s have passed since the last: at 12 s (3 works) and 24 s (6).
  assert capsys.readouterr().out == ('  milton test: 3 of 6 works\n'
                                     '  milton test: 6 of 6 works\n')
  assert list(console.progress(range(1000), 'quick', 1000)) == list(range(1000))
  assert capsys.readouterr().out == ''  # quick work prints nothing in a log
