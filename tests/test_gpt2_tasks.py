"""configs/gpt2_tasks.py end to end on TFDS's mock data: for each public task, examples with
the dataset's own features (from its TFDS builder's code; random text, nothing downloaded)
are written as the data step would write them, turned into prompts and completions by the
config's templates, trained on by a tiny model in place of GPT-2, and scored by
evaluate.py's --generate."""
import json
import string

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import gpt2_tasks
from lmjax import evaluation, events, train
from lmjax.data import completions, tokenizers

EVAL_SPLITS = {variant: task[2] for variant, task in gpt2_tasks.TASKS.items()}


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


# variant: (example -> the (prompt, completion) the config must make of it), by hand
EXPECTED = {
    'squad': lambda ex: (f'{_text(ex["context"])[:3000]}\n\nQuestion: {_text(ex["question"])}'
                         '\nAnswer:', ' ' + _text(ex['answers']['text'][0])),
    'imdb': lambda ex: (f'{_text(ex["text"])[:3000]}\n\nSentiment:',
                        ' ' + ('neg', 'pos')[ex['label']]),
    'sst2': lambda ex: (f'{_text(ex["sentence"])}\nSentiment:',
                        ' ' + ('negative', 'positive')[ex['label']]),
    'cnn_dailymail': lambda ex: (f'{_text(ex["article"])[:2500]}\n\nTL;DR:',
                                 ' ' + _text(ex['highlights'])),
    'wmt14_de_en': lambda ex: (f'German: {_text(ex["de"])}\nEnglish:', ' ' + _text(ex['en'])),
}


def _prepare_mock(variant: str, data_dir: str) -> dict:
  """Mock examples of the variant's dataset written into `data_dir` under its own name,
  config and version; returns {split: the examples}."""
  name = gpt2_tasks.TASKS[variant][0][len('tfds:'):]
  builder = tfds.builder(name)  # its code: the features, name, config and version
  splits = {}
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    for split in ('train', EVAL_SPLITS[variant]):
      splits[split] = list(tfds.as_numpy(tfds.load(name, split=split)))
  for examples in splits.values():
    for ex in examples:
      if 'answers' in ex:  # the mock draws each part of a sequence its own length
        length = min(len(part) for part in ex['answers'].values())
        ex['answers'] = {key: part[:length] for key, part in ex['answers'].items()}
  config = builder.builder_config.name if builder.builder_config else None
  tfds.dataset_builders.store_as_tfds_dataset(
      name=builder.name, version=str(builder.version), config=config, data_dir=data_dir,
      features=builder.info.features, disable_shuffling=True,
      split_datasets={split: [(i, ex) for i, ex in enumerate(examples)]
                      for split, examples in splits.items()})
  return splits


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """One character vocabulary for every variant: the same shapes, so the five runs share
  their compiled programs."""
  directory = str(tmp_path_factory.mktemp('tokenizer'))
  tokenizers.CharTokenizer.train([string.printable]).save(directory)
  return directory


@pytest.mark.parametrize('variant', gpt2_tasks.TASKS)
def test_a_task_config_trains_and_scores_on_mock_data(variant, tmp_path, tokenizer_dir):
  data_dir = str(tmp_path / 'tfds')
  splits = _prepare_mock(variant, data_dir)
  config = gpt2_tasks.get_config(variant)
  config.data.update(data_dir=data_dir, tokenizer='char', tokenizer_dir=tokenizer_dir,
                     drop_unknown_chars=True)
  eval_split = config.data.eval_split
  assert completions.read_examples(config.data, eval_split) == [
      EXPECTED[variant](ex) for ex in splits[eval_split]]

  # GPT-2's place taken by a tiny model with a character vocabulary, for two steps.
  config.model.update(num_layers=1, num_heads=2, d_model=32, max_len=128, dropout=0.0)
  config.opt.warmup_steps = 0
  config.train.update(num_steps=2, batch_size=8, eval_batch_size=8, seq_len=128,
                      eval_every=2, checkpoint_every=2, log_every=1, eval_completions=2,
                      sample_tokens=6)
  workdir = str(tmp_path / 'run')
  metrics = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  wanted = gpt2_tasks.TASKS[variant][5]
  assert set(wanted) <= set(metrics), metrics
  assert {f'eval/{name}' for name in wanted} <= set(events.read_scalars(workdir))

  out = tmp_path / 'scored.jsonl'
  scored = evaluation.generate_and_score(workdir, eval_split, num_examples=3, batch_size=2,
                                         max_new_tokens=4, metrics=wanted, output=str(out))
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert scored['num_examples'] == len(rows) == 3
  for name in wanted:
    if name != 'bleu':
      assert scored[name] == pytest.approx(np.mean([r[name] for r in rows]))
