"""experiments/benchmark.py runs end to end on a tiny model and prints what it promises."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(*flags):
  env = dict(os.environ, XLA_FLAGS='')
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'benchmark.py'), *flags],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_decode_benchmark_prints_one_json_object_per_case_and_a_table():
  done = _benchmark('--config=configs/shakespeare_char.py:tiny', '--bench=decode',
                    '--batch_sizes=2', '--strategies=greedy,beam2', '--prompt_len=4',
                    '--new_tokens=6', '--repeats=1', '--table')
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  rows = [json.loads(line) for line in lines if line.startswith('{')]
  assert [(r['batch'], r['strategy']) for r in rows] == [(2, 'greedy'), (2, 'beam2')]
  for r in rows:
    assert r['impl'] == 'lmjax' and r['model'] == '2x64' and r['new_tokens'] == 6
    for field in ('prefill_ms', 'cached_step_ms', 'recompute_step_ms', 'generate_s',
                  'tokens_per_s'):
      assert r[field] > 0, field
  assert any(line.startswith('| lmjax | 2x64 | 2 | beam2 |') for line in lines)


def test_decode_benchmark_rejects_lengths_beyond_the_context():
  done = _benchmark('--config=configs/shakespeare_char.py:tiny', '--prompt_len=30',
                    '--new_tokens=30')
  assert done.returncode != 0
  assert 'model.max_len=32' in done.stderr and 'Traceback' not in done.stderr


def test_train_pipeline_and_checkpoint_benchmarks_report_their_figures():
  done = _benchmark('--config=configs/shakespeare_char.py:tiny', '--bench=train',
                    '--bench=pipeline', '--bench=checkpoint', '--steps=2', '--warmup=1',
                    '--pipeline_batches=20', '--table')
  assert done.returncode == 0, done.stderr
  rows = {r['bench']: r for r in (json.loads(line) for line in done.stdout.splitlines()
                                  if line.startswith('{'))}
  train, data, ckpt = rows['train'], rows['pipeline'], rows['checkpoint']
  assert train['model'] == '2x64' and train['batch'] == 16 and train['seq_len'] == 32
  assert train['step_ms'] > 0 and 0 < train['mfu'] < 1 and train['peak_memory_gb'] > 0
  # 6N + 12 L d T with N the 106,304 parameters less the 32 x 64 position table.
  assert train['flops_per_token'] == 6 * (106304 - 32 * 64) + 12 * 2 * 64 * 32
  assert data['dataset'] == 'shakespeare' and data['tokens_per_s'] > 0
  assert data['times_training'] == pytest.approx(
      data['tokens_per_s'] / train['tokens_per_s'], rel=0.01)
  assert ckpt['bytes'] > 4 * 106304  # the params alone, in float32
  assert 0 < ckpt['save_blocking_s'] <= ckpt['save_total_s']
  assert 'checkpoint:' in done.stdout and 'pipeline:' in done.stdout


def test_recurrent_train_benchmark_times_pytorch_beside_lmjax():
  done = _benchmark('--config=configs/rnn_shakespeare_char.py:tiny', '--bench=train',
                    '--bench=decode', '--compare_torch', '--steps=2', '--warmup=1',
                    '--batch_sizes=2', '--strategies=greedy', '--prompt_len=4',
                    '--new_tokens=40', '--repeats=1')
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  lmjax, torch, decode = rows
  assert lmjax['impl'] == 'lmjax' and torch['impl'].endswith('nn.LSTM')
  assert lmjax['model'] == torch['model'] == 'lstm 1x64'
  # 1x64 LSTM over 32-wide embeddings, untied output over the 65 characters the benchmark
  # assumes: 6 FLOPs per matmul weight (biases included, the embedding lookup not).
  weights = 32 * 4 * 64 + 64 * 4 * 64 + 4 * 64 + 64 * 65 + 65
  assert lmjax['flops_per_token'] == torch['flops_per_token'] == 6 * weights
  assert lmjax['params'] == weights + 65 * 32
  assert torch['params'] == lmjax['params'] + 4 * 64  # PyTorch's second bias vector
  assert torch['lmjax_speedup'] == pytest.approx(
      lmjax['tokens_per_s'] / torch['tokens_per_s'], rel=0.01)
  assert decode['bench'] == 'decode' and decode['tokens_per_s'] > 0  # no context bound


def test_compare_torch_needs_a_recurrent_train_benchmark():
  done = _benchmark('--config=configs/shakespeare_char.py:tiny', '--bench=train',
                    '--compare_torch', '--steps=1')
  assert done.returncode != 0
  assert '--compare_torch' in done.stderr and 'Traceback' not in done.stderr
