"""Orbax checkpoints in WORKDIR/checkpoints: the train state plus the data position.

Orbax writes each step into a temporary directory and renames it when complete, so
a crash mid-write never leaves a checkpoint that `latest_step` would pick up.
"""
import os

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Saves and restores {'state': TrainState, 'data': {'next_example': int}}."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, read_only=read_only,
        create=not read_only)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array should live."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree,
      shardings)
