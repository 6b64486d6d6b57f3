"""The config schema and the files in configs/: every field of `base_config()` commented where it
is set and settable from the command line as train.py parses it; every config file and variant
builds from the schema alone, in at most 100 lines; docs/reference/config.md is the schema's.
A config.json saved without a field resumes with its default."""
import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from lmjax import config as config_lib
from lmjax import runtime
from lmjax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs',
                                                                               '*.py')))
# Every variant of every file (the text after ':').
VARIANTS = {
    'configs/authorship.py': ('', 'lstm', 'tiny'),
    'configs/countdown.py': ('', 'tiny', 'completion', 'completion_tiny'),
    'configs/gpt2.py': ('', 'medium', 'large', 'xl', 'small', 'pretrain_medium',
                        'pretrain_large'),
    'configs/gpt2_tasks.py': ('', 'squad', 'imdb', 'sst2', 'cnn_dailymail', 'wmt14_de_en'),
    'configs/rnn_shakespeare_char.py': ('lstm', '', 'gru', 'rnn', 'lstm_spm', 'awd', 'laptop',
                                        'tiny'),
    'configs/shakespeare_char.py': ('', 'full', 'laptop', 'full_cpu', 'cpu', 'mlm', 'tiny'),
}
MAX_CONFIG_LINES = 100


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


def test_every_field_of_the_schema_is_commented_where_it_is_set():
  """Each field is set once in its section's function of lmjax/config.py, with a comment
  on its line or just above it (the field's definition, on the reference page)."""
  comments = config_lib.field_comments()
  fields = [field for field, _ in _leaves(config_lib.base_config())]
  assert sorted(comments) == sorted(fields), 'a field is not set as c.FIELD = ... in its section'
  assert not [field for field in fields if not comments[field]], 'fields without a comment'


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_field_takes_a_command_line_override(path):
  default = _parse(['train.py', f'--config={path}'])
  assert {f for f, _ in _leaves(default)} == {f for f, _ in _leaves(config_lib.base_config())}
  wanted = {field: _another_value(value) for field, value in _leaves(default)}
  argv = ['train.py', f'--config={path}',
          *[f'--config.{field}={_flag_text(value)}' for field, value in wanted.items()]]
  got = dict(_leaves(_parse(argv)))
  for field, value in wanted.items():
    assert got[field] == value, (field, got[field], value)


def test_every_config_file_has_its_variants_listed_here():
  assert sorted(VARIANTS) == CONFIG_FILES


@pytest.mark.parametrize('path, variant',
                         [(p, v) for p in sorted(VARIANTS) for v in VARIANTS[p]])
def test_every_variant_sets_fields_of_the_schema_only(path, variant):
  """A config file changes the schema's values: a field of its own would be one the
  schema, its defaults and the reference page do not know."""
  config = _parse(['train.py', f'--config={path}:{variant}'])
  schema = dict(_leaves(config_lib.base_config()))
  fields = dict(_leaves(config))
  assert set(fields) == set(schema), set(fields) ^ set(schema)
  for field, value in fields.items():
    assert type(value) is type(schema[field]), (field, value, schema[field])


def test_every_variant_loads_as_the_scripts_load_it(tmp_path):
  """train.py and the sweep load a config file from its path, in a process whose sys.path
  lacks the repository root (a script's own directory comes first): a config file that
  imported another as a package (`from configs import gpt2`) loaded here but not there."""
  code = ('import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n'
          'for spec in sys.argv[1:]:\n'
          '  values = flags.FlagValues()\n'
          '  config_flags.DEFINE_config_file("config", flag_values=values)\n'
          '  values(["train.py", "--config=" + spec])\n'
          '  values.config.model  # loads the file\n'
          'print("loaded", len(sys.argv) - 1)\n')
  specs = [f'{REPO}/{p}:{v}' for p in sorted(VARIANTS) for v in VARIANTS[p]]
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run([sys.executable, '-c', code, *specs], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ['loaded', str(len(specs))]


def test_the_shakespeare_default_is_the_recipe_for_this_machine_and_says_why():
  kind, why = runtime.find_accelerator()
  recipe = 'full' if kind else 'laptop'
  chosen = _parse(['train.py', '--config=configs/shakespeare_char.py'])
  named = _parse(['train.py', f'--config=configs/shakespeare_char.py:{recipe}'])
  assert chosen.train.recipe.startswith(f'Recipe :{recipe}, ')
  assert why in chosen.train.recipe
  named.unlock().train.recipe = chosen.train.recipe
  assert chosen.to_dict() == named.to_dict()


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_files_are_short(path):
  with open(os.path.join(REPO, path)) as f:
    num_lines = len(f.read().splitlines())
  assert num_lines <= MAX_CONFIG_LINES, (
      f'{path} has {num_lines} lines, more than {MAX_CONFIG_LINES}: a config file sets what '
      'its experiment changes from lmjax/config.py, with a comment where a value is a choice.')


def test_the_reference_page_is_the_schemas():
  with open(os.path.join(REPO, 'docs', 'reference', 'config.md')) as f:
    page = f.read()
  assert page == config_lib.reference_markdown(), (
      'docs/reference/config.md is stale; regenerate it: '
      'python -m lmjax.config > docs/reference/config.md')


def test_a_saved_config_without_a_field_takes_its_default_and_keeps_unknown_ones():
  base = config_lib.base_config()
  saved = json.loads(base.to_json())
  del saved['train']['stateful'], saved['init_from']
  saved['model']['retired'] = 3
  saved['opt']['lr'] = 0.5
  config, differ = config_lib.with_defaults(saved)
  assert sorted(differ) == ['init_from.step', 'init_from.workdir', 'model.retired',
                            'train.stateful']
  assert (config.train.stateful, config.init_from.workdir) == (False, '')
  assert (config.model.retired, config.opt.lr) == (3, 0.5)
  # JSON's lists come back as the tuples the schema holds.
  assert config.mesh.rules == base.mesh.rules and config.train.freeze == ()
  assert config.is_locked


def test_a_workdir_config_missing_a_field_loads_with_its_default(tmp_path):
  saved = json.loads(config_lib.base_config().to_json())
  del saved['model']['scan_layers']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert workdir_lib.load_config(str(tmp_path)).model.scan_layers is False


def test_resuming_compares_a_field_the_saved_config_lacks_at_its_default(tmp_path, capsys):
  saved = json.loads(config_lib.base_config().to_json())
  del saved['train']['mask_rate']
  saved['model']['retired'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = config_lib.base_config()
  workdir_lib.check_config_change(config, str(tmp_path))
  out = capsys.readouterr().out
  assert ('fields that differ in presence: model.retired: 1 -> (absent), '
          'train.mask_rate: (absent) -> 0.15') in out, out
  assert 'the config differs' not in out, out
  config.train.mask_rate = 0.3
  workdir_lib.check_config_change(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'the config differs from' in out and ' in train.mask_rate: 0.15 -> 0.3;' in out, out
