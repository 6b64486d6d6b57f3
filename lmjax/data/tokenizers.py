"""Character, SentencePiece and GPT-2 tokenizers: train, encode/decode, save and load.

All have `vocab_size`, `eos_id` (the separator written after each document),
`kind`, `encode(text) -> int32 array`, `encode_batch(texts) -> [int32 array]` (the same,
for many texts at once, on all cores where the tokenizer can), `decode(ids) -> str`,
`byte_lengths()` (the UTF-8 bytes of text each id stands for, for bits per byte) and
`save(directory)`.
`decode` turns eos into the empty string, so decoding a generation that ran past
the end of a document drops the separators but keeps everything else.
A directory holds `tokenizer.json` (and `tokenizer.model` for SentencePiece,
`vocab.json` and `merges.txt` for GPT-2's byte-level BPE); `load_tokenizer(directory)`
reads it back. GPT-2 tokenizers are never trained here: they come with a pretrained
model (experiments/import_hf.py) or from GPT-2's own vocab.json + merges.txt
(`read_tokenizer_dir`, which data.tokenizer_dir names). Hugging Face's `tokenizers` (Rust)
defines them and decodes; `fastokens` (Rust, read from the same definition) encodes, with
the same ids at 24-71 times the rate on 2 cores (docs/results.md#tokenizers).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence

import fastokens
import numpy as np
import sentencepiece as spm
# Hugging Face's library, not this module (lmjax.data.tokenizers).
import tokenizers as hf_tokenizers

from lmjax import storage
from lmjax.errors import UserError

# The kinds a config may name in data.tokenizer.
KINDS = ('char', 'sentencepiece', 'gpt2_bpe')
SPM_MODEL_TYPES = ('bpe', 'unigram')
CONFIG_FILE = 'tokenizer.json'
SPM_MODEL_FILE = 'tokenizer.model'
GPT2_VOCAB_FILE = 'vocab.json'
GPT2_MERGES_FILE = 'merges.txt'
GPT2_EOS_TOKEN = '<|endoftext|>'

# Unigram models come out different for different thread counts, so training
# uses a fixed number: a model then depends on its input, not on the machine.
_SPM_TRAIN_THREADS = 4
# Long texts are encoded in chunks of about this many characters, in parallel.
_CHUNK_CHARS = 1 << 15
# GPT-2 texts are encoded this many characters at a time, each batch's ids in one flat
# array: memory stays bounded however many texts a call passes.
_GPT2_BATCH_CHARS = 1 << 22


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
  storage.write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2))


def _cut(texts: Sequence[str], next_cut: Callable[[str, int], int]
         ) -> tuple[list[str], list[int]]:
  """`texts` cut into chunks of about `_CHUNK_CHARS` characters, and how many chunks each
  text became. `next_cut(text, start)` is the end of the first place at or after `start`
  where a cut leaves the ids unchanged, or -1 if there is none."""
  chunks, counts = [], []
  for text in texts:
    start, count = 0, 0
    while start < len(text):
      end = next_cut(text, start + _CHUNK_CHARS) if len(text) - start > _CHUNK_CHARS else -1
      end = len(text) if end < 0 else end
      chunks.append(text[start:end])
      start, count = end, count + 1
    counts.append(count)
  return chunks, counts


def _join(pieces: Sequence[Sequence[int]], counts: Sequence[int]) -> list[np.ndarray]:
  """Each text's ids as one int32 array, from its chunks' ids (`counts` chunks each, in
  order, as `_cut` made them)."""
  out, i = [], 0
  for count in counts:
    if count == 1:
      out.append(np.asarray(pieces[i], np.int32))
    else:
      out.append(np.concatenate([np.asarray(p, np.int32) for p in pieces[i:i + count]])
                 if count else np.zeros([0], np.int32))
    i += count
  return out


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
      raise UserError('The training split has no text to learn a character vocabulary from; '
                      'check data.name and data.train_split.')
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
      raise UserError(
          f'Text has characters outside the character vocabulary: {shown}{more}. '
          'The vocabulary is the set of characters in the training split; remove '
          'or replace these characters (training and evaluation drop them with '
          '--config.data.drop_unknown_chars=True).')
    return ids.astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`[encode(text) for text in texts]` (a table lookup: already as fast as memory)."""
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    ids = _as_ids(ids, self.vocab_size)
    ids = ids[ids != self.eos_id]
    # '<U1' stores each character as one little-endian UTF-32 code unit.
    return self._char_by_id[ids].tobytes().decode('utf-32-le', 'surrogatepass')

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of each id's character; eos stands for no text (0)."""
    # surrogatepass: a lone surrogate in the training text still has a length.
    return np.array([0] + [len(c.encode('utf-8', 'surrogatepass')) for c in self.chars],
                    np.int64)

  def save(self, directory: str) -> None:
    storage.makedirs(directory)
    _write_config(directory, {'kind': self.kind, 'vocab_size': self.vocab_size,
                              'eos_id': self.eos_id, 'chars': self.chars})


def _after_newline(text: str, start: int) -> int:
  """Just past the first '\\n' at or after `start`, or -1."""
  end = text.find('\n', start)
  return end if end < 0 else end + 1


def _spm_training_lines(texts: Iterable[str]) -> Iterable[str]:
  # '\n' is a user-defined symbol, so no piece crosses a line end: training on
  # lines loses nothing, and short sentences keep SentencePiece's limits away.
  for text in texts:
    for line in text.split('\n'):
      if line:
        yield line


def _spm_size_error(error: RuntimeError, vocab_size: int) -> UserError | None:
  message = str(error)
  too_high = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)',
                       message)
  if too_high:
    return UserError(
        f'data.vocab_size={vocab_size} is too large for the training text: SentencePiece '
        f'can make at most {too_high.group(2)} pieces from it. Set data.vocab_size to '
        f'{too_high.group(2)} or less.')
  too_low = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', message)
  if too_low:
    return UserError(
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
      raise UserError(f'data.spm_model_type={model_type!r}; use one of '
                      f'{", ".join(SPM_MODEL_TYPES)}.')
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
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`[encode(text) for text in texts]`, in one call that keeps every thread busy (a
    corpus of many short documents would otherwise encode on one thread each)."""
    # Chunks end after a '\n', which no piece crosses, so encoding them apart gives
    # the same pieces (up to ties between equally good unigram segmentations)
    # and lets SentencePiece use several threads.
    chunks, counts = _cut(texts, _after_newline)
    pieces = self._sp.encode(chunks, num_threads=os.cpu_count() or 1) if chunks else []
    return _join(pieces, counts)

  def decode(self, ids) -> str:
    return self._sp.decode(_as_ids(ids, self.vocab_size).tolist())

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of text each piece decodes to: '▁' is a space, a
    byte-fallback piece (<0x41>) one byte, control pieces (eos, bos, pad) and unknown 0.

    With no dummy prefix (see `train`) the lengths of `encode(text)` add up to
    `len(text.encode())` exactly, as long as the text holds no '▁' of its own:
    SentencePiece reads that character as a space (and decodes it as one)."""
    sp, lengths = self._sp, np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      if sp.is_byte(i):
        lengths[i] = 1
      else:
        lengths[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return lengths

  def save(self, directory: str) -> None:
    storage.makedirs(directory)
    storage.write_bytes(os.path.join(directory, SPM_MODEL_FILE), self.model_proto)
    _write_config(directory, {'kind': self.kind, 'vocab_size': self.vocab_size,
                              'eos_id': self.eos_id, 'model_file': SPM_MODEL_FILE})


# Where a long text may be cut for GPT-2 without changing its ids: just after a '\n' with a
# printable ASCII character (never whitespace) on each side. GPT-2's pattern (see
# Gpt2BpeTokenizer) ends a piece before such a '\n', makes the '\n' a piece of its own and
# starts the next piece after it; no rule looks back before where a piece starts, and the
# eos token has no '\n' in it.
_GPT2_CUT = re.compile(r'[!-~]\n(?=[!-~])')


def _gpt2_cut(text: str, start: int) -> int:
  """Just past the first '\\n' at or after `start` where GPT-2's ids allow a cut, or -1."""
  match = _GPT2_CUT.search(text, start)
  return match.end() if match else -1


def _gpt2_byte_chars() -> list[str]:
  """GPT-2's table from the 256 byte values to characters that print (and are not spaces).

  Printable Latin-1 bytes stand for themselves; the others (control bytes, space,
  no-break space, soft hyphen) take code points 256, 257, ... in byte order, so ' ' is
  'Ġ' and '\\n' is 'Ċ'. Vocabulary and merges are written in these characters.
  """
  kept = {*range(ord('!'), ord('~') + 1), *range(ord('\u00a1'), ord('\u00ac') + 1),
          *range(ord('\u00ae'), ord('\u00ff') + 1)}
  chars, moved = [], 0
  for byte in range(256):
    if byte in kept:
      chars.append(chr(byte))
    else:
      chars.append(chr(256 + moved))
      moved += 1
  return chars


def read_gpt2_merges(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
  """Merge pairs, best first, from the lines of a merges.txt (its '#version' line skipped)."""
  merges = []
  for number, line in enumerate(lines, 1):
    line = line.rstrip('\r\n')
    if not line or (number == 1 and line.startswith('#version')):
      continue
    pair = line.split(' ')
    if len(pair) != 2 or not all(pair):
      raise UserError(f'{source}, line {number}: expected two pieces separated by one space, '
                      f'got {line!r}; the merges file is damaged.')
    merges.append((pair[0], pair[1]))
  return merges


class Gpt2BpeTokenizer:
  """GPT-2's byte-level BPE: any text encodes, and decoding gives it back exactly.

  The eos token, '<|endoftext|>', is matched in the text as a whole first, as GPT-2 does.
  The rest is cut into pieces by GPT-2's pattern: English contractions, then runs of
  letters, of digits or of other symbols, each taking at most one space in front;
  whitespace before a word leaves its last space to that word. Each piece's UTF-8 bytes,
  written as characters of the byte table, are merged pair by pair, the best-ranked pair
  first, and the resulting pieces are looked up in the vocabulary; merges never cross
  pieces. Hugging Face's `tokenizers` holds the definition, set up as transformers'
  GPT2TokenizerFast is, so the ids are the ones transformers gives, and decodes.
  `fastokens` encodes from the same definition (its own pattern matcher and BPE, in Rust, a
  batch on all cores): the same ids, checked against `tokenizers` in the tests, at 186-207M
  tokens/s on 1 GB on 2 cores against 2.6M (docs/results.md#tokenizers).
  """

  kind = 'gpt2_bpe'

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               eos_token: str = GPT2_EOS_TOKEN):
    ids = list(vocab.values())
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(ids))):
      raise UserError(f'GPT-2 vocabulary ids must be 0..{len(ids) - 1}, each once; the '
                      'vocabulary has gaps or repeats. Is vocab.json damaged?')
    if eos_token not in vocab:
      raise UserError(f'The GPT-2 vocabulary has no {eos_token!r} token, which lmjax uses '
                      'as eos; add it to vocab.json.')
    missing = [c for c in _gpt2_byte_chars() if c not in vocab]
    if missing:
      raise UserError(f'The vocabulary lacks {len(missing)} of the 256 byte pieces (e.g. '
                      f'{missing[:5]}), so some text could not be encoded; this is not a '
                      'byte-level BPE vocabulary.')
    self.vocab = dict(vocab)
    self.merges = [tuple(pair) for pair in merges]
    bad = [a + b for a, b in self.merges if a + b not in vocab or a not in vocab
           or b not in vocab]
    if bad:
      raise UserError(f'{len(bad)} merges make or use pieces that are not in the vocabulary '
                      f'(e.g. {bad[:5]}); vocab.json and merges.txt do not belong together.')
    self.eos_token = eos_token
    self.eos_id = vocab[eos_token]
    self.vocab_size = len(vocab)
    # A pair listed twice keeps its first (best) rank; the library would keep its last.
    # The library merges one pair at a time, the best rank first and the leftmost of equal
    # ones: the same as merging every occurrence of the best pair at once whenever each
    # merge's parts come from better-ranked merges, as in any trained merges.txt.
    model = hf_tokenizers.models.BPE(self.vocab, list(dict.fromkeys(self.merges)))
    self._hf = hf_tokenizers.Tokenizer(model)
    self._hf.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                     use_regex=True)
    self._hf.decoder = hf_tokenizers.decoders.ByteLevel()
    # Special: found in raw text before the pattern runs, and dropped by decode.
    self._hf.add_special_tokens([hf_tokenizers.AddedToken(eos_token, special=True,
                                                          normalized=False)])
    self._fast = fastokens.Tokenizer.from_json_str(self._hf.to_str())

  @classmethod
  def from_files(cls, vocab_path: str, merges_path: str,
                 eos_token: str = GPT2_EOS_TOKEN) -> Gpt2BpeTokenizer:
    """Reads a GPT-2 `vocab.json` (piece -> id) and `merges.txt` (pairs, best first)."""
    for path in (vocab_path, merges_path):
      if not storage.exists(path):
        raise FileNotFoundError(f'{path} is missing; a GPT-2 tokenizer needs both '
                                f'{GPT2_VOCAB_FILE} and {GPT2_MERGES_FILE}.')
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
      raise UserError(f'{vocab_path} is damaged: it is not a JSON object of pieces and ids.')
    try:
      merges = read_gpt2_merges(io.StringIO(storage.read_text(merges_path)), merges_path)
    except UnicodeDecodeError as e:
      raise UserError(f'{merges_path} is damaged: it is not UTF-8 text ({e}).') from None
    return cls(vocab, merges, eos_token)

  def encode(self, text: str) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`[encode(text) for text in texts]`, on all cores: long texts are cut where GPT-2's
    pattern starts a new piece anyway, and all chunks are encoded in parallel."""
    for text in texts:
      if not isinstance(text, str):
        raise ValueError(f'encode takes a str; got {type(text).__name__}. Decode bytes to '
                         'text first.')
    chunks, counts = _cut(texts, _gpt2_cut)
    ids, start = [], 0
    while start < len(chunks):
      stop, size = start + 1, len(chunks[start])
      while stop < len(chunks) and size + len(chunks[stop]) <= _GPT2_BATCH_CHARS:
        size, stop = size + len(chunks[stop]), stop + 1
      try:
        flat, ends = self._fast.encode_batch_flat(chunks[start:stop], add_special_tokens=False)
      except (TypeError, ValueError):
        _refuse_lone_surrogates(texts)
        raise
      # Every chunk's ids one after another, and where each chunk's begin (and the last ends).
      ends = np.frombuffer(ends, np.uint64).astype(np.int64)
      ids += np.split(np.frombuffer(flat, np.uint32).astype(np.int32), ends[1:-1])
      start = stop
    return _join(ids, counts)

  @property
  def hf_tokenizer(self) -> hf_tokenizers.Tokenizer:
    """The Hugging Face `tokenizers.Tokenizer` that defines this one: it decodes, and its own
    encoder is the reference the fast one is checked against."""
    return self._hf

  def decode(self, ids) -> str:
    ids = _as_ids(ids, self.vocab_size)
    # A generation can stop inside a character's bytes: the decoder marks them with U+FFFD
    # instead of failing.
    return self._hf.decode(ids.tolist(), skip_special_tokens=True)

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] bytes each id decodes to (byte-level, so exact); eos 0: it is the
    document separator here, not text."""
    table = set(_gpt2_byte_chars())
    lengths = np.zeros(self.vocab_size, np.int64)
    for piece, i in self.vocab.items():
      # A piece with a character outside the byte table (possible in added tokens) decodes
      # to its own UTF-8, as the decoder reads it.
      lengths[i] = len(piece) if table.issuperset(piece) else len(piece.encode('utf-8'))
    lengths[self.eos_id] = 0
    return lengths

  def save_vocab_and_merges(self, directory: str) -> None:
    """Writes GPT-2's own files, `vocab.json` and `merges.txt`, as Hugging Face reads them."""
    storage.makedirs(directory)
    storage.write_text(os.path.join(directory, GPT2_VOCAB_FILE),
                       json.dumps(self.vocab, ensure_ascii=False))
    storage.write_text(os.path.join(directory, GPT2_MERGES_FILE),
                       '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in self.merges))

  def save(self, directory: str) -> None:
    self.save_vocab_and_merges(directory)
    _write_config(directory, {'kind': self.kind, 'vocab_size': self.vocab_size,
                              'eos_id': self.eos_id, 'eos_token': self.eos_token,
                              'vocab_file': GPT2_VOCAB_FILE, 'merges_file': GPT2_MERGES_FILE})


def _refuse_lone_surrogates(texts: Iterable[str]) -> None:
  """UserError naming the first character of `texts` that UTF-8 cannot write, if any."""
  for text in texts:
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:
      raise UserError(
          f'Text has a character that UTF-8 cannot write ({text[e.start]!r} at position '
          f'{e.start}, a lone surrogate); remove it or decode the source with '
          "errors='replace'.") from None


Tokenizer = CharTokenizer | SentencePieceTokenizer | Gpt2BpeTokenizer


def _read_json(path: str):
  """The JSON in `path`; UserError naming the file if it is not UTF-8 JSON."""
  try:
    return json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is damaged: it is not valid JSON ({e}). Restore it from a copy '
                    'of the directory it came from.') from None


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads the tokenizer that `save` wrote to `directory`; UserError naming the file if
  what is there is damaged."""
  path = os.path.join(directory, CONFIG_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(
        f'No tokenizer in {directory} ({CONFIG_FILE} is missing); train first '
        '(experiments/train.py writes one into its workdir).')
  config = _read_json(path)
  if not isinstance(config, dict):
    raise UserError(f'{path} is damaged: it is not the JSON object lmjax writes. Restore it '
                    'from a copy of the directory it came from.')
  try:
    tokenizer = _tokenizer_of_kind(config, directory, path)
  except UserError:
    raise
  except (KeyError, TypeError, ValueError, RuntimeError) as e:
    raise UserError(f'{path} is damaged ({type(e).__name__}: {e}). Restore it from a copy '
                    'of the directory it came from.') from None
  if tokenizer.vocab_size != config.get('vocab_size'):
    raise UserError(f'{path} says vocab_size={config.get("vocab_size")}, but the saved '
                    f'tokenizer has {tokenizer.vocab_size}; the directory is damaged.')
  return tokenizer


def _tokenizer_of_kind(config: dict, directory: str, path: str) -> Tokenizer:
  """The tokenizer a tokenizer.json (`config`, read from `path`) describes."""
  kind = config.get('kind')
  if kind == 'char':
    tokenizer = CharTokenizer(config['chars'])
  elif kind == 'sentencepiece':
    model_path = os.path.join(directory, config.get('model_file', SPM_MODEL_FILE))
    if not storage.exists(model_path):
      raise FileNotFoundError(f'{path} names a SentencePiece model, but {model_path} is '
                              'missing; train the tokenizer again in a new directory.')
    tokenizer = SentencePieceTokenizer(storage.read_bytes(model_path))
  elif kind == 'gpt2_bpe':
    tokenizer = Gpt2BpeTokenizer.from_files(
        os.path.join(directory, config.get('vocab_file', GPT2_VOCAB_FILE)),
        os.path.join(directory, config.get('merges_file', GPT2_MERGES_FILE)),
        config.get('eos_token', GPT2_EOS_TOKEN))
  else:
    raise UserError(f'{path}: unknown tokenizer kind {kind!r}; expected one of '
                    f'{", ".join(KINDS)}. The file is damaged or from another program.')
  return tokenizer


def read_tokenizer_dir(directory: str) -> Tokenizer:
  """The tokenizer in `directory`: one `save` wrote (an lmjax workdir), or GPT-2's own
  `vocab.json` + `merges.txt` (a Hugging Face GPT-2 directory)."""
  config_path = os.path.join(directory, CONFIG_FILE)
  if storage.exists(config_path):
    # Hugging Face directories have a tokenizer.json too (transformers' own format); only
    # lmjax's names its kind.
    try:
      is_lmjax = 'kind' in json.loads(storage.read_text(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError):
      is_lmjax = False
    if is_lmjax:
      return load_tokenizer(directory)
  vocab_path = os.path.join(directory, GPT2_VOCAB_FILE)
  merges_path = os.path.join(directory, GPT2_MERGES_FILE)
  if storage.exists(vocab_path) and storage.exists(merges_path):
    return Gpt2BpeTokenizer.from_files(vocab_path, merges_path)
  raise FileNotFoundError(
      f'{directory} holds no tokenizer: expected an lmjax workdir (with an lmjax '
      f'{CONFIG_FILE}) or a GPT-2 tokenizer as {GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE}.')


def fingerprint(tokenizer: Tokenizer) -> str:
  """A hex digest of everything that decides `tokenizer`'s ids (the files `save` writes)."""
  digest = hashlib.sha256()
  with tempfile.TemporaryDirectory(prefix='lmjax-tokenizer-') as directory:
    tokenizer.save(directory)
    for name in sorted(os.listdir(directory)):
      with open(os.path.join(directory, name), 'rb') as f:
        digest.update(name.encode() + b'\0' + f.read() + b'\0')
  return digest.hexdigest()


def build_tokenizer(kind: str, directory: str, train_texts: Callable[[], Iterable[str]],
                    vocab_size: int | None = None, model_type: str = 'bpe') -> Tokenizer:
  """Loads the tokenizer saved in `directory`, or trains one on `train_texts()` and saves it.

  Reusing the saved one is what keeps a resumed run's ids the same.
  """
  if kind not in KINDS:
    raise UserError(f'data.tokenizer={kind!r}; use one of {KINDS}.')
  if storage.exists(os.path.join(directory, CONFIG_FILE)):
    tokenizer = load_tokenizer(directory)
    if tokenizer.kind != kind:
      raise UserError(
          f'data.tokenizer={kind!r}, but {directory} already holds a {tokenizer.kind!r} '
          f'tokenizer (from an earlier run). Use data.tokenizer={tokenizer.kind!r} to '
          'resume that run, or a new workdir.')
    if kind == 'sentencepiece' and vocab_size and tokenizer.vocab_size != vocab_size:
      raise UserError(
          f'data.vocab_size={vocab_size}, but {directory} already holds a SentencePiece '
          f'tokenizer of {tokenizer.vocab_size} pieces (from an earlier run). Use '
          f'data.vocab_size={tokenizer.vocab_size} to resume that run, or a new workdir.')
    return tokenizer
  if kind == 'char':
    tokenizer = CharTokenizer.train(train_texts())
  elif kind == 'gpt2_bpe':
    raise UserError(
        f'data.tokenizer=gpt2_bpe, but {directory} holds no tokenizer, and lmjax does not '
        'train GPT-2 tokenizers: they come with a pretrained model. To pretrain with '
        "GPT-2's, set data.tokenizer_dir to a directory with its vocab.json and merges.txt "
        '(e.g. `hf download openai-community/gpt2 vocab.json merges.txt --local-dir=DIR`) '
        'or to a workdir that has it; to fine-tune, import a model with python '
        'experiments/import_hf.py --hf_dir=HF_MODEL_DIR --workdir=WORKDIR, which writes the '
        'tokenizer and the weights into WORKDIR, then train or decode in that workdir.')
  else:
    if not vocab_size:
      raise UserError('data.tokenizer=sentencepiece needs data.vocab_size > 0 '
                      '(e.g. --config.data.vocab_size=2000).')
    print(f'Training a SentencePiece tokenizer ({model_type}, {vocab_size:,} pieces) on the '
          'training texts, once ...', flush=True)
    tokenizer = SentencePieceTokenizer.train(train_texts(), vocab_size, model_type)
  tokenizer.save(directory)
  return tokenizer
