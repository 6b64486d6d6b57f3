"""Scores a workdir's checkpoint on a whole split; prints one JSON object.

  python experiments/evaluate.py --workdir=runs/shakespeare_char --split=test
  python experiments/evaluate.py --workdir=runs/shakespeare_char --step=16 --devices=1
  python experiments/evaluate.py --workdir=runs/shakespeare_char --dataset=milton
  python experiments/evaluate.py --workdir=runs/countdown_sft --generate --num_examples=200 \
      --output=completions.jsonl

The object holds loss (nats per token), perplexity, accuracy, bits_per_token,
bits_per_byte (of UTF-8 text: character and SentencePiece models compare on it),
num_tokens, num_bytes, dataset, workdir, step, split, tokenizer and num_params; character
models also bits_per_char. A classifier's (configs/authorship.py) holds loss, accuracy,
precision/CLASS, recall/CLASS and f1/CLASS for each class, their macro means
(precision_macro, recall_macro, f1_macro), confusion_matrix (rows: true class, columns:
predicted), classes and num_examples, and the same run fields. --split defaults to
validation, the split training evaluates on, so the latest checkpoint gives the numbers the
run logged at its last step. Any number of
devices gives the same numbers.

--generate instead completes the split's prompts (a prompt -> completion run, or a language
model of Countdown), --strategy greedy by default, and scores each completion against its
reference: exact_match and token_f1 (SQuAD's), rouge1, rouge2, rougeL, bleu (sacreBLEU's
corpus BLEU), label_accuracy (the first word is the label word), and on Countdown
solve_rate (the puzzle checker). The object holds their means, num_examples and the run
fields; --output writes one JSON line per example (prompt, reference, generation, finish,
scores). Logs go to stderr; a mistake in a flag or the workdir is one `error:` line there
(exit status 1).
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import contextlib
import json
import sys

from absl import app, flags

from lmjax.errors import run_script

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Split to score: train, validation or '
                             "test; for a tfds: dataset any of its splits, e.g. 'train[-1000:]'.")
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Rows per evaluation batch; default: '
                                   "the run's train.eval_batch_size. --generate: prompts "
                                   'decoded together; default 8.')
_DEVICES = flags.DEFINE_integer('devices', None, 'How many local devices to use; default: all.')
_DATASET = flags.DEFINE_string('dataset', None, "Language models: the corpus to score "
                               "(shakespeare, milton, tfds:NAME...); default: the run's "
                               'data.name. A run on a mixture must name one.')
_GENERATE = flags.DEFINE_bool('generate', False, 'Complete the prompts of --split and score the '
                              'completions against their references.')
_STRATEGY = flags.DEFINE_enum('strategy', 'greedy', ['greedy', 'sample', 'beam'],
                              '--generate: how to decode.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 4, '--generate --strategy=beam: beams kept.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '--generate --strategy=sample: temperature.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, "--generate: tokens a completion "
                                       "has at most; default: the run's train.sample_tokens.")
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 0, '--generate: the first N examples of '
                                     'the split; 0: all.')
_METRICS = flags.DEFINE_list('metrics', 'exact_match,token_f1,rouge1,rouge2,rougeL,bleu,'
                             'label_accuracy', '--generate: the scores to compute.')
_OUTPUT = flags.DEFINE_string('output', None, '--generate: write one JSON line per example here.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # after absl has parsed flags: a typo is reported fast

  from lmjax import evaluation, runtime
  from lmjax.errors import UserError

  runtime.use_compilation_cache()
  devices = None  # all of them
  if _DEVICES.value is not None:
    local = jax.local_devices()
    if not 1 <= _DEVICES.value <= len(local):
      raise UserError(f'--devices={_DEVICES.value}; this machine has {len(local)} '
                      f'device(s), use 1 to {len(local)}.')
    devices = local[:_DEVICES.value]
  # stdout carries only the result: anything the library prints goes to stderr. A bad
  # workdir, step or flag raises UserError, which run_script prints as one line.
  with contextlib.redirect_stdout(sys.stderr):
    if _GENERATE.value:
      result = _generate(evaluation)
    else:
      result = evaluation.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _STEP.value,
                                           _BATCH_SIZE.value, devices, _DATASET.value)
  print(json.dumps(result), flush=True)


def _generate(evaluation) -> dict:
  from lmjax import scores
  from lmjax.errors import UserError
  unknown = sorted(set(_METRICS.value) - set(scores.METRICS))
  if unknown:
    raise UserError(f'--metrics: unknown {unknown}; use some of {",".join(scores.METRICS)}.')
  if _DATASET.value is not None:
    raise UserError('--dataset scores a language model on another corpus; --generate '
                    "completes the run's own prompts. Drop one of them.")
  options = {'strategy': _STRATEGY.value}
  if _STRATEGY.value == 'beam':
    options['beam_size'] = _BEAM_SIZE.value
  if _STRATEGY.value == 'sample':
    options['temperature'] = _TEMPERATURE.value
  return evaluation.generate_and_score(
      _WORKDIR.value, _SPLIT.value, _STEP.value, num_examples=_NUM_EXAMPLES.value,
      batch_size=_BATCH_SIZE.value or 8, max_new_tokens=_MAX_NEW_TOKENS.value,
      metrics=tuple(_METRICS.value), output=_OUTPUT.value, **options)


if __name__ == '__main__':
  run_script(main)
