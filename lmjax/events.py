"""A workdir's TensorBoard events: the writer training logs to, and the scalars read back
as TensorBoard itself shows them."""
import os
import shutil
import tempfile
import time

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from lmjax import storage
from lmjax.data import tfdata

_EVENT_FILE_PREFIX = 'events.out.tfevents.'


def open_writer(workdir: str, just_logging: bool = False):
  """The TensorBoard writer for `workdir`. `just_logging`, as on every process but the
  first: no events (the progress lines are the log). A workdir in a bucket gets
  `BucketWriter`."""
  if just_logging:
    return _NoEvents()
  return BucketWriter(workdir) if storage.is_remote(workdir) else SummaryWriter(workdir)


class SummaryWriter:
  """Scalars, texts and hyperparameters into a directory's event files, through
  TensorFlow's summary API, as TensorBoard's scalar, text and HParams tabs read them.

  TensorFlow comes through lmjax.data.tfdata (off the GPU, without Keras). The HParams
  record is written with TensorBoard's `hparams.summary_v2`, not its `hparams.api`, which
  also defines a Keras callback and so imports Keras and matplotlib (with the TFDS
  datasets' own import of TensorFlow, about 1 CPU-second at the start of a run)."""

  def __init__(self, directory: str):
    self._tf = tfdata.tensorflow()
    self._writer = self._tf.summary.create_file_writer(directory)

  def write_scalars(self, step: int, scalars) -> None:
    with self._writer.as_default():
      for tag, value in scalars.items():
        self._tf.summary.scalar(tag, value, step=step)

  def write_texts(self, step: int, texts) -> None:
    with self._writer.as_default():
      for tag, text in texts.items():
        self._tf.summary.text(tag, text, step=step)

  def write_hparams(self, hparams) -> None:
    """`hparams`: a flat {name: bool, int, float or str}."""
    from tensorboard.plugins.hparams import summary_v2
    with self._writer.as_default():
      summary_v2.hparams(dict(hparams))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class _NoEvents:
  """The writer of a process that writes no events."""

  def write_scalars(self, step: int, scalars) -> None:
    pass

  def write_texts(self, step: int, texts) -> None:
    pass

  def write_hparams(self, hparams) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


_now = time.monotonic  # the clock of BucketWriter's copies (the tests set their own)


class BucketWriter:
  """TensorBoard events for a workdir in a bucket, which cannot be appended to: written to
  a local directory and copied whole into the workdir at each flush that follows a write,
  and at the first write `every_seconds` or more after the last copy, through lmjax's
  storage layer like every other file of the workdir. (TensorFlow's own writer would
  append to gs:// itself, but only on Google's endpoint, where no test can reach it.)"""

  def __init__(self, workdir: str, every_seconds: float = 60.0):
    self.workdir, self.every_seconds = workdir, every_seconds
    self.local = tempfile.mkdtemp(prefix='lmjax-events-')
    self._writer = SummaryWriter(self.local)
    self._copied = _now()
    self._written = False  # anything written since the last copy

  def write_scalars(self, step: int, scalars) -> None:
    self._writer.write_scalars(step, scalars)
    self._copy_if_due()

  def write_texts(self, step: int, texts) -> None:
    self._writer.write_texts(step, texts)
    self._copy_if_due()

  def write_hparams(self, hparams) -> None:
    self._writer.write_hparams(hparams)
    self._copy_if_due()

  def flush(self) -> None:
    """Copies the event files into the workdir, unless nothing was written since the last
    copy (a run's end calls flush, then close)."""
    self._writer.flush()
    if self._written:
      storage.copy_tree(self.local, self.workdir)
      self._written = False
    self._copied = _now()

  def close(self) -> None:
    self.flush()
    self._writer.close()
    shutil.rmtree(self.local, ignore_errors=True)

  def _copy_if_due(self) -> None:
    self._written = True
    if _now() - self._copied >= self.every_seconds:
      self.flush()


def read_scalars(workdir: str, tags=None) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars in `workdir`'s event files (all by default; text
  and hparams summaries are not scalars).

  A resumed run writes some steps again: the restarted run's values win, and the dead
  run's steps past the restart are dropped.
  """
  if storage.is_remote(workdir):  # read from a local copy of the event files
    with tempfile.TemporaryDirectory(prefix='lmjax-events-') as local:
      for name in storage.listdir(workdir):
        if name.startswith(_EVENT_FILE_PREFIX):
          with open(os.path.join(local, name), 'wb') as f:
            f.write(storage.read_bytes(os.path.join(workdir, name)))
      return _read_local_scalars(local, tags, workdir)
  return _read_local_scalars(workdir, tags, workdir)


def _read_local_scalars(directory: str, tags, workdir: str) -> dict[str, dict[int, float]]:
  # TensorBoard's reader imports TensorFlow if it can: through tfdata, without Keras.
  tfdata.tensorflow()
  acc = event_accumulator.EventAccumulator(directory, size_guidance={'tensors': 0})
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
  (TensorBoard's reader purges them only on a SessionLog.START event, which TensorFlow's
  summary writer does not write.)"""
  values = {}
  for e in tensor_events:
    if values and e.step <= max(values):
      values = {step: v for step, v in values.items() if step < e.step}
    values[e.step] = float(tensor_util.make_ndarray(e.tensor_proto))
  return values
