"""Workdirs in a bucket: lmjax's storage layer and a whole run (train, stop by SIGTERM,
resume, decode, evaluate, sweep) at gs://, against a Cloud Storage emulator on loopback.

What this does not reach: TensorFlow's own GCS client, which speaks only to Google's
endpoint. lmjax does not use it for a workdir (events go through `events.BucketWriter`), but
TFDS's data_dir and the profiler's trace would, so those stay local here.
"""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import events, storage, sweep, train, workdir as workdir_lib
from tests import gcs_emulator, script_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = f'gs://{gcs_emulator.BUCKET}'
# Short: the cycle, not the learning, is under test. No sample: its decoder would compile
# in every process and prove nothing here.
TRAIN = dict(num_steps=24, log_every=4, eval_every=24, checkpoint_every=8, sample_tokens=0)
FLAGS = [f'--config.train.{k}={v}' for k, v in TRAIN.items()]
SWEEP_CONFIG = '''
from lmjax import config, sweep

base = config.load_file({path!r})


def get_config(variant=''):
  c = base.get_config('tiny')
  c.train.update({train!r})
  return c


def get_sweep(variant=''):
  return sweep.grid({{'opt.lr': [1e-2]}})
'''


@pytest.fixture(scope='module')
def bucket():
  with gcs_emulator.running() as env:
    # The processes started here see the devices this one does, so that their runs compute
    # what an in-process run does, bit for bit.
    yield {**os.environ, **env}


def test_files_in_a_bucket_are_written_read_listed_and_moved(bucket):
  root = f'{BUCKET}/files'
  assert not storage.exists(root)
  storage.makedirs(root)
  storage.write_text(f'{root}/a.json', '{"x": 1}')
  storage.write_text(f'{root}/a.json', '{"x": 2}')  # replaced whole
  storage.write_bytes(f'{root}/sub/b.bin', b'\0\1')
  assert storage.read_text(f'{root}/a.json') == '{"x": 2}'
  assert sorted(storage.listdir(root)) == ['a.json', 'sub']
  assert storage.isdir(f'{root}/sub') and storage.isfile(f'{root}/sub/b.bin')
  assert not storage.isfile(f'{root}/sub')
  storage.move(f'{root}/sub', f'{root}/aside/sub-1')
  assert sorted(storage.listdir(root)) == ['a.json', 'aside']
  assert storage.read_bytes(f'{root}/aside/sub-1/b.bin') == b'\0\1'
  storage.remove(f'{root}/a.json')
  assert storage.listdir(root) == ['aside']
  assert storage.absolute(root) == root and storage.absolute('x') == os.path.abspath('x')


def test_a_bucket_that_is_not_there_refuses_or_is_not_gcs_is_named_by_the_script(bucket):
  results = script_cases.run({
      'missing': ('train.py', ['--config=configs/shakespeare_char.py:tiny',
                               '--workdir=gs://no-such-bucket/run']),
      's3': ('decode.py', ['--workdir=s3://bucket/run', '--prompt=a']),
      'refused': ('train.py', ['--config=configs/shakespeare_char.py:tiny',
                               f'--workdir=gs://{gcs_emulator.READ_ONLY}/run']),
  }, env=bucket)
  assert results['missing'].returncode == 1 and results['missing'].stderr == (
      'error: gs://no-such-bucket/run: there is no bucket gs://no-such-bucket that these '
      'credentials can see; create it (gcloud storage buckets create gs://no-such-bucket) or '
      'name another.\n'), results['missing']
  assert results['s3'].returncode == 1 and results['s3'].stderr.startswith(
      'error: s3://bucket/run/config.json: lmjax reaches buckets at gs:// only'), results['s3']
  assert not storage.exists('gs://no-such-bucket')
  # A bucket the credentials may read but not write: its 403 in one line, not gcsfs's
  # exception.
  refused = results['refused']
  assert refused.returncode == 1 and refused.stderr.count('\n') == 1, refused
  assert refused.stderr.startswith(f'error: gs://{gcs_emulator.READ_ONLY}/run/'), refused
  assert (f'the bucket refused it ({gcs_emulator.FORBIDDEN[:-1]}). Give the credentials this '
          'process uses (GOOGLE_APPLICATION_CREDENTIALS') in refused.stderr, refused


def test_a_run_in_a_bucket_stops_resumes_exactly_decodes_evaluates_and_sweeps(
    bucket, tmp_path):
  workdir = f'{BUCKET}/run'
  command = [sys.executable, os.path.join(REPO, 'experiments', 'train.py'),
             '--config=configs/shakespeare_char.py:tiny', f'--workdir={workdir}', *FLAGS]
  # 1. SIGTERM at the first progress line (step 4): the run stops after the step it is in,
  # with that step's checkpoint complete in the bucket.
  proc = subprocess.Popen(command, cwd=REPO, env=bucket, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step      4/'):
      proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = ''.join(lines)
  assert proc.returncode == 0 and 'Stopped by SIGTERM at step ' in out, out[-3000:]
  stopped = int(out.split('Stopped by SIGTERM at step ')[1].split()[0])
  assert 4 <= stopped < 8, out[-3000:]  # before the first periodic checkpoint
  assert ckpt_lib.complete_steps(workdir)[-1] == stopped
  assert {'config.json', 'tokenizer.json', 'checkpoints'} <= set(storage.listdir(workdir))

  # 2. The same command resumes from it and finishes; the parameters are those of a run
  # never stopped, bit for bit, and the event files in the bucket hold the whole run.
  done = subprocess.run(command, cwd=REPO, env=bucket, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert f'Resuming from step {stopped} of {TRAIN["num_steps"]}' in done.stdout
  config = shakespeare_char.get_config('tiny')
  config.train.update(TRAIN)
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)
  _, _, params, step = workdir_lib.load_trained(workdir)
  _, _, expected, _ = workdir_lib.load_trained(reference)
  assert step == TRAIN['num_steps']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(expected))
  assert storage.exists(f'{workdir}/result.json')
  logged = events.read_scalars(workdir, ['train/loss', 'eval/loss'])
  assert sorted(logged['train/loss']) == [4, 8, 12, 16, 20, 24]
  assert list(logged['eval/loss']) == [24]

  # 3. Decoding and evaluation read the run from the bucket.
  results = script_cases.run({
      'decode': ('decode.py', [f'--workdir={workdir}', '--prompt=ROMEO:', '--max_new_tokens=8',
                               '--strategy=greedy']),
      'evaluate': ('evaluate.py', [f'--workdir={workdir}', '--split=validation']),
  }, env=bucket)
  for name, result in results.items():
    assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-2000:])
  assert results['decode'].stdout.startswith(f'# {workdir}, step 24, greedy\nROMEO:'), \
      results['decode'].stdout
  assert 'loss' in results['evaluate'].stdout, results['evaluate'].stdout

  # 4. A sweep keeps its record, its point's workdir and its summary in the bucket (one point:
  # tests/test_sweep.py runs several, in parallel).
  config_file = tmp_path / 'sweep_config.py'
  config_file.write_text(SWEEP_CONFIG.format(
      path=os.path.join(REPO, 'configs', 'shakespeare_char.py'), train=TRAIN))
  root = f'{BUCKET}/sweep'
  done = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
                         f'--config={config_file}', f'--workdir={root}'],
                        cwd=REPO, env=bucket, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  names = sweep.point_names(sweep.grid({'opt.lr': [1e-2]}))
  for name in names:
    assert sweep.point_status(f'{root}/{name}') == 'finished'
    assert 'Compiled in' in storage.read_text(f'{root}/{name}/train.log')
  assert {'sweep.json', 'summary.md', 'summary.csv', 'curves.png'} <= set(
      storage.listdir(root))
  assert all(name in storage.read_text(f'{root}/summary.md') for name in names)
