"""Kills a training run at random moments, again and again, and checks that after all the
resumes it ends exactly where a run trained in one go ends.

  python experiments/soak.py --config=configs/shakespeare_char.py:tiny --workdir=runs/soak \
      --kills=20 --set=train.num_steps=300 --set=train.checkpoint_every=5

First a reference run trains without interruption (WORKDIR/reference). Then each round
starts experiments/train.py in WORKDIR/soak and, after a random time, sends SIGKILL (or
SIGTERM, one round in four: --sigterm_fraction). One round in five kills during start-up
(imports, data, tokenizer, restore); the others kill after training began and compiled, at
a random share of 2.5 x (the reference's training time / --kills), so the run is cut at
many different steps, in steps and in asynchronous checkpoint writes alike. A round that
finishes the run ends the rounds. Then the run is resumed to the end and its final
parameters (bit for bit) and logged metrics are compared with the reference. Prints one
JSON line per round and a summary; exit status 1 if anything differs. Each round's output
is in WORKDIR/logs/.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from lmjax.errors import run_script

_CONFIG = flags.DEFINE_string('config', 'configs/shakespeare_char.py:tiny',
                              'Config file (and variant) to train, as for experiments/train.py.')
_SET = flags.DEFINE_multi_string('set', [], 'A config override without the --config. prefix, '
                                 'e.g. --set=train.num_steps=300 (repeatable).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'An empty or new directory for the two runs.')
_KILLS = flags.DEFINE_integer('kills', 10, 'Rounds of start, wait, kill.')
_SIGTERM_FRACTION = flags.DEFINE_float('sigterm_fraction', 0.25,
                                       'Share of rounds that send SIGTERM instead of SIGKILL.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the kill moments and signals.')
flags.mark_flag_as_required('workdir')

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
# Scalars that must match; throughput and MFU are timings, not results.
IGNORED_SCALARS = ('train/tokens_per_sec', 'train/mfu')


def _run(command: list[str], log_path: str, *, kill_after: float | None = None,
         from_start: bool = False, sig: int = signal.SIGKILL) -> dict:
  """Runs `command`, its output copied to `log_path`. With `kill_after`, sends `sig` that
  many seconds after the run printed that it started training (`Starting a new run` or
  `Resuming from step`), or after the process started if `from_start`. Returns the exit
  status, the seconds from start to training and to the end, and whether it was signalled."""
  start = time.perf_counter()
  training = threading.Event()
  times = {}
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def copy_output():
    with open(log_path, 'w') as log:
      for line in proc.stdout:
        log.write(line)
        if not training.is_set() and line.startswith(('Starting a new run', 'Resuming from')):
          times['to_training_s'] = time.perf_counter() - start
          training.set()
        if 'to_first_step_s' not in times and line.startswith('step '):
          times['to_first_step_s'] = time.perf_counter() - start
    training.set()  # it ended without training (or failed)

  reader = threading.Thread(target=copy_output, daemon=True)
  reader.start()
  signalled = False
  if kill_after is not None:
    if not from_start:
      training.wait()
      kill_after += times.get('to_training_s', 0.0)
    remaining = kill_after - (time.perf_counter() - start)
    try:
      proc.wait(timeout=max(remaining, 0.0))
    except subprocess.TimeoutExpired:
      proc.send_signal(sig)
      signalled = True
  proc.wait()
  reader.join()
  return {'exit': proc.returncode, 'signalled': signalled,
          'to_training_s': times.get('to_training_s'),
          'to_first_step_s': times.get('to_first_step_s'),
          'seconds': time.perf_counter() - start}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  root = os.path.abspath(_WORKDIR.value)
  if os.path.exists(root) and os.listdir(root):
    raise app.UsageError(f'--workdir={root} is not empty; give a new directory.')
  reference, soak, logs = (os.path.join(root, name) for name in ('reference', 'soak', 'logs'))
  os.makedirs(logs)
  command = [sys.executable, TRAIN_SCRIPT, f'--config={_CONFIG.value}',
             *[f'--config.{override}' for override in _SET.value]]

  ref = _run(command + [f'--workdir={reference}'], os.path.join(logs, 'reference.txt'))
  if ref['exit'] != 0 or ref['to_first_step_s'] is None:
    raise app.UsageError(f'the reference run failed; see {logs}/reference.txt')
  # Start-up: imports, data and tokenizer, restore. Then compiling and the first logged
  # steps, then the rest of training.
  startup_s = ref['to_training_s']
  compile_s = ref['to_first_step_s'] - ref['to_training_s']
  train_s = ref['seconds'] - ref['to_first_step_s']

  # One round in five kills during start-up; the others after training began, past the
  # compile, at a random share of 2.5 x (training time / --kills): the run ends after about
  # --kills rounds, having been cut at many different steps.
  rng = random.Random(_SEED.value)
  rounds = []
  for i in range(_KILLS.value):
    sig = signal.SIGTERM if rng.random() < _SIGTERM_FRACTION.value else signal.SIGKILL
    early = rng.random() < 0.2
    delay = (rng.uniform(0, startup_s) if early else
             compile_s + rng.uniform(0, 2.5 * train_s / _KILLS.value))
    log_path = os.path.join(logs, f'round_{i:03d}.txt')
    result = _run(command + [f'--workdir={soak}'], log_path, kill_after=delay,
                  from_start=early, sig=sig)
    with open(log_path) as f:
      out = f.read()
    resumed = re.search(r'Resuming from step (\d+)', out)
    stopped = re.search(r'Stopped by SIGTERM at step (\d+)', out)
    rounds.append({'signal': signal.Signals(sig).name if result['signalled'] else None,
                   'during': 'start-up' if early else 'training',
                   'after_s': round(result['seconds'], 2), 'exit': result['exit'],
                   'resumed_from': int(resumed.group(1)) if resumed else None,
                   'stopped_at': int(stopped.group(1)) if stopped else None,
                   'set_aside': 'moved it to' in out})
    print(json.dumps({'round': i, **rounds[-1]}), flush=True)
    if not result['signalled'] and result['exit'] != 0:
      raise app.UsageError(f'round {i} failed on its own (exit {result["exit"]}); see '
                           f'{log_path}')
    if not result['signalled']:  # it finished: nothing left to interrupt
      break

  if _run(command + [f'--workdir={soak}'], os.path.join(logs, 'final.txt'))['exit'] != 0:
    raise app.UsageError(f'the final resume failed; see {logs}/final.txt')

  import jax  # only now: the runs above had the machine to themselves
  import numpy as np

  from lmjax import events, workdir as workdir_lib
  _, _, ref_params, ref_step = workdir_lib.load_trained(reference)
  _, _, params, step = workdir_lib.load_trained(soak)
  differing = [jax.tree_util.keystr(path) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(jax.device_get(ref_params))[0],
      jax.tree.leaves(jax.device_get(params)), strict=True) if not np.array_equal(a, b)]
  ref_scalars, scalars = events.read_scalars(reference), events.read_scalars(soak)
  differing_scalars = sorted(tag for tag in set(ref_scalars) | set(scalars)
                             if tag not in IGNORED_SCALARS
                             and ref_scalars.get(tag) != scalars.get(tag))
  summary = {
      'config': _CONFIG.value, 'overrides': _SET.value, 'rounds': len(rounds),
      'sigkill': sum(r['signal'] == 'SIGKILL' for r in rounds),
      'sigterm': sum(r['signal'] == 'SIGTERM' for r in rounds),
      'killed_during_startup': sum(r['signal'] is not None and r['during'] == 'start-up'
                                   for r in rounds),
      'distinct_resume_steps': len({r['resumed_from'] for r in rounds} - {None}),
      'checkpoints_set_aside': sum(r['set_aside'] for r in rounds),
      'final_step': step, 'reference_step': ref_step,
      'params_identical': step == ref_step and not differing, 'params_differing': differing,
      'scalars_identical': not differing_scalars, 'scalars_differing': differing_scalars,
      'reference_seconds': round(ref['seconds'], 1),
  }
  print(json.dumps(summary))
  if not (summary['params_identical'] and summary['scalars_identical']):
    sys.exit(1)


if __name__ == '__main__':
  run_script(main)
