"""Generates text from a trained (or imported) workdir's latest or given checkpoint.

  python experiments/decode.py --workdir=runs/shakespeare_char --prompt='ROMEO:' \
      --strategy=sample --temperature=0.8 --top_k=40 --top_p=0.95 --max_new_tokens=200
  python experiments/decode.py --workdir=runs/shakespeare_char --prompt='ROMEO:' \
      --strategy=beam --beam_size=8 --num_samples=3 --length_penalty=0.6
  python experiments/decode.py --workdir=runs/shakespeare_char --prompt_file=prompts.txt \
      --stop=$'\\n\\n' --output=out.jsonl

Prompts come from --prompt (repeatable) and --prompt_file (one per line; write a newline
inside a prompt as \\n). Continuations print as text; --output writes JSON lines with
the prompt, text, tokens, score and why each one ended ('-' for stdout). A Transformer
writes past its context (model.max_len) by sliding a window over the text, re-reading it
every --window_stride tokens; of a longer prompt it reads the last model.max_len tokens.

Speculative decoding (greedy or sample; lmjax/speculative.py) gives the same text, or the
same distribution, in fewer calls of the model: a draft proposes --num_draft_tokens tokens
a round and the model checks them all in one call.

  python experiments/decode.py --workdir=runs/shakespeare_char --prompt='ROMEO:' \
      --strategy=greedy --draft_workdir=runs/cpu --num_draft_tokens=4
  python experiments/decode.py --workdir=runs/countdown --prompt_file=puzzles.txt \
      --strategy=greedy --draft=ngram
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import json
import sys

from absl import app, flags

from lmjax.errors import run_script

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to decode from.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Text to continue; repeat for several.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None,
                                   'File of prompts, one per line (\\n for a newline).')
_STRATEGY = flags.DEFINE_enum('strategy', 'sample', ['greedy', 'sample', 'beam'],
                              'greedy: most likely token; sample: draw from the model; '
                              'beam: beam search for the most likely continuation.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (> 0).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of most likely tokens '
                            'holding this much probability (nucleus); 1: all.')
_REPETITION_PENALTY = flags.DEFINE_float(
    'repetition_penalty', 1.0, 'Above 1 discourages tokens already in the text (CTRL).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations per prompt; for beam '
                                    'search, how many of the best beams to return.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 4, 'Beams kept per prompt (beam search).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 0.6, 'Beam search: alpha of the length '
                                     'penalty; 0 ranks by log-probability alone.')
_BEAM_COMPAT = flags.DEFINE_enum('beam_compat', 'lmjax', ['lmjax', 'hf'],
                                 "lmjax: GNMT length penalty, exact stopping; hf: Hugging "
                                 "Face generate's beam search, result for result.")
_EARLY_STOPPING = flags.DEFINE_bool('early_stopping', False, 'Beam search: stop a prompt as '
                                    'soon as beam_size beams have finished.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Stop a continuation at this text (repeatable); '
                                  'the text is cut before it.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Prompts decoded together.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write JSON lines here (- for stdout).')
_WINDOW_STRIDE = flags.DEFINE_integer(
    'window_stride', None, 'Text longer than the context (model.max_len): re-read the window '
    'every this many tokens, in [1, model.max_len]; default max_len // 2. 1 always '
    'conditions on the last max_len tokens, at the cost of a full re-read per token.')
_DRAFT_WORKDIR = flags.DEFINE_string(
    'draft_workdir', None, 'Speculative decoding with this trained run as the draft (a '
    'smaller Transformer or an RNN with the same tokenizer).')
_DRAFT = flags.DEFINE_enum('draft', None, ['ngram'], 'Speculative decoding with a draft that '
                           "copies from the text itself (prompt lookup): 'ngram'.")
_NUM_DRAFT_TOKENS = flags.DEFINE_integer(
    'num_draft_tokens', 4, 'Speculative decoding: tokens the draft proposes a round.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for sampling.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
flags.mark_flag_as_required('workdir')


def _read_prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    try:
      with open(_PROMPT_FILE.value, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise app.UsageError(f'--prompt_file={_PROMPT_FILE.value}: {e}') from None
    prompts += [line.replace('\\n', '\n') for line in lines if line]
  if not prompts:
    raise app.UsageError('no prompt: give --prompt=TEXT or --prompt_file=FILE.')
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise app.UsageError(f'prompt {i + 1} is empty; give some text to continue.')
  return prompts


def _open_output():
  """Where --output sends the JSON lines: stdout, a file opened for writing, or None (the
  text goes to stdout)."""
  from lmjax.errors import UserError
  if _OUTPUT.value == '-':
    return sys.stdout
  if not _OUTPUT.value:
    return None
  try:
    return open(_OUTPUT.value, 'w', encoding='utf-8')
  except OSError as e:
    raise UserError(f'--output={_OUTPUT.value} cannot be written ({e.strerror or e}); name '
                    'a file in a directory you can write to, or - for stdout.') from None


def _say_long_prompts(prompts: list[str], tokenizer, max_len: int | None) -> None:
  """One line on stderr per prompt longer than the model's context: the decoder reads
  only its last max_len tokens."""
  if max_len is None:
    return
  for i, prompt in enumerate(prompts):
    length = len(tokenizer.encode(prompt))
    if length > max_len:
      print(f'note: prompt {i + 1} is {length} tokens; the model reads only its last '
            f'{max_len} (model.max_len).', file=sys.stderr)


def _draft_spec(strategy: str) -> str | None:
  """'ngram', a draft workdir, or None; refuses what speculative decoding cannot do."""
  if _DRAFT.value and _DRAFT_WORKDIR.value:
    raise app.UsageError('--draft=ngram and --draft_workdir both given; choose one draft.')
  spec = _DRAFT.value or _DRAFT_WORKDIR.value
  if spec is None:
    return None
  if strategy == 'beam':
    raise app.UsageError('--strategy=beam has no draft: speculative decoding is greedy or '
                         'sample; drop --draft/--draft_workdir or change --strategy.')
  if _NUM_SAMPLES.value != 1:
    raise app.UsageError(f'--num_samples={_NUM_SAMPLES.value} with a draft; speculative '
                         'decoding writes one continuation per prompt (repeat the prompt '
                         'for more).')
  if _REPETITION_PENALTY.value != 1.0:
    raise app.UsageError('--repetition_penalty with a draft: speculative decoding has no '
                         'repetition penalty; drop one of them.')
  if _NUM_DRAFT_TOKENS.value < 1:
    raise app.UsageError(f'--num_draft_tokens={_NUM_DRAFT_TOKENS.value}; it must be at '
                         'least 1.')
  return spec


def _speculative_options(options: dict) -> dict:
  return {key: options[key] for key in ('strategy', 'seed', 'temperature', 'top_k', 'top_p')
          if key in options}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from lmjax import generation, runtime, workdir as workdir_lib

  runtime.use_compilation_cache()
  prompts = _read_prompts()
  if _BATCH_SIZE.value < 1:
    raise app.UsageError(f'--batch_size={_BATCH_SIZE.value}; it must be at least 1.')
  strategy = _STRATEGY.value
  options = dict(strategy=strategy, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
                 repetition_penalty=_REPETITION_PENALTY.value,
                 window_stride=_WINDOW_STRIDE.value)
  if strategy == 'sample':
    options.update(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  if strategy == 'beam':
    options.update(beam_size=_BEAM_SIZE.value, length_penalty=_LENGTH_PENALTY.value,
                   beam_compat=_BEAM_COMPAT.value, early_stopping=_EARLY_STOPPING.value)
  # Not a workdir, no such step, a damaged one, a run that writes no text: run_script
  # prints the one line.
  generation.check_decodable(workdir_lib.load_config(_WORKDIR.value))
  draft_spec = _draft_spec(strategy)
  config, tokenizer, params, step = workdir_lib.load_trained(_WORKDIR.value, _STEP.value)
  draft = generation.load_draft(draft_spec, tokenizer) if draft_spec else None

  _say_long_prompts(prompts, tokenizer, generation.context_length(config))
  out = _open_output()
  if out is None:
    print(f'# {_WORKDIR.value}, step {step}, {strategy}')
  batch = _BATCH_SIZE.value
  for start in range(0, len(prompts), batch):
    chunk = prompts[start:start + batch]
    try:
      if draft is None:
        results = generation.generate_texts(config, params, tokenizer, chunk,
                                            max_new_tokens=_MAX_NEW_TOKENS.value,
                                            stop_strings=tuple(_STOP.value), **options)
      else:
        results, stats = generation.speculative_texts(
            config, params, tokenizer, chunk, draft=draft,
            num_draft_tokens=_NUM_DRAFT_TOKENS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
            stop_strings=tuple(_STOP.value), **_speculative_options(options))
        print(f'# draft {draft_spec}: {stats.acceptance:.0%} of its tokens accepted, '
              f'{stats.tokens_per_round:.2f} tokens a call of the model', file=sys.stderr)
    except ValueError as e:  # out-of-vocabulary or too long prompt, bad option value
      raise app.UsageError(str(e)) from None
    for prompt, candidates in zip(chunk, results):
      for rank, c in enumerate(candidates):
        if out is not None:
          out.write(json.dumps({'prompt': prompt, 'sample': rank, **c},
                               ensure_ascii=False) + '\n')
        else:
          print(prompt + c['text'])
          print(f'-- {c["finish"]}, score {c["score"]:.3f}, {len(c["tokens"])} tokens --')
  if out is not None and out is not sys.stdout:
    out.close()
    print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  run_script(main)
