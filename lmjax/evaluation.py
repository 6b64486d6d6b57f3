"""Scores a trained checkpoint on a whole split: loss, perplexity, accuracy, bits per token
and bits per byte of text; for a classifier, accuracy, precision, recall and F1 per class
and macro, and the confusion matrix.

Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens stand for, so a
character model and a SentencePiece model of the same text compare fairly (bits per token
do not: a token of the second holds several characters). The split is read and cut into
windows exactly as training's evaluation does it, so the validation split gives the
numbers the run logged; the mesh is data parallel over any number of devices.
"""
import functools
import math
import os

import flax.linen as nn
import jax
import ml_collections

from lmjax import models, sharding, train
from lmjax.data import corpora, external, pipeline
from lmjax.errors import UserError


def evaluate_workdir(workdir: str, split: str = 'validation', step: int | None = None,
                     batch_size: int | None = None, devices=None,
                     dataset: str | None = None) -> dict:
  """Metrics of `workdir`'s checkpoint `step` (default: the latest) on `split` of the
  run's dataset, or of language-modelling corpus `dataset` (a run on a mixture must name
  one of its corpora).

  `batch_size` (rows of `train.seq_len` tokens) defaults to the run's
  `train.eval_batch_size`; `devices` to all of them. Returns a JSON-ready dict: 'loss'
  (nats per token), 'perplexity', 'accuracy', 'bits_per_token', 'bits_per_byte',
  'num_tokens' (scored targets), 'num_bytes' (the text they stand for), 'dataset',
  'workdir', 'step', 'split', 'tokenizer', 'num_params', and for character models 'bits_per_char'.
  A classifier's holds 'loss' (nats per example), `losses.classification_metrics`,
  'confusion_matrix' (rows: true class, columns: predicted), 'classes', 'num_examples'
  and the same run fields. Mistakes raise UserError naming the flag of experiments/evaluate.py.
  """
  workdir = os.path.abspath(workdir)
  # The config alone first: a bad split or batch size is reported before any checkpoint is
  # read.
  run_config = train.load_config(workdir)
  if (not external.is_external(dataset or run_config.data.name) and
      split not in corpora.SPLITS):  # a tfds: dataset's splits are its own, checked by TFDS
    raise UserError(f'--split={split!r} is not a split; use one of {", ".join(corpora.SPLITS)}.')
  t = run_config.train
  stateful = t.get('stateful', False)
  # A data-parallel mesh whatever the run trained on: a forward pass of a model that fits
  # for training fits whole on each device, and rows split evenly over any device count.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'shape': (-1, 1, 1)}), devices)
  batch_size = _batch_size(batch_size, t.eval_batch_size, sharding.data_parallel_size(mesh),
                           stateful)
  config, tokenizer, params, step = train.load_trained(workdir, step)
  # The run's rules still resolve the models' activation constraints on this mesh.
  rules = sharding.rules_as_tuples(config.mesh.rules)

  run = {'workdir': workdir, 'step': step, 'split': split, 'tokenizer': tokenizer.kind,
         'num_params': models.count_params(params)}
  class_names = corpora.class_names(config.data.name)
  if class_names:
    if dataset is not None:
      raise UserError(f'--dataset={dataset!r}: this run is a classifier of '
                      f'{config.data.name!r}; it scores that dataset\'s passages only.')
    return {**_evaluate_classifier(config, tokenizer, params, split, batch_size, mesh, rules,
                                   class_names), **run}

  data = _scored_data(config, dataset)
  tokens = pipeline.load_tokens(data, split, tokenizer,
                                cache_dir=external.cache_dir(data, workdir))
  try:
    if stateful:
      evals = pipeline.stream_eval_set(tokens, seq_len=t.seq_len, batch_size=batch_size,
                                       eos_id=tokenizer.eos_id)
    else:
      evals = train.lm_eval_set(config, tokenizer, tokens, batch_size)
  except ValueError as e:  # a split shorter than one window
    raise UserError(f'--split={split}: {e}') from None

  model = train.build_model(config, tokenizer.vocab_size)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.device_put(params, replicated)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if stateful:
      eval_fn = jax.jit(functools.partial(train.stateful_eval_step, model=model),
                        in_shardings=(replicated, batch_sharding, batch_sharding),
                        out_shardings=(replicated, batch_sharding))
      carry = train.eval_carry(model, mesh, batch_size)
    else:
      eval_fn = jax.jit(functools.partial(train.eval_step, model=model),
                        in_shardings=(replicated, batch_sharding), out_shardings=replicated)
      carry = None
    metrics = train.evaluate(eval_fn, params, evals, batch_sharding, bits_per_char=False,
                             carry=carry)

  # The text the scored targets stand for, counted on the host: padding has weight 0,
  # the end-of-document separator 0 bytes.
  scored = evals.arrays['weights'] > 0
  num_tokens = int(scored.sum())
  num_bytes = int(tokenizer.byte_lengths()[evals.arrays['targets'][scored]].sum())
  loss_bits = metrics['loss'] * num_tokens / math.log(2)  # the whole split's loss, in bits
  result = {
      'loss': metrics['loss'],
      'perplexity': metrics['perplexity'],
      'accuracy': metrics['accuracy'],
      'bits_per_token': metrics['loss'] / math.log(2),
      'bits_per_byte': loss_bits / num_bytes if num_bytes else None,
      'num_tokens': num_tokens,
      'num_bytes': num_bytes,
      'dataset': data.name,
      **run,
  }
  if tokenizer.kind == 'char':
    result['bits_per_char'] = result['bits_per_token']
  return result


def _evaluate_classifier(config, tokenizer, params, split, batch_size, mesh, rules,
                         class_names) -> dict:
  examples = pipeline.load_examples(config.data, split, tokenizer, config.train.seq_len)
  evals = pipeline.classification_eval_set(examples, batch_size=batch_size)
  model = train.build_model(config, tokenizer.vocab_size)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    eval_fn = jax.jit(functools.partial(train.eval_step, model=model),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    metrics = train.evaluate(eval_fn, jax.device_put(params, replicated), evals,
                             batch_sharding, bits_per_char=False, class_names=class_names)
  return {**metrics, 'classes': list(class_names), 'num_examples': len(examples['labels'])}


def _scored_data(config, dataset: str | None):
  """The data config of the corpus to score: `dataset`, or the run's own."""
  tasks = [name for name, _ in train.mixture_tasks(config)]
  if dataset is None:
    if tasks:
      raise UserError(f'this run trained on a mixture of {", ".join(tasks)}; name the corpus '
                      f'to score with --dataset={tasks[0]} (each is scored on its own).')
    return config.data
  if external.is_external(dataset):
    external.check_name(dataset)
  elif dataset not in corpora.DATASETS or corpora.class_names(dataset):
    known = ', '.join(n for n in corpora.DATASETS if not corpora.class_names(n))
    raise UserError(f'--dataset={dataset!r}; score a language model on one of {known}, or '
                    "a prepared TFDS text dataset as 'tfds:NAME'.")
  return train.task_data(config.data, dataset)


def _batch_size(requested: int | None, configured: int, data_parallel: int,
                stateful: bool) -> int:
  """The evaluation batch: `requested`, checked, or the run's, fitted to the devices."""
  processes = jax.process_count()
  if requested is not None:
    if requested < 1:
      raise UserError(f'--batch_size={requested}; it must be a positive multiple of '
                      f'{data_parallel}, the devices evaluating.')
    if requested % data_parallel or requested % processes:
      raise UserError(f'--batch_size={requested} does not divide over the {data_parallel} '
                      f'devices and {processes} process(es); use a multiple of '
                      f'{math.lcm(data_parallel, processes)}.')
    return requested
  if configured % data_parallel == 0 and configured % processes == 0:
    return configured
  if stateful:
    # Each row of a stateful evaluation is its own stream with its own carry: another
    # row count reads the split differently and would give other numbers.
    raise UserError(f'train.eval_batch_size={configured} of this stateful run does not divide '
                    f'over {data_parallel} devices; evaluate on a number of devices that '
                    f'divides it (--devices), or pass --batch_size (a multiple of '
                    f'{data_parallel}; the carry then runs along other streams).')
  # Windows are scored independently, so more rows only add padding.
  multiple = math.lcm(data_parallel, processes)
  return -(-configured // multiple) * multiple
