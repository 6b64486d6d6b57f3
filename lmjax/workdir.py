"""A training workdir's files: config.json, result.json, and the trained model read back
(`load_trained`, `restore_state`), the public way to use a finished run."""
import contextlib
import functools
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import finetune, optim, state as state_lib, storage
from lmjax.data import tokenizers
from lmjax.errors import UserError

def check_config_change(config, workdir: str, allow_change: bool = False) -> None:
  """A workdir with checkpoints keeps the config it was trained with: resuming it under a
  different one is refused, naming the fields, unless `allow_change`.

  Fields that only one side has come from a different lmjax version (a field added or
  removed since the run started), not from the user: they are reported, not refused. A field
  the saved config lacks ran at its default, so it is a change only where the new value is
  another."""
  path = os.path.join(workdir, 'config.json')
  if not storage.exists(path):
    return
  saved = config_lib.read_saved_dict(path)
  current = json.loads(config.to_json())
  _, versioned = _config_changes(saved, current)
  previous, _ = config_lib.with_defaults(saved)
  changes, _ = _config_changes(json.loads(previous.to_json()), current)
  # The mesh says where the arrays live, not what is computed: a run checkpointed on one
  # mesh (or number of hosts) resumes on another.
  remeshed = [change for change in changes if change.startswith('mesh.')]
  changes = [change for change in changes if not change.startswith('mesh.')]
  if remeshed:
    print(f'note: resuming on another mesh ({"; ".join(remeshed)}); the checkpoint is '
          'resharded onto it.')
  if versioned:
    print(f'note: {path} was written by another lmjax version; fields that differ in '
          f'presence: {", ".join(versioned[:6])}{" ..." if len(versioned) > 6 else ""}')
  if not changes:
    return
  has_checkpoints = bool(ckpt_lib.complete_steps(workdir))
  if has_checkpoints and not allow_change:
    shown = '; '.join(changes[:12])
    more = f'; ... and {len(changes) - 12} more' if len(changes) > 12 else ''
    raise UserError(
        f'{workdir} holds checkpoints of a run with another config; this one differs '
        f'in: {shown}{more}. Use a new --workdir for a new run, or pass '
        '--allow_config_change to resume these checkpoints under the new config.')
  print(f'note: the config differs from {path} in {", ".join(changes[:4])}'
        f'{" ..." if len(changes) > 4 else ""}; the new one replaces it.')


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:  # atomically: a kill mid-write leaves the old file whole
    storage.write_text(os.path.join(workdir, 'config.json'), config.to_json(indent=2))


def _config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """'field: old -> new' for every leaf both configs have and that differs, and
  'field: (absent) -> new' (or the reverse) for leaves only one of them has."""
  old, new = flatten(old), flatten(new)

  def shown(values, k):
    return repr(values[k]) if k in values else '(absent)'

  differ = [k for k in sorted(set(old) | set(new)) if shown(old, k) != shown(new, k)]
  line = lambda k: f'{k}: {shown(old, k)} -> {shown(new, k)}'
  return ([line(k) for k in differ if k in old and k in new],
          [line(k) for k in differ if (k in old) != (k in new)])


RESULT_FILE = 'result.json'


def write_result(workdir: str, result: dict) -> None:
  """`WORKDIR/result.json`, written (atomically) when a run has done all its steps: a sweep
  takes its presence to mean the point is finished."""
  if jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, RESULT_FILE), json.dumps(result, indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  config = config_lib.read_saved(workdir)
  if config is None:
    raise UserError(f'no config.json in {workdir}: is it a training workdir '
                    '(experiments/train.py --workdir=...)?')
  return config


def prepare(workdir: str, flag: str = '--workdir') -> None:
  """Creates the workdir (or another output directory, given on the command line as
  `flag`) and proves it writable before anything is computed."""
  try:
    storage.makedirs(workdir)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    storage.write_text(probe, 'ok')
    storage.remove(probe)
  except OSError as e:
    raise UserError(f'{flag}={workdir} cannot be written ({e.strerror or e}: '
                    f'{e.filename or workdir}); choose a directory you can write to.') from None


def check_disk_space(workdir: str, state) -> None:
  """Refuses to start when the disk cannot hold two checkpoints (one complete while the
  next is written). `state` may hold arrays or only their shapes."""
  if storage.is_remote(workdir):  # a bucket has no fixed size
    return
  checkpoint_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                         for x in jax.tree.leaves(state))
  free = shutil.disk_usage(workdir).free
  if free < 2 * checkpoint_bytes:
    raise UserError(f'the disk of {workdir} has {free / 2**20:,.1f} MiB free; a checkpoint of '
                    f'this model takes {checkpoint_bytes / 2**20:,.1f} MiB and two must fit. '
                    'Free some space or choose another --workdir.')


def restore_state(workdir: str, step: int | None = None):
  """(config, tokenizer, TrainState, step) of a training workdir (latest step by default),
  on the host's first device. A fine-tuning run's state keeps its frozen parameters apart
  (state.frozen) and its adapters unmerged; `load_trained` gives the whole model."""
  config = load_config(workdir)
  tokenizer = tokenizers.load_tokenizer(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  model = state_lib.build_model(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)

  init = functools.partial(state_lib.init_state, model=model, tx=tx, seq_len=config.train.seq_len,
                           carry_rows=state_lib.carry_rows(config),
                           trainable=finetune.trainable_filter(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = ckpt_lib.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  restored = ckpt_lib.restore_checkpoint(checkpointer, abstract, step)
  checkpointer.close()
  if restored is None:
    raise UserError(f'no checkpoint in {checkpointer.directory}; train first '
                    '(experiments/train.py --workdir=...).')
  step, state, _ = restored
  return config, tokenizer, state, step


def load_trained(workdir: str, step: int | None = None):
  """(config, tokenizer, params, step) of a training workdir, params on the default device:
  the whole tree (frozen parts joined, LoRA adapters merged), for the config returned."""
  config, tokenizer, state, step = restore_state(workdir, step)
  config, params = finetune.for_decoding(config, finetune.join(state.params, state.frozen))
  return config, tokenizer, params, step


def flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, name + '.'))
    else:
      out[name] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


@contextlib.contextmanager
def writing(what: str, checkpointer):
  """Turns a failed write (a full disk, a vanished directory) into one clear message."""
  try:
    yield
  except Exception as e:
    cause = e
    while cause.__cause__ is not None:  # the writers wrap the OS error
      cause = cause.__cause__
    detail = (str(cause).strip().splitlines() or [''])[0][:300]
    raise UserError(
        f'writing {what} failed ({type(cause).__name__}: {detail}). The last complete '
        f'checkpoint is {ckpt_lib.steps_text(checkpointer.complete_steps()[-1:])} in '
        f'{checkpointer.directory}; free some space or fix the directory, then rerun the '
        'same command to resume from it.') from e


def prepare_tokenizer(config, workdir: str, base: str | None, texts):
  """The run's tokenizer, trained (on `texts()`) or copied into the workdir once and read
  from there after: a fine-tuned run's is its base's, data.tokenizer_dir names a given
  one (e.g. GPT-2's). On several processes, process 0 writes it and the others read it."""
  data = config.data
  if base and data.tokenizer_dir:
    raise UserError(f'data.tokenizer_dir={data.tokenizer_dir!r} and init_from.workdir='
                    f"{base!r}: a fine-tuned run takes its base's tokenizer; set "
                    "data.tokenizer_dir=''.")

  def build():
    present = storage.exists(os.path.join(workdir, tokenizers.CONFIG_FILE))
    if base and not present:
      tokenizers.load_tokenizer(base).save(workdir)
    if data.tokenizer_dir and not present:
      try:
        given = tokenizers.read_tokenizer_dir(data.tokenizer_dir)
      except (OSError, ValueError) as e:
        raise UserError(f'data.tokenizer_dir={data.tokenizer_dir!r}: {e}') from None
      if given.kind != data.tokenizer:
        raise UserError(f'data.tokenizer_dir={data.tokenizer_dir!r} holds a {given.kind!r} '
                        f'tokenizer, and data.tokenizer={data.tokenizer!r}; set '
                        f'data.tokenizer={given.kind!r}.')
      given.save(workdir)
    # A given tokenizer has its own size; data.vocab_size is for one trained here.
    return tokenizers.build_tokenizer(
        data.tokenizer, workdir, texts,
        vocab_size=None if data.tokenizer_dir else data.vocab_size or None,
        model_type=data.spm_model_type)

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      build()
    multihost_utils.sync_global_devices('lmjax: tokenizer saved')
  return build()
