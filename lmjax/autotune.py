"""train.autotune: the settings of the train step chosen by timing them on this machine.

Settings that leave the model and its updates as they are can still move the step time by
tens of percent, and which is fastest depends on the machine: how many slices the batch is
accumulated in (train.microbatches), causal attention in blocks (model.attention_block),
which attention kernel (model.attention), what the backward pass recomputes (model.remat)
and, on a CPU, how many devices the host is presented as (mesh.cpu_devices). Before a run
with train.autotune=True, `search` takes one field at a time: its candidate values, the
other fields at the best found so far, are compiled; those whose compiled step does not fit
in a device's memory (XLA's memory analysis, as training itself checks) are refused; the
others race, a step each in turn on the run's first batch, and the lowest median wins. A
second pass over the fields finds settings that win only together. A field named in
train.autotune_pinned keeps the config's value.

The choice is kept three ways: in the workdir's config.json (a resume takes it from
there), in a cache file keyed by everything that decides the step's speed (the model, the
batch's shapes, the optimizer, the mesh, the device kind and count, the JAX version), so
that a second run of the same model on the same machine does not time again, and in the
run's TensorBoard text and result.json. Timing trains a throwaway copy of the state; the
run itself starts from its own initialisation, and what it computes differs only as the
chosen settings document (float rounding, dropout masks drawn per slice).
"""
import dataclasses
import datetime
import hashlib
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import optim, runtime, sharding, state as state_lib, steps, storage
from lmjax.data import pipeline
from lmjax.errors import UserError
from lmjax.models import transformer

# A candidate whose first timed step is this much slower than the fastest of its race is not
# timed further: it cannot win.
GIVE_UP_RATIO = 1.5
# Passes over the fields: a second one finds pairs of settings that win only together.
PASSES = 2
# A candidate's steps are timed (after one untimed) train.autotune_steps times, more where
# they add up to less than MIN_SECONDS (a few milliseconds' steps vary more than settings
# move them; MAX_STEPS at most), fewer where MAX_SECONDS are timed already (at least one).
MIN_SECONDS, MAX_SECONDS = 0.3, 10.0
MAX_STEPS = 50


@dataclasses.dataclass
class Trial:
  """One candidate: its settings (field -> value), and what timing it found."""
  settings: dict
  compile_s: float = 0.0
  step_s: float | None = None  # median of the timed steps
  peak_bytes: int | None = None  # XLA's memory analysis of the compiled step, per device
  verdict: str = ''


@dataclasses.dataclass
class Tuning:
  """The settings a run trains with, where they came from (search, cache or workdir), and
  the table of trials that chose them."""
  settings: dict
  source: str
  seconds: float
  table: str

  def as_result(self) -> dict:
    return {'settings': self.settings, 'source': self.source,
            'seconds': round(self.seconds, 1)}


def cache_path() -> str:
  """The cache of choices: autotune.json in the user's cache (`runtime.user_cache_dir`)."""
  return os.path.join(runtime.user_cache_dir(), 'autotune.json')


def searched_fields(config, mesh) -> tuple[str, ...]:
  """The fields autotune chooses for `config` on `mesh`: not the pinned ones, not the
  Transformer's for a recurrent model, the device count only for one process on a CPU."""
  fields = [f for f in config_lib.AUTOTUNE_FIELDS
            if f not in tuple(config.train.autotune_pinned)]
  if config.model.name != 'transformer':
    fields = [f for f in fields if not f.startswith('model.')]
  if mesh.devices.flat[0].platform != 'cpu' or jax.process_count() > 1:
    fields = [f for f in fields if f != 'mesh.cpu_devices']
  return tuple(fields)


def _get(config, field: str):
  section, name = field.split('.')
  return config[section][name]


def with_settings(config, settings: dict):
  config = config.copy_and_resolve_references()
  for field, value in settings.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


def submesh(config, mesh, settings: dict):
  """`mesh` or, where the settings choose fewer CPU devices, one over the first of them."""
  n = settings.get('mesh.cpu_devices')
  if not n or n == mesh.devices.size:
    return mesh
  return sharding.make_mesh(config.mesh, list(mesh.devices.flat)[:n])


def from_workdir(config, workdir: str):
  """(config, Tuning or None): with train.autotune, the settings the run in `workdir`
  chose when it started (its config.json), so that a resume trains as it began."""
  if not config.train.autotune:
    return config, None
  saved = config_lib.read_saved(workdir)
  if saved is None or not saved.train.autotune:
    return config, None
  pinned = tuple(config.train.autotune_pinned)
  settings = {f: _get(saved, f) for f in config_lib.AUTOTUNE_FIELDS if f not in pinned}
  print(f'Autotune: the settings this run chose when it started ({workdir}/config.json): '
        f'{_format(settings)}.', flush=True)
  return with_settings(config, settings), Tuning(settings, 'workdir', 0.0, '')


def settle(config, mesh, task, vocab_size: int, tuning: Tuning | None = None):
  """(config, mesh, Tuning): `tuning` if the workdir gave one; else the fastest settings
  for `config` from the cache, or found by `search` on the first batch of `task`'s training
  stream (and cached)."""
  if tuning is None:
    batch = next(task.train_dataset(0).as_numpy_iterator())
    key = cache_key(config, mesh, batch, vocab_size)
    # Several processes time together instead: each host's cache may hold another choice.
    cached = _read_cache().get(key) if jax.process_count() == 1 else None
    if cached is not None:
      print(f'Autotune: settings timed for this model and these devices on '
            f'{cached["date"]} ({cache_path()}): {_format(cached["settings"])}.', flush=True)
      tuning = Tuning(cached['settings'], 'cache', 0.0, cached['table'])
    else:
      began = time.perf_counter()
      settings, trials = search(config, mesh, batch, vocab_size)
      tuning = Tuning(settings, 'search', time.perf_counter() - began, markdown(trials))
      print(f'Autotune: {len(trials)} settings tried in {tuning.seconds:.1f} s; training '
            f'with {_format(settings)}.\n{tuning.table}', flush=True)
      _write_cache(key, {'settings': settings, 'table': tuning.table,
                         'seconds': round(tuning.seconds, 1),
                         'date': datetime.date.today().isoformat()})
  return (with_settings(config, tuning.settings), submesh(config, mesh, tuning.settings), tuning)


def search(config, mesh, batch: dict, vocab_size: int, *,
           memory_limit: int | None = None) -> tuple[dict, list[Trial]]:
  """(the fastest settings, every candidate in the order first compiled). One field at a
  time, its candidates (the other fields at the best so far) race: compiled, then timed a
  step each in turn, so that the machine's drift weighs on all alike. The fields are
  passed over again until a pass changes nothing (PASSES at most). `memory_limit` (bytes per
  device) replaces the device's own. Raises UserError if no candidate fits."""
  config_lib.validate_config(config, mesh)  # the config's own mistakes, named as such
  best = _own(config, mesh, searched_fields(config, mesh))
  fields = tuple(best)
  trials, runs, states = {}, {}, {}  # by settings: Trial, compiled step; state by device count
  for _ in range(PASSES):
    before = best
    for field in fields or (None,):
      # A field's candidates depend on the others' values (the device count on all devices).
      at = with_settings(config, best)
      on = mesh if field == 'mesh.cpu_devices' else submesh(at, mesh, best)
      group = [best] + [{**best, field: v} for v in ([] if field is None else
                                                      _candidates(at, on, field))]
      group = list({_key(g): g for g in group}.values())
      if len(group) == 1 and _key(best) in trials:
        continue
      for settings in group:
        if _key(settings) not in trials:
          trial, run = _compile(config, mesh, batch, vocab_size, settings, memory_limit, states)
          trials[_key(settings)], runs[_key(settings)] = trial, run
          if run is None:
            print(f'  autotune {_changes(settings, config, mesh)}: {trial.verdict}', flush=True)
      racing = [g for g in group if runs[_key(g)] is not None]
      _race([trials[_key(g)] for g in racing], [runs[_key(g)] for g in racing],
            config.train.autotune_steps, states)
      if field is not None and racing:
        print(f'  autotune {field} ({_changes(best, config, mesh)}): ' + ', '.join(
            f'{g[field]!r} {_describe(trials[_key(g)])}' for g in racing), flush=True)
      if racing:
        best = min(racing, key=lambda g: trials[_key(g)].step_s)
    if best == before:
      break
  if trials[_key(best)].step_s is None:
    raise UserError('train.autotune: no candidate setting fits in memory (see the lines '
                    'above); lower train.batch_size or train.seq_len, or pin fewer fields '
                    '(train.autotune_pinned).')
  trials[_key(best)].verdict = 'fastest'
  return best, list(trials.values())


def _key(settings: dict) -> tuple:
  return tuple(settings.items())


def _own(config, mesh, fields) -> dict:
  """The config's own value of each field; the device count is the mesh's."""
  return {f: mesh.devices.size if f == 'mesh.cpu_devices' else _get(config, f) for f in fields}


def _changes(settings: dict, config, mesh) -> str:
  own = _own(config, mesh, settings)
  changed = {f: v for f, v in settings.items() if v != own[f]}
  return _format(changed) if changed else 'the config as given'


def _candidates(config, mesh, field: str) -> list:
  """The values of `field` worth timing for `config` on `mesh`."""
  m, t = config.model, config.train
  if field == 'mesh.cpu_devices':
    n = mesh.devices.size
    return [d for d in range(1, n + 1) if n % d == 0]
  if field == 'train.microbatches':
    rows = t.batch_size // sharding.data_parallel_size(mesh)
    return [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= rows and rows % k == 0]
  if field == 'model.remat':
    return list(transformer.REMAT_POLICIES)
  if field == 'model.attention':  # a step with attention dropout runs the einsum path
    on_gpu = jax.default_backend() == 'gpu' and m.dtype == 'bfloat16'
    return [m.attention] if m.dropout > 0 else [
        a for a in transformer.ATTENTION_KINDS if a != 'cudnn' or on_gpu]
  if field == 'model.attention_block':  # blocks apply on the einsum path, causal
    if not (m.causal and (m.attention == 'einsum' or m.dropout > 0)):
      return [m.attention_block]
    return [0] + [b for b in (16, 32, 64, 128, 256, 512) if b < t.seq_len]
  raise ValueError(f'no candidates for {field}')


def _compile(config, mesh, batch: dict, vocab_size: int, settings: dict,
             memory_limit: int | None, states: dict):
  """(Trial, (compiled step, its batch, device count) or None where it cannot run): the
  train step of `config` with `settings`, its memory checked against the device's."""
  config = with_settings(config, settings)
  trial = Trial(settings)
  try:
    mesh = submesh(config, mesh, settings)
    config_lib.validate_config(config, mesh)
  except UserError as e:
    trial.verdict = f'not possible: {e}'
    return trial, None
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  n = mesh.devices.size
  if n not in states:  # one throwaway state per device count, passed from step to step
    states[n] = state_lib.create_train_state(
        model, tx, mesh, rules, config.train.seed, config.train.seq_len,
        carry_rows=state_lib.carry_rows(config))[0]
  step_fn = steps.jit_train_step(model, tx, mesh, rules,
                                 jax.tree.map(lambda x: x.sharding, states[n]),
                                 config.train.microbatches)
  on_mesh = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  began = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(states[n], on_mesh, jax.random.key(0)).compile()
  trial.compile_s = time.perf_counter() - began
  use = steps.memory_use(compiled, states[n], mesh)
  trial.peak_bytes, limit = use['step_peak_bytes'], memory_limit or use['limit_bytes']
  if trial.peak_bytes is not None and limit and trial.peak_bytes > limit:
    trial.verdict = f'does not fit: {_mib(trial.peak_bytes)} of {_mib(limit)}'
    return trial, None
  _step(compiled, on_mesh, n, states)  # the first run is not timed
  return trial, (compiled, on_mesh, n)


def _step(compiled, batch, n: int, states: dict) -> float:
  began = time.perf_counter()
  states[n], metrics = compiled(states[n], batch, jax.random.key(0))
  jax.block_until_ready((states[n], metrics))
  return _agreed(time.perf_counter() - began)


def _race(trials: list[Trial], runs: list, steps_wanted: int, states: dict) -> None:
  """Times the compiled steps of `runs` one step each in turn, round after round, until
  each has train.autotune_steps (see MIN_SECONDS and MAX_SECONDS); sets each trial's
  median. After the first round, one slower than GIVE_UP_RATIO x the fastest stops."""
  times = [[] for _ in runs]
  alive = list(range(len(runs)))
  for trial in trials:
    trial.verdict = ''
  while alive:
    for i in alive:
      times[i].append(_step(*runs[i], states))
    if len(times[alive[0]]) == 1:
      fastest = min(times[i][0] for i in alive)
      for i in [i for i in alive if times[i][0] > GIVE_UP_RATIO * fastest]:
        trials[i].verdict, alive = 'slower: timed once', [j for j in alive if j != i]
    alive = [i for i in alive if not _timed_enough(times[i], steps_wanted)]
  for trial, timed in zip(trials, times, strict=True):
    trial.step_s = statistics.median(timed)


def _timed_enough(times: list[float], steps: int) -> bool:
  if not times:
    return False
  if len(times) >= MAX_STEPS or sum(times) >= MAX_SECONDS:
    return True
  return len(times) >= steps and sum(times) >= MIN_SECONDS


def _agreed(seconds: float) -> float:
  """Process 0's time, on every process: all of them must choose alike."""
  if jax.process_count() == 1:
    return seconds
  from jax.experimental import multihost_utils
  return float(multihost_utils.broadcast_one_to_all(np.float64(seconds)))


def cache_key(config, mesh, batch: dict, vocab_size: int) -> str:
  """What decides which settings are fastest: the model and optimizer, the batch's fields
  and shapes, the searched fields and the pinned ones' values, the mesh, the devices."""
  fields = searched_fields(config, mesh)
  model = {k: v for k, v in config.model.to_dict().items() if f'model.{k}' not in fields}
  device = mesh.devices.flat[0]
  described = {
      'model': model, 'opt': config.opt.to_dict(), 'vocab_size': vocab_size,
      'batch': {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in batch.items()},
      'train': {k: config.train[k] for k in ('batch_size', 'seq_len', 'stateful')},
      'searched': fields,
      'pinned': {f: _get(config, f) for f in config_lib.AUTOTUNE_FIELDS if f not in fields},
      'mesh': {'shape': list(config.mesh.shape), 'dcn_shape': list(config.mesh.dcn_shape),
               'rules': json.loads(json.dumps(config.mesh.rules, default=list))},
      'devices': [device.platform, device.device_kind, mesh.devices.size,
                  jax.process_count()],
      'jax': jax.__version__}
  return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()
                        ).hexdigest()[:24]


def _read_cache() -> dict:
  path = cache_path()
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    print(f'note: the autotune cache {path} could not be read ({e}); timing again.')
    return {}


def _write_cache(key: str, entry: dict) -> None:
  """Adds `entry`; the file is replaced whole, so a reader never sees half of it."""
  if jax.process_index() != 0:
    return
  path = cache_path()
  try:
    entries = {**_read_cache(), key: entry}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_text(path, json.dumps(entries, indent=1))
  except OSError as e:
    print(f'note: the autotune choice could not be cached in {path} ({e}); the next run '
          'times again.')


def _describe(trial: Trial) -> str:
  """The median step, in a race's line."""
  return f'{1e3 * trial.step_s:,.1f} ms' + (f' ({trial.verdict})' if trial.verdict else '')


def _format(settings: dict) -> str:
  return ', '.join(f'{f}={v!r}' for f, v in settings.items()) or 'nothing to choose'


def _mib(n: int) -> str:
  return f'{n / 2**20:,.0f} MiB'


def markdown(trials: list[Trial]) -> str:
  """The trials as a Markdown table, in the order first compiled."""
  fields = list(trials[0].settings) if trials else []
  rows = [fields + ['compile s', 'step ms', 'peak MiB', ''],
          ['---'] * (len(fields) + 4)]
  for t in trials:
    rows.append([repr(t.settings[f]) for f in fields] + [
        f'{t.compile_s:.1f}', '' if t.step_s is None else f'{1e3 * t.step_s:,.1f}',
        '' if t.peak_bytes is None else f'{t.peak_bytes / 2**20:,.0f}', t.verdict])
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)
