"""Any prepared TFDS text dataset, by name: tokenized once into a flat file, read as a memmap.

A config names one as `data.name='tfds:NAME'`, NAME in TFDS's own syntax,
DATASET[/CONFIG][:VERSION]: 'tfds:lm1b', 'tfds:c4/en:3.0.1', 'tfds:pg19', or a Hugging Face
dataset TFDS converted, 'tfds:huggingface:skylion007__openwebtext'. `data.text_feature` is
the feature holding a document's text, `data.train_split` and `data.eval_split` are splits
in TFDS's syntax ('train', 'train[:-1000]', 'train[-1000:]', 'validation').

A folder of your own .txt and .jsonl files, `data.name='files:PATH'`, is read the same way
once lmjax/data/files.py has copied it into a TFDS dataset (the first run does).

Nothing downloads here. The dataset must have been prepared in `data.data_dir` (or TFDS's
default) by the data step, `python experiments/prepare_data.py --tfds=NAME`; it is then read
from its files alone, without its builder's code (which may need Beam, a login or the
network even to start).

A split is tokenized once, streaming over its documents in the order TFDS reads them, each
followed by the tokenizer's eos (as `pipeline.load_tokens` joins lmjax's own corpora), into
`{cache_dir}/{dataset}-{split}-{key}.bin`: the ids as uint16 when the vocabulary has at most
65,536 of them (GPT-2's 50,257), else uint32; `.json` beside it says what it holds. `key`
hashes all the tokens depend on (dataset version, split, feature, data.drop_unknown_chars,
the tokenizer's files), so runs with the same tokenizer share a file and no other tokenizer
reads it. The file is written under a temporary name and renamed when whole, so a killed
run never leaves a file that looks finished; a lock file beside it makes a second run (or
host) wait for the first instead of tokenizing the same split again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming, read_only_builder

from lmjax import storage
from lmjax.data import files, locking, tfdata, tokenizers
from lmjax.errors import UserError, one_line

PREFIX = 'tfds:'
# A tokenizer that must be trained (char, SentencePiece) learns from the first documents of
# the training split up to this many characters: about 15M GPT-2 tokens of web text, plenty
# for a 50k vocabulary, and SentencePiece's trainer holds all of it in memory (several GB
# at 200M characters, hours on millions of documents).
TOKENIZER_SAMPLE_CHARS = 50_000_000
FORMAT_VERSION = 1  # of the token files; bump when their layout or content changes
_READ_BATCH = 1024  # documents per TFDS read and per tokenizer call
_PROGRESS_SECONDS = 60.0


def is_external(name: str) -> bool:
  """A 'tfds:' dataset, or a folder of your own text ('files:', lmjax/data/files.py)."""
  return name.startswith(PREFIX) or files.is_files(name)


def check_name(name: str) -> None:
  """Raises UserError unless `name` is 'tfds:' and a TFDS dataset name, or 'files:' and a
  folder of text files."""
  if files.is_files(name):
    return files.check_name(name)
  try:
    naming.parse_builder_name_kwargs(name[len(PREFIX):])
  except ValueError:
    raise UserError(f"data.name={name!r}: write 'tfds:' and a TFDS dataset name, "
                    "DATASET[/CONFIG][:VERSION], e.g. 'tfds:lm1b' or 'tfds:c4/en:3.0.1'.") from None


def tfds_name(name: str) -> str:
  """'tfds:c4/en:3.0.1' -> 'c4/en:3.0.1', the name TFDS builds it under."""
  return name[len(PREFIX):]


def prepare_command(name: str, data_dir: str | None) -> str:
  dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  return f'python experiments/prepare_data.py --tfds={tfds_name(name)}{dir_flag}'


def _files_name(name: str) -> str:
  """The name to find the prepared files by: a namespace ('huggingface:') names where the
  builder comes from, not where its files are."""
  dataset, kwargs = naming.parse_builder_name_kwargs(tfds_name(name))
  files_name = dataset.name
  if kwargs.get('config'):
    files_name += f'/{kwargs["config"]}'
  if kwargs.get('version'):
    files_name += f':{kwargs["version"]}'
  return files_name


def builder(data_config) -> tfds.core.DatasetBuilder:
  """The prepared dataset `data_config.name` names, read from its files; UserError with the
  command that prepares it if it is not there. A 'files:' folder is copied into one first
  if it has not been. TensorFlow, which the builder loads on first use, comes through
  lmjax.data.tfdata (without Keras)."""
  tfdata.tensorflow()
  if files.is_files(data_config.name):
    return files.builder(data_config)
  check_name(data_config.name)
  data_dir = data_config.data_dir or None
  try:
    return read_only_builder.builder_from_files(_files_name(data_config.name),
                                                data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    where = data_dir or f"TFDS's default, {tfds.core.constants.DATA_DIR}"
    raise UserError(
        f'data.name={data_config.name!r}: {tfds_name(data_config.name)} is not prepared in '
        f'{where} (data.data_dir), and lmjax downloads nothing while training. Prepare it '
        f'once with `{prepare_command(data_config.name, data_dir)}` (or `tfds build '
        f'{tfds_name(data_config.name)}{f" --data_dir={data_dir}" if data_dir else ""}`), '
        f'or point data.data_dir at where it is. TFDS said: {one_line(e)}') from None


def _check_split_and_feature(builder_, data_config, split: str) -> int:
  """The split's number of documents; UserError for an unknown split or text feature."""
  try:
    num_documents = builder_.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    fields = [f'data.{field}' for field in ('train_split', 'eval_split')
              if data_config[field] == split]
    raise UserError(f'{" and ".join(fields) or "split"}={split!r} is not a split of '
                    f'{builder_.info.full_name}: {one_line(e)} '
                    f'Its splits: {", ".join(builder_.info.splits)}; slices such as '
                    "'train[:-1000]' and 'train[-1000:]' cut one in two.") from None
  check_text_feature(builder_, data_config.text_feature, 'data.text_feature')
  return num_documents


def check_text_feature(builder_, name: str, field: str) -> None:
  """UserError, naming config field `field`, unless `name` is a text feature of the
  dataset; the message lists the text features it has."""
  features = builder_.info.features
  feature = features[name] if name in features else None
  if feature is None or feature.shape != () or feature.tf_dtype.name != 'string':
    texts = sorted(k for k, f in features.items()
                   if f.shape == () and f.tf_dtype.name == 'string')
    raise UserError(f'{field}={name!r} is not a text feature of {builder_.info.full_name}; '
                    f'its text features: {", ".join(texts) or "none"}.')


def documents(data_config, split: str) -> Iterator[list[str]]:
  """The split's texts in batches, in the order TFDS reads them (the same every time)."""
  builder_ = builder(data_config)
  _check_split_and_feature(builder_, data_config, split)
  feature = data_config.text_feature
  # Only the text is decoded; shuffle_files=False reads the shards in order.
  ds = builder_.as_dataset(split=split, shuffle_files=False,
                           decoders=tfds.decode.PartialDecoding({feature: True}))
  ds = ds.map(lambda example: example[feature]).batch(_READ_BATCH)
  not_utf8 = 0
  for batch in tfds.as_numpy(ds):
    texts = []
    for text in batch:
      try:
        texts.append(text.decode('utf-8'))
      except UnicodeDecodeError:
        # Replaced, not refused: one bad byte in millions of documents must not end a long
        # tokenization; the count is reported when the split has been read.
        not_utf8 += 1
        texts.append(text.decode('utf-8', errors='replace'))
    yield texts
  if not_utf8:
    print(f'note: {data_config.name} {split!r}: {not_utf8:,} document(s) not valid UTF-8; '
          'their undecodable bytes were read as U+FFFD.', flush=True)


def sample_texts(data_config, split: str, max_chars: int = TOKENIZER_SAMPLE_CHARS) -> list[str]:
  """The split's first documents, up to `max_chars` characters: what a tokenizer learns."""
  texts, chars = [], 0
  for batch in documents(data_config, split):
    for text in batch:
      texts.append(text[:max_chars - chars])
      chars += len(texts[-1])
      if chars >= max_chars:
        return texts
  return texts


def cache_dir(data_config, workdir: str) -> str:
  """Where the token files go: data.cache_dir, or the workdir's tokens/. They are read
  memory-mapped, so for a workdir in a bucket they go to a local directory named after it,
  under ~/.cache/lmjax/tokens/."""
  if data_config.cache_dir:
    return data_config.cache_dir
  if storage.is_remote(workdir):
    return os.path.join(os.path.expanduser('~/.cache/lmjax/tokens'),
                        workdir.replace('://', '/'))
  return os.path.join(workdir, 'tokens')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _describe(data_config, builder_, split: str, tokenizer) -> dict:
  """Everything the tokens depend on."""
  return {
      'format': FORMAT_VERSION,
      'dataset': builder_.info.full_name,
      'split': split,
      'num_documents': builder_.info.splits[split].num_examples,
      'text_feature': data_config.text_feature,
      'drop_unknown_chars': bool(tokenizer.kind == 'char' and data_config.drop_unknown_chars),
      'tokenizer': tokenizer.kind,
      'vocab_size': tokenizer.vocab_size,
      'tokenizer_sha256': tokenizers.fingerprint(tokenizer),
  }


def token_file(data_config, split: str, tokenizer, directory: str) -> tuple[str, dict]:
  """(path of the .bin, its description) for this split and tokenizer in `directory`."""
  builder_ = builder(data_config)
  _check_split_and_feature(builder_, data_config, split)
  description = _describe(data_config, builder_, split, tokenizer)
  key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
  slug = lambda text: re.sub(r'[^A-Za-z0-9.]+', '_', text).strip('_')
  stem = f'{slug(builder_.info.full_name)}-{slug(split)}-{key}'
  return os.path.join(directory, stem + '.bin'), description


def load_tokens(data_config, split: str, tokenizer, directory: str) -> np.memmap:
  """The split's tokens as a read-only memmap of the token file in `directory`, written
  first if no finished one is there."""
  path, description = token_file(data_config, split, tokenizer, directory)
  tokens = _read(path, description)
  if tokens is not None:
    return tokens
  os.makedirs(directory, exist_ok=True)
  with locking.exclusive(path + '.lock') as exclusive:
    tokens = _read(path, description)  # another run may have written it while we waited
    if tokens is None:
      _write(path, description, data_config, split, tokenizer, exclusive)
      tokens = _read(path, description)
  return tokens


def _read(path: str, description: dict) -> np.memmap | None:
  """The finished file's tokens, or None if there is none (or it does not match)."""
  try:
    with open(path[:-len('.bin')] + '.json') as f:
      stored = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  dtype = token_dtype(description['vocab_size'])
  if ({k: stored.get(k) for k in description} != description or
      not os.path.exists(path) or
      os.path.getsize(path) != stored.get('num_tokens', -1) * dtype.itemsize):
    return None
  return np.memmap(path, dtype=dtype, mode='r', shape=(stored['num_tokens'],))


def _write(path: str, description: dict, data_config, split: str, tokenizer,
           exclusive: bool) -> None:
  directory, stem = os.path.split(path[:-len('.bin')])
  if exclusive:  # under the lock, any other temporary file is a killed writer's
    for name in os.listdir(directory):
      if name.startswith(stem + '.bin.tmp-') or name.startswith(stem + '.json.tmp-'):
        os.remove(os.path.join(directory, name))
  suffix = f'.tmp-{socket.gethostname()}-{os.getpid()}'
  tmp = path + suffix
  dtype = token_dtype(tokenizer.vocab_size)
  drop_unknown = description['drop_unknown_chars']
  known = set(tokenizer.chars) if tokenizer.kind == 'char' else None
  eos = np.array([tokenizer.eos_id], dtype)
  total = description['num_documents']
  num_documents = num_tokens = dropped = 0
  start = last_report = time.perf_counter()
  print(f'Tokenizing {description["dataset"]} {split} ({total:,} documents) into {path} ...',
        flush=True)
  try:
    with open(tmp, 'wb') as f:
      for texts in documents(data_config, split):
        if known is not None:
          texts, dropped_here = _known_chars_only(texts, known, drop_unknown, num_documents,
                                                  data_config, split)
          dropped += dropped_here
        pieces = []
        for ids in tokenizer.encode_batch(texts):
          pieces += [ids.astype(dtype), eos]
        chunk = np.concatenate(pieces)
        f.write(chunk.tobytes())
        num_documents += len(texts)
        num_tokens += len(chunk)
        now = time.perf_counter()
        if now - last_report > _PROGRESS_SECONDS:
          last_report = now
          print(f'  {num_documents:,} of {total:,} documents, {num_tokens:,} tokens, '
                f'{num_tokens / (now - start):,.0f} tokens/s', flush=True)
      f.flush()
      os.fsync(f.fileno())
    # The description first, then the tokens: a .bin under its final name is always whole
    # and described.
    with open(path[:-len('.bin')] + '.json' + suffix, 'w') as f:
      json.dump({**description, 'num_tokens': num_tokens, 'dtype': dtype.name,
                 'seconds': round(time.perf_counter() - start, 1)}, f, indent=2)
    os.replace(path[:-len('.bin')] + '.json' + suffix, path[:-len('.bin')] + '.json')
    os.replace(tmp, path)
  finally:
    for leftover in (tmp, path[:-len('.bin')] + '.json' + suffix):
      if os.path.exists(leftover):
        os.remove(leftover)
  seconds = time.perf_counter() - start
  dropped_text = (f'; data.drop_unknown_chars dropped {dropped:,} characters the vocabulary '
                  'lacks' if dropped else '')
  print(f'Tokenized {num_documents:,} documents into {num_tokens:,} tokens in {seconds:,.1f} s '
        f'({num_tokens / max(seconds, 1e-9):,.0f} tokens/s){dropped_text}.', flush=True)


def _known_chars_only(texts: list[str], known: set, drop: bool, first_index: int,
                      data_config, split: str) -> tuple[list[str], int]:
  """`texts` without the characters a char tokenizer lacks (data.drop_unknown_chars), or
  UserError naming them."""
  out, dropped = [], 0
  for i, text in enumerate(texts):
    missing = set(text) - known
    if missing and not drop:
      shown = ', '.join(repr(c) for c in sorted(missing)[:10])
      raise UserError(
          f'document {first_index + i:,} of {data_config.name} {split} has characters the '
          f'char tokenizer lacks ({shown}); it learned its characters from the first '
          f'{TOKENIZER_SAMPLE_CHARS:,} characters of data.train_split. Set '
          'data.drop_unknown_chars=True to drop such characters, or use '
          'data.tokenizer=sentencepiece (byte fallback: any text encodes).')
    if missing:
      kept = ''.join(c for c in text if c in known)
      dropped += len(text) - len(kept)
      text = kept
    out.append(text)
  return out, dropped
