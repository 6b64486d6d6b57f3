"""Token streams -> training and evaluation batches -> global jax.Arrays.

Training order is a pure function of (seed, example index): epoch e cuts the token
stream into windows of `seq_len + 1` at an offset drawn from (seed, e), every token
a target once per epoch, and visits them in an order shuffled by (seed, e). The only
state to checkpoint is how many examples the run has consumed, so a resumed run sees
the batches an uninterrupted one would, and so would a run on a different number of
processes (each reads only its own rows of every global batch).

Stateful training of recurrent models (truncated backpropagation through time) reads
the stream differently, see `stream_dataset`: row r of every batch continues where row r
of the previous batch stopped, and a 'resets' mask marks where the carry must start
afresh. Its state is the same single count.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from lmjax.data import corpora, external
from lmjax.data.tfdata import tf
from lmjax.errors import UserError


def load_tokens(data_config, split: str, tokenizer, works=None,
                cache_dir: str | None = None) -> np.ndarray:
  """The split's works, tokenized and joined with the separator (eos) after each. `works`:
  the split's (title, text) pairs when the caller has read them already.

  A 'tfds:' dataset (lmjax/data/external.py) comes back as a read-only np.memmap of its
  token file in `cache_dir` (uint16 or uint32 ids), written first if needed; every reader
  below takes it as it takes an array in memory."""
  if external.is_external(data_config.name):
    if works is not None:
      raise ValueError('a tfds: dataset is read from its token file, not from works.')
    directory = cache_dir or data_config.cache_dir
    if not directory:
      raise ValueError('a tfds: dataset needs cache_dir (or data.cache_dir): where its '
                       'token files go.')
    return external.load_tokens(data_config, split, tokenizer, directory)
  if works is None:
    works = corpora.load_split_texts(data_config.name, split, data_config.data_dir or None)
  if data_config.drop_unknown_chars and tokenizer.kind == 'char':
    works = _drop_unknown_chars(works, tokenizer, split)
  pieces = []
  for ids in tokenizer.encode_batch([text for _, text in works]):
    pieces.append(ids)
    pieces.append(np.array([tokenizer.eos_id], np.int32))
  return np.concatenate(pieces).astype(np.int32)


def _drop_unknown_chars(works, tokenizer, split: str):
  """`works` without the characters the tokenizer has no id for (data.drop_unknown_chars:
  a character model fine-tuned on text with a few symbols its base never saw)."""
  known = set(tokenizer.chars)
  kept_works, unknown, dropped = [], set(), 0
  for title, text in works:
    missing = set(text) - known
    if missing:
      unknown |= missing
      kept = ''.join(c for c in text if c in known)
      dropped += len(text) - len(kept)
      text = kept
    kept_works.append((title, text))
  if dropped:
    print(f'data.drop_unknown_chars: dropped {dropped} characters of the {split} split that '
          f'the vocabulary lacks ({", ".join(map(repr, sorted(unknown)))}).', flush=True)
  return kept_works


def _check_long_enough(tokens: np.ndarray, seq_len: int, what: str):
  if len(tokens) < seq_len + 2:
    raise UserError(f'{what} has {len(tokens)} tokens, too few for one window of '
                    f'train.seq_len + 1 = {seq_len + 1}; use a smaller train.seq_len or a '
                    'larger split.')


def _window_reader(tokens: np.ndarray, length: int):
  """A function from int64 start positions [B] to the int32 windows [B, length] there.

  An array in memory becomes one tensor, gathered from in the graph. A memmap (a token file
  of a corpus too large to hold) is read window by window instead: only the pages a batch
  touches come into memory, never the whole file."""
  if isinstance(tokens, np.memmap):
    offsets = np.arange(length)

    def read(starts):
      return np.asarray(tokens[starts[:, None] + offsets], np.int32)

    def windows(starts):
      out = tf.numpy_function(read, [starts], tf.int32, stateful=False)
      return tf.ensure_shape(out, [None, length])
    return windows
  tokens_t = tf.constant(tokens, tf.int32)
  span = tf.range(length, dtype=tf.int64)
  return lambda starts: tf.gather(tokens_t, starts[:, None] + span)


def windows_per_epoch(num_tokens: int, seq_len: int) -> int:
  # Leaves room for an offset of up to seq_len - 1 in every epoch.
  return (num_tokens - seq_len) // seq_len


def local_rows(global_batch: int) -> tuple[int, int]:
  """The [start, stop) rows of each global batch that this process reads."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch % count:
    raise ValueError(f'batch size {global_batch} does not divide by the {count} processes.')
  per_process = global_batch // count
  return index * per_process, (index + 1) * per_process


@dataclasses.dataclass(frozen=True)
class Masking:
  """BERT's masked-LM corruption: each position is selected with probability `rate`; a
  selected token becomes `mask_id` (80%), a random token of the vocabulary (10%) or stays
  (10%), and only selected positions are scored."""
  rate: float
  mask_id: int
  vocab_size: int  # random replacements are drawn from [0, vocab_size)

  def apply(self, tokens_BxL, seed_pair):
    """(inputs, weights) for `tokens_BxL`, a pure function of the tokens and `seed_pair`
    (two int64s)."""
    select_seed, kind_seed, token_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed_pair, 3))
    shape = tf.shape(tokens_BxL)
    selected = tf.random.stateless_uniform(shape, select_seed) < self.rate
    kind = tf.random.stateless_uniform(shape, kind_seed)
    random_ids = tf.random.stateless_uniform(shape, token_seed, 0, self.vocab_size,
                                             dtype=tf.int32)
    inputs = tf.where(selected & (kind < 0.8), tf.constant(self.mask_id, tf.int32),
                      tf.where(selected & (kind < 0.9), random_ids, tokens_BxL))
    return inputs, tf.cast(selected, tf.float32)


def read_ahead(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` with two batches prepared ahead of the step, and tf.data's autotuning off.

  These pipelines leave tf.data nothing to tune (no parallel map, a fixed read-ahead), and
  with autotuning on, deleting a finished run's iterator can wait for the tuning thread to
  wake from its sleep, which lengthens as the run goes on: the end of a `:cpu` run took
  24-34 s longer in about half of the runs."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(2).with_options(options)


def train_dataset(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                  start_example: int = 0, masking: Masking | None = None) -> tf.data.Dataset:
  """Endless {'inputs', 'targets'} batches of this process's rows, from `start_example` on.

  With `masking` (a masked-LM encoder) the targets are the window's tokens, the inputs the
  same tokens corrupted, and 'weights' marks the positions to score; the corruption is drawn
  for the whole global batch from (seed, batch number), so it is the same on any number of
  processes and after a resume."""
  _check_long_enough(tokens, seq_len, 'the training split')
  n = windows_per_epoch(len(tokens), seq_len)
  read_windows = _window_reader(tokens, seq_len + 1)

  def epoch_window_starts(epoch):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    offset = tf.random.stateless_uniform([], epoch_seed, 0, seq_len, dtype=tf.int64)
    starts = offset + tf.range(n, dtype=tf.int64) * seq_len
    return tf.data.Dataset.from_tensor_slices(
        tf.random.experimental.stateless_shuffle(starts, epoch_seed))

  first_epoch, skip = divmod(start_example, n)
  row_start, row_stop = local_rows(global_batch)

  def to_batch(starts):
    windows = read_windows(starts[row_start:row_stop])
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}

  def to_masked_batch(batch_number, starts):
    tokens_BxL = read_windows(starts)[:, :-1]  # all rows: one draw
    inputs, weights = masking.apply(tokens_BxL, tf.stack([tf.constant(seed, tf.int64),
                                                          batch_number]))
    rows = slice(row_start, row_stop)
    return {'inputs': inputs[rows], 'targets': tokens_BxL[rows], 'weights': weights[rows]}

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch_window_starts).skip(skip)
  ds = ds.batch(global_batch, drop_remainder=True)
  if masking is None:
    ds = ds.map(to_batch)
  else:  # a resumed run starts at a whole batch: start_example is steps x batch
    ds = ds.enumerate(start=start_example // global_batch).map(to_masked_batch)
  return read_ahead(ds)


def mixture_schedule(task_lengths: list[int], weights: list[float], *, seq_len: int,
                     num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(window starts, task ids) of the first `num_examples` training examples of a weighted
  mixture of token streams laid end to end (task t's stream starts where t - 1's ends).

  Each example's task is drawn by weight; each task reads its own windows as
  `train_dataset` reads a single stream (an offset and an order per epoch, every token a
  target once per epoch), with its own epochs. All of it is a pure function of the seed:
  a run resumed at any example, or read by any number of processes, sees the same."""
  for length in task_lengths:
    if length < seq_len + 2:
      raise UserError(f'a training split of the mixture has {length} tokens, too few for '
                      f'one window of train.seq_len + 1 = {seq_len + 1}; use a smaller '
                      'train.seq_len.')
  probabilities = np.asarray(weights, np.float64) / np.sum(weights)
  tasks = np.random.default_rng([seed, 1]).choice(len(task_lengths), num_examples,
                                                  p=probabilities).astype(np.int32)
  starts = np.empty(num_examples, np.int64)
  base = 0
  for t, length in enumerate(task_lengths):
    rows = np.flatnonzero(tasks == t)
    n = windows_per_epoch(length, seq_len)
    epochs = []
    for epoch in range(-(-len(rows) // n)):
      rng = np.random.default_rng([seed, 2, t, epoch])
      epochs.append(base + rng.integers(seq_len) + rng.permutation(n) * seq_len)
    starts[rows] = np.concatenate(epochs)[:len(rows)] if epochs else []
    base += length
  return starts, tasks


def mixture_dataset(tokens: np.ndarray, starts: np.ndarray, *, seq_len: int,
                    global_batch: int, start_example: int = 0) -> tf.data.Dataset:
  """{'inputs', 'targets'} batches of this process's rows of the windows at `starts` (from
  `mixture_schedule`), from `start_example` on, until the schedule ends."""
  read_windows = _window_reader(tokens, seq_len + 1)
  row_start, row_stop = local_rows(global_batch)
  batches = starts[start_example:].reshape(-1, global_batch)[:, row_start:row_stop]

  def to_batch(batch_starts):
    windows = read_windows(batch_starts)
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}

  return read_ahead(tf.data.Dataset.from_tensor_slices(batches).map(to_batch))


def stream_rows(num_tokens: int, *, seq_len: int, global_batch: int) -> tuple[int, int]:
  """(tokens each row reads per epoch, windows per epoch) of a stateful stream."""
  # Leaves room for an epoch offset of up to seq_len - 1 and the last window's target.
  row_len = (num_tokens - seq_len - 1) // global_batch // seq_len * seq_len
  if row_len < seq_len:
    raise UserError(
        f'stateful training cuts the {num_tokens}-token training split into train.batch_size'
        f'={global_batch} contiguous streams, and each needs at least one window of '
        f'train.seq_len={seq_len} tokens; lower the batch size or the sequence length.')
  return row_len, row_len // seq_len


def stream_dataset(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                   eos_id: int, start_example: int = 0) -> tf.data.Dataset:
  """Endless {'inputs', 'targets', 'resets'} batches for stateful (TBPTT) training.

  Epoch e drops an offset drawn from (seed, e) and cuts the rest of the stream into
  `global_batch` contiguous pieces of equal length, one per row; batch k of the epoch
  holds window k of every piece, so a carry passed from batch to batch reads each piece
  in order. `resets` is True where the carry must restart: at inputs that are the
  document separator (eos), and at the first position of every epoch (the piece's
  stream jumped back). `start_example` counts rows, as `train_dataset`'s does.
  """
  row_len, windows = stream_rows(len(tokens), seq_len=seq_len, global_batch=global_batch)
  read_windows = _window_reader(tokens, seq_len + 1)
  row_start, row_stop = local_rows(global_batch)
  rows = tf.range(row_start, row_stop, dtype=tf.int64)
  first_column = tf.range(seq_len) == 0

  def batch_at(index):
    epoch, k = index // windows, index % windows
    offset = tf.random.stateless_uniform(
        [], tf.stack([tf.constant(seed, tf.int64), epoch]), 0, seq_len, dtype=tf.int64)
    starts = offset + rows * row_len + k * seq_len
    window = read_windows(starts)
    inputs = window[:, :-1]
    resets = (inputs == eos_id) | (first_column[None, :] & (k == 0))
    return {'inputs': inputs, 'targets': window[:, 1:], 'resets': resets}

  if start_example % global_batch:
    raise UserError(f'a stateful stream resumes at whole batches; {start_example} rows were '
                    f'read, which train.batch_size={global_batch} does not divide; resume '
                    'with the train.batch_size the run had.')
  ds = tf.data.Dataset.range(start_example // global_batch, np.iinfo(np.int64).max)
  return read_ahead(ds.map(batch_at))


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """A split cut into fixed rows, padded to whole batches: `arrays` maps each batch field
  to all its rows, [num_batches * batch_size, ...], and its 'weights' are 0 on padding.

  Language modelling: 'inputs', 'targets', 'weights' ([rows, seq_len] each), and with
  'resets' (stateful evaluation of a recurrent model) row r of batch b + 1 continues row r
  of batch b, so a carry passed along the batches reads the whole split. Classification:
  'inputs', 'mask' ([rows, seq_len]), 'labels', 'weights' ([rows]).
  """
  arrays: dict[str, np.ndarray]
  batch_size: int

  @property
  def num_batches(self) -> int:
    return len(self.arrays['inputs']) // self.batch_size

  def batches(self) -> Iterator[dict]:
    row_start, row_stop = local_rows(self.batch_size)
    for b in range(self.num_batches):
      rows = slice(b * self.batch_size + row_start, b * self.batch_size + row_stop)
      yield {k: v[rows] for k, v in self.arrays.items()}


def eval_set(tokens: np.ndarray, *, seq_len: int, batch_size: int) -> EvalSet:
  """Every token after the first is a target exactly once; the same every time."""
  _check_long_enough(tokens, seq_len, 'the evaluation split')
  num_targets = len(tokens) - 1
  num_windows = -(-num_targets // seq_len)
  num_rows = -(-num_windows // batch_size) * batch_size
  padded = np.zeros(num_rows * seq_len + 1, np.int32)
  padded[:len(tokens)] = tokens
  weights = np.zeros(num_rows * seq_len, np.float32)
  weights[:num_targets] = 1.0
  starts = np.arange(num_rows) * seq_len
  idx = starts[:, None] + np.arange(seq_len)
  return EvalSet({'inputs': padded[idx], 'targets': padded[idx + 1],
                  'weights': weights[idx]}, batch_size)


def masked_eval_set(tokens: np.ndarray, *, seq_len: int, batch_size: int, masking: Masking,
                    seed: int) -> EvalSet:
  """The split cut into windows of `seq_len` tokens, corrupted once by `masking` under
  `seed` (the same every evaluation); every selected real token is scored."""
  _check_long_enough(tokens, seq_len, 'the evaluation split')
  num_windows = -(-len(tokens) // seq_len)
  num_rows = -(-num_windows // batch_size) * batch_size
  padded = np.zeros(num_rows * seq_len, np.int32)
  padded[:len(tokens)] = tokens
  windows = padded.reshape(num_rows, seq_len)
  # -1: the training batches' draws use batch numbers 0, 1, ...
  inputs, selected = masking.apply(tf.constant(windows), tf.constant([seed, -1], tf.int64))
  real = (np.arange(num_rows * seq_len) < len(tokens)).reshape(num_rows, seq_len)
  return EvalSet({'inputs': inputs.numpy(), 'targets': windows,
                  'weights': selected.numpy() * real}, batch_size)


def stream_eval_set(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                    eos_id: int) -> EvalSet:
  """The split as `batch_size` contiguous streams read window by window (stateful
  evaluation): every token after the first is a target exactly once."""
  _check_long_enough(tokens, seq_len, 'the evaluation split')
  num_targets = len(tokens) - 1
  row_len = -(-num_targets // batch_size)
  row_len = -(-row_len // seq_len) * seq_len
  windows = row_len // seq_len
  padded = np.zeros(batch_size * row_len + 1, np.int32)
  padded[:len(tokens)] = tokens
  weights = np.zeros(batch_size * row_len, np.float32)
  weights[:num_targets] = 1.0
  # Row r of batch b starts at r * row_len + b * seq_len; batches are stored one after
  # the other, as EvalSet.batches reads them.
  starts = (np.arange(batch_size)[None, :] * row_len +
            np.arange(windows)[:, None] * seq_len).reshape(-1)
  idx = starts[:, None] + np.arange(seq_len)
  inputs = padded[idx]
  return EvalSet({'inputs': inputs, 'targets': padded[idx + 1], 'weights': weights[idx],
                  'resets': inputs == eos_id}, batch_size)


# ----------------------------------------------------------------- classification


def load_examples(data_config, split: str, tokenizer, seq_len: int,
                  passages=None) -> dict[str, np.ndarray]:
  """A classification split as arrays: 'inputs' (each passage's first `seq_len` tokens,
  right-padded with 0), 'mask' (True on real tokens) and 'labels'. `passages`: the split's
  (title, index, text, label) rows when the caller has read them already."""
  if passages is None:
    passages = corpora.load_split_passages(data_config.name, split,
                                           data_config.data_dir or None)
  texts = [(title, text) for title, _, text, _ in passages]
  if data_config.drop_unknown_chars and tokenizer.kind == 'char':
    texts = _drop_unknown_chars(texts, tokenizer, split)
  inputs = np.zeros((len(texts), seq_len), np.int32)
  mask = np.zeros((len(texts), seq_len), bool)
  for row, ids in enumerate(tokenizer.encode_batch([text for _, text in texts])):
    ids = ids[:seq_len]
    inputs[row, :len(ids)] = ids
    mask[row, :len(ids)] = True
  labels = np.array([label for *_, label in passages], np.int32)
  return {'inputs': inputs, 'mask': mask, 'labels': labels}


def check_one_batch(num_examples: int, global_batch: int) -> None:
  """A classification training split holds at least one batch of examples."""
  if num_examples < global_batch:
    raise UserError(f'the training split has {num_examples} examples, fewer than one batch '
                    f'of train.batch_size={global_batch}; lower the batch size.')


def classification_train_dataset(examples: dict[str, np.ndarray], *, global_batch: int,
                                 seed: int, start_example: int = 0) -> tf.data.Dataset:
  """Endless {'inputs', 'mask', 'labels'} batches of this process's rows: every epoch
  visits all examples in an order shuffled by (seed, epoch). As with `train_dataset`, the
  only state is the count of examples read, `start_example`."""
  n = len(examples['labels'])
  check_one_batch(n, global_batch)
  tensors = {k: tf.constant(v) for k, v in examples.items()}

  def epoch_order(epoch):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    return tf.data.Dataset.from_tensor_slices(
        tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed))

  first_epoch, skip = divmod(start_example, n)
  row_start, row_stop = local_rows(global_batch)

  def to_batch(indices):
    return {k: tf.gather(v, indices[row_start:row_stop]) for k, v in tensors.items()}

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch_order).skip(skip)
  return read_ahead(ds.batch(global_batch, drop_remainder=True).map(to_batch))


def classification_eval_set(examples: dict[str, np.ndarray], *, batch_size: int) -> EvalSet:
  """Every example once, in order, padded with weight-0 rows to whole batches."""
  n = len(examples['labels'])
  rows = -(-n // batch_size) * batch_size
  arrays = {}
  for k, v in examples.items():
    padded = np.zeros((rows,) + v.shape[1:], v.dtype)
    padded[:n] = v
    arrays[k] = padded
  arrays['weights'] = (np.arange(rows) < n).astype(np.float32)
  return EvalSet(arrays, batch_size)


def to_global(local_batch: dict, sharding) -> dict:
  """Each process's rows -> one global jax.Array per field, split over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
