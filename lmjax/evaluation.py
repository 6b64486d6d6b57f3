"""Scores a trained checkpoint on a whole split: loss, perplexity, accuracy, bits per token
and bits per byte of text; for a classifier, accuracy, precision, recall and F1 per class
and macro, and the confusion matrix.

Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens stand for, so a
character model and a SentencePiece model of the same text compare fairly (bits per token
do not: a token of the second holds several characters). The split is read and cut into
windows exactly as training's evaluation does it, so the validation split gives the
numbers the run logged; the mesh is data parallel over any number of devices.

`generate_and_score` instead completes a split's prompts and scores the completions against
the references (exact match, token F1, ROUGE, BLEU, label accuracy; Countdown's checker).
"""
import json
import math

import flax.linen as nn
import jax

from lmjax import config as config_lib
from lmjax import finetune, generation, models, scores, sharding, state as state_lib, steps, tasks
from lmjax import storage, workdir as workdir_lib
from lmjax.data import completions, corpora, external, puzzles
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
  workdir = storage.absolute(workdir)
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


def generate_and_score(workdir: str, split: str = 'validation', step: int | None = None, *,
                       num_examples: int = 0, batch_size: int = 8,
                       max_new_tokens: int | None = None, metrics=scores.METRICS,
                       output: str | None = None, **options) -> dict:
  """Completes the prompts of `split` with `workdir`'s checkpoint `step` (default: the
  latest) and scores each completion against its reference: `metrics` of lmjax.scores,
  and on Countdown the share the puzzle checker accepts ('solve_rate').

  The run must have prompts and references: a prompt -> completion run
  (data.format='completion'), or a language model of Countdown (the puzzle line is the
  prompt, after the end-of-text id, as the model saw each puzzle in training).
  `num_examples` (0: all) takes the split's first examples; `batch_size` prompts are
  decoded together, at most `max_new_tokens` each (default: the run's train.sample_tokens),
  with `options` for `generation.generate_texts` (strategy, beam_size, temperature, ...;
  greedy by default). `output`, if given, receives one JSON line per example: prompt,
  reference, generation, finish and its scores.

  Returns a JSON-ready dict: each metric's mean over the examples (BLEU: the corpus BLEU),
  'num_examples', 'dataset', 'workdir', 'step', 'split', 'strategy', 'max_new_tokens'."""
  if num_examples < 0 or batch_size < 1:
    raise UserError(f'--num_examples={num_examples} and --batch_size={batch_size}: give 0 '
                    '(all) or more examples, and at least 1 prompt a batch.')
  workdir = storage.absolute(workdir)
  run_config = workdir_lib.load_config(workdir)
  d = run_config.data
  if corpora.class_names(d.name) or state_lib.is_encoder(run_config):
    raise UserError('--generate: this run (a classifier or a bidirectional encoder) writes no '
                    'text; score it without --generate.')
  if d.format != 'completion' and d.name != 'countdown':
    raise UserError(f'--generate completes prompts and scores them against references; this '
                    f'run is a language model of {d.name!r}, whose text has no prompts. Use a '
                    "run with data.format='completion' (or one of countdown).")
  pairs = completions.read_examples(d, split)
  pairs = pairs[:num_examples] if num_examples else pairs
  if not pairs:
    raise UserError(f'--split={split!r} of {completions.source(d)} holds no example.')
  try:  # opened before any decoding: a path that cannot be written costs no work
    out = open(output, 'w', encoding='utf-8') if output else None
  except OSError as e:
    raise UserError(f'--output={output} cannot be written ({e.strerror or e}); name a file '
                    'in a directory you can write to.') from None
  config, tokenizer, params, step = workdir_lib.load_trained(workdir, step)
  config, params = finetune.for_decoding(config, params)
  max_new_tokens = max_new_tokens or config.train.sample_tokens
  options.setdefault('strategy', 'greedy')
  countdown = completions.source(d) == 'countdown'
  rows = []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    results = generation.generate_texts(config, params, tokenizer, [p for p, _ in chunk],
                                        max_new_tokens=max_new_tokens,
                                        after_eos=d.format != 'completion', **options)
    for (prompt, reference), candidates in zip(chunk, results, strict=True):
      text = candidates[0]['text']
      row = {'prompt': prompt, 'reference': reference, 'generation': text,
             'finish': candidates[0]['finish'], **scores.per_example(text, [reference], metrics)}
      if countdown:
        row['solved'] = float(puzzles.solves(prompt, text))
      rows.append(row)
  summary = scores.summarize([r['generation'] for r in rows], [[r['reference']] for r in rows],
                             rows, metrics)
  if countdown:
    summary['solve_rate'] = sum(r['solved'] for r in rows) / len(rows)
  if out is not None:
    with out:
      out.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
  return {**summary, 'num_examples': len(rows), 'dataset': completions.source(d),
          'workdir': workdir, 'step': step, 'split': split, 'strategy': options['strategy'],
          'max_new_tokens': max_new_tokens}
