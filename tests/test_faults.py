"""Faults a long run meets: preemption, Ctrl-C, kill -9, NaN, damaged checkpoints, a changed
config, bad flags, and a workdir that holds code. Real processes, real signals, real files."""
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import events
from lmjax import generation, train, workdir as workdir_lib
from lmjax.errors import UserError
from tests import script_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No end-of-run sample: its decoder would compile in every run and prove nothing here.
TRAIN = dict(num_steps=40, log_every=6, eval_every=40, checkpoint_every=10, keep_checkpoints=3,
             sample_tokens=0)
COMPARED_SCALARS = ('train/loss', 'train/grad_norm', 'train/accuracy', 'train/learning_rate',
                    'train/skipped_steps', 'eval/loss', 'eval/accuracy')


def tiny_config(**train_fields):
  config = shakespeare_char.get_config('tiny')
  config.train.update({**TRAIN, **train_fields})
  return config


def train_command(workdir, *extra):
  flags = [f'--config.train.{k}={v}' for k, v in TRAIN.items()]
  return [sys.executable, os.path.join(REPO, 'experiments', 'train.py'),
          '--config=configs/shakespeare_char.py:tiny', f'--workdir={workdir}', *flags, *extra]


def final_params(workdir):
  _, _, params, step = workdir_lib.load_trained(workdir)
  return step, jax.device_get(params)


def logged_scalars(workdir) -> dict:
  return events.read_scalars(workdir, COMPARED_SCALARS)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir




def _sigterm_when(path: str) -> threading.Thread:
  """Sends this process SIGTERM as soon as `path` exists."""
  def watch():
    while not os.path.exists(path):
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


# experiments/train.py with every checkpoint written once a stop signal has come held open
# at the moment orbax would complete it (renaming its temporary directory to the step's
# number), so that signals can be aimed at a save in flight. It prints `test: holding
# checkpoint STEP`, then `test: exiting with checkpoint STEP unfinished` if the interpreter
# begins to exit meanwhile; it keeps the write open until killed (or for a minute).
HELD_SAVE = r"""
import faulthandler, os, runpy, signal, sys, threading, time

faulthandler.enable()  # a crash prints its stack

rename = os.rename

def stopping():
  handler = signal.getsignal(signal.SIGINT)  # lmjax.runtime.StopSignals' while training
  return getattr(getattr(handler, '__self__', None), 'received', None) is not None

def held_rename(src, dst, *args, **kwargs):
  parent, name = os.path.split(os.fspath(dst))
  if os.path.basename(parent) == 'checkpoints' and name.isdigit() and stopping():
    print(f'test: holding checkpoint {name}', flush=True)
    deadline = time.monotonic() + 60
    # threading._SHUTTING_DOWN turns True as the interpreter begins to exit.
    while not threading._SHUTTING_DOWN and time.monotonic() < deadline:
      time.sleep(0.01)
    if threading._SHUTTING_DOWN:
      print(f'test: exiting with checkpoint {name} unfinished', flush=True)
    while threading._SHUTTING_DOWN and time.monotonic() < deadline:
      time.sleep(0.01)
  return rename(src, dst, *args, **kwargs)

os.rename = held_rename
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _start_script(workdir, hold_saves: bool = False):
  """experiments/train.py on the test config; output (stderr too) read line by line. With
  `hold_saves`, run under HELD_SAVE."""
  command = train_command(workdir)
  if hold_saves:
    command = [sys.executable, '-c', HELD_SAVE, *command[1:]]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _unfinished(workdir, step: int) -> list[str]:
  """Orbax's temporary directories of `step`: a write begun and not completed."""
  return glob.glob(os.path.join(workdir, 'checkpoints', f'{step}.orbax-checkpoint-tmp*'))


def _raised(output: str) -> list[str]:
  """The last line of every traceback (`KeyError: ...`) and every ignored exception."""
  return [line for line in output.splitlines()
          if re.match(r'[\w.]*(Error|Exception|Interrupt|Exit)\b', line)]


def _read_until(proc, prefix: str) -> list[str]:
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return lines
  try:  # how it ended (a negative status: killed by that signal)
    status = proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    status = 'still running'
  raise AssertionError(f'the run ended (exit status {status}) before a line starting '
                       f'{prefix!r}:\n{"".join(lines)}')


def test_signals_full_disk_and_kill_9_lose_nothing_and_resume_exactly(reference, tmp_path,
                                                                     capfd):
  workdir = str(tmp_path / 'run')
  checkpoints = ckpt_lib.checkpoint_dir(workdir)
  # 1. SIGTERM (preemption) once the first checkpoint is complete: the step finishes, its
  # checkpoint is written, and the run returns. Should the signal miss the training loop,
  # the handler below keeps it from ending the test process.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    watcher = _sigterm_when(os.path.join(workdir, 'checkpoints', '10'))
    assert train.train_and_evaluate(tiny_config(), workdir) == {}
    watcher.join()
  finally:
    signal.signal(signal.SIGTERM, previous)
  out = capfd.readouterr().out
  assert 'SIGTERM received' in out and 'Stopped by SIGTERM at step' in out, out
  stopped = int(out.split('Stopped by SIGTERM at step ')[1].split()[0])
  assert 10 <= stopped < 40
  assert ckpt_lib.complete_steps(workdir)[-1] == stopped

  # 2. A full disk, as the script sees it: once it has resumed, every write that would grow
  # a file fails (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write gets EFBIG). It stops
  # with one line naming the last complete checkpoint, which stays intact.
  proc = _start_script(workdir)
  _read_until(proc, f'Resuming from step {stopped} of 40')
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1, rest[-3000:]
  errors = [line for line in rest.splitlines() if line.startswith('error: ')]
  assert errors and 'failed' in errors[0] and 'File too large' in errors[0], rest[-3000:]
  assert f'The last complete checkpoint is step {stopped} in' in errors[0], errors

  # 3. Ctrl-C (SIGINT) to the script once it trains: it says so at once, finishes the step
  # it is in, writes that step's checkpoint and waits for it, names it, and exits with
  # status 0, no traceback.
  proc = _start_script(workdir)
  _read_until(proc, f'Resuming from step {stopped} of 40')
  _read_until(proc, 'step ')
  proc.send_signal(signal.SIGINT)
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and not _raised(rest) and 'Traceback' not in rest, rest[-3000:]
  assert 'SIGINT received: stopping after this step' in rest, rest[-3000:]
  stopped = int(rest.split('Stopped by SIGINT at step ')[1].split()[0])
  assert f'of 40; checkpoint {checkpoints}/{stopped} is complete.' in rest
  assert ckpt_lib.complete_steps(workdir)[-1] == stopped < 40

  # 4. Ctrl-C, then a second Ctrl-C while the stop's checkpoint is being written (held open
  # before orbax completes it). The second ends the wait: no stop is claimed, a line says
  # so, and the exiting interpreter waits for the write under way instead
  # of dropping it.
  proc = _start_script(workdir, hold_saves=True)
  _read_until(proc, f'Resuming from step {stopped} of 40')
  _read_until(proc, 'step ')
  proc.send_signal(signal.SIGINT)
  lines = _read_until(proc, 'test: holding checkpoint ')
  assert any(line.startswith('SIGINT received: stopping') for line in lines), lines
  held = int(lines[-1].split()[-1])
  assert _unfinished(workdir, held) and held not in ckpt_lib.complete_steps(workdir)
  proc.send_signal(signal.SIGINT)
  lines = _read_until(proc, f'test: exiting with checkpoint {held} unfinished')
  assert not [line for line in lines if 'Stopped by' in line], lines
  assert 'interrupted (Ctrl-C)\n' in lines, lines
  # orbax logs the interrupted wait, with its stack; nothing else is raised.
  assert set(_raised(''.join(lines))) <= {'KeyboardInterrupt'}, ''.join(lines)[-3000:]

  # 5. kill -9 while that asynchronous write is still in flight: its temporary directory
  # stays behind, and it is not counted as a checkpoint.
  proc.kill()
  proc.wait(timeout=60)
  assert _unfinished(workdir, held)
  # The newest complete checkpoint is the SIGINT stop's, or a periodic one written after it
  # before the second run's Ctrl-C arrived; never the held one.
  last = ckpt_lib.complete_steps(workdir)[-1]
  assert stopped <= last < held

  # 6. The last complete checkpoint is the one resumed; the result is the uninterrupted
  # run's, bit for bit, and so are the logged metrics.
  train.train_and_evaluate(tiny_config(), workdir)
  assert f'Resuming from step {last} of 40' in capfd.readouterr().out
  (step, params), (ref_step, ref_params) = final_params(workdir), final_params(reference)
  assert step == ref_step == 40
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert logged_scalars(workdir) == logged_scalars(reference)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped_and_counted(tmp_path):
  # Adam's first update moves every weight by about opt.lr: 1e30 makes the logits overflow,
  # so every step from the second on has a NaN loss.
  def config(mode):
    c = tiny_config(num_steps=4, eval_every=4, checkpoint_every=1, keep_checkpoints=10,
                    log_every=2, nonfinite=mode)
    c.opt.update(lr=1e30, warmup_steps=0)
    return c

  with pytest.raises(UserError, match='not finite at step 2 .*checkpoint 1 in .* is the last good'):
    train.train_and_evaluate(config('stop'), str(tmp_path / 'stop'))
  assert ckpt_lib.Checkpointer(str(tmp_path / 'stop'), read_only=True).all_steps() == [1]

  # Four steps in one dispatch: each step's metrics are still checked.
  several = config('stop')
  several.train.update(steps_per_dispatch=4, checkpoint_every=4, log_every=4)
  with pytest.raises(UserError, match='not finite at step 2 .*no checkpoint had been written'):
    train.train_and_evaluate(several, str(tmp_path / 'several'))

  skip = str(tmp_path / 'skip')
  train.train_and_evaluate(config('skip'), skip)
  _, _, after_1, _ = workdir_lib.restore_state(skip, 1)
  _, _, after_4, _ = workdir_lib.restore_state(skip, 4)
  assert int(after_4.step) == 4
  # No NaN update reached the parameters or the optimizer (Adam's count stayed at 1).
  for a, b in zip(jax.tree.leaves((after_1.params, after_1.opt_state)),
                  jax.tree.leaves((after_4.params, after_4.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))
  skipped = logged_scalars(skip)['train/skipped_steps']
  assert skipped == {2: 1.0, 4: 3.0}


def test_a_changed_config_is_refused_and_a_changed_shape_names_the_parameter(reference,
                                                                              tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  config = tiny_config()
  config.opt.lr = 0.5
  with pytest.raises(UserError, match=r'differs in: opt.lr: 0.003 -> 0.5\. .*'
                                      '--allow_config_change'):
    train.train_and_evaluate(config, workdir)
  wider = tiny_config()
  wider.model.d_model = 96
  with pytest.raises(UserError, match=r"parameter \['final_norm'\]\['bias'\] is \(64,\) "
                                      r'there and \(96,\) here'):
    train.train_and_evaluate(wider, workdir, allow_config_change=True)
  # The workdir still describes its checkpoints, so decoding it works as before.
  assert workdir_lib.load_config(workdir).model.d_model == 64


def test_a_field_added_by_a_newer_lmjax_does_not_block_resuming(reference, tmp_path, capsys):
  """A config.json written before a field existed resumes under today's config: only a
  field both sides have and that differs is a change the user made."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  del saved['train']['profile_steps']
  with open(path, 'w') as f:
    json.dump(saved, f)
  workdir_lib.check_config_change(tiny_config(), workdir)
  assert "fields that differ in presence: train.profile_steps: (absent) -> '[]'" in (
      capsys.readouterr().out)


def test_an_unreadable_latest_checkpoint_is_named_and_training_resumes_before_it(
    reference, tmp_path, capsys):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  damaged = os.path.join(workdir, 'checkpoints', '40')
  for root, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
  # Decoding names it and the other steps; it does not guess.
  with pytest.raises(UserError, match=r'checkpoint 40 .* cannot be read .*steps 20, 30'):
    workdir_lib.load_trained(workdir)
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert 'checkpoint 40' in out and 'moved it to' in out and 'Resuming from step 30' in out
  assert os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  (_, params), (_, ref_params) = final_params(workdir), final_params(reference)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_loading_a_workdir_runs_no_code_from_it(reference, tmp_path, capsys):
  """Checkpoints, config and tokenizer are data: decoding a workdir that also holds Python
  files and pickles, and resuming training in it, imports, executes and unpickles
  nothing."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  marker = tmp_path / 'ran'
  payload = f'open({str(marker)!r}, "w").write("ran")\n'
  for name in ('config.py', 'sitecustomize.py', 'tokenizer.py', '__init__.py'):
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(payload)
  pickled = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
  # Beside the state, and inside the checkpoint training resumes from.
  for name in ('state.pkl', 'checkpoints/40/state.pkl', 'checkpoints/40/data.pkl'):
    with open(os.path.join(workdir, name), 'wb') as f:
      f.write(pickled)
  opened, ran = [], []

  def audit(event, args):
    if event == 'open' and isinstance(args[0], str) and args[0].startswith(workdir):
      opened.append(os.path.relpath(args[0], workdir))
    elif event == 'import' and args[1] and str(args[1]).startswith(workdir):
      ran.append(('import', args[1]))
    elif event == 'exec' and getattr(args[0], 'co_filename', '').startswith(workdir):
      ran.append(('exec', args[0].co_filename))
    elif event == 'pickle.find_class':
      ran.append(('unpickle', args))

  active = [True]
  sys.addaudithook(lambda event, args: audit(event, args) if active[0] else None)
  try:
    config, tokenizer, params, _ = workdir_lib.load_trained(workdir)
    generation.generate_texts(config, params, tokenizer, ['ROMEO:'], max_new_tokens=4,
                         strategy='greedy')
    decoding = list(opened)
    # Training resumes: it reads what decoding reads, then evaluates the finished run.
    opened.clear()
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(), workdir)
  finally:
    active[0] = False  # an audit hook cannot be removed, only silenced
  assert 'Resuming from step 40 of 40' in capsys.readouterr().out
  assert not marker.exists() and not ran, ran
  # The hook saw the loading: the config and tokenizer each time, and checkpoint 40's
  # metadata when training resumed from it.
  assert 'config.json' in decoding and 'tokenizer.json' in decoding, decoding
  assert 'config.json' in opened and 'tokenizer.json' in opened, opened
  assert any(p.startswith(os.path.join('checkpoints', '40', '')) for p in opened), opened
  assert not [p for p in decoding + opened if p.endswith(('.py', '.pkl'))], opened


# `reference` has compiled the train step into the compilation cache the test run shares:
# soak.py times its kill by its own reference run's compile, and a cold compile there would
# put the kill after the round's end.
@pytest.mark.usefixtures('reference')
def test_the_soak_script_kills_resumes_and_finds_the_run_exact(tmp_path):
  """experiments/soak.py at its smallest: a reference run, one round killed by SIGKILL (seed
  2 picks a moment early in training; a checkpoint every 5 steps leaves one before it), the
  resume to the end, and the comparison, on the test config."""
  root = tmp_path / 'soak'
  overrides = [f'train.{k}={v}' for k, v in {**TRAIN, 'checkpoint_every': 5}.items()]
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'soak.py'), f'--workdir={root}',
       '--kills=1', '--sigterm_fraction=0', '--seed=2', *[f'--set={o}' for o in overrides]],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  assert len(lines) == 2, done.stdout  # one round, then the summary
  round_0, summary = lines
  assert round_0['round'] == 0 and round_0['exit'] in (0, -signal.SIGKILL), round_0
  assert summary['rounds'] == 1 and summary['overrides'] == overrides, summary
  assert summary['params_identical'] and summary['scalars_identical'], summary
  assert summary['final_step'] == summary['reference_step'] == 40, summary
  assert sorted(os.listdir(root / 'logs')) == ['final.txt', 'reference.txt', 'round_000.txt']


BAD_FLAGS = {
    'field': (['--config.model.widht=64'], "--config.model.widht=64: the config has no such field"),
    'value': (['--config.train.num_steps=ten'], "--config.train.num_steps=ten: invalid literal"),
    'file': (['--config=configs/nope.py'], "--config: [Errno 2] No such file or directory"),
    'variant': (['--config=configs/shakespeare_char.py:huge'], "unknown variant 'huge'"),
    'batch': (['--config.train.batch_size=12', '--config.mesh.cpu_devices=8'],
              'train.batch_size=12 does not divide by the 8'),
    'devices': (['--config.mesh.cpu_devices=-2'], 'mesh.cpu_devices=-2: give a whole number'),
}


@pytest.fixture(scope='module')
def bad_flag_runs(tmp_path_factory):
  """Every case of BAD_FLAGS as `python experiments/train.py ...`, each with its workdir."""
  root = tmp_path_factory.mktemp('bad_flags')
  cases = {}
  for key, (flags, _) in BAD_FLAGS.items():
    command = train_command(str(root / key), *flags)[2:]
    if flags[0].startswith('--config='):  # in place of the tiny config and its overrides
      command = [f'--workdir={root / key}', *flags]
    cases[key] = ('train.py', command)
  return root, script_cases.run(cases)


@pytest.mark.parametrize('key', BAD_FLAGS)
def test_the_train_script_names_a_bad_flag_without_a_traceback(bad_flag_runs, key):
  root, runs = bad_flag_runs
  done, message = runs[key], BAD_FLAGS[key][1]
  assert message in script_cases.error_line(done)
  assert not os.path.exists(root / key / 'checkpoints')


def test_an_unwritable_workdir_is_refused_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='cannot be written .*choose a directory'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))


def test_the_saved_state_carries_the_metrics_between_log_lines(reference):
  """What makes a resumed run log the same means: the steps since the last log line ride
  in the checkpoint (checkpoint 20 is 2 steps past the log line of step 18), as JSON."""
  data = ckpt_lib.Checkpointer(reference, read_only=True).data_state(20)
  batch_size = shakespeare_char.get_config('tiny').train.batch_size
  assert data['next_example'] == 20 * batch_size
  assert [s for s, _ in data['pending_metrics']] == [19, 20]
  assert data['skipped_steps'] == 0
