"""experiments/benchmark.py runs end to end on a tiny model and prints what it promises."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(*flags):
  env = dict(os.environ, XLA_FLAGS='')
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'benchmark.py'), *flags],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_decode_benchmark_prints_one_json_object_per_case_and_a_table():
  done = _benchmark('--config=configs/shakespeare_char.py:tiny', '--bench=decode',
                    '--batch_sizes=1,2', '--strategies=greedy,beam2', '--prompt_len=4',
                    '--new_tokens=6', '--repeats=1', '--table')
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  rows = [json.loads(line) for line in lines if line.startswith('{')]
  assert [(r['batch'], r['strategy']) for r in rows] == [
      (1, 'greedy'), (1, 'beam2'), (2, 'greedy'), (2, 'beam2')]
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
