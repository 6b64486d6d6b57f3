"""Greedy, sampling, beam search and tree-of-thought search side by side on Countdown puzzles.

  python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
  python experiments/tot.py --workdir=runs/countdown --num_puzzles=500
  python experiments/tot.py --workdir=runs/countdown --task_file=puzzles.txt --output=tot.json

Puzzles come from --task_file (one per line, "4 7 8 9 -> 34") or else from the held-out
--split of the countdown dataset (the first --num_puzzles of a seeded shuffle). Every
strategy continues the same prompts (the puzzle line, after the end-of-text id for a
language model, as it saw puzzles in training) and its answer is checked by the same rules
(lmjax/data/puzzles.py). For each it reports the share of puzzles solved, the tokens the
model generated per puzzle (every sample, beam and pruned branch counted) and the wall time
(after one untimed batch that compiles).

Strategies (--strategies, any subset, in this order):
  greedy            the most likely token at each step
  sample            one sample at --temperature
  beam              beam search (--beam_size), its best beam
  beam_verified     the same beams; solved if the checker accepts any of them
  sample_verified   --samples samples; solved if the checker accepts any (best-of-n)
  bfs_model         tree-of-thought BFS, valued by the model's mean log-probability
  bfs_checker       tree-of-thought BFS, valued by the line checker (ties: the model)
  bfs_lookahead     the same, the checker also pruning states that can no longer make the
                    target (an exact stand-in for the model-judged value of Yao et al.)
  dfs_checker       tree-of-thought DFS with backtracking, valued by the line checker
  dfs_lookahead     the same with the lookahead checker
  bfs_scorer        tree-of-thought BFS, valued by a second model (--scorer_workdir)
A thought is one line. Tree search proposes --proposals lines per state (--proposal:
sampled at --temperature, or the most likely distinct lines by a beam search within the
line), keeps --breadth states per level (BFS) and goes --max_depth lines deep.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import functools
import json
import random
import sys
import time

from absl import app, flags

from lmjax.errors import run_script

STRATEGIES = ('greedy', 'sample', 'beam', 'beam_verified', 'sample_verified', 'bfs_model',
              'bfs_checker', 'bfs_lookahead', 'dfs_checker', 'dfs_lookahead', 'bfs_scorer')

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a model trained on countdown.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_TASK_FILE = flags.DEFINE_string('task_file', None, 'Puzzles, one per line ("4 7 8 9 -> 34").')
_SPLIT = flags.DEFINE_enum('split', 'test', ['validation', 'test'],
                           'Held-out split to take puzzles from when no --task_file.')
_NUM_PUZZLES = flags.DEFINE_integer('num_puzzles', 200, 'Puzzles to take from --split.')
_STRATEGIES = flags.DEFINE_list('strategies', [s for s in STRATEGIES if s not in (
                                    'dfs_checker', 'bfs_scorer')],
                                f'Any of {", ".join(STRATEGIES)}.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature of sample, '
                                  'sample_verified and the tree search proposals.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 8, 'Beams (beam, beam_verified).')
_SAMPLES = flags.DEFINE_integer('samples', 8, 'Samples per puzzle (sample_verified).')
_BREADTH = flags.DEFINE_integer('breadth', 3, 'States kept per level (BFS).')
_PROPOSALS = flags.DEFINE_integer('proposals', 6, 'Thoughts proposed per state.')
_PROPOSAL = flags.DEFINE_enum('proposal', 'beam', ['sample', 'beam'],
                              'How tree search proposes thoughts: sample at --temperature, or '
                              'the most likely distinct lines by a beam search within the line.')
_MAX_DEPTH = flags.DEFINE_integer('max_depth', 3, 'Thoughts (lines) per answer at most.')
_MAX_EXPANSIONS = flags.DEFINE_integer('max_expansions', 12, 'DFS: states expanded at most.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 40,
                                       'Tokens per answer at most (greedy, sample, beam).')
_MAX_THOUGHT_TOKENS = flags.DEFINE_integer('max_thought_tokens', 14, 'Tokens per line at most.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Puzzles decoded or searched together.')
_SCORER_WORKDIR = flags.DEFINE_string('scorer_workdir', None,
                                      'Second model for bfs_scorer (same tokenizer).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for the puzzle shuffle and for sampling.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON here.')
flags.mark_flag_as_required('workdir')


def _read_puzzles(puzzles_lib, corpora):
  if _TASK_FILE.value:
    try:
      with open(_TASK_FILE.value, encoding='utf-8') as f:
        lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise app.UsageError(f'--task_file: cannot read {_TASK_FILE.value}: {e}') from None
    try:
      puzzles = [puzzles_lib.parse_puzzle(line) for line in lines]
    except ValueError as e:
      raise app.UsageError(f'--task_file {_TASK_FILE.value}: {e}') from None
    if not puzzles:
      raise app.UsageError(f'--task_file {_TASK_FILE.value} holds no puzzles.')
    return puzzles
  texts = [text for _, text in corpora.load_split_texts('countdown', _SPLIT.value)]
  puzzles = sorted({puzzles_lib.parse_puzzle(t) for t in texts},
                   key=lambda p: (p.numbers, p.target))
  random.Random(_SEED.value).shuffle(puzzles)
  return puzzles[:_NUM_PUZZLES.value]


def _open_output():
  """The --output file, opened for writing before any puzzle is solved; None without one."""
  if not _OUTPUT.value:
    return None
  try:
    return open(_OUTPUT.value, 'w')
  except OSError as e:
    raise app.UsageError(f'--output={_OUTPUT.value} cannot be written ({e.strerror or e}); '
                         'name a file in a directory you can write to.') from None


def _load(workdir, step):
  from lmjax import generation, workdir as workdir_lib
  generation.check_decodable(workdir_lib.load_config(workdir))
  config, tokenizer, params, _ = workdir_lib.load_trained(workdir, step)
  return (tokenizer, generation.decoder_fns(config, params, tokenizer.vocab_size),
          config.model.max_len, config.data.format == 'completion')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = [s for s in _STRATEGIES.value if s not in STRATEGIES]
  if unknown:
    raise app.UsageError(f'--strategies: unknown {unknown}; known: {", ".join(STRATEGIES)}.')
  if 'bfs_scorer' in _STRATEGIES.value and not _SCORER_WORKDIR.value:
    raise app.UsageError('--strategies=bfs_scorer needs --scorer_workdir (a second model).')
  for name in ('num_puzzles', 'beam_size', 'samples', 'breadth', 'proposals', 'max_depth',
               'max_expansions', 'max_new_tokens', 'max_thought_tokens', 'batch'):
    if flags.FLAGS[name].value < 1:
      raise app.UsageError(f'--{name}={flags.FLAGS[name].value}; it must be at least 1.')
  if _TEMPERATURE.value <= 0:
    raise app.UsageError(f'--temperature={_TEMPERATURE.value}; it must be positive.')

  import numpy as np

  from lmjax import decode, runtime, search
  from lmjax.data import corpora
  from lmjax.data import puzzles as puzzles_lib

  runtime.use_compilation_cache()
  puzzles = _read_puzzles(puzzles_lib, corpora)
  output = _open_output()
  try:
    tokenizer, decoder_fns, max_len, completion_run = _load(_WORKDIR.value, _STEP.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f'--workdir={_WORKDIR.value}: {e}') from None
  eos = tokenizer.eos_id
  # A prompt as the run saw puzzles in training: a language model after the end-of-text id
  # that ended the document before; a prompt -> completion run at the start of its example.
  lead = [] if completion_run else [eos]
  try:
    prompts = [np.concatenate([lead, tokenizer.encode(p.prompt)]).astype(np.int32)
               for p in puzzles]
  except ValueError as e:
    raise app.UsageError(f'a puzzle has symbols the model never saw: {e}') from None

  def solved(puzzle, tokens) -> bool:
    text = tokenizer.decode(np.asarray(tokens, np.int32))
    return puzzles_lib.check(puzzle, puzzles_lib.answer_lines(text)).solved

  def generated(candidate) -> int:
    return len(candidate.tokens) + (candidate.finish == 'eos')

  def decode_batch(rows, **options):
    tokens_to_logits, state = decoder_fns(
        batch_size=len(rows),
        cache_len=decode.buffer_length(max(map(len, rows)) + _MAX_NEW_TOKENS.value, max_len))
    return decode.generate(tokens_to_logits, state, rows, max_new_tokens=_MAX_NEW_TOKENS.value,
                           eos_id=eos, max_len=max_len, seed=_SEED.value, **options)

  # Each runner takes a batch of (puzzle, prompt) and returns (solved, tokens) per puzzle.
  def plain(options, best_only=True, spread=1):
    def run(batch):
      results = decode_batch([p for _, p in batch], **options)
      out = []
      for (puzzle, _), cands in zip(batch, results):
        ok = [solved(puzzle, c.tokens) for c in (cands[:1] if best_only else cands)]
        # Beam search decodes `spread` rows per step up to its longest returned beam.
        tokens = (spread * max(generated(c) for c in cands) if spread > 1 else
                  sum(generated(c) for c in cands))
        out.append((any(ok), tokens))
      return out
    return run

  propose = search.Proposer(decoder_fns, delimiters=[tokenizer.encode('\n')], eos_id=eos,
                            max_thought_tokens=_MAX_THOUGHT_TOKENS.value,
                            method=_PROPOSAL.value, temperature=_TEMPERATURE.value,
                            max_len=max_len)
  checker = search.verifier_value(puzzles_lib.verify_thoughts, tokenizer.decode)
  lookahead = search.verifier_value(
      functools.partial(puzzles_lib.verify_thoughts, lookahead=True), tokenizer.decode)

  def tree(value_fn, method):
    def run(batch):
      rows = [p for _, p in batch]
      if method == 'bfs':
        results = search.bfs(propose, rows, value_fn, breadth=_BREADTH.value,
                             proposals=_PROPOSALS.value, max_depth=_MAX_DEPTH.value,
                             seed=_SEED.value)
      else:
        results = [search.dfs(propose, row, value_fn, proposals=_PROPOSALS.value,
                              max_depth=_MAX_DEPTH.value,
                              max_expansions=_MAX_EXPANSIONS.value, seed=_SEED.value)
                   for row in rows]
      return [(r.best is not None and solved(puzzle, r.best.tokens), r.tokens_generated)
              for (puzzle, _), r in zip(batch, results)]
    return run

  k, n, t = _BEAM_SIZE.value, _SAMPLES.value, _TEMPERATURE.value
  b, d = _BREADTH.value, _MAX_DEPTH.value
  m = (f'{_PROPOSALS.value} sampled' if _PROPOSAL.value == 'sample' else
       f'{_PROPOSALS.value} beam-searched')
  runners = {
      'greedy': (plain({'strategy': 'greedy'}), 'argmax'),
      'sample': (plain({'strategy': 'sample', 'temperature': t}), f'1 sample, T={t}'),
      # Both beam rows ask for all k beams, so that their token counts are the same.
      'beam': (plain({'strategy': 'beam', 'beam_size': k, 'num_samples': k}, spread=k),
               f'best of {k} beams'),
      'beam_verified': (plain({'strategy': 'beam', 'beam_size': k, 'num_samples': k},
                              best_only=False, spread=k), f'any of {k} beams passes the checker'),
      'sample_verified': (plain({'strategy': 'sample', 'temperature': t, 'num_samples': n},
                                best_only=False), f'any of {n} samples (T={t}) passes'),
      'bfs_model': (tree(search.model_value, 'bfs'),
                    f'breadth {b}, {m} proposals, depth {d}, value: model log-prob'),
      'bfs_checker': (tree(checker, 'bfs'),
                      f'breadth {b}, {m} proposals, depth {d}, value: line checker'),
      'bfs_lookahead': (tree(lookahead, 'bfs'),
                        f'breadth {b}, {m} proposals, depth {d}, value: lookahead checker'),
      'dfs_checker': (tree(checker, 'dfs'),
                      f'{m} proposals, at most {_MAX_EXPANSIONS.value} expansions, '
                      'value: line checker'),
      'dfs_lookahead': (tree(lookahead, 'dfs'),
                        f'{m} proposals, at most {_MAX_EXPANSIONS.value} expansions, '
                        'value: lookahead checker'),
  }
  if 'bfs_scorer' in _STRATEGIES.value:
    try:
      _, scorer_fns, scorer_len, _ = _load(_SCORER_WORKDIR.value, None)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(f'--scorer_workdir={_SCORER_WORKDIR.value}: {e}') from None
    scorer = search.scorer_value(scorer_fns, eos_id=eos, max_len=scorer_len)
    runners['bfs_scorer'] = (tree(scorer, 'bfs'),
                             f'breadth {b}, {m} proposals, depth {d}, value: second model')

  pairs = list(zip(puzzles, prompts))
  batches = [pairs[i:i + _BATCH.value] for i in range(0, len(pairs), _BATCH.value)]
  print(f'{len(puzzles)} puzzles, model {_WORKDIR.value}', flush=True)
  rows = []
  for name in _STRATEGIES.value:
    run, what = runners[name]
    run(batches[0])  # compiles; not timed
    start = time.perf_counter()
    outcomes = [o for batch in batches for o in run(batch)]
    seconds = time.perf_counter() - start
    row = {'strategy': name, 'what': what, 'puzzles': len(outcomes),
           'solved': sum(ok for ok, _ in outcomes),
           'accuracy': sum(ok for ok, _ in outcomes) / len(outcomes),
           'tokens_per_puzzle': sum(tok for _, tok in outcomes) / len(outcomes),
           'seconds': round(seconds, 2)}
    rows.append(row)
    print(f'{name:<16} {row["accuracy"]:7.1%} solved  {row["tokens_per_puzzle"]:7.1f} '
          f'tokens/puzzle  {seconds:7.1f} s   ({what})', flush=True)

  print('\n| strategy | what | solved | tokens / puzzle | wall s |\n|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["strategy"]} | {r["what"]} | {r["solved"]}/{r["puzzles"]} '
          f'({r["accuracy"]:.1%}) | {r["tokens_per_puzzle"]:.0f} | {r["seconds"]:.1f} |')
  if output is not None:
    settings = {name: flags.FLAGS[name].value for name in (
        'workdir', 'step', 'task_file', 'split', 'num_puzzles', 'temperature', 'beam_size',
        'samples', 'breadth', 'proposals', 'proposal', 'max_depth', 'max_expansions',
        'max_new_tokens', 'max_thought_tokens', 'seed')}
    with output:
      json.dump({'settings': settings, 'results': rows}, output, indent=2)
  sys.stdout.flush()


if __name__ == '__main__':
  run_script(main)
