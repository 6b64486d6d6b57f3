"""A folder of your own text as a corpus: `data.name='files:PATH'`.

PATH is a folder (`~` allowed). Every `.txt` file under it is one document, and every line
of a `.jsonl` file is one, its text under the key `data.text_feature` ('text' by default);
files are read in the order of their paths, hidden ones skipped. The splits:

- with subfolders `train/`, and `validation/` or `test/`, each subfolder's files are the
  split of its name;
- without them, every file is read, and the last HELD_OUT of the characters, in that order,
  is the split 'validation' and the rest 'train' (the document the cut falls in is cut at a
  line break): one big `input.txt` is then split as nanoGPT splits it.

The first run copies the folder into a TFDS dataset, `lmjax_files/NAME_KEY`, in
`data.data_dir` (or TFDS's default), where KEY hashes the files' paths, sizes and
modification times with the text key: the copy is made once and read from there, by
lmjax/data/external.py as any prepared TFDS dataset (its token files, its split syntax such
as 'train[:90%]'). Changed files make a new copy under a new KEY, and a run resumed after
the change trains on the new text; the old copy stays until deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from lmjax.data import locking
from lmjax.errors import UserError

PREFIX = 'files:'
SUFFIXES = ('.txt', '.jsonl')
SPLIT_FOLDERS = ('train', 'validation', 'test')
HELD_OUT = 0.1  # of the characters, when the folder has no split subfolders
DATASET = 'lmjax_files'
VERSION = '1.0.0'
FORMAT_VERSION = 1  # of the copy; bump when what goes into it changes


def is_files(name: str) -> bool:
  return name.startswith(PREFIX)


def folder(name: str) -> str:
  return os.path.abspath(os.path.expanduser(name[len(PREFIX):]))


def check_name(name: str) -> None:
  """UserError unless `name` is 'files:' and a folder holding .txt or .jsonl files."""
  split_files(name)


def split_files(name: str) -> dict[str, list[str]]:
  """{split: its files} of the folder; 'all' when it has no split subfolders."""
  root = folder(name)
  if not os.path.isdir(root):
    raise UserError(f"data.name={name!r}: {root} is not a folder; write 'files:' and a "
                    'folder of .txt or .jsonl files, e.g. files:~/my_corpus.')
  found = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, s))]
  splits = {s: _text_files(os.path.join(root, s)) for s in found} if found else {
      'all': _text_files(root)}
  if found and 'train' not in found:
    raise UserError(f'data.name={name!r}: {root} has {", ".join(s + "/" for s in found)} '
                    'but no train/ folder; add one, or move the files up to split them '
                    'by the held-out rule (docs/reference/data.md).')
  for split, paths in splits.items():
    if not paths:
      where = root if split == 'all' else os.path.join(root, split)
      raise UserError(f'data.name={name!r}: {where} holds no .txt or .jsonl file.')
  return splits


def _text_files(directory: str) -> list[str]:
  paths = []
  for parent, subdirs, names in os.walk(directory):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    paths += [os.path.join(parent, n) for n in names
              if n.endswith(SUFFIXES) and not n.startswith('.')]
  return sorted(paths)


def documents(path: str, text_key: str, not_utf8: set | None = None) -> Iterator[str]:
  """The file's documents: a .txt file whole, a .jsonl file's lines' texts. Undecodable
  bytes are read as U+FFFD, and the file's path is added to `not_utf8`."""
  def decoded(raw: bytes) -> str:
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      if not_utf8 is not None:
        not_utf8.add(path)
      return raw.decode('utf-8', errors='replace')

  with open(path, 'rb') as f:
    if path.endswith('.txt'):
      yield decoded(f.read())
      return
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
      yield text


def _key(name: str, splits: dict[str, list[str]], text_key: str) -> str:
  """What the copy depends on: the files (path, size, modification time) and the text key."""
  root = folder(name)
  listing = []
  for split, paths in splits.items():
    for path in paths:
      stat = os.stat(path)
      listing.append([split, os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
  blob = json.dumps([FORMAT_VERSION, text_key, listing])
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config_name(name: str, text_key: str) -> str:
  """The TFDS config the folder's copy is under: its base name and the key."""
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder(name)).lower()).strip('_')
  return f'{slug or "root"}_{_key(name, split_files(name), text_key)}'


def builder(data_config) -> tfds.core.DatasetBuilder:
  """The folder's TFDS copy, made first if there is none for the files as they are now."""
  name, text_key = data_config.name, data_config.text_feature
  data_dir = data_config.data_dir or tfds.core.constants.DATA_DIR
  config = config_name(name, text_key)
  full_name = f'{DATASET}/{config}:{VERSION}'
  with contextlib.suppress(tfds.core.registered.DatasetNotFoundError):
    return read_only_builder.builder_from_files(full_name, data_dir=data_dir)
  os.makedirs(data_dir, exist_ok=True)
  with locking.exclusive(os.path.join(data_dir, f'{DATASET}-{config}.lock')):
    with contextlib.suppress(tfds.core.registered.DatasetNotFoundError):
      return read_only_builder.builder_from_files(full_name, data_dir=data_dir)  # built meanwhile
    splits = split_files(name)
    count = sum(map(len, splits.values()))
    print(f'Copying the {count:,} files of {folder(name)} into a TFDS dataset in '
          f'{os.path.join(data_dir, DATASET, config)}, once ...', flush=True)
    tfds.disable_progress_bar()
    not_utf8 = set()
    with contextlib.redirect_stdout(io.StringIO()):
      tfds.dataset_builders.store_as_tfds_dataset(
          name=DATASET, version=VERSION, config=config, data_dir=data_dir,
          features=tfds.features.FeaturesDict({text_key: tfds.features.Text()}),
          split_datasets=_split_documents(splits, text_key, name, not_utf8),
          disable_shuffling=True, description=f'The .txt and .jsonl files of {folder(name)}.')
    if not_utf8:
      print(f'note: {len(not_utf8):,} file(s) of {folder(name)} are not valid UTF-8 (the first: '
            f'{min(not_utf8)}); their undecodable bytes were read as U+FFFD.', flush=True)
  return read_only_builder.builder_from_files(full_name, data_dir=data_dir)


def _split_documents(splits: dict[str, list[str]], text_key: str, name: str,
                     not_utf8: set) -> dict:
  """{split: an iterable of (key, example)} in file order."""
  def texts(paths):
    return (t for p in paths for t in documents(p, text_key, not_utf8))

  def examples(split_texts):
    for i, text in enumerate(split_texts):
      yield f'{i:012d}', {text_key: text}

  if 'all' not in splits:
    return {split: _Reiterable(lambda paths=paths: examples(texts(paths)))
            for split, paths in splits.items()}
  paths = splits['all']
  total = sum(map(len, texts(paths)))
  if total < 2:
    raise UserError(f'data.name={name!r}: {folder(name)} holds {total} character(s); '
                    'there is nothing to hold out for validation.')
  cut = total - max(1, round(total * HELD_OUT))
  return {'train': _Reiterable(lambda: examples(_held_out(texts(paths), cut, False))),
          'validation': _Reiterable(lambda: examples(_held_out(texts(paths), cut, True)))}


def _held_out(all_texts: Iterator[str], cut: int, validation: bool) -> Iterator[str]:
  """The documents before character `cut` (validation=False) or from it on; the document
  the cut falls in is cut at the line break nearest to it (or at `cut` if it has none)."""
  start = 0
  for text in all_texts:
    end = start + len(text)
    if end <= cut:
      if not validation:
        yield text
    elif start >= cut:
      if validation:
        yield text
    else:
      at = _line_break_near(text, cut - start)
      part = text[at:] if validation else text[:at]
      if part:
        yield part
    start = end


def _line_break_near(text: str, at: int) -> int:
  """The start of the line nearest to `at` that leaves text on both sides; `at` itself if
  no line break does."""
  after, before = text.find('\n', at) + 1, text.rfind('\n', 0, at) + 1
  starts = [s for s in (after, before) if 0 < s < len(text)]
  return min(starts, key=lambda s: abs(s - at)) if starts else at


class _Reiterable:
  """An iterable that starts its generator anew each time it is iterated."""

  def __init__(self, make):
    self._make = make

  def __iter__(self):
    return self._make()
