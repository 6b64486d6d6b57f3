"""Fine-tuning: starting from another run, frozen parts, LoRA adapters."""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import evaluation, finetune, models, train, workdir as workdir_lib
from lmjax.data import pipeline, tokenizers
from lmjax.errors import UserError
from lmjax.models import transformer


def _config(**sections):
  config = shakespeare_char.get_config('tiny')
  config.train.update(sample_tokens=0)
  for section, fields in sections.items():
    config[section].update(fields)
  return config


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A tiny Shakespeare run of 40 steps on all 8 devices."""
  workdir = str(tmp_path_factory.mktemp('base'))
  train.train_and_evaluate(_config(train=dict(num_steps=40, eval_every=40),
                                   mesh=dict(cpu_devices=0)), workdir)
  return workdir


def _milton(base_workdir, **sections):
  """Fine-tuning `base_workdir` on Milton: a few steps, a checkpoint every 3."""
  sections['train'] = {'num_steps': 6, 'eval_every': 6, 'checkpoint_every': 3,
                       **sections.get('train', {})}
  sections['opt'] = {'warmup_steps': 1, **sections.get('opt', {})}
  return _config(data=dict(name='milton', drop_unknown_chars=True),
                 init_from=dict(workdir=base_workdir), **sections)


def _flat(params):
  return {k: np.asarray(v) for k, v in finetune._flat(jax.device_get(params)).items()}


def _checkpoint_names(workdir, step):
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  names = set(finetune.param_names(checkpointer.param_metadata(step)))
  checkpointer.close()
  return names


def test_fresh_adapters_change_nothing_and_merging_gives_the_same_logits():
  config = _config(model=dict(lora_rank=4, lora_alpha=8.0))
  plain_model = models.build_model(_config().model, 40)
  lora_model = models.build_model(config.model, 40)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 40)
  flat = finetune._flat(nn.meta.unbox(lora_model.init(jax.random.key(0), ids)['params']))
  plain = finetune._unflat({k: v for k, v in flat.items() if not finetune.is_lora(k)})
  assert any(finetune.is_lora(k) for k in flat)
  np.testing.assert_array_equal(lora_model.apply({'params': finetune._unflat(flat)}, ids),
                                plain_model.apply({'params': plain}, ids))

  # Trained adapters (B no longer zero) move the logits; the merged kernels follow them.
  for i, name in enumerate(sorted(k for k in flat if k.endswith('lora_b'))):
    flat[name] = 0.05 * jax.random.normal(jax.random.key(i), flat[name].shape)
  params = finetune._unflat(flat)
  unmerged = lora_model.apply({'params': params}, ids)
  assert np.abs(unmerged - plain_model.apply({'params': plain}, ids)).max() > 1e-3
  merged = plain_model.apply(
      {'params': transformer.merge_lora(params, models.lora_spec(config.model))}, ids)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)


def test_init_from_copies_the_base_parameters_exactly_onto_another_mesh(base, tmp_path,
                                                                         capsys):
  """Base trained on 8 devices, fine-tuned on 1 with a learning rate of zero."""
  workdir = str(tmp_path / 'copy')
  config = _milton(base, opt=dict(lr=0.0, min_lr=0.0), train=dict(num_steps=2))
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert f'Fine-tuning from {base}, step 40' in out
  assert 'data.drop_unknown_chars: dropped' in out  # Milton has symbols Shakespeare lacks
  _, tokenizer, params, _ = workdir_lib.load_trained(workdir)
  _, base_tokenizer, base_params, _ = workdir_lib.load_trained(base)
  assert tokenizer.chars == base_tokenizer.chars
  got, expected = _flat(params), _flat(base_params)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_frozen_parts_do_not_change_are_stored_once_and_resume_exactly(base, tmp_path):
  workdir, moved_base = str(tmp_path / 'frozen'), str(tmp_path / 'base')
  shutil.copytree(base, moved_base)
  config = _milton(moved_base, train=dict(freeze=('token_embed', 'layer_0/')))
  train.train_and_evaluate(config, workdir)
  got = _flat(workdir_lib.load_trained(workdir)[2])
  before = _flat(workdir_lib.load_trained(base)[2])
  frozen = {n for n in got if n.startswith(('token_embed', 'layer_0/'))}
  assert frozen and len(frozen) < len(got)
  for name in got:
    if name in frozen:
      np.testing.assert_array_equal(got[name], before[name], err_msg=name)
    else:
      assert not np.array_equal(got[name], before[name]), name
  # Checkpoints hold the trained parameters only; the frozen ones are stored once.
  assert _checkpoint_names(workdir, 6) == set(got) - frozen
  assert set(finetune.param_names(ckpt_lib.frozen_metadata(workdir))) == frozen

  # Resuming reads nothing of the base: the run holds what it needs.
  shutil.rmtree(moved_base)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  train.train_and_evaluate(config, resumed)
  for name, value in _flat(workdir_lib.load_trained(resumed)[2]).items():
    np.testing.assert_array_equal(value, got[name], err_msg=name)


def test_lora_trains_only_the_adapters_and_decodes_merged(base, tmp_path):
  workdir = str(tmp_path / 'lora')
  # Evaluated on the whole split, as evaluate_workdir scores it.
  config = _milton(base, model=dict(lora_rank=4, lora_targets=('query', 'value', 'dense_in')),
                   train=dict(eval_batches=0))
  metrics = train.train_and_evaluate(config, workdir)
  saved = _checkpoint_names(workdir, 6)
  assert saved and all(finetune.is_lora(n) for n in saved)
  assert {n.split('/')[-2] for n in saved} == {'query', 'value', 'dense_in'}

  restored_config, tokenizer, state, _ = workdir_lib.restore_state(workdir)
  for name, value in _flat(state.frozen).items():  # the base, untouched
    np.testing.assert_array_equal(value, _flat(workdir_lib.load_trained(base)[2])[name])
  decode_config, _, merged, _ = workdir_lib.load_trained(workdir)
  assert decode_config.model.lora_rank == 0
  assert not any(finetune.is_lora(n) for n in _flat(merged))

  ids = jnp.asarray(tokenizers.load_tokenizer(workdir).encode('ROMEO:\nWhat say'))[None]
  adapters = models.build_model(restored_config.model, tokenizer.vocab_size).apply(
      {'params': finetune.join(state.params, state.frozen)}, ids)
  plain = models.build_model(decode_config.model, tokenizer.vocab_size).apply(
      {'params': merged}, ids)
  np.testing.assert_allclose(plain, adapters, atol=1e-5)
  # The merged model, evaluated by experiments/evaluate.py's code, scores what the run
  # itself logged with its adapters.
  assert evaluation.evaluate_workdir(workdir)['loss'] == pytest.approx(metrics['loss'],
                                                                       rel=1e-6)


@pytest.mark.parametrize('sections, message', [
    (dict(model=dict(d_model=32)),
     r'does not fit this model: parameter \S+ is \(\d+,?\d*\) there and \(\d+,?\d*\) here'),
    (dict(data=dict(tokenizer='sentencepiece', vocab_size=200)),
     r"data.tokenizer='sentencepiece', but the run in init_from.workdir=.* used 'char'"),
    (dict(init_from=dict(step=7)), r'has no checkpoint of step 7; it has 40'),
    (dict(train=dict(freeze=('.',))), r"freezes every parameter"),
    (dict(train=dict(freeze=('attn',))), r"train.freeze pattern 'attn' matches no parameter"),
    (dict(train=dict(freeze=('(',))), r"train.freeze pattern '\(' is not a regular expr"),
    (dict(model=dict(lora_rank=4, lora_targets=('qkv',))), r"model.lora_targets=\('qkv',\)"),
])
def test_bad_fine_tuning_configs_are_named(base, tmp_path, sections, message):
  config = _milton(base)
  for section, fields in sections.items():
    config[section].update(fields)
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not ckpt_lib.complete_steps(str(tmp_path / 'run'))


def test_init_from_must_name_another_existing_run(base, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    train.train_and_evaluate(_milton(str(tmp_path / 'nothing')), str(tmp_path / 'a'))
  with pytest.raises(UserError, match="init_from.workdir is the run's own --workdir"):
    train.train_and_evaluate(_milton(base), base)


def test_lora_needs_a_transformer(tmp_path):
  config = rnn_shakespeare_char.get_config('tiny')
  config.unlock()
  config.model.lora_rank = 4
  with pytest.raises(UserError, match=r"model.lora_rank=4: LoRA adapters attach to the "
                                      r"Transformer's projections, and model.name='lstm'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_unknown_characters_fail_clearly_or_are_dropped_on_request():
  tokenizer = tokenizers.CharTokenizer(list('abc \n'))
  works = [('one', 'a b £c'), ('two', 'cab|\n')]
  data = _config().data
  with pytest.raises(UserError, match=r"'£'.*drop_unknown_chars=True"):
    pipeline.load_tokens(data, 'train', tokenizer, works)
  data.drop_unknown_chars = True
  tokens = pipeline.load_tokens(data, 'train', tokenizer, works)
  assert tokenizer.decode(tokens) == 'a b ccab\n'
  assert (tokens == tokenizer.eos_id).sum() == 2
