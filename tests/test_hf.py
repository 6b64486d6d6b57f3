"""GPT-2 to and from Hugging Face: lmjax agrees with transformers on logits, ids and files."""
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

_NEEDS = "the Hugging Face tests need transformers and torch: pip install -e '.[hf]'"
transformers = pytest.importorskip('transformers', reason=_NEEDS)
torch = pytest.importorskip('torch', reason=_NEEDS)

from lmjax import hf, models, train, workdir as workdir_lib  # noqa: E402
from lmjax.data import tokenizers  # noqa: E402
from lmjax.errors import UserError  # noqa: E402
from tests import hf_util, script_cases, xla  # noqa: E402


# What GPT-2's pre-tokenizer and byte table must get right.
TEXTS = [
    'Hello world',
    "isn't it? I'll, we've, they're, she'd, I'm, DON'T, you'LL",
    'numbers 3.14159 and 1234567890, 42nd, \u0663 \u00b2 \u00bd',
    'runs  of   spaces    and trailing spaces   ',
    '  two leading spaces',
    ' one leading space',
    'lines\nand\n\nblank lines\n  indented\r\nwindows\n',
    'tabs\tand\t\ttabs \t mixed',
    'caf\u00e9 na\u00efve r\u00e9sum\u00e9 e\u0301 stra\u00dfe \u00a1hola!',
    '\u6771\u4eac \u65e5\u672c\u8a9e\u306e\u6587\u7ae0 \ud55c\uad6d\uc5b4',
    'emoji \U0001F600\U0001F600 \U0001F468\u200d\U0001F469\u200d\U0001F467 \u2603',
    'end of one<|endoftext|>start of the next <|endoftext|>',
    '\x00\x1f control \x0b\x0c and \u00a0no-break \u3000 spaces',
    '',
    ' ',
    '\n',
]


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  return hf_util.make_tiny_gpt2_dir(str(tmp_path_factory.mktemp('hf') / 'tiny_gpt2'))


@pytest.fixture(scope='module')
def hf_model(hf_dir):
  return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope='module')
def hf_tokenizer(hf_dir):
  return transformers.GPT2TokenizerFast.from_pretrained(hf_dir)


@pytest.fixture(scope='module')
def workdir(hf_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('imported'))
  hf.import_gpt2(hf_dir, workdir)
  return workdir


@pytest.fixture(scope='module')
def random_ids():
  # A full context and a short one, over the whole vocabulary (eos included).
  rng = np.random.default_rng(0)
  return rng.integers(0, 512, (2, 64)), rng.integers(0, 512, (3, 7))


def test_imported_model_gives_the_logits_of_transformers(workdir, hf_model, random_ids):
  config, tokenizer, params, step = workdir_lib.load_trained(workdir)
  assert step == 0 and tokenizer.kind == 'gpt2_bpe' and tokenizer.vocab_size == 512
  assert (config.model.num_layers, config.model.num_heads, config.model.d_model,
          config.model.max_len, config.data.tokenizer) == (2, 4, 64, 64, 'gpt2_bpe')
  model = models.build_model(config.model, tokenizer.vocab_size)
  for ids in random_ids:
    ours = np.asarray(model.apply({'params': params}, ids))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize('text', TEXTS)
def test_tokenizer_encodes_and_decodes_as_transformers(workdir, hf_tokenizer, text):
  ours = tokenizers.load_tokenizer(workdir)
  ids = ours.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == hf_tokenizer.encode(text)
  # decode drops eos, as the other lmjax tokenizers do.
  assert ours.decode(ids) == hf_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
  assert ours.decode(ids) == text.replace('<|endoftext|>', '')


def test_tokenizer_agrees_on_a_long_text_and_uses_merges(workdir, hf_tokenizer):
  ours = tokenizers.load_tokenizer(workdir)
  text = '\n'.join(hf_util.tiny_gpt2_text(num_lines=200, seed=1))
  ids = ours.encode(text)
  assert ids.tolist() == hf_tokenizer.encode(text)
  assert len(ids) < len(text.encode('utf-8')) / 2  # merges happened
  assert ours.decode(ids) == text


def test_tokenizer_is_read_from_tokenizer_json_alone(hf_dir, hf_tokenizer, tmp_path):
  only_json = tmp_path / 'only_json'
  only_json.mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(hf_dir, name), only_json / name)
  from_json = hf.read_hf_tokenizer(str(only_json))
  from_files = hf.read_hf_tokenizer(hf_dir)
  assert from_json.vocab == from_files.vocab and from_json.merges == from_files.merges
  for text in TEXTS:
    assert from_json.encode(text).tolist() == hf_tokenizer.encode(text)


def test_export_loads_in_transformers_with_the_same_logits_and_tokenizer(
    workdir, hf_dir, hf_model, hf_tokenizer, random_ids, tmp_path):
  exported = str(tmp_path / 'exported')
  assert hf.export_gpt2(workdir, exported) == 0
  model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
  for ids in random_ids:
    np.testing.assert_allclose(_hf_logits(model, ids), _hf_logits(hf_model, ids), atol=1e-5,
                               rtol=0)
  # The tensors are the ones transformers saves, under the same names.
  ours, theirs = (safetensors.numpy.load_file(os.path.join(d, 'model.safetensors'))
                  for d in (exported, hf_dir))
  assert sorted(ours) == sorted(theirs)
  for name, array in theirs.items():
    np.testing.assert_array_equal(ours[name], array, err_msg=name)
  with open(os.path.join(exported, 'config.json')) as f:
    config = json.load(f)
  assert (config['model_type'], config['architectures']) == ('gpt2', ['GPT2LMHeadModel'])
  assert config['bos_token_id'] == config['eos_token_id'] == hf_tokenizer.eos_token_id

  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(exported)
  assert tokenizer.eos_token == '<|endoftext|>'
  for text in TEXTS:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text), text



def test_export_of_a_char_tokenizer_run_keeps_the_weights_and_says_why_no_tokenizer(
    workdir, hf_model, random_ids, tmp_path, capsys):
  char_workdir = str(tmp_path / 'char')
  shutil.copytree(workdir, char_workdir)
  # Same vocabulary size, so the imported weights still fit.
  tokenizers.CharTokenizer([chr(0x100 + i) for i in range(511)]).save(char_workdir)
  exported = str(tmp_path / 'exported')
  hf.export_gpt2(char_workdir, exported)
  assert "'char'" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(exported, 'vocab.json'))
  model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
  ids = random_ids[1]
  np.testing.assert_allclose(_hf_logits(model, ids), _hf_logits(hf_model, ids), atol=1e-5, rtol=0)


def _copy(hf_dir, tmp_path, **config_changes):
  copy = str(tmp_path / 'hf_copy')
  shutil.copytree(hf_dir, copy)
  path = os.path.join(copy, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(config_changes)
  with open(path, 'w') as f:
    json.dump(config, f)
  return copy


@pytest.mark.parametrize('changes, message', [
    (dict(activation_function='relu'), r"activation_function='relu'.*gelu_new"),
    (dict(layer_norm_epsilon=1e-6), r'layer_norm_epsilon=1e-06'),
    (dict(scale_attn_by_inverse_layer_idx=True), r'scale_attn_by_inverse_layer_idx=True'),
    (dict(tie_word_embeddings=False), r'tie_word_embeddings=False'),
    (dict(model_type='gpt_neo'), r"model_type='gpt_neo'"),
    (dict(vocab_size=600), r'vocab_size=600.*512 pieces'),
    (dict(n_layer=3), r'3-layer GPT-2.*missing.*h\.2'),
])
def test_unrepresentable_checkpoints_are_refused_by_name(hf_dir, tmp_path, changes, message):
  copy = _copy(hf_dir, tmp_path, **changes)
  workdir = str(tmp_path / 'workdir')
  with pytest.raises(UserError, match=message):
    hf.import_gpt2(copy, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def _rewrite_weights(hf_dir, tmp_path, lm_head_offset):
  """A copy with GPT2Model's names (no 'transformer.'), mask buffers and an lm_head."""
  copy = _copy(hf_dir, tmp_path)
  path = os.path.join(copy, 'model.safetensors')
  weights = {name.removeprefix('transformer.'): array
             for name, array in safetensors.numpy.load_file(path).items()}
  for i in range(2):
    weights[f'h.{i}.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    weights[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
  weights['lm_head.weight'] = weights['wte.weight'] + lm_head_offset
  safetensors.numpy.save_file(weights, path, metadata={'format': 'pt'})
  return copy


def test_unprefixed_names_buffers_and_a_tied_head_import(hf_dir, hf_model, random_ids, tmp_path):
  workdir = str(tmp_path / 'workdir')
  hf.import_gpt2(_rewrite_weights(hf_dir, tmp_path, lm_head_offset=0.0), workdir)
  config, tokenizer, params, _ = workdir_lib.load_trained(workdir)
  model = models.build_model(config.model, tokenizer.vocab_size)
  ids = random_ids[1]
  np.testing.assert_allclose(np.asarray(model.apply({'params': params}, ids)),
                             _hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_an_untied_head_is_refused(hf_dir, tmp_path):
  with pytest.raises(UserError, match='lm_head.weight differs from the token embedding'):
    hf.import_gpt2(_rewrite_weights(hf_dir, tmp_path, lm_head_offset=1.0),
                   str(tmp_path / 'workdir'))


def test_pickled_weights_are_refused_unread(hf_dir, tmp_path):
  copy = _copy(hf_dir, tmp_path)
  os.remove(os.path.join(copy, 'model.safetensors'))
  # Not a real pickle: the importer must refuse before opening it.
  with open(os.path.join(copy, 'pytorch_model.bin'), 'wb') as f:
    f.write(b'not to be unpickled')
  with pytest.raises(UserError, match=r'only pytorch_model\.bin.*safetensors'):
    hf.import_gpt2(copy, str(tmp_path / 'workdir'))


def test_import_refuses_a_workdir_with_checkpoints(hf_dir, workdir):
  with pytest.raises(UserError, match='already has checkpoints'):
    hf.import_gpt2(hf_dir, workdir)
  with pytest.raises(UserError, match='separate workdir'):
    hf.import_gpt2(hf_dir, hf_dir)


def test_export_refuses_to_overwrite(workdir, tmp_path):
  exported = str(tmp_path / 'exported')
  hf.export_gpt2(workdir, exported)
  with pytest.raises(UserError, match='already holds model.safetensors'):
    hf.export_gpt2(workdir, exported)


def test_import_script_then_decode_script(hf_dir, tmp_path):
  """One process runs both commands, in this order (one device, as a plain process has)."""
  workdir = str(tmp_path / 'workdir')
  runs = script_cases.run({
      'import': ('import_hf.py', [f'--hf_dir={hf_dir}', f'--workdir={workdir}']),
      'decode': ('decode.py', [f'--workdir={workdir}', '--prompt=The king', '--strategy=greedy',
                               '--max_new_tokens=5'])}, env=dict(os.environ, XLA_FLAGS=xla.flags()))
  assert runs['import'].returncode == 0, runs['import'].stderr
  assert f'python experiments/decode.py --workdir={workdir}' in runs['import'].stdout
  assert runs['decode'].returncode == 0, runs['decode'].stderr
  assert 'The king' in runs['decode'].stdout


def test_lora_on_an_imported_gpt2_exports_merged(workdir, hf_model, random_ids, tmp_path):
  """An imported GPT-2 is a base like any other: LoRA-tune it briefly, export the merged
  model, and transformers gives lmjax's logits, which the adapters have moved."""
  config = workdir_lib.load_config(workdir)
  config.init_from.workdir = workdir
  config.model.update(lora_rank=4, dropout=0.0)
  config.opt.update(lr=1e-2, warmup_steps=0)
  config.train.update(num_steps=2, batch_size=8, seq_len=32, eval_batch_size=64,
                      eval_every=2, checkpoint_every=2, sample_tokens=0)
  lora_workdir = str(tmp_path / 'lora')
  train.train_and_evaluate(config, lora_workdir)
  exported = str(tmp_path / 'exported')
  assert hf.export_gpt2(lora_workdir, exported) == 2  # the step exported
  model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
  merged_config, tokenizer, params, _ = workdir_lib.load_trained(lora_workdir)
  lmjax_model = models.build_model(merged_config.model, tokenizer.vocab_size)
  ids = random_ids[1]
  ours = np.asarray(lmjax_model.apply({'params': params}, ids))
  np.testing.assert_allclose(_hf_logits(model, ids), ours, atol=1e-4, rtol=0)
  assert np.abs(_hf_logits(hf_model, ids) - ours).max() > 1e-3
