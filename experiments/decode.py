"""Generates text from a trained workdir's latest (or a given) checkpoint.

  python experiments/decode.py --workdir=runs/shakespeare_char --prompt='ROMEO:' \
      --strategy=sample --temperature=0.8 --top_k=40 --top_p=0.95 --max_new_tokens=200
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to decode from.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to continue.')
_STRATEGY = flags.DEFINE_enum('strategy', 'sample', ['greedy', 'sample'],
                              'greedy: most likely token; sample: draw from the model.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (> 0).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of most likely tokens '
                            'holding this much probability (nucleus); 1: all.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations of the prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for sampling.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
flags.mark_flags_as_required(['workdir', 'prompt'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads
  from lmjax import train  # noqa: PLC0415  (after absl has parsed flags)

  if _STRATEGY.value == 'sample' and _TEMPERATURE.value <= 0:
    raise app.UsageError(f'--temperature={_TEMPERATURE.value}: sampling needs a positive '
                         'temperature; use --strategy=greedy for argmax decoding.')
  if _NUM_SAMPLES.value < 1:
    raise app.UsageError(f'--num_samples={_NUM_SAMPLES.value}; it must be at least 1.')
  if not _PROMPT.value:
    raise app.UsageError('--prompt is empty; give some text to continue.')
  config, tokenizer, params, step = train.load_trained(_WORKDIR.value, _STEP.value)
  try:
    texts = train.continue_prompt(
        config, params, tokenizer, _PROMPT.value, _MAX_NEW_TOKENS.value,
        num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        temperature=0.0 if _STRATEGY.value == 'greedy' else _TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value)
  except ValueError as e:  # prompt out of vocabulary or too long, bad top_k / top_p
    raise app.UsageError(f'--prompt / flags: {e}') from None
  print(f'# {_WORKDIR.value}, step {step}, {_STRATEGY.value}')
  for text in texts:
    print(text)
    print('-' * 40)


if __name__ == '__main__':
  app.run(main)
