"""Several hosts: real processes (2 x 4 CPU devices, gloo collectives, jax.distributed) train,
are preempted, checkpoint collectively, set a damaged checkpoint aside together, resume, and
match one process of 8 devices; the checkpoint then resumes on another number of processes
and devices."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import train, workdir as workdir_lib
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Six steps: the preemption stops both processes after the first, and a checkpoint every
# 3 leaves one between that stop and the end for the elastic resume to start from.
# Evaluation in batches of 512: the validation split in 15 batches instead of the
# config's 120, each batch a gloo all-reduce between the processes.
TRAIN = dict(num_steps=6, checkpoint_every=3, eval_every=6, log_every=3, sample_tokens=10,
             eval_batch_size=512)
LAST = TRAIN['num_steps']
# Within each process FSDP x tensor parallel; across the two, data parallel (the outer mesh).
MESH = dict(shape='(1,-1,2)', dcn_shape='(2,1,1)')


def _config(**mesh):
  config = shakespeare_char.get_config('tiny')
  config.train.update(TRAIN)
  config.opt.warmup_steps = 2
  config.mesh.update(mesh)
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_processes(workdir):
  """The same train.py command on 2 processes of 4 devices each, as on 2 hosts."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla.flags(devices=4),
             JAX_PLATFORMS='cpu')
  flags = ([f'--config.train.{k}={v}' for k, v in TRAIN.items()] +
           [f'--config.mesh.{k}={v}' for k, v in MESH.items()] +
           ['--config.opt.warmup_steps=2'])
  return [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'experiments', 'train.py'),
       '--config=configs/shakespeare_char.py:tiny', f'--workdir={workdir}', *flags,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _finish(processes, timeout=300) -> list[str]:
  outputs = []
  for p in processes:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    outputs.append(out)
  return outputs


def _params(workdir, step):
  return jax.device_get(workdir_lib.restore_state(workdir, step)[2].params)


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One process of 8 devices, data parallel: what every other run must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  metrics = train.train_and_evaluate(_config(cpu_devices=0), workdir)
  return workdir, metrics


@pytest.fixture(scope='module')
def preempted_and_resumed(tmp_path_factory):
  """Two processes; process 1 gets SIGTERM as training starts, both stop at the same step
  with its checkpoint written. A damaged checkpoint is then put after it (a copy with every
  file garbled, as a disk fault would leave one), and the same command on both resumes to the
  end: one process sets the damaged one aside, both resume from the preemption's."""
  workdir = str(tmp_path_factory.mktemp('two_hosts'))
  processes = _start_processes(workdir)
  # Before the first step (it compiles for seconds): the notice is in long before step 6.
  deadline = time.time() + 240
  line = ''
  while 'Starting a new run' not in line and time.time() < deadline:
    line = processes[1].stdout.readline()
    assert line or processes[1].poll() is None, 'process 1 ended before training'
  processes[1].send_signal(signal.SIGTERM)
  stopped = _finish(processes)
  steps = [int(re.search(r'Stopped by preemption notice at step (\d+)', out).group(1))
           for out in stopped]
  saved = ckpt_lib.complete_steps(workdir)
  damaged = _damaged_copy(workdir, saved[-1])
  resumed = _finish(_start_processes(workdir))
  return workdir, steps, saved, damaged, resumed


def _damaged_copy(workdir, step) -> int:
  """Copies checkpoint `step` to the next step and garbles every file of the copy."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  damaged = step + 1
  shutil.copytree(os.path.join(checkpoints, str(step)), os.path.join(checkpoints, str(damaged)))
  for root, _, files in os.walk(os.path.join(checkpoints, str(damaged))):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x98 not a checkpoint')
  assert ckpt_lib.complete_steps(workdir)[-1] == damaged
  return damaged


def test_two_hosts_preempted_and_resumed_match_one_host(preempted_and_resumed, reference):
  workdir, steps, saved, damaged, resumed = preempted_and_resumed
  # JAX's preemption sync point: both processes stopped after the same step, and wrote
  # its checkpoint together.
  assert steps[0] == steps[1] < TRAIN['num_steps'] - 1, steps
  assert saved[-1] == steps[0], saved
  # The damaged checkpoint after it was moved aside once (both processes raced on the same
  # rename), and both resumed from the preemption's checkpoint.
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith(f'{damaged}-'), aside
  for out in resumed:
    assert f'moved it to {workdir}/unreadable_checkpoints/{aside[0]}' in out
    assert f'Resuming from step {steps[0]} of {LAST}' in out
  reference_dir, reference_metrics = reference
  _assert_close(_params(workdir, LAST), _params(reference_dir, LAST))
  for out in resumed:  # every process evaluated the same, and sampled the same text
    assert f'eval at step {LAST}: loss {reference_metrics["loss"]:.4f}' in out
    assert out.split('--- sample ---')[1] == resumed[0].split('--- sample ---')[1]


def test_a_two_host_checkpoint_resumes_on_one_host_of_two_devices(
    preempted_and_resumed, reference, tmp_path, capsys):
  """Elastic resume: the data stream goes on where it stopped, with no example repeated or
  skipped (the parameters would differ otherwise), on another mesh and process count."""
  workdir = str(tmp_path / 'elastic')
  shutil.copytree(preempted_and_resumed[0], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(LAST)))
  start = ckpt_lib.complete_steps(workdir)[-1]
  config = _config(shape=(-1, 1, 1), dcn_shape=(1, 1, 1))
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  out = capsys.readouterr().out
  assert f'Resuming from step {start} of {LAST}' in out
  assert 'note: resuming on another mesh' in out
  _assert_close(_params(workdir, LAST), _params(reference[0], LAST))
