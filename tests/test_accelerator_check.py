"""experiments/accelerator_check.py runs every measurement end to end with --tiny on the CPU,
prints its table, writes its JSON, projects the Shakespeare run from its parts, and refuses
to run full size without an accelerator."""
import importlib.util
import json
import os

import pytest

from tests import script_cases, xla


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{case: Result} and the JSON the tiny run wrote."""
  output = tmp_path_factory.mktemp('check') / 'check.json'
  results = script_cases.run(
      {'tiny': ('accelerator_check.py', ['--tiny', f'--output={output}']),
       'cpu': ('accelerator_check.py', [])},
      env=dict(os.environ, XLA_FLAGS=xla.flags()))
  return results, json.loads(output.read_text()) if output.exists() else None


def test_the_tiny_run_makes_every_measurement_and_prints_one_table(runs):
  results, report = runs
  done = results['tiny']
  assert done.returncode == 0, done.stderr[-3000:]
  assert report['platform'] == 'cpu' and report['tiny'] is True
  m = report['measurements']
  assert m['gpt2_train_cudnn'] == {
      'skipped': 'cuDNN attention needs an NVIDIA GPU; this is a cpu'}
  gpt2 = m['gpt2_train_xla']
  assert (gpt2['model'], gpt2['dtype'], gpt2['vocab'], gpt2['batch']) == (
      '1x32', 'bfloat16', 256, 4)
  assert gpt2['tokens_per_s'] > 0 and 0 < gpt2['mfu'] < 1
  assert m['shakespeare_train']['vocab'] == 85
  (lmjax,) = m['decode_lmjax']['runs']
  assert (lmjax['batch'], lmjax['new_tokens']) == (2, 8) and lmjax['tokens_per_s'] > 0
  if importlib.util.find_spec('transformers') and importlib.util.find_spec('torch'):
    (hf,) = m['decode_hf']['runs']
    assert hf['impl'].startswith('hf-transformers') and hf['tokens_per_s'] > 0
  else:
    assert 'not installed' in m['decode_hf']['skipped']
  lines = done.stdout.splitlines()
  assert '| measurement | tokens_per_s | mfu | ms | compile_s | note |' in lines
  rows = [line for line in lines if line.startswith('| GPT-2') or line.startswith('| shakes')]
  assert len(rows) == len(report['table']) == 6
  # The JSON lines of benchmark.py go to stderr, as progress: stdout is the table.
  assert not any(line.startswith('{') for line in lines)


def test_the_whole_shakespeare_run_is_projected_from_its_step_and_its_saves(runs):
  _, report = runs
  m = report['measurements']
  train, save = m['shakespeare_train'], m['shakespeare_checkpoint']
  projection = train['projection']
  # configs/shakespeare_char.py:full: 5000 steps, a checkpoint every 500, an evaluation
  # every 250 (not counted).
  assert (projection['num_steps'], projection['checkpoint_saves'],
          projection['evaluations_not_counted']) == (5000, 10, 20)
  expected = train['compile_s'] + 5000 * train['step_ms'] / 1e3 + 10 * save['save_blocking_s']
  assert projection['projected_s'] == pytest.approx(expected, abs=0.1)
  row = next(r for r in report['table'] if r['measurement'].startswith('shakespeare'))
  assert f'projected {projection["projected_min"]} min' in row['note']


def test_without_an_accelerator_it_asks_for_one_or_for_tiny(runs):
  results, _ = runs
  error = script_cases.error_line(results['cpu'])
  assert 'finds no GPU or TPU' in error and '--tiny' in error
