"""Orbax checkpoints in WORKDIR/checkpoints: the train state plus the data position.

Orbax writes each step into a temporary directory and renames it when complete, so
a crash mid-write never leaves a checkpoint that `latest_step` would pick up. In a bucket,
which has no rename, it writes the step's directory in place and marks it complete last,
with a file of its own (orbax's commit_success.txt).
"""
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lmjax import storage
from lmjax.errors import UserError

# What marks a step complete in a bucket (orbax's own name for it).
_COMMIT_SUCCESS_FILE = 'commit_success.txt'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(storage.absolute(workdir), 'checkpoints')


FROZEN_DIR = 'frozen_params'


class Checkpointer:
  """Saves and restores {'state': TrainState, 'data': {'next_example': int}}; the state's
  frozen parameters live apart, in WORKDIR/frozen_params (see save_frozen)."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    # Read-only: nothing kept or saved (said here, so that orbax need not warn that it
    # changed them), and its warning that the directory is read-only, which a reader
    # asked for, silenced.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=asynchronous, read_only=read_only, create=not read_only)
    self.directory = checkpoint_dir(workdir)
    _write_replicated_arrays_once()
    verbosity = logging.get_verbosity()
    if read_only:
      logging.set_verbosity(logging.ERROR)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={'state': ocp.StandardCheckpointHandler(),
                         'data': ocp.JsonCheckpointHandler()})
    finally:
      logging.set_verbosity(verbosity)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The checkpoints' steps, oldest first: those on disk when opened, and those saved since
    (complete or still being written)."""
    return sorted(self._manager.all_steps())

  def complete_steps(self) -> list[int]:
    """The steps complete on disk now (unlike `all_steps`, which counts a save as soon as
    it starts)."""
    return complete_steps(os.path.dirname(self.directory))

  def param_metadata(self, step: int):
    """The tree of the parameters stored at `step`, with each array's shape and dtype,
    read from the checkpoint's metadata without loading any array."""
    return self._manager.item_metadata(step)['state']['params']

  def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'['layer_0']['mlp']...': shape} of the parameters stored at `step`."""
    return shapes_by_path(self.param_metadata(step))

  def set_aside(self, step: int, reason: str) -> str:
    """Moves an unreadable checkpoint out of the way (to WORKDIR/unreadable_checkpoints/), so
    training can resume from the one before and later write this step again. Returns where
    it went."""
    # Process 0's clock names the place, so that every process says the same.
    stamp = _agreed(time.strftime('%Y%m%d-%H%M%S'))
    target = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR,
                          f'{step}-{stamp}')
    if jax.process_index() == 0:  # one process moves it; the others wait, then look again
      storage.move(os.path.join(self.directory, str(step)), target)
      storage.write_text(os.path.join(target, 'WHY.txt'), reason + '\n')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'lmjax: checkpoint {step} set aside')
    self._manager.reload()
    return target

  def data_state(self, step: int) -> dict:
    """The data position and pending metrics saved with `step` (JSON; no arrays read)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore()))['data']

  def save(self, step: int, state, data_state: dict) -> None:
    # Frozen parameters never change: they are stored once (save_frozen), not per step.
    state = state.replace(frozen=None)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); its
    frozen parameters, if it has any, come from WORKDIR/frozen_params."""
    frozen = abstract_state.frozen
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state.replace(frozen=None)),
        data=ocp.args.JsonRestore()))
    state = restored['state']
    if frozen is not None:
      state = state.replace(frozen=restore_frozen(os.path.dirname(self.directory), frozen))
    return state, restored['data']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _write_replicated_arrays_once() -> None:
  """Orbax's default on CPU and TPU splits each replicated array into one slice per replica
  and writes the slices side by side, so that several hosts share the writing. In a run of
  one process every slice is written by that process, and cutting them costs one dispatched
  operation per array and device (about 0.8 s a save for the tiny test model on 8 devices):
  there each array is written whole from one replica. The files are the same either way."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
      override=True)


def _agreed(text: str) -> str:
  """Process 0's `text`, on every process."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  return multihost_utils.broadcast_one_to_all(
      np.frombuffer(text.encode().ljust(32), np.uint8)).tobytes().decode().strip()


def complete_steps(workdir: str) -> list[int]:
  """The steps of `workdir` whose checkpoint is complete on disk, oldest first: orbax gives
  a step directory its plain number only when its write has finished (in a bucket, where
  it writes under that number, its commit_success.txt marks the end)."""
  directory = checkpoint_dir(workdir)
  if not storage.isdir(directory):
    return []
  steps = [name for name in storage.listdir(directory) if name.isdigit()]
  if storage.is_remote(directory):
    steps = [step for step in steps
             if storage.exists(os.path.join(directory, step, _COMMIT_SUCCESS_FILE))]
  return sorted(map(int, steps))


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array should live."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree,
      shardings)


def restore_params(workdir: str, step: int, abstract_params):
  """Only the parameters of checkpoint `step` (no optimizer state read), onto the shardings
  of `abstract_params`."""
  path = os.path.join(checkpoint_dir(workdir), str(step), 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    item = {'params': abstract_params}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return restored['params']


def _frozen_path(workdir: str) -> str:
  return os.path.join(storage.absolute(workdir), FROZEN_DIR)


def save_frozen(workdir: str, frozen) -> None:
  """Writes the parameters a run does not train, once, when it starts; replaces any
  earlier copy (a start that died before its first checkpoint). Orbax writes into a
  temporary directory and renames it, so a crash leaves none or a whole one."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_frozen_path(workdir), frozen, force=True)
    checkpointer.wait_until_finished()


def frozen_metadata(workdir: str):
  """The tree of WORKDIR/frozen_params (shapes and dtypes, no array read), or None if the
  run froze nothing."""
  path = _frozen_path(workdir)
  if not storage.isdir(path):
    return None
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(path).item_metadata.tree


def restore_frozen(workdir: str, abstract_frozen):
  path = _frozen_path(workdir)
  if not storage.isdir(path):
    raise UserError(
        f'{path} is missing: this run trains only some parameters (train.freeze or '
        'model.lora_rank), its checkpoints hold only those, and the rest were written there '
        'when it started. Without them it cannot resume or decode; train it again in a new '
        '--workdir.')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_frozen)


def restore_checkpoint(checkpointer, abstract, step: int | None = None, *,
                       set_aside_unreadable: bool = False,
                       restart_if_all_damaged: bool = False):
  """(step, state, data state) of checkpoint `step`, or of the latest one; None if there is
  none. `abstract` (ShapeDtypeStructs with shardings) says what the state should be.

  Parameters of other shapes than `abstract`'s are refused, naming the first that differs.
  An unreadable checkpoint is an error. With `set_aside_unreadable` (resuming training) a
  damaged one (files missing, cut short or garbled) is moved aside instead, with a message,
  and the one before it is tried; any other failure (another train state structure, memory,
  permissions, I/O) stops with its cause and leaves every checkpoint where it is. A workdir
  whose checkpoints were all damaged is refused rather than trained again from step 0,
  unless `restart_if_all_damaged` (then None: start afresh).
  """
  steps = checkpointer.all_steps()
  if step is not None and step not in steps:
    raise UserError(f'no checkpoint of step {step} in {checkpointer.directory}; it has '
                    f'{steps_text(steps)}.')
  if set_aside_unreadable and not steps and not restart_if_all_damaged:
    _refuse_if_all_set_aside(checkpointer.directory)
  expected = shapes_by_path(abstract.params)
  for candidate in reversed(steps if step is None else [step]):
    error = None
    try:
      stored = checkpointer.param_shapes(candidate)
      fits = stored == expected
      if fits:
        state, data_state = checkpointer.restore(candidate, abstract)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      error = e
    reason = None if error is None else _unreadable(checkpointer.directory, candidate, error)
    if _failed_anywhere(reason is not None) and reason is None:
      # Each host reads its own shards: one that read them all must still go where the
      # others go.
      reason = (f'checkpoint {candidate} in {checkpointer.directory} cannot be read on '
                'another process')
    if reason is not None:
      if not set_aside_unreadable:
        others = [s for s in steps if s != candidate]
        raise UserError(f'{reason}. Other checkpoints: {steps_text(others)} (--step=N).'
                        ) from None
      damage = _damage(checkpointer.directory, candidate, error)
      # A process that read it leaves the verdict to those that could not.
      if _failed_anywhere(error is not None and damage is None):
        raise UserError(f'{reason}. {_advice(checkpointer.directory, candidate, error)} '
                        'Every checkpoint was left where it is.') from None
      where = checkpointer.set_aside(candidate, f'{reason}; {damage or "damaged elsewhere"}')
      print(f'{reason}: {damage or "damaged on another process"}; moved it to {where} and '
            'trying the one before it.', flush=True)
      continue
    if not fits:
      raise UserError(_shape_mismatch(candidate, checkpointer.directory, stored, expected))
    return candidate, state, data_state
  if step is None and steps and set_aside_unreadable and not restart_if_all_damaged:
    _refuse_if_all_set_aside(checkpointer.directory)
  return None


UNREADABLE_DIR = 'unreadable_checkpoints'
# tensorstore's status codes when an array's file is missing or shorter than its index says.
_DAMAGE_CODES = ('NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS')


def _unreadable(directory: str, step: int, error: Exception) -> str:
  detail = (str(error).strip().splitlines() or [''])[0][:300]
  return f'checkpoint {step} in {directory} cannot be read ({type(error).__name__}: {detail})'


def _damage(directory: str, step: int, error: Exception | None) -> str | None:
  """What shows checkpoint `step` to be damaged: a metadata file missing or not JSON, an
  array file missing or cut short. None if `error` is not of that kind (or is None)."""
  if error is None:
    return None
  step_dir = os.path.join(directory, str(step))
  for name in ('_CHECKPOINT_METADATA', os.path.join('state', '_METADATA')):
    if not storage.isfile(os.path.join(step_dir, name)):
      return f'{name} is missing'
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return 'a metadata file is not valid JSON'
  if isinstance(error, FileNotFoundError):
    return f'a file is missing ({error.filename})'
  if isinstance(error, ValueError) and str(error).startswith(_DAMAGE_CODES):
    return 'an array file is missing or cut short'
  return None


def _advice(directory: str, step: int, error: Exception | None) -> str:
  """What to do about a checkpoint that is unreadable for another reason than damage."""
  workdir = os.path.dirname(directory)
  if isinstance(error, ValueError) and 'tree structures do not match' in str(error):
    return ('It holds a train state of another structure than this config makes (another '
            'optimizer, or other frozen parameters): resume with the config it was saved '
            f'under ({workdir}/config.json), or start a new --workdir from its parameters '
            f'with --config.init_from.workdir={workdir}.')
  if isinstance(error, MemoryError):
    return 'Memory ran out while reading it: free some, or resume on more devices.'
  if isinstance(error, OSError):
    return f'Check that {directory} can be read (permissions, disk, mount), then run again.'
  return (f'It is not recognisably damaged (no file missing or cut short). If it is, move '
          f'{directory}/{step} out of the way and run again to resume from the one before.')


def _refuse_if_all_set_aside(directory: str) -> None:
  """A workdir with no checkpoint left, whose checkpoints were set aside as damaged, is not
  trained again from step 0 unless the user asks for it."""
  aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR)
  if storage.isdir(aside) and storage.listdir(aside):
    raise UserError(f'{directory} holds no readable checkpoint: every one was damaged and is '
                    f'in {aside}. Nothing was trained over them. To train this run again from '
                    'step 0, rerun with --restart_if_all_damaged (they stay where they are), or '
                    'train in a new --workdir.')


def _failed_anywhere(failed: bool) -> bool:
  """Whether `failed` holds on any process (on one process: whether it holds)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([failed]))))


def steps_text(steps) -> str:
  if not steps:
    return 'none'
  return f'step{"s" if len(steps) > 1 else ""} {", ".join(map(str, steps))}'


def _shape_mismatch(step, directory, stored: dict, expected: dict) -> str:
  for path in sorted(set(stored) | set(expected)):
    if stored.get(path) != expected.get(path):
      return (f'checkpoint {step} in {directory} does not fit the model of this config: '
              f'parameter {path} is {stored.get(path, "absent")} there and '
              f'{expected.get(path, "absent")} here (of {len(expected)} parameters, '
              f'{len(stored)} stored). Restore it with the config it was trained with, or '
              'train in a new --workdir.')
  return f'checkpoint {step} in {directory} does not fit the model of this config.'
