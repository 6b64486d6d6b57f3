"""A folder of your own text as a corpus ('files:PATH'): its splits, its TFDS copy (made
once, anew when the files change), its refusals, and a run that trains on it and resumes
exactly."""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import train
from lmjax import workdir as workdir_lib
from lmjax.data import external, files, pipeline, tokenizers
from lmjax.errors import UserError

LINES = [f'Line {i}: the quick brown fox jumps over the lazy dog.\n' for i in range(200)]


def _data(folder, tmp_path, **fields):
  data = shakespeare_char.get_config('tiny').data
  data.update(name=f'files:{folder}', data_dir=str(tmp_path / 'tfds'), **fields)
  return data


def _texts(data, split):
  return [text for batch in external.documents(data, split) for text in batch]


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def test_one_text_file_holds_out_its_last_tenth_at_a_line_break(tmp_path, capsys):
  _write(tmp_path / 'corpus' / 'input.txt', ''.join(LINES))
  data = _data(tmp_path / 'corpus', tmp_path)
  train_texts, held_out = _texts(data, 'train'), _texts(data, 'validation')
  assert 'Copying the 1 files' in capsys.readouterr().out
  assert len(train_texts) == len(held_out) == 1
  assert train_texts[0] + held_out[0] == ''.join(LINES)
  assert held_out[0] == ''.join(LINES[180:])  # 200 equal lines: the last 20
  # The copy is made once: reading again copies nothing.
  assert _texts(data, 'validation') == held_out and 'Copying' not in capsys.readouterr().out


def test_files_are_documents_in_path_order_and_jsonl_lines_are_documents(tmp_path):
  root = tmp_path / 'corpus'
  _write(root / 'b.txt', 'second file\n')
  _write(root / 'a' / 'z.txt', 'first file\n')  # a/z.txt sorts before b.txt
  _write(root / 'c.jsonl', '\n'.join(json.dumps({'body': f'record {i}', 'id': i})
                                     for i in range(30)) + '\n\n')
  _write(root / '.hidden.txt', 'never read')
  _write(root / 'notes.md', 'never read')
  data = _data(root, tmp_path, text_feature='body')
  train_texts, held_out = _texts(data, 'train'), _texts(data, 'validation')
  records = [f'record {i}' for i in range(30)]
  # 283 characters: the last 28 are the end of record 26, which holds no line break to cut
  # at, and the three records after it.
  assert held_out == ['6', *records[27:]]
  assert train_texts == ['first file\n', 'second file\n', *records[:26], 'record 2']


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
  before = files.config_name(data.name, data.text_feature)
  _write(root / 'train' / '03.txt', 'changed\n')
  assert files.config_name(data.name, data.text_feature) != before
  assert _texts(data, 'train')[3] == 'changed\n'
  assert 'Copying the 11 files' in capsys.readouterr().out


@pytest.mark.parametrize('make, message', [
    (lambda root: None, 'is not a folder'),
    (lambda root: _write(root / 'notes.md', 'x'), 'holds no .txt or .jsonl file'),
    (lambda root: _write(root / 'validation' / 'v.txt', 'x'), 'but no train/ folder'),
    (lambda root: (_write(root / 'train' / 't.txt', 'x'), (root / 'test').mkdir()),
     'test holds no .txt or .jsonl file'),
    (lambda root: _write(root / 'a.jsonl', '{"text": "a"}\n{"text": 1}\n'),
     r"a.jsonl:2 has no text under 'text' \(data.text_feature\); its keys: text"),
    (lambda root: _write(root / 'a.jsonl', '{"text": "a"}\nnot json\n'),
     'a.jsonl:2 is not a JSON object'),
    (lambda root: _write(root / 'a.txt', 'x'), 'holds 1 character'),
])
def test_a_bad_folder_is_named(tmp_path, make, message):
  make(tmp_path / 'corpus')
  with pytest.raises(UserError, match=message):
    external.builder(_data(tmp_path / 'corpus', tmp_path))


def test_a_run_on_a_folder_trains_and_resumes_exactly(tmp_path, capsys):
  root = tmp_path / 'corpus'
  text = (pathlib.Path(__file__).parents[2] / 'README.md').read_text()
  for i in range(4):  # any text will do: the README, in four files
    _write(root / f'part{i}.txt', text[i * len(text) // 4:(i + 1) * len(text) // 4])
  config = shakespeare_char.get_config('tiny')
  config.data.update(name=f'files:{root}', data_dir=str(tmp_path / 'tfds'))
  config.train.update(num_steps=8, eval_every=8, checkpoint_every=4, log_every=4,
                      sample_tokens=0, eval_batch_size=256)
  config.opt.warmup_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  tokenizer = tokenizers.load_tokenizer(workdir)
  tokens = pipeline.load_tokens(config.data, 'train', tokenizer,
                                cache_dir=os.path.join(workdir, 'tokens'))
  assert f'{len(tokens):,} training tokens' in capsys.readouterr().out
  assert abs(len(tokens) - 0.9 * len(text)) < 200  # four documents' ends, a cut at a line

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
