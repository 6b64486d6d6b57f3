"""Scores a trained checkpoint on a whole split: loss, perplexity, accuracy, bits per token
and bits per byte of text; for a classifier, accuracy, precision, recall and F1 per class
and macro, and the confusion matrix.

Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens stand for, so a
character model and a SentencePiece model of the same text compare fairly (bits per token
do not: a token of the second holds several characters). The split is read and cut into
windows exactly as training's evaluation does it, so the validation split gives the
numbers the run logged; the mesh is data parallel over any number of devices.
"""
import math
import os

import flax.linen as nn
import jax

from lmjax import config as config_lib
from lmjax import models, sharding, state as state_lib, steps, tasks, workdir as workdir_lib
from lmjax.data import corpora, external
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
  'workdir', 'step', 'split', 'tokenizer', 'num_params', and for character models
  'bits_per_char'. A classifier's holds 'loss' (nats per example),
  `losses.classification_metrics`, 'confusion_matrix' (rows: true class, columns:
  predicted), 'classes', 'num_examples' and the same run fields. Mistakes raise UserError
  naming the flag of experiments/evaluate.py.
  """
  workdir = os.path.abspath(workdir)
  # The config alone first: a bad split or batch size is reported before any checkpoint is
  # read.
  run_config = workdir_lib.load_config(workdir)
  if (not external.is_external(dataset or run_config.data.name) and
      split not in corpora.SPLITS):  # a tfds: dataset's splits are its own, checked by TFDS
    raise UserError(f'--split={split!r} is not a split; use one of {", ".join(corpora.SPLITS)}.')
  task = tasks.scoring_task(run_config, dataset)
  # A data-parallel mesh whatever the run trained on: a forward pass of a model that fits
  # for training fits whole on each device, and rows split evenly over any device count.
  data_parallel = config_lib.base_config().mesh
  data_parallel.shape = (-1, 1, 1)
  mesh = sharding.make_mesh(data_parallel, devices)
  batch_size = _batch_size(batch_size, run_config.train.eval_batch_size,
                           sharding.data_parallel_size(mesh), task.stateful)
  config, tokenizer, params, step = workdir_lib.load_trained(workdir, step)
  evals = task.split_eval_set(split, tokenizer, batch_size, workdir)
  metrics = _score(config, task, tokenizer, params, evals, mesh)
  return {**task.split_report(metrics, evals, tokenizer), 'workdir': workdir, 'step': step,
          'split': split, 'tokenizer': tokenizer.kind,
          'num_params': models.count_params(params)}


def _score(config, task, tokenizer, params, evals, mesh) -> dict:
  """`task`'s metrics of `params` on `evals`, replicated on a data-parallel `mesh`."""
  model = state_lib.build_model(config, tokenizer.vocab_size)
  # The run's rules still resolve the models' activation constraints on this mesh.
  rules = sharding.rules_as_tuples(config.mesh.rules)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    eval_fn = steps.jit_eval_step(model, mesh, replicated, stateful=task.stateful)
    carry = (state_lib.eval_carry(model, mesh, evals.batch_size) if task.stateful else None)
    return steps.evaluate(eval_fn, jax.device_put(params, replicated), evals,
                          batch_sharding, bits_per_char=False, carry=carry,
                          class_names=task.class_names)


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
