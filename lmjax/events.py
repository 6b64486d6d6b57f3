"""Reads a workdir's TensorBoard scalars back, as TensorBoard itself shows them."""
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(workdir: str, tags=None) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars in `workdir`'s event files (all by default; text
  and hparams summaries are not scalars).

  A resumed run writes some steps again: the restarted run's values win, and the dead
  run's steps past the restart are dropped.
  """
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  found = [tag for tag in acc.Tags()['tensors']
           if acc.SummaryMetadata(tag).plugin_data.plugin_name == 'scalars']
  out = {}
  for tag in found if tags is None else tags:
    if tag not in found:
      raise KeyError(f'no scalar {tag!r} in the event files of {workdir}; it has {found}.')
    out[tag] = _after_restarts(acc.Tensors(tag))
  return out


def _after_restarts(tensor_events) -> dict[int, float]:
  """{step: value} of a tag's events in the order written, where a step at or below one
  already seen starts a resumed run: the dead run's steps from there on are dropped.
  (TensorBoard's reader purges them only on a SessionLog.START event, which clu's
  writer does not write.)"""
  values = {}
  for e in tensor_events:
    if values and e.step <= max(values):
      values = {step: v for step, v in values.items() if step < e.step}
    values[e.step] = float(tensor_util.make_ndarray(e.tensor_proto))
  return values
