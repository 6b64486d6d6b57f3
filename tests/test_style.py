"""The house's shape, checked: short functions, a trainer that fits in a reader's head, and
a test file for every module (ruff checks the rest, before the tests run)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LONGEST = 80  # lines from `def` to its last line, docstring included
EXCEPTIONS = {'lmjax/decode.py:_beam_loop': 100}  # a beam step's bookkeeping in one place


def _functions():
  for path in sorted((ROOT / 'lmjax').rglob('*.py')):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        yield f'{path.relative_to(ROOT)}:{node.name}', node.end_lineno - start + 1


def test_no_function_in_lmjax_is_longer_than_80_lines():
  too_long = {name: n for name, n in _functions() if n > EXCEPTIONS.get(name, LONGEST)}
  assert not too_long, f'split these functions (lines): {too_long}'


def test_the_trainer_stays_short():
  lines = len((ROOT / 'lmjax' / 'train.py').read_text().splitlines())
  assert lines < 400, f'lmjax/train.py has {lines} lines; move what is not the loop out'


@pytest.mark.parametrize('module', sorted(
    str(p.relative_to(ROOT / 'lmjax')) for p in (ROOT / 'lmjax').rglob('*.py')
    if p.name not in ('__init__.py', 'errors.py')))
def test_every_module_has_its_test_file(module):
  path = pathlib.PurePath(module)
  test = ROOT / 'tests' / path.parent / f'test_{path.name}'
  assert test.exists(), f'lmjax/{module} has no {test.relative_to(ROOT)}'
