"""Every config file: each field commented where it is set, and each field settable from the
command line as train.py parses it."""
import glob
import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs',
                                                                               '*.py')))


def _parse(argv: list[str]):
  """The config train.py would get from these flags."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv,
                                  lock_config=True)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    flag_values(argv)
    return flag_values.config
  finally:
    os.chdir(cwd)


def _leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _another_value(value):
  """A different value of the same type (its validity is train.py's business, not the
  parser's)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 3
  if isinstance(value, float):
    return value * 2 + 0.25
  if isinstance(value, str):
    return value + 'x' if value else 'x'
  if isinstance(value, tuple):
    return value[::-1] if len(value) > 1 else value + value if value else (1, 2)
  raise AssertionError(f'a config field of type {type(value)}: teach this test about it')


def _flag_text(value) -> str:
  return repr(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_field_is_commented_where_it_is_set(path):
  config = _parse(['train.py', f'--config={path}'])
  lines = open(os.path.join(REPO, path)).read().splitlines()
  for field, _ in _leaves(config):
    pattern = re.compile(rf'^\s*c\.{re.escape(field)}\s*=')
    where = [i for i, line in enumerate(lines) if pattern.match(line)]
    assert where, f'{path}: {field} is not set as c.{field} = ... in get_config'
    i = where[0]
    assert '#' in lines[i] or lines[i - 1].strip().startswith('#'), (
        f'{path}:{i + 1}: c.{field} has no comment on its line or just above it')


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_field_takes_a_command_line_override(path):
  default = _parse(['train.py', f'--config={path}'])
  wanted = {field: _another_value(value) for field, value in _leaves(default)}
  argv = ['train.py', f'--config={path}',
          *[f'--config.{field}={_flag_text(value)}' for field, value in wanted.items()]]
  got = dict(_leaves(_parse(argv)))
  for field, value in wanted.items():
    assert got[field] == value, (field, got[field], value)
