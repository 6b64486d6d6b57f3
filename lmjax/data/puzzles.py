"""Countdown arithmetic puzzles (the "Game of 24" generalised): a TFDS builder and a checker.

A puzzle gives four numbers from 1 to 13 (the cards of the Game of 24) and a target from
10 to 100. A solution uses every number once, one operation per line, each line
combining two numbers still available into a new one (positive integers only, exact
division), until the last line makes the target:

    4 7 8 9 -> 34
    9-7=2
    8*4=32
    32+2=34

Every line can be checked on its own, which is what tree-of-thought search with a
verifier needs. The data are made here, from nothing but the rules: every solution of
every puzzle is enumerated (intermediate results kept to 100 and below, so the
arithmetic a small model must learn stays small), and a puzzle (numbers and target) goes
to train, validation or test by a hash of its text, so no held-out puzzle is ever seen
in training. Training has up to `TRAIN_SOLUTIONS_PER_PUZZLE` different solutions of each
of its puzzles, held-out splits one (a reference; any correct solution counts).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
import re
from typing import Iterator

import tensorflow_datasets as tfds

from lmjax import console
from lmjax.errors import UserError

NUMBERS = range(1, 14)
COUNT = 4
TARGETS = range(10, 101)
# Largest intermediate result in a generated solution (the checker allows any).
MAX_INTERMEDIATE = 100
TRAIN_SOLUTIONS_PER_PUZZLE = 2
# Per 100 puzzles: the rest are training.
VALIDATION_PERCENT = 3
TEST_PERCENT = 3
OPS = '+-*/'
ARROW = ' -> '

_LINE = re.compile(r'^(\d+)([-+*/])(\d+)=(\d+)$')


@dataclasses.dataclass(frozen=True)
class Puzzle:
  numbers: tuple[int, ...]  # ascending
  target: int

  @property
  def prompt(self) -> str:
    """The problem line a model continues (the newline included)."""
    return ' '.join(map(str, self.numbers)) + ARROW + str(self.target) + '\n'


def parse_puzzle(text: str) -> Puzzle:
  """The puzzle on the first line of `text` ('4 7 8 9 -> 34')."""
  line = text.split('\n', 1)[0]
  try:
    numbers, target = line.split(ARROW)
    return Puzzle(tuple(sorted(int(n) for n in numbers.split())), int(target))
  except ValueError:
    raise UserError(f'{line!r} is not a puzzle line like "4 7 8 9 -> 34".') from None


def _apply(a: int, op: str, b: int) -> int | None:
  """a op b if it is a positive integer, else None."""
  if op == '+':
    c = a + b
  elif op == '-':
    c = a - b
  elif op == '*':
    c = a * b
  else:
    if b == 0 or a % b:
      return None
    c = a // b
  return c if c > 0 else None


@dataclasses.dataclass(frozen=True)
class Verdict:
  valid: bool  # every line well formed, correct, and using numbers still available
  solved: bool  # valid, every number used, and the last result is the target
  remaining: tuple[int, ...]  # the numbers left after the valid lines
  reason: str  # why not valid / not solved ('' when solved)


def check(puzzle: Puzzle, lines: list[str]) -> Verdict:
  """Checks solution lines (a partial solution too) against the puzzle's rules."""
  available = list(puzzle.numbers)
  for i, line in enumerate(lines):
    match = _LINE.match(line.strip())
    if not match:
      return Verdict(False, False, tuple(available), f'line {i + 1} {line!r} is not "a+b=c"')
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    pool = list(available)
    for n in (a, b):
      if n not in pool:
        return Verdict(False, False, tuple(available),
                       f'line {i + 1} uses {n}, which is not available ({available})')
      pool.remove(n)
    if _apply(a, op, b) != c:
      return Verdict(False, False, tuple(available), f'line {i + 1}: {a}{op}{b} is not {c}')
    available = sorted(pool + [c])
  if len(available) != 1 or available[0] != puzzle.target:
    reason = ('not finished' if len(available) > 1 else
              f'ends at {available[0]}, not {puzzle.target}')
    return Verdict(True, False, tuple(available), reason)
  return Verdict(True, True, tuple(available), '')


def solutions(numbers: tuple[int, ...], max_intermediate: int = MAX_INTERMEDIATE
              ) -> dict[int, list[tuple[str, ...]]]:
  """Every solution of every target the numbers reach: {target: [lines, ...]}.

  Sums and products are written larger number first, so the data have one spelling
  of each step (the checker accepts both)."""
  found: dict[int, list[tuple[str, ...]]] = {}

  def extend(pool: list[int], lines: list[str]):
    if len(pool) == 1:
      found.setdefault(pool[0], []).append(tuple(lines))
      return
    for i, j in itertools.permutations(range(len(pool)), 2):
      a, b = pool[i], pool[j]
      rest = [n for k, n in enumerate(pool) if k not in (i, j)]
      for op in OPS:
        if op in '+*' and a < b:
          continue
        c = _apply(a, op, b)
        if c is not None and c <= max_intermediate:
          extend(sorted(rest + [c]), lines + [f'{a}{op}{b}={c}'])

  extend(sorted(numbers), [])
  # Permuted duplicate numbers give the same lines more than once.
  return {t: sorted(set(s)) for t, s in found.items()}


def split_of(puzzle: Puzzle) -> str:
  """'train' | 'validation' | 'test', fixed by a hash of the puzzle line."""
  bucket = int(hashlib.sha256(puzzle.prompt.encode()).hexdigest(), 16) % 100
  if bucket < VALIDATION_PERCENT:
    return 'validation'
  if bucket < VALIDATION_PERCENT + TEST_PERCENT:
    return 'test'
  return 'train'


def text_of(puzzle: Puzzle, lines: tuple[str, ...]) -> str:
  """A solved example; it ends after the last line (the document separator follows)."""
  return puzzle.prompt + '\n'.join(lines)


@functools.lru_cache(maxsize=1)
def all_examples(seed: int = 0) -> tuple[tuple[str, Puzzle, tuple[str, ...]], ...]:
  """(split, puzzle, solution lines) for every example, in a fixed order (a few seconds;
  cached, as the builder asks once per split)."""
  return tuple(_examples(seed))


def _examples(seed: int) -> Iterator[tuple[str, Puzzle, tuple[str, ...]]]:
  rng = random.Random(seed)
  draws = list(itertools.combinations_with_replacement(NUMBERS, COUNT))
  for numbers in console.progress(draws, 'countdown: solving', len(draws), 'draws of numbers'):
    for target, sols in sorted(solutions(numbers).items()):
      if target not in TARGETS:
        continue
      puzzle = Puzzle(numbers, target)
      split = split_of(puzzle)
      keep = TRAIN_SOLUTIONS_PER_PUZZLE if split == 'train' else 1
      for lines in rng.sample(sols, min(keep, len(sols))):
        yield split, puzzle, lines


class Countdown(tfds.core.GeneratorBasedBuilder):
  """Countdown puzzles with worked solutions, split by puzzle."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': '4 numbers in 1..13, targets 10..100, split by puzzle.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'title': tfds.features.Text(),  # a hash, the puzzle line, a solution number
            'text': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in ('train', 'validation', 'test')}

  def _generate_examples(self, split: str):
    counts: dict[Puzzle, int] = {}
    examples = [(puzzle, lines) for s, puzzle, lines in all_examples() if s == split]
    for puzzle, lines in console.progress(examples, f'countdown {split}', len(examples)):
      index = counts[puzzle] = counts.get(puzzle, -1) + 1
      text = text_of(puzzle, lines)
      # Readers order examples by title (the pipeline joins them in that order); a hash
      # first makes that order a shuffle. In puzzle order, the two solutions of a puzzle
      # and the puzzles of the same numbers would sit side by side in a training window,
      # and the model would learn to copy the previous example rather than to solve.
      title = f'{hashlib.sha256(text.encode()).hexdigest()[:12]} {puzzle.prompt.strip()} #{index}'
      yield title, {'title': title, 'text': text}


def answer_lines(text: str) -> list[str]:
  """The solution lines of a generated answer (blank lines dropped)."""
  return [line for line in text.split('\n') if line.strip()]


def prompt_and_solution(text: str) -> tuple[str, str]:
  """A solved example as a prompt and its completion: the puzzle line with its newline, and
  the solution lines (what a prompt -> completion run trains a model to write)."""
  line, _, solution = text.partition('\n')
  return line + '\n', solution


def solves(prompt: str, answer: str) -> bool:
  """Whether `answer`, a generated completion of the puzzle line `prompt`, solves it."""
  return check(parse_puzzle(prompt), answer_lines(answer)).solved


@functools.lru_cache(maxsize=1 << 16)
def can_reach(numbers: tuple[int, ...], target: int) -> bool:
  """Whether the numbers (ascending) can still make the target under the rules, with
  intermediate results of any size."""
  if len(numbers) == 1:
    return numbers[0] == target
  for i, j in itertools.permutations(range(len(numbers)), 2):
    rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
    for op in OPS:
      c = _apply(numbers[i], op, numbers[j])
      if c is not None and can_reach(tuple(sorted(rest + [c])), target):
        return True
  return False


def verify_thoughts(prompt_text: str, thoughts: list[str], finished: bool, *,
                    lookahead: bool = False) -> float | None:
  """A tree-of-thought verifier (lmjax.search.verifier_value): each thought is one line.

  None (prune) when a line is malformed, wrong, or uses a number that is not available,
  and when a finished state has not made the target; else 1 for a solution, 0 for a
  partial one. By default it checks only what is written, and whether the numbers left
  can still make the target is for the search to find out. With `lookahead` it also
  prunes partial states whose numbers can no longer make the target (an exact version of
  the "sure / likely / impossible" judgement Yao et al. ask the model for)."""
  puzzle = parse_puzzle(prompt_text.lstrip('\n'))
  lines = [t.rstrip('\n') for t in thoughts]
  verdict = check(puzzle, lines)
  if not verdict.valid:
    return None
  if finished:
    return 1.0 if verdict.solved else None
  if lookahead and not can_reach(verdict.remaining, puzzle.target):
    return None
  return 0.0
