"""The tf.data training stream and the fixed evaluation windows."""
import itertools

import numpy as np
import pytest

from lmjax.data import completions, pipeline, tokenizers
from lmjax.errors import UserError


def _take(ds, n):
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def _stream(n=5000):
  # Distinct values, so a window's position in the stream can be read off its first token.
  return np.arange(n, dtype=np.int32)


def test_targets_are_inputs_shifted_by_one():
  tokens = _stream()
  for batch in _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=0), 5):
    assert batch['inputs'].shape == batch['targets'].shape == (4, 16)
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    np.testing.assert_array_equal(batch['inputs'] + 1, batch['targets'])  # contiguous


def test_same_seed_same_batches_and_other_seed_differs():
  tokens = _stream()
  a = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=3), 20)
  b = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=3), 20)
  c = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=4), 20)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert any(not np.array_equal(x['inputs'], z['inputs']) for x, z in zip(a, c, strict=True))


def test_starting_mid_stream_continues_the_same_stream():
  tokens = _stream(2000)
  # 2000 tokens / 16 = 124 windows an epoch: 40 batches of 4 cross two epoch boundaries.
  full = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=1), 80)
  resumed = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=1,
                                         start_example=4 * 37), 43)
  for x, y in zip(full[37:], resumed, strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_an_epoch_visits_every_window_once_in_shuffled_order():
  tokens = _stream(16 * 101 + 7)
  n = pipeline.windows_per_epoch(len(tokens), 16)
  batches = _take(pipeline.train_dataset(tokens, seq_len=16, global_batch=1, seed=0), n)
  starts = np.array([b['inputs'][0, 0] for b in batches])
  offset = starts.min()
  assert 0 <= offset < 16
  np.testing.assert_array_equal(np.sort(starts), offset + 16 * np.arange(n))
  assert not np.array_equal(starts, np.sort(starts))  # shuffled


def test_eval_set_scores_every_token_once_in_fixed_windows():
  tokens = _stream(1000)
  evals = pipeline.eval_set(tokens, seq_len=16, batch_size=8)
  batches = list(evals.batches())
  assert all(b['inputs'].shape == (8, 16) for b in batches)
  weights = np.concatenate([b['weights'].ravel() for b in batches])
  targets = np.concatenate([b['targets'].ravel() for b in batches])
  assert weights.sum() == len(tokens) - 1
  np.testing.assert_array_equal(targets[weights > 0], tokens[1:])
  again = list(pipeline.eval_set(tokens, seq_len=16, batch_size=8).batches())
  for x, y in zip(batches, again, strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_split_too_short_for_one_window_is_a_clear_error():
  with pytest.raises(UserError, match='train.seq_len'):
    pipeline.train_dataset(_stream(10), seq_len=16, global_batch=2, seed=0)
  with pytest.raises(UserError, match='evaluation split'):
    pipeline.eval_set(_stream(10), seq_len=16, batch_size=2)


# ----------------------------------------------------------- stateful streams (TBPTT)

EOS = 7  # a token id of _stream that stands in for the document separator here


def test_stream_rows_continue_from_batch_to_batch_and_reset_at_eos_and_epochs():
  tokens = _stream(2000)
  row_len, windows = pipeline.stream_rows(len(tokens), seq_len=16, global_batch=4)
  assert windows == row_len // 16 and windows >= 2
  # The separator: a token that falls mid-window in the second batch.
  eos = int(_take(pipeline.stream_dataset(tokens, seq_len=16, global_batch=4, seed=2,
                                          eos_id=-1), 2)[1]['inputs'][2, 5])
  batches = _take(pipeline.stream_dataset(tokens, seq_len=16, global_batch=4, seed=2,
                                          eos_id=eos), 3 * windows)
  for k, (prev, batch) in enumerate(zip(batches, batches[1:]), start=1):
    np.testing.assert_array_equal(batch['inputs'] + 1, batch['targets'])
    if k % windows:  # within an epoch, each row picks up where it stopped
      np.testing.assert_array_equal(batch['inputs'][:, 0], prev['targets'][:, -1])
    expected = batch['inputs'] == eos
    expected[:, 0] |= k % windows == 0  # a new epoch: every row's stream jumped back
    np.testing.assert_array_equal(batch['resets'], expected)
  # Rows are disjoint pieces of one stream; an epoch's offset moves where they start.
  firsts = [batches[e * windows]['inputs'][:, 0] for e in range(3)]
  np.testing.assert_array_equal(np.diff(firsts[0]), row_len)
  assert len({int(f[0]) for f in firsts}) > 1
  assert batches[1]['resets'][2, 5] and batches[0]['resets'][:, 0].all()


def test_stream_resumes_at_the_batch_it_stopped():
  tokens = _stream(2000)
  full = _take(pipeline.stream_dataset(tokens, seq_len=16, global_batch=4, seed=1, eos_id=EOS),
               40)
  resumed = _take(pipeline.stream_dataset(tokens, seq_len=16, global_batch=4, seed=1,
                                          eos_id=EOS, start_example=4 * 25), 15)
  for x, y in zip(full[25:], resumed, strict=True):
    for key in ('inputs', 'targets', 'resets'):
      np.testing.assert_array_equal(x[key], y[key])


def test_stream_eval_set_reads_every_token_once_as_contiguous_rows():
  tokens = _stream(1000)
  evals = pipeline.stream_eval_set(tokens, seq_len=16, batch_size=4, eos_id=EOS)
  batches = list(evals.batches())
  for prev, batch in zip(batches, batches[1:]):
    np.testing.assert_array_equal(batch['inputs'][:, 0], prev['targets'][:, -1])
  weights = np.stack([b['weights'] for b in batches], 1).reshape(4, -1)  # row-major
  targets = np.stack([b['targets'] for b in batches], 1).reshape(4, -1)
  assert weights.sum() == len(tokens) - 1
  np.testing.assert_array_equal(targets.ravel()[weights.ravel() > 0], tokens[1:])
  resets = np.concatenate([b['resets'] for b in batches])
  inputs = np.concatenate([b['inputs'] for b in batches])
  np.testing.assert_array_equal(resets, inputs == EOS)


def test_stream_too_short_for_the_batch_is_a_clear_error():
  with pytest.raises(UserError, match='train.batch_size=64 contiguous streams'):
    pipeline.stream_dataset(_stream(1000), seq_len=16, global_batch=64, seed=0, eos_id=EOS)


# ------------------------------------------------- token files on disk (np.memmap)


def _memmap(path, tokens, dtype=np.uint16):
  np.asarray(tokens, dtype).tofile(path)
  return np.memmap(path, dtype=dtype, mode='r', shape=(len(tokens),))


def test_a_stateful_stream_resumes_only_at_whole_batches():
  with pytest.raises(UserError, match='resumes at whole batches; 6 rows were read'):
    pipeline.stream_dataset(_stream(1000), seq_len=16, global_batch=4, seed=0, eos_id=EOS,
                            start_example=6)


def test_a_mixture_split_too_short_for_one_window_is_a_clear_error():
  with pytest.raises(UserError, match='a training split of the mixture has 10 tokens'):
    pipeline.mixture_schedule([1000, 10], [1.0, 1.0], seq_len=16, num_examples=4, seed=0)


def test_a_classification_split_smaller_than_a_batch_is_a_clear_error():
  examples = {'inputs': np.zeros((3, 4), np.int32), 'mask': np.ones((3, 4), bool),
              'labels': np.zeros(3, np.int32)}
  with pytest.raises(UserError, match='has 3 examples, fewer than one batch of '
                                      'train.batch_size=8'):
    pipeline.classification_train_dataset(examples, global_batch=8, seed=0)


def test_a_memmap_reads_as_the_same_array_in_memory(tmp_path):
  tokens = _stream()
  on_disk = _memmap(tmp_path / 'tokens.bin', tokens)
  masking = pipeline.Masking(rate=0.3, mask_id=5000, vocab_size=5000)
  for make in (
      lambda t: pipeline.train_dataset(t, seq_len=16, global_batch=4, seed=3, start_example=8),
      lambda t: pipeline.train_dataset(t, seq_len=16, global_batch=4, seed=3, masking=masking),
      lambda t: pipeline.stream_dataset(t, seq_len=16, global_batch=4, seed=3, eos_id=EOS)):
    for x, y in zip(_take(make(tokens), 5), _take(make(on_disk), 5), strict=True):
      assert x.keys() == y.keys()
      for key in x:
        assert x[key].dtype == y[key].dtype
        np.testing.assert_array_equal(x[key], y[key])


def test_a_memmap_is_read_window_by_window_not_loaded_whole(tmp_path):
  import resource

  # 2 GB of uint16 ids, sparse on disk; loaded whole as int32 it would take 4 GB.
  num_tokens = 1 << 30
  path = tmp_path / 'large.bin'
  with open(path, 'wb') as f:
    f.truncate(num_tokens * 2)
  on_disk = np.memmap(path, dtype=np.uint16, mode='r', shape=(num_tokens,))
  peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  batches = _take(pipeline.train_dataset(on_disk, seq_len=1024, global_batch=2, seed=0), 3)
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
  assert batches[0]['inputs'].shape == (2, 1024)
  assert grown < 1 << 20, f'peak memory grew by {grown / 2**20:.1f} GiB'


def test_training_streams_leave_tf_data_nothing_to_tune():
  """With tf.data's autotuning on, deleting a long run's iterator could wait up to the
  tuning thread's next wake-up (24-34 s at the end of a `:cpu` run): every stream a run
  trains on has it off, and still yields its batches."""
  tokens = _stream(2000)
  starts, _ = pipeline.mixture_schedule([1000, 1000], [0.5, 0.5], seq_len=16, num_examples=8,
                                        seed=0)
  classes = {'inputs': np.zeros((8, 4), np.int32), 'mask': np.ones((8, 4), bool),
             'labels': np.zeros(8, np.int32)}
  chars = tokenizers.CharTokenizer.train(['abc'])
  pairs = completions.tokenize([('ab', 'c')] * 8, chars, seq_len=16, what='x')
  streams = {
      'lm': pipeline.train_dataset(tokens, seq_len=16, global_batch=4, seed=0),
      'mixture': pipeline.mixture_dataset(tokens, starts, seq_len=16, global_batch=4),
      'stream': pipeline.stream_dataset(tokens, seq_len=16, global_batch=4, seed=0, eos_id=EOS),
      'classification': pipeline.classification_train_dataset(classes, global_batch=4, seed=0),
      'completion': completions.train_dataset(pairs, seq_len=16, global_batch=4, seed=0,
                                              packed=True),
  }
  for name, ds in streams.items():
    assert ds.options().autotune.enabled is False, name
    assert len(_take(ds, 2)) == 2, name
