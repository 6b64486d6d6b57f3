"""Prompt -> completion examples: read from JSONL files, TFDS and Countdown, tokenized, laid
into packed or padded rows whose weights, segments and positions say what each token is, and
streamed for training from any row on."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lmjax import config as config_lib
from lmjax.data import completions, puzzles, tokenizers
from lmjax.errors import UserError

CHARS = tokenizers.CharTokenizer(sorted('abcdefghijklmnopqrstuvwxyz ->?!\n'))


def _data(**fields) -> ml_collections.ConfigDict:
  data = config_lib.base_config().data
  data.update(format='completion', **fields)
  return data


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """`n` examples of varied lengths: prompts of 1-6 letters, completions of 0-8."""
  rng = np.random.default_rng(seed)
  letters = list('abcdefghij')
  return [(''.join(rng.choice(letters, rng.integers(1, 7))) + '?',
           ''.join(rng.choice(letters, rng.integers(0, 9)))) for _ in range(n)]


def _write_jsonl(path, pairs, keys=('prompt', 'completion')):
  path.write_text(''.join(json.dumps(dict(zip(keys, pair))) + '\n' for pair in pairs))
  return str(path)


def test_jsonl_reads_every_pair_and_holds_out_the_same_examples_every_time(tmp_path):
  pairs = _pairs(200)
  path = _write_jsonl(tmp_path / 'sft.jsonl', pairs)
  data = _data(train_file=path, holdout=0.25)
  train = completions.read_examples(data, 'train')
  validation = completions.read_examples(data, 'validation')
  assert sorted(train + validation) == sorted(pairs)
  assert 20 < len(validation) < 80  # a quarter of 200, by a hash
  assert not set(train) & set(validation)
  # The hold-out is by the example's text, not its line: reordered, the split is the same.
  _write_jsonl(tmp_path / 'reversed.jsonl', pairs[::-1])
  reordered = _data(train_file=f'{tmp_path}/reversed.jsonl', holdout=0.25)
  assert sorted(completions.read_examples(reordered, 'validation')) == sorted(validation)


def test_jsonl_takes_a_glob_other_keys_and_a_validation_file(tmp_path):
  pairs = _pairs(30)
  for i in range(3):
    _write_jsonl(tmp_path / f'part{i}.jsonl', pairs[10 * i:10 * i + 10], keys=('q', 'a'))
  eval_path = _write_jsonl(tmp_path / 'eval.jsonl.txt', _pairs(5, seed=1), keys=('q', 'a'))
  data = _data(train_file=f'{tmp_path}/part*.jsonl', eval_file=eval_path,
               prompt_feature='q', completion_feature='a')
  assert completions.read_examples(data, 'train') == pairs
  assert completions.read_examples(data, 'validation') == _pairs(5, seed=1)


def _raises_user_error(fn, match: str):
  with pytest.raises(Exception) as info:
    fn()
  assert type(info.value) is UserError, repr(info.value)
  assert match in str(info.value), str(info.value)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('content, match', [
    (None, 'no file matches'),
    ('', 'has no examples'),
    ('\n\n', 'has no examples'),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', 'sft.jsonl:2 is not JSON'),
    ('{"prompt": "a"}\n', "sft.jsonl:1 has no text field 'completion'"),
    ('["a", "b"]\n', "sft.jsonl:1 has no text field 'prompt'"),
    ('{"prompt": 3, "completion": "b"}\n', "has no text field 'prompt'"),
])
def test_bad_jsonl_files_are_refused_naming_the_file_and_line(tmp_path, content, match):
  path = tmp_path / 'sft.jsonl'
  if content is not None:
    path.write_text(content)
  data = _data(train_file=str(path), eval_file=str(path))
  _raises_user_error(lambda: completions.read_examples(data, 'train'), match)


def test_jsonl_examples_have_train_and_validation_splits_only(tmp_path):
  path = _write_jsonl(tmp_path / 'sft.jsonl', _pairs(10))
  _raises_user_error(lambda: completions.read_examples(_data(train_file=path), 'test'),
                     'have the splits train and validation')


def test_tfds_examples_come_from_the_two_features_named(tmp_path):
  pairs = _pairs(12)
  tfds.dataset_builders.store_as_tfds_dataset(
      name='lmjax_test_sft', version='1.0.0', data_dir=str(tmp_path),
      features=tfds.features.FeaturesDict({'question': tfds.features.Text(),
                                           'answer': tfds.features.Text()}),
      split_datasets={'train': [(i, {'question': p, 'answer': c})
                                for i, (p, c) in enumerate(pairs)]})
  data = _data(name='tfds:lmjax_test_sft', data_dir=str(tmp_path),
               prompt_feature='question', completion_feature='answer')
  assert sorted(completions.read_examples(data, 'train')) == sorted(pairs)
  assert len(completions.read_examples(data, 'train[:5]')) == 5
  data.completion_feature = 'completion'
  _raises_user_error(lambda: completions.read_examples(data, 'train'),
                     "data.completion_feature='completion' is not a text feature")
  data.completion_feature = 'answer'
  _raises_user_error(lambda: completions.read_examples(data, 'validation'),
                     "split 'validation' is not a split")


def test_countdown_prompts_are_puzzle_lines_and_completions_their_solutions():
  text = '4 7 8 9 -> 34\n9-7=2\n8*4=32\n32+2=34'
  prompt, solution = puzzles.prompt_and_solution(text)
  assert (prompt, solution) == ('4 7 8 9 -> 34\n', '9-7=2\n8*4=32\n32+2=34')
  assert puzzles.solves(prompt, solution)
  assert not puzzles.solves(prompt, '9-7=2\n8*4=32')


def test_tokenized_examples_are_prompt_completion_eos():
  examples = completions.tokenize([('ab?', 'cd'), ('e?', '')], CHARS, seq_len=8, what='x')
  assert len(examples) == 2
  np.testing.assert_array_equal(examples.prompt_lengths, [3, 2])
  np.testing.assert_array_equal(examples.spans, [5, 2])  # tokens less one: eos is no input
  first = examples.tokens[examples.starts[0]:examples.starts[1]]
  assert CHARS.decode(first[:-1]) == 'ab?cd' and first[-1] == CHARS.eos_id


def test_an_example_longer_than_a_row_or_without_prompt_is_refused():
  too_long = [('ab?', 'cd'), ('abcdef?', 'ghij'), ('a?', 'bcdefghijk')]
  _raises_user_error(lambda: completions.tokenize(too_long, CHARS, seq_len=8, what='s'),
                     'example 2 of s (prompt \'abcdef?\') is 11 tokens long, more than a row '
                     'of train.seq_len=8 (2 of 3 examples are)')
  completions.tokenize(too_long[:1], CHARS, seq_len=5, what='s')  # exactly a row fits
  _raises_user_error(lambda: completions.tokenize([('', 'x')], CHARS, seq_len=8, what='s'),
                     'example 1 of s has an empty prompt')


def _rows(pairs, seq_len, packed):
  examples = completions.tokenize(pairs, CHARS, seq_len=seq_len, what='x')
  evals = completions.eval_set(examples, seq_len=seq_len, batch_size=1, packed=packed)
  return examples, evals.arrays


@pytest.mark.parametrize('packed', [True, False])
def test_rows_weigh_the_completion_and_eos_only_and_positions_restart(packed):
  pairs = _pairs(40)
  _, arrays = _rows(pairs, seq_len=16, packed=packed)
  scored, prompts = [], []
  for r in range(len(arrays['inputs'])):
    if packed:
      segments, positions = arrays['segment_ids'][r], arrays['positions'][r]
    else:  # one example a row, from position 0
      segments = (np.arange(16) < (arrays['inputs'][r] > 0).sum()).astype(int)
      positions = np.where(segments > 0, np.arange(16), 0)
    for s in range(1, segments.max() + 1):
      span = np.flatnonzero(segments == s)
      np.testing.assert_array_equal(positions[span], np.arange(len(span)))  # from 0
      weights = arrays['weights'][r, span]
      np.testing.assert_array_equal(arrays['inputs'][r, span[1:]],
                                    arrays['targets'][r, span[:-1]])
      prompts.append(CHARS.decode(arrays['inputs'][r, span][:int((weights == 0).sum()) + 1]))
      scored.append(arrays['targets'][r, span][weights == 1])
    assert not arrays['weights'][r, segments == 0].any()  # padding weighs nothing
  assert all(ids[-1] == CHARS.eos_id for ids in scored)
  found = [(prompt, CHARS.decode(ids[:-1])) for prompt, ids in zip(prompts, scored)]
  assert sorted(found) == sorted(pairs)  # every example once, its completion scored


def test_packing_fills_rows_in_order_without_overflowing_them():
  spans = np.array([5, 4, 3, 8, 1, 1, 7, 2])
  # Each example goes to the first open row with room; a full row closes at once.
  members, bounds = completions.pack(spans, seq_len=9)
  np.testing.assert_array_equal(members, [0, 1, 2, 4, 5, 7, 3, 6])  # 5+4 | 3+1+1+2 | 8 | 7
  np.testing.assert_array_equal(bounds, [0, 2, 6, 7, 8])
  # One open row: each row takes the examples that follow while they fit.
  members, bounds = completions.pack(spans, seq_len=9, open_rows=1)
  np.testing.assert_array_equal(members, np.arange(8))
  np.testing.assert_array_equal(bounds, [0, 2, 3, 5, 7, 8])  # 5+4 | 3 | 8+1 | 1+7 | 2
  spans = np.random.default_rng(0).integers(1, 17, 500)
  members, bounds = completions.pack(spans, seq_len=16)
  assert sorted(members) == list(range(500))
  fills = [spans[members[a:b]].sum() for a, b in zip(bounds[:-1], bounds[1:])]
  assert max(fills) <= 16 and np.mean(fills) > 14  # rows nearly full


def _stream(examples, start, num_batches, **kwargs):
  ds = completions.train_dataset(examples, seq_len=16, global_batch=4, seed=3,
                                 start_example=start, **kwargs)
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(num_batches)]


@pytest.mark.parametrize('packed', [True, False])
def test_the_training_stream_resumes_at_any_row_across_epochs(packed):
  examples = completions.tokenize(_pairs(25), CHARS, seq_len=16, what='x')
  whole = _stream(examples, 0, 12, packed=packed)  # several epochs
  rows = {k: np.concatenate([b[k] for b in whole]) for k in whole[0]}
  assert set(rows) == ({'inputs', 'targets', 'weights'} |
                       ({'segment_ids', 'positions'} if packed else set()))
  for start in (4, 8, 20):  # whole batches, as the trainer resumes
    resumed = _stream(examples, start, 3, packed=packed)
    for k in rows:
      np.testing.assert_array_equal(np.concatenate([b[k] for b in resumed]),
                                    rows[k][start:start + 12], err_msg=k)
  # Every epoch holds every example once, in another order.
  order0, bounds0 = completions.epoch_plan(examples, 0, seed=3, seq_len=16, packed=packed)
  order1, _ = completions.epoch_plan(examples, 1, seed=3, seq_len=16, packed=packed)
  assert sorted(order0) == sorted(order1) == list(range(25))
  assert list(order0) != list(order1)
  first_epoch = rows['weights'][:len(bounds0) - 1].sum()
  assert first_epoch == (examples.spans - examples.prompt_lengths + 1).sum()
