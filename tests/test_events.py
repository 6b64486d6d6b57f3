"""lmjax/events.py: scalars read back from event files that its writer (the one training
uses) wrote, including a restarted run's."""
import time

import pytest

from lmjax import events


def _write(workdir, scalars_by_step, texts=False):
  """One writer's life: scalars per step, then closed (as a run that ends or dies)."""
  writer = events.open_writer(str(workdir))
  if texts:
    writer.write_texts(0, {'config': '    model: tiny'})
    writer.write_hparams({'lr': 0.5, 'model': 'tiny'})
  for step, scalars in scalars_by_step.items():
    writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


def _next_second():
  """Event files are named after the second their writer opened and read in name order: a
  restarted run's file comes after the dead run's, as it would on a real restart."""
  time.sleep(1.02 - time.time() % 1.0)


def test_scalars_are_read_per_tag_and_step_and_texts_are_not_scalars(tmp_path):
  _write(tmp_path, {1: {'train/loss': 2.5, 'train/accuracy': 0.25},
                    2: {'train/loss': 2.0, 'train/accuracy': 0.5},
                    4: {'train/loss': 1.5, 'eval/loss': 1.75}}, texts=True)
  assert events.read_scalars(str(tmp_path)) == {
      'train/loss': {1: 2.5, 2: 2.0, 4: 1.5},
      'train/accuracy': {1: 0.25, 2: 0.5},
      'eval/loss': {4: 1.75}}
  assert events.read_scalars(str(tmp_path), ['eval/loss']) == {'eval/loss': {4: 1.75}}


def _dead_run_and_restart(workdir):
  """The first run logs steps 1-10 and dies; its restart resumes from a checkpoint at step
  6 and logs steps 7 and 8 again, with other values."""
  _write(workdir, {step: {'train/loss': 10.0 - step} for step in range(1, 11)})
  _next_second()
  _write(workdir, {step: {'train/loss': 100.0 + step} for step in range(7, 9)})


def test_steps_a_restarted_run_writes_again_take_its_values(tmp_path):
  _dead_run_and_restart(tmp_path)
  loss = events.read_scalars(str(tmp_path), ['train/loss'])['train/loss']
  assert {step: loss[step] for step in range(1, 9)} == {
      1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 5.0, 6: 4.0, 7: 107.0, 8: 108.0}


def test_the_dead_runs_steps_past_the_restart_are_dropped(tmp_path):
  _dead_run_and_restart(tmp_path)
  assert sorted(events.read_scalars(str(tmp_path), ['train/loss'])['train/loss']) == [
      1, 2, 3, 4, 5, 6, 7, 8]


def test_an_unknown_tag_is_a_key_error_naming_it_and_the_tags_there(tmp_path):
  _write(tmp_path, {1: {'train/loss': 1.0}}, texts=True)
  with pytest.raises(KeyError, match=r"no scalar 'eval/loss' in .*\['train/loss'\]"):
    events.read_scalars(str(tmp_path), ['train/loss', 'eval/loss'])
  with pytest.raises(KeyError, match="no scalar 'config'"):  # a text summary
    events.read_scalars(str(tmp_path), ['config'])


def test_the_bucket_writer_copies_what_was_written_and_only_when_something_was(tmp_path,
                                                                              monkeypatch):
  """BucketWriter keeps events locally and copies them into the workdir (here a local
  directory: the copy goes through lmjax.storage either way) at a flush, at the first write
  a minute after the last copy, and never for nothing new (a run's end flushes, then
  closes)."""
  workdir = tmp_path / 'workdir'
  clock = [0.0]
  monkeypatch.setattr(events, '_now', lambda: clock[0])
  writer = events.BucketWriter(str(workdir), every_seconds=60.0)
  writer.flush()
  assert not workdir.exists()  # nothing written, nothing copied
  writer.write_scalars(1, {'train/loss': 2.5})
  assert not workdir.exists()  # not yet a minute
  clock[0] = 61.0
  writer.write_scalars(2, {'train/loss': 2.0})
  assert events.read_scalars(str(workdir)) == {'train/loss': {1: 2.5, 2: 2.0}}
  for name in list(workdir.iterdir()):
    name.unlink()
  writer.flush()
  writer.close()
  assert list(workdir.iterdir()) == []  # what was copied is not copied again
  writer = events.BucketWriter(str(workdir))
  writer.write_scalars(3, {'eval/loss': 1.5})
  writer.close()
  assert events.read_scalars(str(workdir)) == {'eval/loss': {3: 1.5}}
