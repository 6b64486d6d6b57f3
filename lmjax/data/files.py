"""Your own text files as a corpus: `data.name='files:PATTERN[,PATTERN...]'`.

Each PATTERN is a folder (every file under it) or a glob ('~/texts/*.txt', '~/web/**/*.jsonl.gz',
'**' reaching into subfolders). A `.txt` file is one document; every line of a `.jsonl` or
`.jsonl.gz` file is one, its text under the key `data.text_feature` ('text' by default).
Files are read in the order of their paths; hidden files and other suffixes are skipped.

The splits:
- one folder with a subfolder `train/` (and `validation/`, `test/`): each subfolder's files
  are the split of its name;
- otherwise the share `data.holdout` of the documents, picked by a hash of each document's
  text, is the split 'validation' and the rest 'train'. A document is never cut in two, and
  copies of a document land in the same split.

The first run copies the files into a TFDS dataset, `lmjax_files/NAME_KEY`, in
`data.data_dir` (or TFDS's default), KEY a hash of the files' paths, sizes and modification
times and of the settings above: the copy is made once, streaming, and read from there by
lmjax/data/external.py as any prepared TFDS dataset (its token files, its split syntax such
as 'train[:90%]'). Changed files make a new copy under a new KEY, and a run resumed after
the change trains on the new text; the old copy stays until deleted.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from lmjax.data import locking
from lmjax.errors import UserError

PREFIX = 'files:'
SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz')
SPLIT_FOLDERS = ('train', 'validation', 'test')
DATASET = 'lmjax_files'
VERSION = '1.0.0'
FORMAT_VERSION = 1  # of the copy; bump when what goes into it changes


def is_files(name: str) -> bool:
  return name.startswith(PREFIX)


def patterns(name: str) -> list[str]:
  return [os.path.expanduser(p.strip()) for p in name[len(PREFIX):].split(',') if p.strip()]


def check_name(name: str) -> None:
  """UserError unless every pattern of `name` names .txt, .jsonl or .jsonl.gz files."""
  split_files(name)


def split_files(name: str) -> dict[str, list[str]]:
  """{split: its files}: the split folders' files, or {'all': every file} to be split by
  data.holdout."""
  found = patterns(name)
  if not found:
    raise UserError(f"data.name={name!r}: write 'files:' and a folder or a glob of .txt, "
                    '.jsonl or .jsonl.gz files, e.g. files:~/my_corpus.')
  if len(found) == 1 and os.path.isdir(os.path.join(found[0], 'train')):
    splits = {s: _text_files(os.path.join(found[0], s)) for s in SPLIT_FOLDERS
              if os.path.isdir(os.path.join(found[0], s))}
    for split, paths in splits.items():
      if not paths:
        raise UserError(f'data.name={name!r}: {os.path.join(found[0], split)} holds no '
                        f'{", ".join(SUFFIXES)} file.')
    return splits
  paths = []
  for pattern in found:
    matched = (_text_files(pattern) if os.path.isdir(pattern) else
               sorted(p for p in glob.glob(pattern, recursive=True)
                      if os.path.isfile(p) and p.endswith(SUFFIXES)))
    if not matched:
      raise UserError(f'data.name={name!r}: {pattern} matches no {", ".join(SUFFIXES)} file.')
    paths += matched
  return {'all': sorted(set(paths))}


def _text_files(directory: str) -> list[str]:
  paths = []
  for parent, subdirs, names in os.walk(directory):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    paths += [os.path.join(parent, n) for n in names
              if n.endswith(SUFFIXES) and not n.startswith('.')]
  return sorted(paths)


def documents(path: str, text_key: str, not_utf8: set | None = None) -> Iterator[str]:
  """The file's documents: a .txt file whole, a .jsonl(.gz) file's lines' texts. Undecodable
  bytes are read as U+FFFD, and the file's path is added to `not_utf8`."""
  def decoded(raw: bytes) -> str:
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      if not_utf8 is not None:
        not_utf8.add(path)
      return raw.decode('utf-8', errors='replace')

  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    if path.endswith('.txt'):
      text = decoded(f.read())
      if not text:
        raise UserError(f'{path} is empty; delete it, or move it out of data.name.')
      yield text
      return
    empty = True
    for number, line in enumerate(f, 1):
      line = decoded(line)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{number} is not a JSON object: {e.msg} (column {e.colno}); '
                        'a .jsonl file holds one object a line.') from None
      text = record.get(text_key) if isinstance(record, dict) else None
      if not isinstance(text, str):
        keys = ', '.join(sorted(record)) if isinstance(record, dict) else 'none'
        raise UserError(f'{path}:{number} has no text under {text_key!r} (data.text_feature); '
                        f'its keys: {keys}. Set data.text_feature to the key of the text.')
      empty = False
      yield text
  if empty:
    raise UserError(f'{path} holds no JSON line; delete it, or move it out of data.name.')


def held_out(text: str, share: float) -> bool:
  """Whether a document is in the validation split: decided by a hash of its text."""
  digest = hashlib.sha256(text.encode('utf-8', errors='surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < share


def config_name(data_config, splits: dict[str, list[str]] | None = None) -> str:
  """The TFDS config the files' copy is under: the first pattern's base name and a hash of
  the files (path, size, modification time) and the settings that decide the copy.
  `splits` is `split_files(data_config.name)`, found here if not given."""
  name = data_config.name
  splits = splits or split_files(name)
  listing = []
  for split, paths in splits.items():
    for path in paths:
      stat = os.stat(path)
      listing.append([split, os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
  holdout = data_config.holdout if 'all' in splits else None
  blob = json.dumps([FORMAT_VERSION, data_config.text_feature, holdout, listing])
  key = hashlib.sha256(blob.encode()).hexdigest()[:12]
  base = os.path.basename(patterns(name)[0].rstrip('/*'))
  slug = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')
  return f'{slug or "files"}_{key}'


def builder(data_config) -> tfds.core.DatasetBuilder:
  """The files' TFDS copy, made first if there is none for the files as they are now."""
  name, text_key = data_config.name, data_config.text_feature
  data_dir = data_config.data_dir or tfds.core.constants.DATA_DIR
  splits = split_files(name)
  config = config_name(data_config, splits)
  full_name = f'{DATASET}/{config}:{VERSION}'
  with contextlib.suppress(tfds.core.registered.DatasetNotFoundError):
    return read_only_builder.builder_from_files(full_name, data_dir=data_dir)
  os.makedirs(data_dir, exist_ok=True)
  with locking.exclusive(os.path.join(data_dir, f'{DATASET}-{config}.lock')):
    with contextlib.suppress(tfds.core.registered.DatasetNotFoundError):
      return read_only_builder.builder_from_files(full_name, data_dir=data_dir)  # built meanwhile
    print(f'Copying the {sum(map(len, splits.values())):,} files of data.name into a TFDS '
          f'dataset in {os.path.join(data_dir, DATASET, config)}, once ...', flush=True)
    tfds.disable_progress_bar()
    not_utf8 = set()
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        tfds.dataset_builders.store_as_tfds_dataset(
            name=DATASET, version=VERSION, config=config, data_dir=data_dir,
            features=tfds.features.FeaturesDict({text_key: tfds.features.Text()}),
            split_datasets=_split_documents(splits, text_key, data_config.holdout, not_utf8),
            disable_shuffling=True, description=f'The files of data.name={name!r}.')
    except AssertionError as e:  # TFDS's words for a split that got no document
      empty = re.search(r'split "([^"]+)": No examples were yielded', str(e))
      if not empty:
        raise
      shutil.rmtree(os.path.join(data_dir, DATASET, config), ignore_errors=True)
      raise UserError(
          f'data.name={name!r}: data.holdout={data_config.holdout:g} of its documents, picked '
          f'by their hash, leaves the split {empty.group(1)!r} empty; give more documents '
          '(one .txt file is one document), another data.holdout, or the splits as folders: '
          'train/ and validation/ under one folder.') from None
    if not_utf8:
      print(f'note: {len(not_utf8):,} file(s) of data.name are not valid UTF-8 (the first: '
            f'{min(not_utf8)}); their undecodable bytes were read as U+FFFD.', flush=True)
  return read_only_builder.builder_from_files(full_name, data_dir=data_dir)


def _split_documents(splits: dict[str, list[str]], text_key: str, holdout: float,
                     not_utf8: set) -> dict:
  """{split: a generator of (key, example)} in file order, read when TFDS writes it."""
  def examples(paths, keep=None):
    texts = (t for p in paths for t in documents(p, text_key, not_utf8))
    if keep is not None:
      texts = (t for t in texts if held_out(t, holdout) == keep)
    for i, text in enumerate(texts):
      yield f'{i:012d}', {text_key: text}

  if 'all' not in splits:
    return {split: examples(paths) for split, paths in splits.items()}
  return {'train': examples(splits['all'], keep=False),
          'validation': examples(splits['all'], keep=True)}
