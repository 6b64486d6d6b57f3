"""train.autotune: candidates timed on the test's fake CPU devices, the ones that do not fit
refused, pinned fields kept, and the choice taken from the workdir on resume and from the
cache in a new workdir."""
import json
import os

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
  assert table.splitlines()[0].startswith('| train.microbatches | compile s | step ms |')
  assert 'does not fit' in table and 'fastest' in table


def _result(workdir) -> dict:
  with open(os.path.join(workdir, 'result.json')) as f:
    return json.load(f)


def test_the_choice_is_cached_and_a_resume_keeps_its_own(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  train.train_and_evaluate(tiny_config(), first)
  out = capsys.readouterr().out
  assert 'Autotune: 2 settings tried in' in out, out  # 16 rows on 8 devices: 1 or 2 slices
  assert '| train.microbatches | compile s |' in out
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
  assert 'the settings this run chose when it started' in out and 'tried in' not in out, out
  assert _result(first)['autotune']['settings'] == chosen['settings']

  # A new run of the same model on the same devices takes the cache's choice, untimed.
  train.train_and_evaluate(tiny_config(), second)
  out = capsys.readouterr().out
  assert 'settings timed for this model and these devices on' in out, out
  assert 'tried in' not in out
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
