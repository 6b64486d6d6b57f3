"""Hyperparameter sweeps: a config file's `get_sweep(arg)` lists points (override dicts); each
point trains in its own workdir under one root, through `experiments/train.py`, and the
results are read back from the points' event files into a table and a plot.

A point is finished when its workdir holds `result.json` (train.py writes it after the last
step); a point with checkpoints but no result was interrupted, and rerunning it resumes.
"""
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import events, runtime, storage
from lmjax.errors import UserError, one_line

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'experiments', 'train.py')
SWEEP_FILE = 'sweep.json'  # in the root: the config and the points, to resume and summarize
LOG_FILE = 'train.log'  # in each point's workdir: its train.py output, appended per attempt
RESULT_FILE = 'result.json'  # in each point's workdir, once finished (lmjax/workdir.py)


# ------------------------------------------------------------------------ making points


def grid(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of the values of `axes` ({'opt.lr': [1e-3, 3e-3], ...}); the last
  field varies fastest."""
  for field, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise UserError(f'grid: {field} needs a non-empty list of values, got {values!r}.')
  fields = list(axes)
  return [dict(zip(fields, combo)) for combo in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Uniform:
  low: float
  high: float
  log: bool = False  # uniform in log space: for learning rates and other scales

  def draw(self, rng: np.random.Generator) -> float:
    if self.log:
      value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    else:
      value = rng.uniform(self.low, self.high)
    return float(f'{value:.3g}')  # three digits: readable names, nothing lost that matters


def uniform(low: float, high: float) -> Uniform:
  return Uniform(low, high)


def log_uniform(low: float, high: float) -> Uniform:
  if not 0 < low < high:
    raise UserError(f'log_uniform({low}, {high}) needs 0 < low < high.')
  return Uniform(low, high, log=True)


def random_search(space: dict[str, Any], num_points: int, seed: int = 0) -> list[dict]:
  """`num_points` draws from `space`: each field takes a `uniform` / `log_uniform` value or
  one element of a list, independently; the same seed gives the same points."""
  rng = np.random.default_rng(seed)
  points = []
  for _ in range(num_points):
    point = {}
    for field, choice in space.items():
      if isinstance(choice, Uniform):
        point[field] = choice.draw(rng)
      elif isinstance(choice, Sequence) and not isinstance(choice, str) and choice:
        point[field] = choice[int(rng.integers(len(choice)))]
      else:
        raise UserError(f'random_search: {field} needs uniform(...), log_uniform(...) or '
                        f'a non-empty list, got {choice!r}.')
    points.append(point)
  return points


# --------------------------------------------------------------------- loading a sweep


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # its workdir's name under the sweep root
  overrides: dict[str, Any]


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '-'.join(_format_value(v) for v in value)
  return str(value)


def point_names(points: list[dict]) -> list[str]:
  """Directory names from the fields that vary across points ('lr=0.001,d_model=128'): the
  last part of each dotted field, or the whole field where two would read the same."""
  fields = list(dict.fromkeys(f for p in points for f in p))
  varying = [f for f in fields if len({repr(p.get(f)) for p in points}) > 1] or fields
  short = {f: f.split('.')[-1] for f in varying}
  if len(set(short.values())) < len(short):
    short = {f: f for f in varying}
  names = []
  for p in points:
    name = ','.join(f'{short[f]}={_format_value(p[f])}' for f in varying if f in p)
    names.append(re.sub(r'[^A-Za-z0-9._=,+-]', '_', name) or 'default')
  return names


def _load_config_module(path: str):
  if not os.path.isfile(path):
    raise UserError(f'--config: no file {path}; name a config in configs/, e.g. '
                    '--config=configs/shakespeare_char.py:cpu')
  from lmjax import config as config_lib  # what every config file imports first anyway
  try:
    module = config_lib.load_file(path)
  except Exception as e:  # noqa: BLE001  (whatever the file raises: it is not lmjax's)
    raise UserError(f'--config: {path} could not be loaded ({type(e).__name__}: '
                    f'{one_line(e)}); name a config in configs/, e.g. '
                    '--config=configs/shakespeare_char.py:cpu') from None
  return module


def _call(fn, arg: str, path: str):
  """get_config / get_sweep, with their own errors (an unknown variant) in one line."""
  try:
    return fn(arg)
  except Exception as e:  # noqa: BLE001  (whatever the config file raises)
    raise UserError(f'{fn.__name__}({arg!r}) in {path} failed: {e}') from None


def _set_field(config, field: str, value: Any) -> None:
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = tuple(value) if isinstance(value, list) else value


def load_points(config_spec: str) -> list[Point]:
  """The points of `configs/FILE.py[:ARG]`'s `get_sweep(ARG)`, each checked against
  `get_config(ARG)`: every field exists and takes the value's type."""
  path, _, arg = config_spec.partition(':')
  module = _load_config_module(path)
  if not hasattr(module, 'get_sweep') or not hasattr(module, 'get_config'):
    raise UserError(f'{path} has no get_sweep(arg) or no get_config(arg); a sweep lives in '
                    'a config file as get_sweep(arg) returning a list of override dicts (see '
                    'configs/shakespeare_char.py).')
  overrides = _call(module.get_sweep, arg, path)
  if not overrides or not all(isinstance(o, dict) for o in overrides):
    raise UserError(f'get_sweep({arg!r}) in {path} must return a non-empty list of dicts '
                    f'(field -> value); it returned {overrides!r}.')
  names = point_names(overrides)
  for name in set(names):
    if names.count(name) > 1:
      raise UserError(f'get_sweep({arg!r}) in {path} gives point {name} more than once; '
                      'make the points differ.')
  for name, point in zip(names, overrides):
    config = _call(module.get_config, arg, path)
    for field, value in point.items():
      try:
        _set_field(config, field, value)
      except (KeyError, AttributeError) as e:
        raise UserError(f'sweep point {name}: the config has no field {field} ({e}); every '
                        'field is listed in docs/reference/config.md.') from None
      except TypeError as e:
        raise UserError(f'sweep point {name}: {field}={value!r} does not fit the config '
                        f'field ({e}).') from None
    from lmjax import config as config_lib, sharding  # heavy; only for the checks
    try:  # the checks train.py makes at start-up, before any point trains
      config_lib.validate_config(config, sharding.make_mesh(config.mesh))
    except UserError as e:
      raise UserError(f'sweep point {name}: {e}') from None
  return [Point(n, dict(o)) for n, o in zip(names, overrides)]


# ------------------------------------------------------------------------------ running


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(_flag_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  if isinstance(value, float):
    return repr(value)
  return str(value)


def train_command(config_spec: str, workdir: str, overrides: dict,
                  python: str = sys.executable, script: str = TRAIN_SCRIPT) -> list[str]:
  return [python, script, f'--config={config_spec}', f'--workdir={workdir}',
          *[f'--config.{k}={_flag_value(v)}' for k, v in overrides.items()]]


def point_status(workdir: str) -> str:
  """'finished', 'interrupted' (checkpoints, no result) or 'new'."""
  if storage.exists(os.path.join(workdir, RESULT_FILE)):
    return 'finished'
  if storage.isdir(workdir) and ckpt_lib.complete_steps(workdir):
    return 'interrupted'
  return 'new'


def _record_sweep(root: str, config_spec: str, points: list[Point]) -> None:
  """Writes ROOT/sweep.json, or checks that an existing one describes the same sweep."""
  path = os.path.join(root, SWEEP_FILE)
  record = {'config': config_spec, 'points': [dataclasses.asdict(p) for p in points]}
  if storage.exists(path):
    previous = _read_record(path)
    if json.loads(json.dumps(record)) != previous:
      old = {p['name']: p for p in previous['points']}
      new = {p.name: dataclasses.asdict(p) for p in points}
      if previous['config'] != config_spec:
        what = f'of {previous["config"]}, not {config_spec}'
      else:
        changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
        what = (f'with other points (only there: {sorted(set(old) - set(new)) or "none"}; '
                f'only here: {sorted(set(new) - set(old)) or "none"}; changed: '
                f'{changed or "none"})')
      raise UserError(f'{root} holds a sweep {what}. Use a new --workdir, or delete {path} '
                      'to mix them.')
    return
  try:
    storage.makedirs(root)
    storage.write_text(path, json.dumps(record, indent=2))
  except OSError as e:
    raise UserError(f'--workdir={root} cannot be written ({e.strerror or e}: '
                    f'{e.filename or root}); choose a directory you can write to.') from None


def _read_record(path: str) -> dict:
  """A sweep root's sweep.json; UserError if it is damaged."""
  try:
    record = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    record, problem = None, f'it is not valid JSON ({e})'
  else:
    problem = 'it lacks the config and the points'
  if isinstance(record, dict) and isinstance(record.get('config'), str) and all(
      isinstance(p, dict) and {'name', 'overrides'} <= set(p)
      for p in record.get('points', [None])):
    return record
  raise UserError(f'{path} is damaged: {problem}. Restore it from a copy, or delete it and '
                  'rerun experiments/sweep.py with the --config of the sweep, which writes it '
                  'again (finished points are skipped).')


def load_sweep(root: str) -> tuple[str, list[Point]]:
  path = os.path.join(root, SWEEP_FILE)
  if not storage.exists(path):
    raise UserError(f'no {SWEEP_FILE} in {root}: is it a sweep root '
                    '(experiments/sweep.py --config=... --workdir=ROOT)?')
  record = _read_record(path)
  return record['config'], [Point(p['name'], p['overrides']) for p in record['points']]


def _local_log(workdir: str) -> str:
  """Where a point's trainer writes its output: WORKDIR/train.log, or for a workdir in a
  bucket (which a process cannot append to) a local file, copied there when it ends and
  read back from there when the point resumes."""
  if not storage.is_remote(workdir):
    return os.path.join(workdir, LOG_FILE)
  local = os.path.join(tempfile.gettempdir(), 'lmjax-sweep-logs', workdir.replace('://', '/'),
                       LOG_FILE)
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    remote = os.path.join(workdir, LOG_FILE)
    with open(local, 'wb') as f:
      f.write(storage.read_bytes(remote) if storage.exists(remote) else b'')
  return local


def _keep_log(workdir: str) -> None:
  """A point in a bucket: its finished trainer's local log copied to WORKDIR/train.log."""
  if storage.is_remote(workdir):
    storage.write_bytes(os.path.join(workdir, LOG_FILE), storage.read_bytes(_local_log(workdir)))


def _last_line(path: str) -> str:
  try:
    with open(path, errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ''
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or [''])[-1][:300]


def run(config_spec: str, root: str, *, parallel: int = 1, dry_run: bool = False,
        echo=print) -> dict[str, str]:
  """Trains every point not finished yet, `parallel` at a time; returns {name: outcome}
  ('finished', 'skipped' (was finished), 'failed', 'stopped'). `dry_run` prints one
  command per point instead."""
  if parallel < 1:
    raise UserError(f'--parallel={parallel}; it must be at least 1.')
  points = load_points(config_spec)
  if dry_run:
    for p in points:
      echo(shlex.join(train_command(config_spec, os.path.join(root, p.name), p.overrides,
                                    python='python', script='experiments/train.py')))
    return {}
  _record_sweep(root, config_spec, points)
  outcome, todo = {}, []
  for p in points:
    if point_status(os.path.join(root, p.name)) == 'finished':
      outcome[p.name] = 'skipped'
      echo(f'{p.name}: finished before, skipped')
    else:
      todo.append(p)

  running: dict[str, tuple[subprocess.Popen, float]] = {}
  stopping = []

  def on_sigterm(signum, frame):
    del frame
    stopping.append(signum)
    for proc, _ in running.values():  # each trainer checkpoints and exits
      proc.send_signal(signal.SIGTERM)

  previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while todo or running:
      while todo and len(running) < parallel and not stopping:
        p = todo.pop(0)
        workdir = os.path.join(root, p.name)
        storage.makedirs(workdir)
        resumed = point_status(workdir) == 'interrupted'
        log = open(_local_log(workdir), 'a')  # closed by the child's end
        log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} '
                  f'{shlex.join(train_command(config_spec, workdir, p.overrides))}\n')
        log.flush()
        proc = subprocess.Popen(train_command(config_spec, workdir, p.overrides),
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, runtime.PARENT_ENV: str(os.getpid())})
        log.close()
        running[p.name] = (proc, time.time())
        echo(f'{p.name}: {"resumed" if resumed else "started"} (log: '
             f'{_local_log(workdir)})')
      if not running:
        break
      time.sleep(0.5)
      for name, (proc, started) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        del running[name]
        workdir = os.path.join(root, name)
        _keep_log(workdir)
        if point_status(workdir) == 'finished':
          outcome[name] = 'finished'
          loss = json.loads(storage.read_text(os.path.join(workdir, RESULT_FILE)))['eval']['loss']
          echo(f'{name}: finished in {time.time() - started:.0f} s, eval loss {loss:.4f}')
        elif code == 0:
          outcome[name] = 'stopped'
          echo(f'{name}: stopped with its checkpoint written; rerun the sweep to resume it')
        else:
          outcome[name] = 'failed'
          echo(f'{name}: failed (exit {code}): {_last_line(_local_log(workdir))}')
    for p in todo:  # not started because the sweep was told to stop
      outcome.setdefault(p.name, 'stopped')
  except KeyboardInterrupt:  # Ctrl-C reached the trainers too: let them write checkpoints
    for proc, _ in running.values():
      proc.wait()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  return outcome


# ------------------------------------------------------------------------ summarizing


def summarize(root: str) -> list[dict]:
  """One row per point, best eval loss first (unfinished points after): its overrides,
  status, last step trained, the final and best eval metrics and the wall time; written to
  ROOT/summary.md and ROOT/summary.csv, with the learning curves in ROOT/curves.png."""
  config_spec, points = load_sweep(root)
  rows, curves = [], {}
  fields = list(dict.fromkeys(f for p in points for f in p.overrides))
  for p in points:
    workdir = os.path.join(root, p.name)
    row = {'point': p.name, **{f: p.overrides.get(f, '') for f in fields},
           'status': point_status(workdir)}
    scalars = events.read_scalars(workdir) if storage.isdir(workdir) else {}
    curves[p.name] = {tag: scalars.get(tag, {}) for tag in ('train/loss', 'eval/loss')}
    train_loss, eval_loss = curves[p.name]['train/loss'], curves[p.name]['eval/loss']
    row['steps'] = max(train_loss) if train_loss else 0
    if eval_loss:
      last, best = max(eval_loss), min(eval_loss, key=lambda s: (eval_loss[s], s))
      row['final_eval_loss'], row['best_eval_loss'], row['best_step'] = (
          eval_loss[last], eval_loss[best], best)
      for tag in sorted(scalars):
        if tag.startswith('eval/') and tag != 'eval/loss' and last in scalars[tag]:
          row['final_' + tag.replace('/', '_')] = scalars[tag][last]
    result_path = os.path.join(workdir, RESULT_FILE)
    if storage.exists(result_path):
      row['wall_seconds'] = round(json.loads(storage.read_text(result_path))['train_seconds'])
    rows.append(row)
  rows.sort(key=lambda r: (r['status'] != 'finished', r.get('best_eval_loss', math.inf)))
  columns = list(dict.fromkeys(c for r in rows for c in r))
  _write_csv(os.path.join(root, 'summary.csv'), columns, rows)
  _write_markdown(os.path.join(root, 'summary.md'), config_spec, columns, rows, fields)
  plot_curves(os.path.join(root, 'curves.png'), curves, title=config_spec)
  return rows


def _cell(value: Any, is_override: bool) -> str:
  if isinstance(value, float) and not is_override:  # a metric
    return f'{value:.4f}' if abs(value) < 1e4 else f'{value:.4g}'
  return _format_value(value)


def _write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, columns, restval='')
  writer.writeheader()
  writer.writerows(rows)
  storage.write_text(path, text.getvalue())


def _write_markdown(path: str, config_spec: str, columns: list[str], rows: list[dict],
                    fields: list[str]) -> None:
  lines = [f'Sweep of `{config_spec}`, best eval loss first.', '',
           '| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(r.get(c, ''), c in fields) for c in columns) + ' |'
            for r in rows]
  storage.write_text(path, '\n'.join(lines) + '\n')


def plot_curves(path: str, curves: dict[str, dict[str, dict[int, float]]],
                title: str = '') -> dict[str, str]:
  """Train and eval loss against step, one colour per point; returns {point: colour}."""
  import matplotlib  # only summaries need it
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  cmap = plt.get_cmap('tab10' if len(curves) <= 10 else 'tab20')
  colors = {name: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, name in enumerate(curves)}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
  for ax, tag in zip(axes, ('train/loss', 'eval/loss')):
    for name, by_tag in curves.items():
      points = sorted(by_tag.get(tag, {}).items())
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, color=colors[name], linewidth=2, label=name,
                marker='o' if len(points) < 8 else None)
    ax.set_title(tag)
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats per token)')
    ax.grid(alpha=0.3)
  if axes[1].get_lines():
    axes[1].legend(fontsize=8, loc='upper right')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format='png')
  plt.close(fig)
  storage.write_bytes(path, image.getvalue())
  return colors
