"""train.autotune: candidates timed on the test's fake CPU devices, on one layer and a share
of the batch, the ones that do not fit refused, pinned fields kept, a change taken only
where it is a measured gain, and the choice taken from the workdir on resume and from the
cache in a new workdir."""
import json
import os
import re

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import autotune, sharding, train
from lmjax.errors import UserError

# Everything but the batch's slices keeps the config's value: two or three trials a search.
PINNED = ('mesh.cpu_devices', 'model.attention', 'model.attention_block', 'model.remat')


def tiny_config(**train_fields):
  config = shakespeare_char.get_config('tiny')
  config.train.update({**dict(autotune=True, autotune_pinned=PINNED, autotune_steps=1,
                              num_steps=4, eval_every=4, checkpoint_every=4, sample_tokens=0),
                       **train_fields})
  config.opt.warmup_steps = 1
  config.mesh.cpu_devices = 8  # the recipe's one device would time 5 slicings, not 2
  return config


def _batch(config, vocab_size: int) -> dict:
  t = config.train
  tokens = np.random.default_rng(0).integers(0, vocab_size, (t.batch_size, t.seq_len + 1),
                                             dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def test_slices_that_do_not_fit_are_refused_and_pinned_fields_are_not_searched():
  config = tiny_config(batch_size=2)  # on one device: the batch whole, or 2 slices of a row
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch = _batch(config, 65)
  _, trials = autotune.search(config, mesh, batch, 65)
  assert [t.settings for t in trials] == [{'train.microbatches': k} for k in (1, 2)]
  whole, sliced = (t.peak_bytes for t in trials)
  assert whole > sliced  # the whole batch's activations at once
  # A device that holds less than the whole batch's step needs: only the slices are timed.
  chosen, trials = autotune.search(config, mesh, batch, 65,
                                   memory_limit=(whole + sliced) // 2)
  assert trials[0].verdict.startswith('does not fit') and trials[0].step_s is None
  assert chosen == {'train.microbatches': 2} and trials[1].verdict == 'fastest'
  with pytest.raises(UserError, match='no candidate setting fits in memory'):
    autotune.search(config, mesh, batch, 65, memory_limit=sliced // 2)
  table = autotune.markdown(trials)
  assert table.splitlines()[0].startswith(
      '| train.microbatches | rows | compile s | 1-layer step ms | peak MiB (bound) |')
  assert 'does not fit' in table and 'fastest' in table


def test_slices_race_on_four_slices_of_the_fewest_sliced_and_one_layer(capsys):
  config = tiny_config(batch_size=16)  # on one device: 1, 2, 4, 8 or 16 slices
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  chosen, trials = autotune.search(config, mesh, _batch(config, 65), 65)
  lines = capsys.readouterr().out.splitlines()
  # 4, 8 and 16 slices race on a quarter of the batch, 4 rows; then, while the fewest so far
  # wins, 2 slices against 4 on 8 rows and 1 against 2 on all 16.
  races = [('the config as given', 4, (4, 8, 16)), ('train.microbatches=4', 8, (4, 2)),
           ('train.microbatches=2', 16, (2, 1))][:len(lines)]
  assert len(lines) == {16: 1, 8: 1, 4: 2, 2: 3, 1: 3}[chosen['train.microbatches']], lines
  for line, (says, rows, counts) in zip(lines, races, strict=True):
    assert line.startswith(f'  autotune train.microbatches ({says}, {rows} rows): '), line
    assert [int(k) for k in re.findall(r'(?:: |, )(\d+) [\d,.]+ ms', line)] == list(counts)
  assert [(t.settings['train.microbatches'], t.rows) for t in trials] == [
      (k, rows) for _, rows, counts in races for k in counts]
  # The bound on the two-layer model's peak: twice the one layer's.
  config.model.num_layers = 1
  _, one_layer = autotune.search(config, mesh, _batch(config, 65), 65)
  assert one_layer[0].settings == trials[0].settings
  assert one_layer[0].peak_bytes * 2 == trials[0].peak_bytes
  assert autotune._timed_rows(16, [4, 8, 16]) == 4
  assert autotune._timed_rows(16, [8]) == 4 and autotune._timed_rows(16, [1, 4]) == 16
  assert autotune._timed_rows(12, [3]) == 12 and autotune._timed_rows(6, [4]) == 6


def test_attention_runs_whole_or_in_four_blocks():
  config = shakespeare_char.get_config('full')  # causal, with dropout: the einsum path
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  assert autotune._candidates(config, mesh, 'model.attention_block') == [0, 64]
  config.train.seq_len = 32  # blocks of 8 queries: too small to pay
  assert autotune._candidates(config, mesh, 'model.attention_block') == [0]
  config.model.dropout = 0.0  # the backend's kernel: no blocks
  assert autotune._candidates(config, mesh, 'model.attention_block') == [0]
  assert shakespeare_char.get_config('full').train.autotune_pinned == ('mesh.cpu_devices',)


def _fake_clock(monkeypatch, times: dict, fields: tuple[str, ...]):
  """Each race's times taken from `times` (by the values of `fields`), not a clock."""
  def race(trials, runs, steps_wanted, states):
    for t in trials:
      t.step_s = times[tuple(t.settings[f] for f in fields)]
  monkeypatch.setattr(autotune, '_race', race)


def test_remat_races_only_where_memory_is_short(monkeypatch):
  config = tiny_config(batch_size=2, autotune_pinned=PINNED[:-1])  # slices and remat
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch = _batch(config, 65)
  _fake_clock(monkeypatch, {(1, 'none'): 1.0, (2, 'none'): 0.95, (2, 'full'): 0.9,
                            (2, 'save_dots'): 0.92}, ('train.microbatches', 'model.remat'))
  # All fits without remat, so remat is not timed.
  chosen, trials = autotune.search(config, mesh, batch, 65)
  assert chosen == {'train.microbatches': 2, 'model.remat': 'none'}
  assert [(t.settings['model.remat'], t.rows) for t in trials] == [('none', 2), ('none', 2)]
  # The whole batch does not fit: remat races, at the slices that won, on half the batch
  # (the one row that 2 slices divide).
  chosen, trials = autotune.search(config, mesh, batch, 65,
                                   memory_limit=trials[0].peak_bytes - 1)
  assert chosen == {'train.microbatches': 2, 'model.remat': 'full'}
  assert [(t.settings['model.remat'], t.rows) for t in trials] == [
      ('none', 2), ('none', 2), ('none', 1), ('full', 1), ('save_dots', 1)]


def test_another_device_count_must_be_a_measured_gain(monkeypatch):
  config = tiny_config(batch_size=2, autotune_pinned=PINNED[1:])  # slices and devices
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])  # one row on each
  batch = _batch(config, 65)
  times = {(2,): 1.0, (1,): 0.99}
  _fake_clock(monkeypatch, times, ('mesh.cpu_devices',))
  # One device 1% faster: within what the cut-down model misjudges, so two stay.
  chosen, trials = autotune.search(config, mesh, batch, 65)
  assert chosen == {'mesh.cpu_devices': 2, 'train.microbatches': 1}
  assert [t.settings['mesh.cpu_devices'] for t in trials] == [2, 1]
  times[1,] = 0.95
  chosen, _ = autotune.search(config, mesh, batch, 65)
  assert chosen == {'mesh.cpu_devices': 1, 'train.microbatches': 1}


def _result(workdir) -> dict:
  with open(os.path.join(workdir, 'result.json')) as f:
    return json.load(f)


def test_the_choice_is_cached_and_a_resume_keeps_its_own(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  train.train_and_evaluate(tiny_config(), first)
  out = capsys.readouterr().out
  assert 'Autotune: 2 trials in' in out, out  # 16 rows on 8 devices: 1 or 2 slices
  assert '| train.microbatches | rows | compile s |' in out
  chosen = _result(first)['autotune']
  assert chosen['source'] == 'search' and chosen['settings'].keys() == {'train.microbatches'}
  # The cache says the other slicing, as if a later search had found it faster.
  with open(autotune.cache_path()) as f:
    cache = json.load(f)
  (key, entry), = cache.items()
  other = 3 - chosen['settings']['train.microbatches']
  entry['settings'] = {'train.microbatches': other}
  with open(autotune.cache_path(), 'w') as f:
    json.dump(cache, f)

  # Resumed (here: finished, so nothing is trained), the run keeps what it chose, though
  # the command's config and the cache say otherwise; the config check does not refuse it.
  train.train_and_evaluate(tiny_config(), first)
  out = capsys.readouterr().out
  assert 'the settings this run chose when it started' in out and 'trials in' not in out, out
  assert _result(first)['autotune']['settings'] == chosen['settings']

  # A new run of the same model on the same devices takes the cache's choice, untimed.
  train.train_and_evaluate(tiny_config(), second)
  out = capsys.readouterr().out
  assert 'settings timed for this model and these devices on' in out, out
  assert 'trials in' not in out
  result = _result(second)['autotune']
  assert result == {'settings': {'train.microbatches': other}, 'source': 'cache',
                    'seconds': 0.0}
  with open(os.path.join(second, 'config.json')) as f:
    assert json.load(f)['train']['microbatches'] == other


def test_the_cache_key_is_what_decides_the_speed():
  mesh = sharding.make_mesh(tiny_config().mesh)
  key = lambda config: autotune.cache_key(config, mesh, _batch(config, 65), 65)
  same = key(tiny_config())
  assert key(tiny_config(num_steps=8, seed=3)) == same  # the run's length, its data order
  for changed in (tiny_config(seq_len=16), tiny_config(autotune_pinned=PINNED[1:])):
    assert key(changed) != same
  wider = tiny_config()
  wider.model.d_model = 32
  assert key(wider) != same
