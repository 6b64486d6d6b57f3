"""Character and SentencePiece tokenizers: train, encode/decode, save and load.

Both have `vocab_size`, `eos_id` (the separator written after each document),
`kind`, `encode(text) -> int32 array`, `decode(ids) -> str` and `save(directory)`.
`decode` turns eos into the empty string, so decoding a generation that ran past
the end of a document drops the separators but keeps everything else.
A directory holds `tokenizer.json` (and `tokenizer.model` for SentencePiece);
`load_tokenizer(directory)` reads it back.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

KINDS = ('char', 'sentencepiece')
SPM_MODEL_TYPES = ('bpe', 'unigram')
CONFIG_FILE = 'tokenizer.json'
SPM_MODEL_FILE = 'tokenizer.model'

# Unigram models come out different for different thread counts, so training
# uses a fixed number: a model then depends on its input, not on the machine.
_SPM_TRAIN_THREADS = 4
# Long texts are encoded in chunks of about this many characters, in parallel.
_SPM_CHUNK_CHARS = 1 << 15


def _as_ids(ids, vocab_size: int) -> np.ndarray:
  """A 1-D int array of ids in [0, vocab_size) from a list, NumPy or JAX array."""
  ids = np.asarray(ids)
  if ids.size == 0:
    return np.zeros([0], np.int32)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'decode takes a 1-D sequence of integer ids; got shape {ids.shape} '
                     f'and dtype {ids.dtype}.')
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ValueError(f'ids {sorted(set(bad.tolist()))[:10]} are outside the vocabulary '
                     f'[0, {vocab_size}).')
  return ids


def _write_config(directory: str, config: dict) -> None:
  # Written last and atomically: a directory with tokenizer.json holds a whole tokenizer.
  path = os.path.join(directory, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(config, f, indent=2)
  os.replace(path + '.tmp', path)


class CharTokenizer:
  """One id per character of the training text; id 0 is eos."""

  kind = 'char'
  eos_id = 0

  def __init__(self, chars: Sequence[str]):
    chars = list(chars)
    if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
      raise ValueError('CharTokenizer needs distinct single characters.')
    self.chars = chars
    self.vocab_size = len(chars) + 1
    codes = np.array([ord(c) for c in chars], np.int64)
    # A table over code points makes encoding one vectorised lookup.
    self._id_by_code = np.full(int(codes.max(initial=0)) + 1, -1, np.int32)
    self._id_by_code[codes] = np.arange(1, len(chars) + 1, dtype=np.int32)
    # Index 0 (eos) is never looked up: decode drops it first.
    self._char_by_id = np.array(['\0'] + chars, dtype='<U1')

  @classmethod
  def train(cls, texts: Iterable[str]) -> CharTokenizer:
    """The vocabulary is every character that occurs in `texts`, sorted."""
    chars = set()
    for text in texts:
      chars.update(text)
    if not chars:
      raise ValueError('CharTokenizer.train got no text; the training split is empty.')
    return cls(sorted(chars))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)
    table = self._id_by_code
    ids = table[np.minimum(codes, len(table) - 1)]
    ids[codes >= len(table)] = -1
    if (ids < 0).any():
      unknown = sorted({chr(c) for c in codes[ids < 0].tolist()})
      shown = ', '.join(repr(c) for c in unknown[:10])
      more = f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''
      raise ValueError(
          f'Text has characters outside the character vocabulary: {shown}{more}. '
          'The vocabulary is the set of characters in the training split; remove '
          'or replace these characters.')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    ids = _as_ids(ids, self.vocab_size)
    ids = ids[ids != self.eos_id]
    # '<U1' stores each character as one little-endian UTF-32 code unit.
    return self._char_by_id[ids].tobytes().decode('utf-32-le', 'surrogatepass')

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _write_config(directory, {'kind': self.kind, 'vocab_size': self.vocab_size,
                              'eos_id': self.eos_id, 'chars': self.chars})


def _spm_training_lines(texts: Iterable[str]) -> Iterable[str]:
  # '\n' is a user-defined symbol, so no piece crosses a line end: training on
  # lines loses nothing, and short sentences keep SentencePiece's limits away.
  for text in texts:
    for line in text.split('\n'):
      if line:
        yield line


def _spm_size_error(error: RuntimeError, vocab_size: int) -> ValueError | None:
  message = str(error)
  too_high = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)',
                       message)
  if too_high:
    return ValueError(
        f'data.vocab_size={vocab_size} is too large for the training text: SentencePiece '
        f'can make at most {too_high.group(2)} pieces from it. Set data.vocab_size to '
        f'{too_high.group(2)} or less.')
  too_low = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', message)
  if too_low:
    return ValueError(
        f'data.vocab_size={vocab_size} is too small: the training text needs '
        f'{too_low.group(2)} pieces for its characters, the 256 fallback bytes and the '
        f'special symbols alone. Set data.vocab_size above {too_low.group(2)}.')
  return None


class SentencePieceTokenizer:
  """A SentencePiece model (BPE or unigram) that round-trips any text exactly.

  Exactness comes from the training options: no normalisation, whitespace kept
  as it is (no dummy prefix, no collapsing of runs), '\\n' as its own symbol and
  byte fallback for characters the vocabulary lacks.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self._newline_id = self._sp.piece_to_id('\n')

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = 'bpe',
            directory: str | None = None) -> SentencePieceTokenizer:
    """Trains on `texts` (deterministically); saves to `directory` if given."""
    if model_type not in SPM_MODEL_TYPES:
      raise ValueError(f'data.spm_model_type={model_type!r}; use one of {SPM_MODEL_TYPES}.')
    model = io.BytesIO()
    # The trainer samples sentences only when input_sentence_size > 0 (it is 0,
    # all sentences); the seed pins any other randomness it has.
    spm.set_random_generator_seed(0)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(_spm_training_lines(texts)),
          model_writer=model,
          vocab_size=vocab_size,
          model_type=model_type,
          normalization_rule_name='identity',
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          user_defined_symbols=['\n'],
          byte_fallback=True,
          character_coverage=1.0,
          # Runs of spaces (verse indentation) may become pieces of their own.
          allow_whitespace_only_pieces=True,
          split_digits=True,
          input_sentence_size=0,
          max_sentence_length=1 << 16,
          num_threads=_SPM_TRAIN_THREADS,
          minloglevel=2,
      )
    except RuntimeError as e:
      reworded = _spm_size_error(e, vocab_size)
      if reworded:
        raise reworded from e
      raise
    tokenizer = cls(model.getvalue())
    if directory is not None:
      tokenizer.save(directory)
    return tokenizer

  def encode(self, text: str) -> np.ndarray:
    # Chunks end at a '\n', which no piece crosses, so encoding them apart gives
    # the same pieces (up to ties between equally good unigram segmentations)
    # and lets SentencePiece use several threads.
    chunks, start = [], 0
    while start < len(text):
      end = text.find('\n', start + _SPM_CHUNK_CHARS)
      end = len(text) if end < 0 else end + 1
      chunks.append(text[start:end])
      start = end
    if not chunks:
      return np.zeros([0], np.int32)
    pieces = self._sp.encode(chunks, num_threads=os.cpu_count() or 1)
    return np.concatenate([np.asarray(p, np.int32) for p in pieces])

  def decode(self, ids) -> str:
    return self._sp.decode(_as_ids(ids, self.vocab_size).tolist())

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SPM_MODEL_FILE), 'wb') as f:
      f.write(self.model_proto)
    _write_config(directory, {'kind': self.kind, 'vocab_size': self.vocab_size,
                              'eos_id': self.eos_id, 'model_file': SPM_MODEL_FILE})


Tokenizer = CharTokenizer | SentencePieceTokenizer


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads the tokenizer that `save` wrote to `directory`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No tokenizer in {directory} ({CONFIG_FILE} is missing); train first '
        '(experiments/train.py writes one into its workdir).')
  with open(path) as f:
    config = json.load(f)
  kind = config.get('kind')
  if kind == 'char':
    tokenizer = CharTokenizer(config['chars'])
  elif kind == 'sentencepiece':
    model_path = os.path.join(directory, config.get('model_file', SPM_MODEL_FILE))
    if not os.path.exists(model_path):
      raise FileNotFoundError(f'{path} names a SentencePiece model, but {model_path} is '
                              'missing; train the tokenizer again in a new directory.')
    with open(model_path, 'rb') as f:
      tokenizer = SentencePieceTokenizer(f.read())
  else:
    raise ValueError(f'{path}: unknown tokenizer kind {kind!r}; expected one of {KINDS}.')
  if tokenizer.vocab_size != config.get('vocab_size'):
    raise ValueError(f'{path} says vocab_size={config.get("vocab_size")}, but the saved '
                     f'tokenizer has {tokenizer.vocab_size}; the directory is damaged.')
  return tokenizer


def build_tokenizer(kind: str, directory: str, train_texts: Callable[[], Iterable[str]],
                    vocab_size: int | None = None, model_type: str = 'bpe') -> Tokenizer:
  """Loads the tokenizer saved in `directory`, or trains one on `train_texts()` and saves it.

  Reusing the saved one is what keeps a resumed run's ids the same.
  """
  if kind not in KINDS:
    raise ValueError(f'data.tokenizer={kind!r}; use one of {KINDS}.')
  if os.path.exists(os.path.join(directory, CONFIG_FILE)):
    tokenizer = load_tokenizer(directory)
    if tokenizer.kind != kind:
      raise ValueError(
          f'data.tokenizer={kind!r}, but {directory} already holds a {tokenizer.kind!r} '
          f'tokenizer (from an earlier run). Use data.tokenizer={tokenizer.kind!r} to '
          'resume that run, or a new workdir.')
    if kind == 'sentencepiece' and vocab_size and tokenizer.vocab_size != vocab_size:
      raise ValueError(
          f'data.vocab_size={vocab_size}, but {directory} already holds a SentencePiece '
          f'tokenizer of {tokenizer.vocab_size} pieces (from an earlier run). Use '
          f'data.vocab_size={tokenizer.vocab_size} to resume that run, or a new workdir.')
    return tokenizer
  if kind == 'char':
    tokenizer = CharTokenizer.train(train_texts())
  else:
    if not vocab_size:
      raise ValueError('data.tokenizer=sentencepiece needs data.vocab_size > 0 '
                       '(e.g. --config.data.vocab_size=2000).')
    tokenizer = SentencePieceTokenizer.train(train_texts(), vocab_size, model_type)
  tokenizer.save(directory)
  return tokenizer
