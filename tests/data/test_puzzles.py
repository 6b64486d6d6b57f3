"""Countdown puzzles: the checker, the enumerated solutions and the split by puzzle."""
import collections

import pytest

from lmjax.data import corpora, puzzles
from lmjax.errors import UserError

PUZZLE = puzzles.Puzzle((4, 7, 8, 9), 34)


@pytest.mark.parametrize('lines, valid, solved, reason', [
    (['9-7=2', '8*4=32', '32+2=34'], True, True, ''),
    (['7-9=2'], False, False, '7-9 is not 2'),  # results must be positive
    (['9-7=3'], False, False, '9-7 is not 3'),
    (['9-9=0'], False, False, 'uses 9, which is not available'),  # only one 9
    (['9/2=4'], False, False, 'uses 2'),
    (['9/4=2'], False, False, '9/4 is not 2'),  # exact division only
    (['9 - 7 = 2'], False, False, 'is not "a+b=c"'),
    (['9-7=2', '8*4=32'], True, False, 'not finished'),
    (['9-7=2', '8*4=32', '32-2=30'], True, False, 'ends at 30, not 34'),
    (['9-7=2', '2+8=10', '10*4=40', '40-6=34'], False, False, 'uses 6'),
    ([], True, False, 'not finished'),
])
def test_check_judges_every_line(lines, valid, solved, reason):
  verdict = puzzles.check(PUZZLE, lines)
  assert (verdict.valid, verdict.solved) == (valid, solved)
  assert reason in verdict.reason


def test_the_verifier_prunes_wrong_lines_and_unsolved_ends():
  prompt = PUZZLE.prompt
  assert puzzles.verify_thoughts(prompt, ['9-7=2\n'], False) == 0.0
  assert puzzles.verify_thoughts(prompt, ['9-7=3\n'], False) is None
  assert puzzles.verify_thoughts(prompt, ['9-7=2\n', '8*4=32\n', '32+2=34'], True) == 1.0
  assert puzzles.verify_thoughts(prompt, ['9-7=2\n', '8*4=32\n'], True) is None


def test_lookahead_prunes_states_that_can_no_longer_make_the_target():
  prompt = PUZZLE.prompt
  # 9-7=2 leaves 2 4 8, which make 34 (8*4+2); 9-8=1 leaves 1 4 7, which cannot.
  assert puzzles.can_reach((2, 4, 8), 34)
  assert not puzzles.can_reach((1, 4, 7), 34)
  assert puzzles.verify_thoughts(prompt, ['9-8=1\n'], False) == 0.0
  assert puzzles.verify_thoughts(prompt, ['9-8=1\n'], False, lookahead=True) is None
  assert puzzles.verify_thoughts(prompt, ['9-7=2\n'], False, lookahead=True) == 0.0
  # Agrees with the enumeration wherever that reaches (intermediates up to 100).
  for numbers in [(1, 2, 3, 4), (5, 5, 11, 13)]:
    found = puzzles.solutions(numbers)
    for target in puzzles.TARGETS:
      if target in found:
        assert puzzles.can_reach(numbers, target), (numbers, target)


def test_parse_puzzle_reads_the_prompt_and_names_bad_lines():
  assert puzzles.parse_puzzle('9 8 7 4 -> 34\n9-7=2') == PUZZLE
  with pytest.raises(UserError, match='not a puzzle line'):
    puzzles.parse_puzzle('4 7 8 9 = 34')


def test_every_enumerated_solution_checks_and_is_distinct():
  for numbers in [(4, 7, 8, 9), (1, 1, 13, 13), (2, 3, 5, 12)]:
    found = puzzles.solutions(numbers)
    assert found, numbers
    for target, sols in found.items():
      assert len(sols) == len(set(sols))
      for lines in sols:
        assert puzzles.check(puzzles.Puzzle(numbers, target), list(lines)).solved
  assert ('9-7=2', '8*4=32', '32+2=34') in puzzles.solutions((4, 7, 8, 9))[34]


def test_splits_share_no_puzzle_and_hold_a_few_percent():
  by_split = collections.defaultdict(set)
  for split, puzzle, _ in puzzles.all_examples():
    by_split[split].add(puzzle)
    assert puzzle.target in puzzles.TARGETS
  assert not by_split['train'] & by_split['validation']
  assert not by_split['train'] & by_split['test']
  assert not by_split['validation'] & by_split['test']
  total = sum(len(s) for s in by_split.values())
  for split in ('validation', 'test'):
    assert 0.02 < len(by_split[split]) / total < 0.04


def test_the_tfds_builder_writes_those_splits():
  test_texts = [text for _, text in corpora.load_split_texts('countdown', 'test')]
  expected = [puzzles.text_of(p, lines) for split, p, lines in puzzles.all_examples()
              if split == 'test']
  assert sorted(test_texts) == sorted(expected)
  for text in test_texts[:50]:
    problem, answer = text.split('\n', 1)
    assert puzzles.check(puzzles.parse_puzzle(problem), puzzles.answer_lines(answer)).solved
