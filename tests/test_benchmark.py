"""experiments/benchmark.py runs end to end on a tiny model and prints what it promises."""
import json
import math
import os

import pytest

from tests import script_cases, xla
from tests.data import test_tokenizers

TINY = '--config=configs/shakespeare_char.py:tiny'
CASES = {
    'decode': [TINY, '--bench=decode', '--batch_sizes=2', '--strategies=greedy,beam2',
               '--prompt_len=4', '--new_tokens=6', '--repeats=1', '--table'],
    'too_long': [TINY, '--prompt_len=30', '--new_tokens=30'],
    'train': [TINY, '--bench=train', '--bench=pipeline', '--bench=checkpoint', '--steps=2',
              '--warmup=1', '--pipeline_batches=20', '--table'],
    'recurrent': ['--config=configs/rnn_shakespeare_char.py:tiny', '--bench=train',
                  '--bench=matmul', '--bench=decode', '--compare_torch', '--steps=2',
                  '--warmup=1', '--batch_sizes=2', '--strategies=greedy', '--prompt_len=4',
                  '--new_tokens=40', '--repeats=1'],
    'torch_without_recurrent': [TINY, '--bench=train', '--compare_torch', '--steps=1'],
    'matmul_of_a_transformer': [TINY, '--bench=matmul'],
    'tokenize': [TINY, '--bench=tokenize', '--tokenize_mb=1'],
    # train.autotune's search, then the train step with its choice: batch slices only.
    'autotune': [TINY, '--bench=train', '--autotune', '--steps=1', '--warmup=0',
                 '--config.train.batch_size=4', '--config.train.autotune_steps=1',
                 "--config.train.autotune_pinned=('model.attention','model.attention_block',"
                 "'model.remat')"],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every case of CASES as `python experiments/benchmark.py ...` on one device, and GPT-2's
  BPE (a small hand-made one) encoded beside Hugging Face's encoder."""
  gpt2 = tmp_path_factory.mktemp('gpt2')
  test_tokenizers._write_gpt2_files(gpt2)
  cases = {**CASES, 'tokenize_gpt2': [
      TINY, '--bench=tokenize', '--tokenize_mb=1', '--compare_hf', '--table',
      '--config.data.tokenizer=gpt2_bpe', f'--config.data.tokenizer_dir={gpt2}']}
  return script_cases.run({key: ('benchmark.py', flags) for key, flags in cases.items()},
                          env=dict(os.environ, XLA_FLAGS=xla.flags()))


def test_decode_benchmark_prints_one_json_object_per_case_and_a_table(runs):
  done = runs['decode']
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


def test_decode_benchmark_rejects_lengths_beyond_the_context(runs):
  assert 'model.max_len=32' in script_cases.error_line(runs['too_long'])


def test_train_pipeline_and_checkpoint_benchmarks_report_their_figures(runs):
  done = runs['train']
  assert done.returncode == 0, done.stderr
  rows = {r['bench']: r for r in (json.loads(line) for line in done.stdout.splitlines()
                                  if line.startswith('{'))}
  train, data, ckpt = rows['train'], rows['pipeline'], rows['checkpoint']
  assert train['model'] == '2x64' and train['batch'] == 16 and train['seq_len'] == 32
  assert train['step_ms'] > 0 and 0 < train['mfu'] < 1 and train['peak_memory_gb'] > 0
  # 6N + 12 L d T with N the 107,584 parameters (the training run's: 85 characters) less the
  # 32 x 64 position table.
  assert train['vocab'] == 85
  assert train['flops_per_token'] == 6 * (107584 - 32 * 64) + 12 * 2 * 64 * 32
  assert data['dataset'] == 'shakespeare' and data['tokens_per_s'] > 0
  assert data['times_training'] == pytest.approx(
      data['tokens_per_s'] / train['tokens_per_s'], rel=0.01)
  assert ckpt['bytes'] > 4 * 107584  # the params alone, in float32
  assert 0 < ckpt['save_blocking_s'] <= ckpt['save_total_s']
  assert 0 < ckpt['first_save_blocking_s']
  assert 'checkpoint:' in done.stdout and 'pipeline:' in done.stdout


def test_recurrent_train_benchmark_times_pytorch_beside_lmjax(runs):
  done = runs['recurrent']
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  matmuls = [r for r in rows if r['bench'] == 'matmul']
  lmjax, torch, decode = [r for r in rows if r['bench'] != 'matmul']
  assert lmjax['impl'] == 'lmjax' and torch['impl'].endswith('nn.LSTM')
  assert lmjax['model'] == torch['model'] == 'lstm 1x64'
  # 1x64 LSTM over 32-wide embeddings, untied output over Shakespeare's 85 characters (as
  # training builds the vocabulary): 6 FLOPs per matmul weight (biases included, the
  # embedding lookup not).
  weights = 32 * 4 * 64 + 64 * 4 * 64 + 4 * 64 + 64 * 85 + 85
  assert lmjax['flops_per_token'] == torch['flops_per_token'] == 6 * weights
  assert lmjax['params'] == weights + 85 * 32
  assert torch['params'] == lmjax['params'] + 4 * 64  # PyTorch's second bias vector
  assert torch['lmjax_speedup'] == pytest.approx(  # rounded to two decimals
      lmjax['tokens_per_s'] / torch['tokens_per_s'], rel=0.01, abs=0.005)
  assert decode['bench'] == 'decode' and decode['tokens_per_s'] > 0  # no context bound
  # --bench=matmul: the products of one step, in XLA and in PyTorch, then their sums. Their
  # FLOPs are 6 per weight of the matmul matrices (no biases) per token of the 16 x 32 batch.
  for impl in ('xla', torch['impl'].split(' nn.')[0]):
    *products, total = [r for r in matmuls if r['impl'] == impl]
    assert total['product'] == 'all, one train step' and total['model'] == 'lstm 1x64'
    flops = sum(r['per_step'] * 2 * math.prod(map(int, r['shape'].split('x')))
                for r in products)
    assert flops == 6 * 16 * 32 * (32 * 4 * 64 + 64 * 4 * 64 + 64 * 85)
    assert [r['per_step'] for r in products if 'one step' in r['product']] == [32, 32]
    # Each row is rounded to 0.1 ms, the total from the unrounded times.
    assert total['step_ms'] == pytest.approx(sum(r['step_ms'] for r in products),
                                             abs=0.05 * len(products) + 0.05)
    assert all(r['ms'] > 0 and r['gflop_per_s'] > 0 for r in products)


def test_compare_torch_needs_a_recurrent_train_benchmark(runs):
  assert '--compare_torch' in script_cases.error_line(runs['torch_without_recurrent'])


def test_matmul_benchmark_is_for_recurrent_configs(runs):
  assert '--bench=matmul' in script_cases.error_line(runs['matmul_of_a_transformer'])


def test_autotune_prints_its_search_and_benchmarks_the_choice(runs):
  done = runs['autotune']
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  tuned, train = rows
  assert tuned['bench'] == 'autotune' and tuned['seconds'] > 0
  # 4 slices against 2 on half the batch, then 1 against 2 on all of it if 2 won.
  trials = [(t['train.microbatches'], t['rows']) for t in tuned['trials']]
  assert trials in ([(4, 2), (2, 2)], [(4, 2), (2, 2), (2, 4), (1, 4)]), trials
  assert [t['verdict'] for t in tuned['trials']].count('fastest') == 1
  assert all(t['step_ms'] > 0 and t['peak_bytes'] > 0 for t in tuned['trials'])
  assert train['bench'] == 'train' and train['microbatches'] == (
      tuned['settings']['train.microbatches'])
  assert ('| mesh.cpu_devices | train.microbatches | rows | compile s | 1-layer step ms | '
          'peak MiB (bound) |') in done.stdout


def _rows(done) -> list[dict]:
  assert done.returncode == 0, done.stderr
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


def test_tokenize_benchmark_reports_rates_and_agrees_with_hugging_face(runs):
  (char,) = _rows(runs['tokenize'])
  assert (char['impl'], char['tokenizer']) == ('lmjax', 'char') and char['vocab'] > 50
  assert char['megabytes'] >= 1 and char['tokens'] == pytest.approx(1e6 * char['megabytes'],
                                                                    rel=0.01)
  assert char['tokens_per_s'] > 0 and char['tokens_per_cpu_s'] > 0 and char['peak_rss_mb'] > 0
  ours, theirs = _rows(runs['tokenize_gpt2'])
  assert (ours['impl'], theirs['impl']) == ('lmjax', 'tokenizers')
  assert ours['tokens'] == theirs['tokens'] > 0 and ours['same_ids'] and theirs['same_ids']
  assert '| lmjax | gpt2_bpe |' in runs['tokenize_gpt2'].stdout
