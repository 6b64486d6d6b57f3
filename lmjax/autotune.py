"""train.autotune: the settings of the train step chosen by timing them on this machine.

Settings that leave the model and its updates as they are can still move the step time by
tens of percent, and which is fastest depends on the machine: how many slices the batch is
accumulated in (train.microbatches), causal attention in blocks (model.attention_block),
which attention kernel (model.attention), what the backward pass recomputes (model.remat)
and, on a CPU, how many devices the host is presented as (mesh.cpu_devices). Before a run
with train.autotune=True, `search` takes one field at a time: its candidate values, the
other fields at the best found so far, are compiled; those whose compiled step does not fit
in a device's memory (XLA's memory analysis, as training itself checks) are refused; the
others race, a step each in turn on the run's first batch, and the lowest median wins.
Each field races with the ones before it (SEARCH_ORDER) at their winners. A field named in
train.autotune_pinned keeps the config's value.

Every candidate is timed on the model cut to one layer (`cut_down`) and a share of the
batch (`_timed_rows`): the settings act on every layer alike (attention and remat inside a
layer, the slices on all of them), so a layer ranks them as the whole model does, and its
step compiles and runs in a fraction of the time (on a CPU, 2-3 s to compile against 3-10 s
for six layers). Its memory, times the layers, bounds the whole model's from above. The
CPU device split is the exception (DEVICES_MARGIN): it is pinned by default.

The choice is kept three ways: in the workdir's config.json (a resume takes it from
there), in a cache file keyed by everything that decides the step's speed (the model, the
batch's shapes, the optimizer, the mesh, the device kind and count, the JAX version), so
that a second run of the same model on the same machine does not time again, and in the
run's TensorBoard text and result.json. Timing trains a throwaway state; the run itself
starts from its own initialisation, and what it computes differs only as the chosen
settings document (float rounding, dropout masks drawn per slice).
"""
import dataclasses
import datetime
import functools
import hashlib
import json
import math
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
# timed further: a race's steps vary by a few percent, so it will not win.
GIVE_UP_RATIO = 1.2
# Another device count replaces the one so far only if it is faster by more than this. The
# one-layer model misjudges the CPU device split: on the whole batch of the :full recipe it
# put 1 and 2 devices within 1% in three of seven races and chose 1 in another, where the
# whole model ran 3-4% faster on 2 (and 9% in that run). train.autotune_pinned holds the
# split by default; unpinned, this margin keeps the config's unless the gain is clear.
DEVICES_MARGIN = 0.02
# The order the fields are searched in: the slices first, which move the step the most on
# a CPU and decide the rows the other races are timed on; each later field races with the
# earlier ones at their winners.
SEARCH_ORDER = ('train.microbatches', 'model.attention', 'model.attention_block',
                'model.remat', 'mesh.cpu_devices')
# A race times the candidates on 1/TIMED_SHARE of the batch, where each one's slices divide it.
TIMED_SHARE = 4
# The layers of the model that candidates are timed on.
TIMED_LAYERS = 1
# Causal attention in blocks: the candidate is this many blocks of queries to a row. With n
# blocks (n + 1) / 2n of the scores are computed: 75% at 2, 62.5% at 4, 56% at 8 for twice
# the unrolled blocks (each its own softmax and masks) and their compile time. On one layer
# of the :full recipe 2 and 4 blocks each won some of eight races, and 8 lost all three it
# ran in; on the whole model 4 ran level with 2 (docs/results.md).
BLOCKS = 4
# A candidate's steps are timed (after one untimed) train.autotune_steps times, more where
# they add up to less than MIN_SECONDS (a few milliseconds' steps vary more than settings
# move them; MAX_STEPS at most), fewer where MAX_SECONDS are timed already (at least one).
MIN_SECONDS, MAX_SECONDS = 0.15, 10.0
MAX_STEPS = 50
# Candidates whose medians are within CLOSE of the fastest's go on together, a step each a
# round, up to CLOSE_STEPS x train.autotune_steps, until one stands apart: settings a few
# percent apart need more steps than clearly slower ones.
CLOSE, CLOSE_STEPS = 1.04, 3


@dataclasses.dataclass
class Trial:
  """One candidate: its settings (field -> value), and what timing it found."""
  settings: dict
  rows: int = 0  # of the batch, timed
  compile_s: float = 0.0
  step_s: float | None = None  # median of the timed steps of the cut-down model
  # per device: XLA's memory analysis of the cut-down step, times the model's layers
  peak_bytes: int | None = None
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


def cut_down(config):
  """`config` with the model cut to TIMED_LAYERS layers: what candidates are timed on."""
  return with_settings(config, {
      'model.num_layers': min(TIMED_LAYERS, config.model.num_layers)})


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
      print(f'Autotune: {len(trials)} trials in {tuning.seconds:.1f} s; training '
            f'with {_format(settings)}.\n{tuning.table}', flush=True)
      _write_cache(key, {'settings': settings, 'table': tuning.table,
                         'seconds': round(tuning.seconds, 1),
                         'date': datetime.date.today().isoformat()})
  return (with_settings(config, tuning.settings), submesh(config, mesh, tuning.settings), tuning)


def search(config, mesh, batch: dict, vocab_size: int, *,
           memory_limit: int | None = None) -> tuple[dict, list[Trial]]:
  """(the fastest settings, every candidate in the order first compiled). One field at a
  time (SEARCH_ORDER), its candidates (the fields before it at their winners) race on the
  cut-down model: compiled, then timed a step each in turn, so that the machine's drift
  weighs on all alike. `memory_limit` (bytes per device) replaces the device's own. Raises
  UserError if no candidate fits."""
  config_lib.validate_config(config, mesh)  # the config's own mistakes, named as such
  best = _own(config, mesh, searched_fields(config, mesh))
  timer = _Timer(config, mesh, batch, vocab_size, memory_limit)
  for field in sorted(best, key=SEARCH_ORDER.index) or (None,):
    # A field's candidates depend on the others' values (the device count on all devices).
    at = with_settings(config, best)
    on = mesh if field == 'mesh.cpu_devices' else submesh(at, mesh, best)
    values = [] if field is None else _candidates(at, on, field)
    if field == 'model.remat' and best[field] == 'none' and not timer.refused:
      values = []  # recomputing only pays where memory is short: every slicing fitted
    if field == 'train.microbatches':
      best = _race_slices(timer, best, values)
    else:
      best = timer.race(field, best, [best] + [{**best, field: v} for v in values])
  return best, timer.finish(best)


def _race_slices(timer, best: dict, counts: list[int]) -> dict:
  """The slice counts of at least TIMED_SHARE race first, on 1/TIMED_SHARE of the batch;
  then, while the fewest so far wins, the next fewer against it, on twice the rows."""
  field = 'train.microbatches'
  many = [k for k in counts if k >= TIMED_SHARE]
  few = sorted((k for k in counts if k < TIMED_SHARE), reverse=True)
  if not many:  # a small batch: all at once
    return timer.race(field, best, [best] + [{**best, field: k} for k in few])
  if len(many) > 1 or best[field] in many:
    best = timer.race(field, best, ([best] if best[field] in many else []) +
                      [{**best, field: k} for k in many])
  else:  # one count of many slices: it meets the next fewer first
    best = {**best, field: many[0]}
  fewest = min(many)
  for k in few:
    if best[field] != fewest:
      break
    best, fewest = timer.race(field, best, [best, {**best, field: k}]), k
  return best


class _Timer:
  """Compiles and races candidates, keeping every trial (by settings and timed rows), the
  compiled steps and one throwaway state per device count."""

  def __init__(self, config, mesh, batch: dict, vocab_size: int, memory_limit: int | None):
    self.config, self.mesh, self.batch, self.vocab_size = config, mesh, batch, vocab_size
    self.memory_limit = memory_limit
    self.trials, self.runs, self.states = {}, {}, {}
    self.last = {}  # settings -> the key of its latest trial
    self.refused = False  # whether a candidate did not fit in memory

  def race(self, field: str | None, best: dict, group: list[dict]) -> dict:
    """The fastest of `group` (`best` if none of it runs), timed on the same rows."""
    group = list({_key(g): g for g in group}.values())
    rows = _timed_rows(self.config.train.batch_size, [
        g.get('train.microbatches', self.config.train.microbatches) for g in group])
    if field == 'mesh.cpu_devices':  # the update's share differs between device counts
      rows = self.config.train.batch_size
    keys = [(_key(g), rows) for g in group]
    if len(group) == 1 and _key(best) in self.last:
      return best  # nothing to race it against
    for settings, key in zip(group, keys, strict=True):
      if key not in self.trials:
        self.trials[key], self.runs[key] = _compile(
            self.config, self.mesh, {k: v[:rows] for k, v in self.batch.items()},
            self.vocab_size, settings, self.memory_limit, self.states)
        if self.runs[key] is None:
          self.refused = self.refused or self.trials[key].verdict.startswith('does not')
          print(f'  autotune {_changes(settings, self.config, self.mesh)}: '
                f'{self.trials[key].verdict}', flush=True)
      self.last[_key(settings)] = key
    racing = [(g, k) for g, k in zip(group, keys, strict=True) if self.runs[k] is not None]
    if not racing:
      return best
    _race([self.trials[k] for _, k in racing], [self.runs[k] for _, k in racing],
          self.config.train.autotune_steps, self.states)
    if field is not None:
      print(f'  autotune {field} ({_changes(best, self.config, self.mesh)}, '
            f'{rows} row{"s" * (rows != 1)}): '
            + ', '.join(f'{g[field]!r} {_describe(self.trials[k])}' for g, k in racing),
            flush=True)
    winner, fastest = min(racing, key=lambda gk: self.trials[gk[1]].step_s)
    own = [k for g, k in racing if g == best]  # the settings so far, if they raced
    margin = DEVICES_MARGIN if field == 'mesh.cpu_devices' else 0.0
    if own and self.trials[own[0]].step_s <= (1 + margin) * self.trials[fastest].step_s:
      return best
    return winner

  def finish(self, best: dict) -> list[Trial]:
    """Every trial, the winner's marked; UserError where none could run."""
    trial = self.trials.get(self.last.get(_key(best)))
    if trial is None or trial.step_s is None:
      raise UserError('train.autotune: no candidate setting fits in memory (see the lines '
                      'above); lower train.batch_size or train.seq_len, or pin fewer fields '
                      '(train.autotune_pinned).')
    trial.verdict = 'fastest'
    return list(self.trials.values())


def _timed_rows(batch_size: int, microbatches: list[int]) -> int:
  """Rows of the batch a race times: a quarter of it where every candidate's slice count is
  a multiple of TIMED_SHARE, else a half or all of it (each candidate runs its slices at the
  sizes they have in the whole batch, a quarter or a half as many). A step's time is its
  slices' plus a part that does not change with the rows (the update). That part is the same
  for every candidate of a field but the device count (each device updates its own copy of
  the parameters, and CPU devices share the cores), whose race takes the whole batch; so
  on the same rows the candidates rank as on the whole batch."""
  share = functools.reduce(math.gcd, microbatches, TIMED_SHARE)
  return batch_size // share if batch_size % share == 0 else batch_size


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
    return [0] + [b for b in [t.seq_len // BLOCKS] if b >= 16]
  raise ValueError(f'no candidates for {field}')


def _compile(config, mesh, batch: dict, vocab_size: int, settings: dict,
             memory_limit: int | None, states: dict):
  """(Trial, (compiled step, its batch, state key) or None where it cannot run): the train
  step of `config` with `settings` cut down to TIMED_LAYERS, its memory times the layers
  checked against the device's, then run once untimed."""
  config = with_settings(config, settings)
  trial = Trial(settings, len(next(iter(batch.values()))))
  try:
    mesh = submesh(config, mesh, settings)
    config_lib.validate_config(config, mesh)
  except UserError as e:
    trial.verdict = f'not possible: {e}'
    return trial, None
  layers, config = config.model.num_layers, cut_down(config)
  # The rows timed, in slices of the size the settings give the whole batch (a stateful
  # model's carry has as many rows).
  config.train.microbatches = config.train.microbatches * trial.rows // config.train.batch_size
  config.train.batch_size = trial.rows
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  n = (mesh.devices.size, state_lib.carry_rows(config))
  if n not in states:  # one throwaway state per device count, passed from step to step
    like = [state for (_, rows), state in states.items() if rows == n[1]]
    if like:  # copied onto these devices through the host, not initialised again
      states[n] = jax.tree.map(lambda x: jax.device_put(
          np.asarray(x), jax.NamedSharding(mesh, x.sharding.spec)), like[0])
    else:
      states[n] = state_lib.create_train_state(model, tx, mesh, rules, config.train.seed,
                                               config.train.seq_len, carry_rows=n[1])[0]
  step_fn = steps.jit_train_step(model, tx, mesh, rules,
                                 jax.tree.map(lambda x: x.sharding, states[n]),
                                 config.train.microbatches)
  on_mesh = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  began = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(states[n], on_mesh, jax.random.key(0)).compile()
  trial.compile_s = time.perf_counter() - began
  use = steps.memory_use(compiled, states[n], mesh)
  limit = memory_limit or use['limit_bytes']
  # Each layer holds its own parameters and activations, and the one layer's peak besides
  # counts the embeddings, the head and the step's scratch: times the layers it is above
  # the whole model's (1.1-1.3x for the six layers of :full, measured).
  trial.peak_bytes = use['step_peak_bytes'] and use['step_peak_bytes'] * layers
  if trial.peak_bytes is not None and limit and trial.peak_bytes > limit:
    trial.verdict = f'does not fit: {_mib(trial.peak_bytes)} of {_mib(limit)}'
    return trial, None
  _step(compiled, on_mesh, n, states)  # the first run is not timed
  return trial, (compiled, on_mesh, n)


def _step(compiled, batch, n: tuple, states: dict) -> float:
  began = time.perf_counter()
  states[n], metrics = compiled(states[n], batch, jax.random.key(0))
  jax.block_until_ready((states[n], metrics))
  return _agreed(time.perf_counter() - began)


def _race(trials: list[Trial], runs: list, steps_wanted: int, states: dict) -> None:
  """Times the compiled steps of `runs` one step each in turn, round after round, until
  each has train.autotune_steps (see MIN_SECONDS and MAX_SECONDS), and those still CLOSE to
  the fastest more (CLOSE_STEPS); sets each trial's median. After the first round, one
  slower than GIVE_UP_RATIO x the fastest stops."""
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
    if not alive:
      alive = _close(times, [t.verdict == '' for t in trials], steps_wanted)
  for trial, timed in zip(trials, times, strict=True):
    trial.step_s = statistics.median(timed)


def _close(times: list[list[float]], racing: list[bool], steps: int) -> list[int]:
  """The candidates (of those `racing`) within CLOSE of the fastest median, if two or more
  are and they have fewer than CLOSE_STEPS x `steps` steps and MAX_SECONDS timed; else []."""
  medians = {i: statistics.median(t) for i, t in enumerate(times) if racing[i]}
  fastest = min(medians.values())
  close = [i for i, m in medians.items() if m <= CLOSE * fastest]
  if len(close) < 2 or any(len(times[i]) >= CLOSE_STEPS * steps or
                           sum(times[i]) >= MAX_SECONDS for i in close):
    return []
  return close


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
  rows = [fields + ['rows', 'compile s', f'{TIMED_LAYERS}-layer step ms', 'peak MiB (bound)',
                   ''], ['---'] * (len(fields) + 5)]
  for t in trials:
    rows.append([repr(t.settings[f]) for f in fields] + [
        str(t.rows), f'{t.compile_s:.1f}', '' if t.step_s is None else f'{1e3 * t.step_s:,.1f}',
        '' if t.peak_bytes is None else f'{t.peak_bytes / 2**20:,.0f}', t.verdict])
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)
