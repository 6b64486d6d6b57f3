"""Your own text files as a corpus ('files:PATTERN'): which files, which documents, which
split (folders, or a hold-out by hash), the TFDS copy (made once, anew when a file
changes), the refusals, and a run that trains on them and resumes exactly."""
import gzip
import json
import os
import pathlib
import random
import shutil

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import train
from lmjax import workdir as workdir_lib
from lmjax.data import external, files, pipeline, tokenizers
from lmjax.errors import UserError

README = (pathlib.Path(__file__).parents[2] / 'README.md').read_text()


def _data(name, tmp_path, **fields):
  data = shakespeare_char.get_config('tiny').data
  data.update(name=f'files:{name}', data_dir=str(tmp_path / 'tfds'), **fields)
  return data


def _texts(data, split):
  return [text for batch in external.documents(data, split) for text in batch]


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _jsonl(records, key='text'):
  return ''.join(json.dumps({key: r, 'id': i}) + '\n' for i, r in enumerate(records))


def test_a_share_of_documents_is_held_out_by_their_hash():
  rng = random.Random(0)
  texts = [''.join(rng.choice('abc ') for _ in range(20)) for _ in range(4000)]
  held = [t for t in texts if files.held_out(t, 0.1)]
  assert 340 < len(held) < 460  # 400 expected; 3 standard deviations either side
  assert [files.held_out(t, 0.1) for t in held] == [True] * len(held)  # a function of the text
  assert not any(files.held_out(t, 0.0) for t in texts)


def test_files_are_documents_in_path_order_split_by_the_hold_out(tmp_path, capsys):
  root = tmp_path / 'corpus'
  records = [f'record {i}' for i in range(60)]
  _write(root / 'b.txt', 'second file\n')
  _write(root / 'a' / 'z.txt', 'first file\n')  # a/z.txt sorts before b.txt
  _write(root / 'c.jsonl', _jsonl(records[:30], key='body') + '\n')  # a blank line is skipped
  with gzip.open(root / 'd.jsonl.gz', 'wt') as f:
    f.write(_jsonl(records[30:], key='body'))
  _write(root / '.hidden.txt', 'never read')
  _write(root / 'notes.md', 'never read')
  data = _data(root, tmp_path, text_feature='body', holdout=0.2)
  everything = ['first file\n', 'second file\n', *records]
  train_texts, held = _texts(data, 'train'), _texts(data, 'validation')
  assert 'Copying the 4 files' in capsys.readouterr().out
  assert held == [t for t in everything if files.held_out(t, 0.2)] and held
  assert train_texts == [t for t in everything if t not in held]
  # The copy is made once: reading again copies nothing.
  assert _texts(data, 'validation') == held and 'Copying' not in capsys.readouterr().out


def test_globs_and_lists_of_patterns_pick_the_files(tmp_path):
  for name in ('x/1.txt', 'x/2.txt', 'x/skip.jsonl', 'y/deep/3.jsonl'):
    _write(tmp_path / name, _jsonl([name]) if name.endswith('.jsonl') else name)
  data = _data(f'{tmp_path}/x/*.txt, {tmp_path}/y/**/*.jsonl', tmp_path, holdout=0.5)
  assert files.split_files(data.name) == {'all': [
      str(tmp_path / n) for n in ('x/1.txt', 'x/2.txt', 'y/deep/3.jsonl')]}


def test_split_folders_are_the_splits_and_the_split_syntax_slices_them(tmp_path, capsys):
  root = tmp_path / 'corpus'
  for i in range(10):
    _write(root / 'train' / f'{i:02d}.txt', f'training document {i}\n')
  _write(root / 'validation' / 'v.jsonl', '{"text": "held out"}\n')
  data = _data(root, tmp_path)
  assert _texts(data, 'train') == [f'training document {i}\n' for i in range(10)]
  assert _texts(data, 'validation') == ['held out']
  assert _texts(data, 'train[-2:]') == [f'training document {i}\n' for i in (8, 9)]
  capsys.readouterr()
  # A changed file is a new copy under a new key.
  before = files.config_name(data)
  _write(root / 'train' / '03.txt', 'changed\n')
  assert files.config_name(data) != before
  assert _texts(data, 'train')[3] == 'changed\n'
  assert 'Copying the 11 files' in capsys.readouterr().out


@pytest.mark.parametrize('make, message', [
    (lambda root: None, 'matches no .txt, .jsonl, .jsonl.gz file'),
    (lambda root: _write(root / 'notes.md', 'x'), 'matches no .txt'),
    (lambda root: (_write(root / 'train' / 't.txt', 'x'), (root / 'test').mkdir()),
     'test holds no .txt'),
    (lambda root: (_write(root / 'a.txt', 'x'), _write(root / 'b.txt', '')), 'b.txt is empty'),
    (lambda root: _write(root / 'a.jsonl', '\n'), 'a.jsonl holds no JSON line'),
    (lambda root: _write(root / 'a.jsonl', '{"text": "a"}\n{"text": 1}\n'),
     r"a.jsonl:2 has no text under 'text' \(data.text_feature\); its keys: text"),
    (lambda root: _write(root / 'a.jsonl', '{"text": "a"}\nnot json\n'),
     'a.jsonl:2 is not a JSON object'),
    # One document: the split its hash does not pick is empty (the README's text, so which
    # one changes with the README).
    (lambda root: _write(root / 'input.txt', README),
     f"leaves the split '{'train' if files.held_out(README, 0.05) else 'validation'}' empty"
     '.*one .txt file is one document'),
])
def test_bad_files_are_named(tmp_path, make, message):
  make(tmp_path / 'corpus')
  with pytest.raises(UserError, match=message):
    external.builder(_data(tmp_path / 'corpus', tmp_path))


def test_a_run_on_files_trains_and_resumes_exactly(tmp_path, capsys):
  paragraphs = [p for p in README.split('\n\n') if p.strip()]  # about 150 documents
  half = len(paragraphs) // 2
  _write(tmp_path / 'corpus' / 'one.jsonl', _jsonl(paragraphs[:half]))
  _write(tmp_path / 'corpus' / 'two.jsonl', _jsonl(paragraphs[half:]))
  config = shakespeare_char.get_config('tiny')
  config.data.update(name=f'files:{tmp_path / "corpus"}', data_dir=str(tmp_path / 'tfds'),
                     holdout=0.1, drop_unknown_chars=True)
  config.train.update(num_steps=8, eval_every=8, checkpoint_every=4, log_every=4,
                      sample_tokens=0, eval_batch_size=64)
  config.opt.warmup_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  tokenizer = tokenizers.load_tokenizer(workdir)
  tokens = pipeline.load_tokens(config.data, 'train', tokenizer,
                                cache_dir=os.path.join(workdir, 'tokens'))
  assert f'{len(tokens):,} training tokens' in capsys.readouterr().out
  trained = [p for p in paragraphs if not files.held_out(p, 0.1)]
  assert len(tokens) == sum(map(len, trained)) + len(trained)  # characters and an eos each

  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))  # as if it died after step 4
  train.train_and_evaluate(config, resumed, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert 'Resuming from step 4' in out and 'Copying' not in out and 'Tokenizing' not in out
  _, _, expected, _ = workdir_lib.load_trained(workdir, 8)
  _, _, got, _ = workdir_lib.load_trained(resumed, 8)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
