"""Any prepared TFDS text dataset by name ('tfds:NAME'): tokenized once into a file, read
as a memmap, trained on and resumed. Real TFDS throughout: lmjax's own prepared Shakespeare
read by name from its files, and small datasets written with TFDS's own writer."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import gpt2, shakespeare_char
from lmjax import config as config_lib, evaluation, models, sharding, state as state_lib, train
from lmjax import workdir as workdir_lib
from lmjax.data import corpora, external, pipeline, tokenizers
from lmjax.errors import UserError
from tests.data.test_tokenizers import _write_gpt2_files

DOCS_NAME = 'lmjax_test_docs'
# Characters from the supplementary planes: 70,000 of them make a char vocabulary too
# large for uint16 ids.
WIDE_CHARS = [chr(0x10000 + i) for i in range(70_000)]


def _data(**fields):
  """The tiny Shakespeare config's data section with `fields` changed."""
  config = shakespeare_char.get_config('tiny')
  config.data.update(fields)
  return config.data


@pytest.fixture(scope='module')
def char_tokenizer():
  works = corpora.load_split_texts('shakespeare', 'train')  # prepares it if need be
  return tokenizers.CharTokenizer.train(text for _, text in works)


@pytest.fixture(scope='module')
def docs_dir(tmp_path_factory):
  """A data_dir with a small dataset of one split whose text is in 'body', not 'text'."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  docs = [f'Document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (i % 5)
          for i in range(40)]
  docs[7] += ''.join(WIDE_CHARS[-3:])  # ids above 65,535 for the wide vocabulary
  tfds.dataset_builders.store_as_tfds_dataset(
      name=DOCS_NAME, version='1.0.0', data_dir=data_dir,
      features=tfds.features.FeaturesDict({'body': tfds.features.Text(),
                                           'id': tfds.features.Scalar(dtype=np.int32)}),
      split_datasets={'train': [(i, {'body': doc, 'id': i}) for i, doc in enumerate(docs)]})
  return data_dir


def _read_in_order(data_config, split, feature):
  """The split's `feature` values in the order TFDS reads them, straight from TFDS."""
  ds = external.builder(data_config).as_dataset(split=split, shuffle_files=False)
  return [x.decode() for x in tfds.as_numpy(ds.map(lambda example: example[feature]))]


def _joined(tokenizer, texts):
  return np.concatenate([np.append(tokenizer.encode(text), tokenizer.eos_id)
                         for text in texts])


def test_tokens_are_the_lmjax_paths_tokens_in_tfds_order(tmp_path, char_tokenizer):
  data = _data(name='tfds:shakespeare')
  tokens = pipeline.load_tokens(data, 'train', char_tokenizer, cache_dir=str(tmp_path))
  assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
  # lmjax's own path, fed the same works in the order TFDS stores them.
  works = dict(corpora.load_split_texts('shakespeare', 'train'))
  order = _read_in_order(data, 'train', 'title')
  expected = pipeline.load_tokens(_data(), 'train', char_tokenizer,
                                  works=[(title, works[title]) for title in order])
  np.testing.assert_array_equal(tokens, expected)
  # TFDS's split syntax: two slices are the whole split.
  head = pipeline.load_tokens(_data(name='tfds:shakespeare'), 'train[:5]', char_tokenizer,
                              cache_dir=str(tmp_path))
  tail = pipeline.load_tokens(data, 'train[5:]', char_tokenizer, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(np.concatenate([head, tail]), tokens)


def test_sentencepiece_batches_encode_as_one_text_at_a_time(tmp_path):
  data = _data(name='tfds:shakespeare')
  texts = external.sample_texts(data, 'validation', max_chars=100_000)
  assert sum(map(len, texts)) == 100_000
  tokenizer = tokenizers.SentencePieceTokenizer.train(texts, 400)
  tokens = pipeline.load_tokens(data, 'validation', tokenizer, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(
      tokens, _joined(tokenizer, _read_in_order(data, 'validation', 'text')))


def test_token_file_is_written_once_and_then_reused(tmp_path, char_tokenizer):
  data, cache = _data(name='tfds:shakespeare'), str(tmp_path)
  first = pipeline.load_tokens(data, 'validation', char_tokenizer, cache_dir=cache)
  before = os.stat(first.filename)
  again = pipeline.load_tokens(data, 'validation', char_tokenizer, cache_dir=cache)
  after = os.stat(again.filename)
  assert again.filename == first.filename
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  stem = first.filename[:-len('.bin')]
  assert sorted(os.listdir(cache)) == sorted(os.path.basename(stem) + suffix
                                             for suffix in ('.bin', '.bin.lock', '.json'))
  with open(stem + '.json') as f:
    described = json.load(f)
  assert described['dataset'] == 'shakespeare/1.0.0' and described['split'] == 'validation'
  assert described['num_tokens'] == len(first) and described['dtype'] == 'uint16'
  # Another tokenizer's ids go to another file.
  other = tokenizers.CharTokenizer(char_tokenizer.chars[::-1])
  assert pipeline.load_tokens(data, 'validation', other,
                              cache_dir=cache).filename != first.filename


def test_a_partial_or_cut_short_token_file_is_never_read(tmp_path, char_tokenizer):
  data = _data(name='tfds:shakespeare')
  expected = np.array(pipeline.load_tokens(data, 'validation', char_tokenizer,
                                           cache_dir=str(tmp_path / 'whole')))
  cache = str(tmp_path / 'damaged')
  path, description = external.token_file(data, 'validation', char_tokenizer, cache)
  os.makedirs(cache)
  # A writer killed mid-file (its temporary name), and a finished-looking file cut short
  # (a copy that ran out of disk) with a description claiming all of it.
  leftover = path + '.tmp-otherhost-123'
  expected[:1000].tofile(leftover)
  expected[:1000].astype(np.uint16).tofile(path)
  with open(path[:-len('.bin')] + '.json', 'w') as f:
    json.dump({**description, 'num_tokens': len(expected)}, f)
  tokens = pipeline.load_tokens(data, 'validation', char_tokenizer, cache_dir=cache)
  np.testing.assert_array_equal(tokens, expected)
  assert not os.path.exists(leftover)


def test_a_tokenization_that_fails_midway_leaves_no_file(tmp_path):
  # A character vocabulary learned from too small a sample meets characters it lacks.
  data, cache = _data(name='tfds:shakespeare'), str(tmp_path)
  tokenizer = tokenizers.CharTokenizer.train(['abcdefghij \n'])
  with pytest.raises(UserError, match=r'data\.drop_unknown_chars=True'):
    pipeline.load_tokens(data, 'validation', tokenizer, cache_dir=cache)
  assert [name for name in os.listdir(cache) if not name.endswith('.lock')] == []
  data.drop_unknown_chars = True
  tokens = pipeline.load_tokens(data, 'validation', tokenizer, cache_dir=cache)
  assert set(np.unique(tokens)) == set(range(tokenizer.vocab_size))


def test_a_dataset_that_is_not_prepared_names_the_command_that_prepares_it(tmp_path,
                                                                          char_tokenizer):
  data = _data(name='tfds:lm1b', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(UserError) as error:
    pipeline.load_tokens(data, 'train', char_tokenizer, cache_dir=str(tmp_path / 'cache'))
  message = str(error.value)
  assert (f'python experiments/prepare_data.py --tfds=lm1b --data_dir={tmp_path / "tfds"}'
          in message), message
  assert 'downloads nothing' in message
  assert not os.path.exists(tmp_path / 'cache')


@pytest.mark.parametrize('fields, message', [
    (dict(train_split='dev'), r"data\.train_split='dev' is not a split of shakespeare/1\.0\.0"),
    (dict(text_feature='body'), r"data\.text_feature='body'.*text features: text, title"),
])
def test_a_wrong_split_or_feature_is_named(fields, message, tmp_path, char_tokenizer):
  data = _data(name='tfds:shakespeare', **fields)
  with pytest.raises(UserError, match=message):
    pipeline.load_tokens(data, data.train_split, char_tokenizer, cache_dir=str(tmp_path))


def test_text_feature_slices_and_ids_too_wide_for_uint16(tmp_path, docs_dir):
  data = _data(name=f'tfds:{DOCS_NAME}:1.0.0', data_dir=docs_dir, text_feature='body')
  docs = _read_in_order(data, 'train', 'body')
  tokenizer = tokenizers.CharTokenizer(sorted(set(''.join(docs)) | set(WIDE_CHARS)))
  assert tokenizer.vocab_size > 1 << 16
  tokens = pipeline.load_tokens(data, 'train[:-4]', tokenizer, cache_dir=str(tmp_path))
  held_out = pipeline.load_tokens(data, 'train[-4:]', tokenizer, cache_dir=str(tmp_path))
  assert tokens.dtype == held_out.dtype == np.uint32
  np.testing.assert_array_equal(np.concatenate([tokens, held_out]), _joined(tokenizer, docs))
  assert tokens.max() == tokenizer.vocab_size - 1 or held_out.max() == tokenizer.vocab_size - 1


def test_a_gpt2_tokenizer_dir_holds_gpt2s_files(tmp_path, docs_dir):
  hf_dir = tmp_path / 'gpt2'
  hf_dir.mkdir()
  _write_gpt2_files(hf_dir)
  # Hugging Face directories hold transformers' tokenizer.json as well: not lmjax's.
  (hf_dir / 'tokenizer.json').write_text(json.dumps({'version': '1.0', 'model': {}}))
  tokenizer = tokenizers.read_tokenizer_dir(str(hf_dir))
  assert tokenizer.kind == 'gpt2_bpe'
  data = _data(name=f'tfds:{DOCS_NAME}', data_dir=docs_dir, text_feature='body')
  tokens = pipeline.load_tokens(data, 'train', tokenizer, cache_dir=str(tmp_path / 'cache'))
  assert tokens.dtype == np.uint16
  np.testing.assert_array_equal(tokens, _joined(tokenizer, _read_in_order(data, 'train',
                                                                          'body')))
  with pytest.raises(FileNotFoundError, match='vocab.json'):
    tokenizers.read_tokenizer_dir(str(tmp_path / 'cache'))


def _tiny_run_config(**data_fields):
  config = shakespeare_char.get_config('tiny')
  config.data.update(name='tfds:shakespeare', **data_fields)
  # Large evaluation batches: the validation split is 7,000 windows of the tiny context.
  config.train.update(num_steps=8, eval_every=8, checkpoint_every=4, log_every=4,
                      sample_tokens=0, eval_batch_size=1024)
  config.opt.warmup_steps = 2
  return config


def test_a_run_on_a_tfds_dataset_trains_and_resumes_from_its_token_files(tmp_path, capsys):
  config, workdir = _tiny_run_config(), str(tmp_path / 'run')
  metrics = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  files = sorted(os.listdir(os.path.join(workdir, 'tokens')))
  assert [f.split('-')[1] for f in files if f.endswith('.bin')] == ['train', 'validation']
  tokenizer = tokenizers.load_tokenizer(workdir)
  train_tokens = pipeline.load_tokens(config.data, 'train', tokenizer,
                                      cache_dir=os.path.join(workdir, 'tokens'))
  assert f'{len(train_tokens):,} training tokens' in out
  assert metrics['loss'] < math.log(tokenizer.vocab_size) - 0.4, metrics  # uniform: 4.44

  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))  # as if it died after step 4
  train.train_and_evaluate(config, resumed, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert 'Resuming from step 4' in out and 'Tokenizing' not in out
  _, _, expected, _ = workdir_lib.load_trained(workdir, 8)
  _, _, got, _ = workdir_lib.load_trained(resumed, 8)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)

  # experiments/evaluate.py reads the same token file and gets the run's numbers.
  scored = evaluation.evaluate_workdir(workdir, devices=jax.devices()[:1])
  assert scored['dataset'] == 'tfds:shakespeare' and 'Tokenizing' not in capsys.readouterr().out
  assert scored['loss'] == pytest.approx(metrics['loss'], abs=1e-5)

  # Another run starting from this one's tokenizer (data.tokenizer_dir) shares its token
  # files when pointed at them (data.cache_dir).
  shared = _tiny_run_config(tokenizer_dir=workdir, cache_dir=os.path.join(workdir, 'tokens'))
  train.train_and_evaluate(shared, str(tmp_path / 'shared'), devices=jax.devices()[:1])
  assert 'Tokenizing' not in capsys.readouterr().out
  assert tokenizers.load_tokenizer(str(tmp_path / 'shared')).chars == tokenizer.chars


def test_a_tokenizer_dir_of_another_kind_is_refused(tmp_path):
  config = _tiny_run_config(tokenizer='sentencepiece', vocab_size=256,
                            tokenizer_dir=str(tmp_path / 'base'))
  tokenizers.CharTokenizer.train(['abc']).save(str(tmp_path / 'base'))
  with pytest.raises(UserError, match=r"holds a 'char' tokenizer.*data\.tokenizer='char'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])


def test_a_malformed_tfds_name_is_refused_before_anything_runs(tmp_path):
  config = _tiny_run_config()
  config.data.name = 'tfds:'
  with pytest.raises(UserError, match="write 'tfds:' and a TFDS dataset name"):
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])


def test_gpt2_small_is_gpt2s_124m_and_its_openwebtext_run_is_valid():
  config = gpt2.get_config('small')
  config.data.update(name='tfds:huggingface:skylion007__openwebtext',
                     train_split='train[:-1000]', eval_split='train[-1000:]',
                     tokenizer='gpt2_bpe', tokenizer_dir='hf/gpt2')
  config_lib.validate_config(config, sharding.make_mesh(config.mesh, jax.devices()))
  model = state_lib.build_model(config, 50257)  # GPT-2's vocabulary
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, config.train.seq_len), jnp.int32)))
  assert models.count_params(shapes['params']) == 124_439_808  # GPT-2 small's count
  assert config.train.batch_size * config.train.seq_len == 491_520  # nanoGPT's 0.5M
  assert (config.model.dtype, config.model.dropout) == ('bfloat16', 0.0)
  assert external._files_name(config.data.name) == 'skylion007__openwebtext'
  # The fine-tuning variants are what they were: gpt2 imports with dropout.
  assert gpt2.get_config('').model.dropout == 0.1
  assert gpt2.get_config('').data.tokenizer == 'gpt2_bpe'


def test_text_that_is_not_utf8_is_read_replaced_and_counted(tmp_path, capsys):
  """A web corpus may hold a few bad bytes: the run goes on, and says how many documents."""
  data_dir = str(tmp_path / 'tfds')
  texts = [b'plain text', b'caf\xe9 in latin-1', 'na\u00efve in UTF-8'.encode()]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='lmjax_test_latin1', version='1.0.0', data_dir=data_dir,
      features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
      split_datasets={'train': [(i, {'text': t}) for i, t in enumerate(texts)]})
  data = _data(name='tfds:lmjax_test_latin1', data_dir=data_dir)
  read = sorted(text for batch in external.documents(data, 'train') for text in batch)
  assert read == sorted(['plain text', 'caf\ufffd in latin-1', 'na\u00efve in UTF-8'])
  assert ("note: tfds:lmjax_test_latin1 'train': 1 document(s) not valid UTF-8"
          in capsys.readouterr().out)
