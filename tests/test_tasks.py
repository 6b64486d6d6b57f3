"""The kinds of training as objects: which config makes which task, what each checks,
reads, evaluates and writes, called one phase at a time (no training loop)."""
import jax
import numpy as np
import pytest

from configs import authorship, rnn_shakespeare_char, shakespeare_char
from lmjax import sharding, state as state_lib, steps, tasks
from lmjax.data import tokenizers
from lmjax.errors import UserError


def _lm(**data):
  config = shakespeare_char.get_config('tiny')
  config.data.update(data)
  return config


def _encoder():
  config = shakespeare_char.get_config('tiny')
  config.model.causal = False
  return config


def _stream():
  return rnn_shakespeare_char.get_config('tiny')


def _mixture():
  return _lm(mixture=('shakespeare:0.7', 'milton:0.3'), drop_unknown_chars=True)


@pytest.mark.parametrize('make, kind', [
    (_lm, tasks.LanguageModel), (_encoder, tasks.MaskedLM), (_stream, tasks.Stream),
    (_mixture, tasks.Mixture), (lambda: authorship.get_config('tiny'), tasks.Classification)])
def test_each_config_makes_its_kind_of_task(make, kind):
  assert tasks.task_class(make()) is kind


def test_each_kind_refuses_the_fields_it_cannot_honour_naming_them():
  stateful_transformer = _lm()
  stateful_transformer.train.stateful = True
  with pytest.raises(UserError, match=r"train.stateful=True .* model.name='transformer'"):
    tasks.task_class(stateful_transformer).check_config(stateful_transformer)
  stateful_classifier = authorship.get_config('tiny')
  stateful_classifier.train.stateful = True
  with pytest.raises(UserError, match='is a classification dataset'):
    tasks.task_class(stateful_classifier).check_config(stateful_classifier)
  recurrent_encoder = _stream()
  recurrent_encoder.model.causal = False
  with pytest.raises(UserError, match='only the Transformer has'):
    tasks.task_class(recurrent_encoder).check_config(recurrent_encoder)
  bad_rate = _encoder()
  bad_rate.train.mask_rate = 1.0
  with pytest.raises(UserError, match='train.mask_rate=1.0'):
    tasks.task_class(bad_rate).check_config(bad_rate)
  twice = _lm(mixture=('shakespeare:1', 'shakespeare:2'))
  with pytest.raises(UserError, match='names a dataset twice'):
    tasks.task_class(twice).check_config(twice)


def test_a_mixture_is_scored_one_named_corpus_at_a_time():
  with pytest.raises(UserError, match='--dataset=shakespeare'):
    tasks.scoring_task(_mixture())
  scored = tasks.scoring_task(_mixture(), 'milton')
  assert type(scored) is tasks.LanguageModel and scored.data.name == 'milton'
  with pytest.raises(UserError, match="--dataset='milton': this run is a classifier"):
    tasks.scoring_task(authorship.get_config('tiny'), 'milton')
  with pytest.raises(UserError, match="--dataset='nope'"):
    tasks.scoring_task(_lm(), 'nope')


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  """Each kind's task read and loaded with a character tokenizer of its own texts."""
  out = {}
  for name, make in (('lm', _lm), ('encoder', _encoder), ('stream', _stream),
                     ('mixture', _mixture),
                     ('classifier', lambda: authorship.get_config('tiny'))):
    config = make()
    workdir = str(tmp_path_factory.mktemp(name))
    task = tasks.task_class(config)(config)
    task.read()
    tokenizer = tokenizers.build_tokenizer('char', workdir, task.tokenizer_texts)
    task.load(tokenizer, workdir)
    out[name] = config, task, tokenizer
  return out


def test_a_task_says_what_it_trains_on(loaded):
  assert loaded['lm'][1].describe().endswith(' training tokens')
  assert loaded['mixture'][1].describe().startswith('a mixture of shakespeare (')
  assert 'weight 0.3' in loaded['mixture'][1].describe()
  assert 'training passages (' in loaded['classifier'][1].describe()


@pytest.mark.parametrize('name', ['lm', 'encoder', 'stream', 'mixture', 'classifier'])
def test_the_training_stream_resumes_at_any_example(loaded, name):
  config, task, _ = loaded[name]
  batch = config.train.batch_size
  whole = list(task.train_dataset(0).take(3).as_numpy_iterator())
  resumed = list(task.train_dataset(2 * batch).take(1).as_numpy_iterator())
  assert whole[2].keys() == resumed[0].keys()
  for k in whole[2]:
    np.testing.assert_array_equal(whole[2][k], resumed[0][k])


def test_a_masked_lm_hides_tokens_behind_the_mask_id(loaded):
  _, task, tokenizer = loaded['encoder']
  batch = next(task.train_dataset(0).as_numpy_iterator())
  assert (batch['inputs'] == tokenizer.vocab_size).any()  # the mask token, one past the vocab
  assert 0 < batch['weights'].mean() < 0.5  # only the corrupted positions are scored


def _evaluate(config, task, tokenizer):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = state_lib.build_model(config, tokenizer.vocab_size)
  params = model.init(jax.random.key(0), np.zeros((1, config.train.seq_len), np.int32))
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  with jax.set_mesh(mesh):
    eval_fn = steps.jit_eval_step(model, mesh, sharding.replicated(mesh), task.stateful)
    carry = (state_lib.eval_carry(model, mesh, config.train.eval_batch_size)
             if task.stateful else None)
    return params, task.evaluate(eval_fn, params, sharding.batch_sharding(mesh), carry)


@pytest.mark.parametrize('name, keys, texts', [
    ('lm', {'loss', 'perplexity', 'accuracy', 'bits_per_char'}, {'sample'}),
    ('mixture', {'loss', 'milton/loss', 'shakespeare/accuracy'}, {'sample'}),
    ('classifier', {'loss', 'f1_macro', 'confusion_matrix'}, {'confusion_matrix'}),
])
def test_an_evaluation_gives_the_kinds_metrics_and_texts(loaded, name, keys, texts):
  config, task, tokenizer = loaded[name]
  config.train.sample_tokens = 4
  params, metrics = _evaluate(config, task, tokenizer)
  assert keys <= set(metrics)
  assert set(task.texts(params, metrics)) == texts
  # An untrained model is near chance: the loss of a uniform guess over its outputs.
  outputs = len(task.class_names) or tokenizer.vocab_size
  assert abs(metrics['loss'] - np.log(outputs)) < 0.5
