"""The documentation holds up: every script command it shows parses as written, README.md
stays a short guide, every relative link leads to a file (and heading) that exists, and no
page tells the history of how a figure was reached.

A command is any `python experiments/NAME.py ...` (or `.venv/bin/python ...`) in a fenced
code block of README.md or docs/**/*.md; a trailing backslash continues it on the next line,
and `VAR="..."` lines earlier in the same block are expanded where `$VAR` appears. All of
them are checked in one subprocess that imports each script once and parses each of its
commands with absl, exactly as the script's own `app.run` would, but runs no `main`: an
unknown flag, a value of the wrong type or outside an enum, a missing required flag, a
`--config` file or variant that does not load, or a `--config.a.b=V` naming no field of that
config all fail, with the file, line and command named. Scripts whose `--config` is a plain
string (sweep.py, soak.py) have the file and variant loaded too, and their `get_sweep`
points or `--set=a.b=V` fields checked against the config.
"""
import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
README_MAX_LINES = 300

_FENCE = re.compile(r'^\s*(```|~~~)')
_ASSIGNMENT = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)=(.*)$')
_PYTHON = re.compile(r'^(\S*/)?python(3(\.\d+)?)?$')
_SCRIPT = re.compile(r'^experiments/(\w+)\.py$')
_SHELL_OPERATORS = {'&&', '||', ';', '|', '&', '>', '>>', '<', '2>', '2>&1'}


def _rel(path: Path) -> str:
  return str(path.relative_to(ROOT))


def _fenced_lines(path: Path):
  """(line number, text, block index) of every line inside a fenced code block."""
  inside, block = False, 0
  for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if _FENCE.match(line):
      inside = not inside
      block += 1
      continue
    if inside:
      yield number, line, block


def _logical_lines(path: Path):
  """(first line number, text, block index) with backslash continuations joined."""
  pending, start = None, None
  for number, line, block in _fenced_lines(path):
    if pending is not None:
      line = pending + ' ' + line.strip()
    else:
      start = number
    if line.rstrip().endswith('\\'):
      pending = line.rstrip()[:-1]
      continue
    pending = None
    yield start, line, block


def _expand(text: str, variables: dict[str, str]) -> str:
  for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
    text = text.replace('${' + name + '}', value).replace('$' + name, value)
  return text


def _script_calls(tokens: list[str]):
  """(script name, its arguments) of each `python experiments/NAME.py ...` in `tokens`,
  including commands quoted inside a token (`ssh ... --command="... python ..."`)."""
  for i, token in enumerate(tokens):
    if ' ' in token and 'experiments/' in token:
      inner = token.split('=', 1)[1] if token.startswith('-') and '=' in token else token
      yield from _script_calls(shlex.split(inner, comments=True))
      continue
    if not _PYTHON.match(token) or i + 1 >= len(tokens):
      continue
    match = _SCRIPT.match(tokens[i + 1])
    if not match:
      continue
    args = []
    for arg in tokens[i + 2:]:
      if arg in _SHELL_OPERATORS:
        break
      args.append(arg)
    yield match.group(1), args


def doc_commands() -> list[dict]:
  """Every script command in the docs: file, line, the text as written, script, argv."""
  commands = []
  for path in DOCS:
    variables, current_block = {}, None
    for number, line, block in _logical_lines(path):
      if block != current_block:
        variables, current_block = {}, block
      stripped = line.strip()
      assignment = _ASSIGNMENT.match(stripped)
      if assignment and ' ' not in assignment.group(1):
        # The shell drops the quotes of the assignment and splits `$VAR` into words.
        variables[assignment.group(1)] = ' '.join(shlex.split(assignment.group(2),
                                                              comments=True))
        continue
      if 'experiments/' not in stripped:
        continue
      try:
        tokens = shlex.split(_expand(stripped, variables), comments=True)
      except ValueError as e:
        commands.append({'file': _rel(path), 'line': number, 'text': stripped,
                         'script': None, 'argv': [], 'error': f'not a shell line: {e}'})
        continue
      for script, args in _script_calls(tokens):
        commands.append({'file': _rel(path), 'line': number, 'text': stripped,
                         'script': script, 'argv': args, 'error': None})
  return commands


# Runs in a subprocess: absl's flags are process-wide, and scripts define flags of the same
# names (--workdir, --config), so each script's flags are removed before the next is imported.
_CHECKER = r'''
import importlib.util, json, os, sys
from absl import app, flags, logging  # noqa: F401  (their flags belong to every script)

FLAGS = flags.FLAGS
BASE = set(FLAGS)
commands = json.load(sys.stdin)


def load_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec):
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no file {path}')
  module = load_module('doc_config_' + str(abs(hash(path))), path)
  return module, module.get_config(variant)


def has_field(config, dotted):
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def check_string_config(script, spec, argv):
  module, config = load_config(spec)
  variant = spec.partition(':')[2]
  if script == 'sweep':
    if not hasattr(module, 'get_sweep'):
      raise ValueError(f'{spec.partition(":")[0]} has no get_sweep')
    for point in module.get_sweep(variant):
      for field in point:
        if not has_field(config, field):
          raise ValueError(f'get_sweep({variant!r}) sets {field}, no field of the config')
  for arg in argv:
    if arg.startswith('--set='):
      field = arg[len('--set='):].split('=', 1)[0]
      if not has_field(config, field):
        raise ValueError(f'{arg}: the config has no field {field}')


results = {}
by_script = {}
for i, command in enumerate(commands):
  by_script.setdefault(command['script'], []).append(i)
for script, indices in sorted(by_script.items()):
  for name in set(FLAGS) - BASE:
    delattr(FLAGS, name)
  try:
    load_module('doc_script_' + script, os.path.join('experiments', script + '.py'))
  except BaseException as e:  # noqa: BLE001
    for i in indices:
      results[i] = f'experiments/{script}.py does not import: {type(e).__name__}: {e}'
    continue
  own = set(FLAGS) - BASE
  for i in indices:
    for name in set(FLAGS) - BASE - own:  # a previous command's --config.a.b flags
      delattr(FLAGS, name)
    FLAGS.unparse_flags()
    argv = [f'experiments/{script}.py', *commands[i]['argv']]
    sys.argv = argv  # ml_collections finds the --config.a.b overrides in sys.argv
    try:
      FLAGS(argv)
      if 'config' in FLAGS and FLAGS['config'].value is not None:
        value = FLAGS['config'].value
        if isinstance(value, str):
          check_string_config(script, value, commands[i]['argv'])
        else:
          value.model  # a config file that failed to load raises on first use
      results[i] = None
    except BaseException as e:  # noqa: BLE001
      lines = [line for line in str(e).strip().splitlines() if line.strip()]
      detail = lines[-1].strip() if lines else ''
      if isinstance(e, (KeyError, AttributeError)):
        detail = 'the config has no field ' + str(e).strip(chr(34) + chr(39))
      results[i] = f'{type(e).__name__}: {detail}'
print(json.dumps(results))
'''

COMMANDS = doc_commands()


@pytest.fixture(scope='module')
def parse_results() -> dict[int, str | None]:
  runnable = [c for c in COMMANDS if c['script']]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _CHECKER],
                       input=json.dumps([{'script': c['script'], 'argv': c['argv']}
                                         for c in runnable]),
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, f'the command checker failed:\n{out.stderr[-3000:]}'
  results = json.loads(out.stdout.strip().splitlines()[-1])
  return {id(c): results[str(i)] for i, c in enumerate(runnable)}


def test_the_docs_show_script_commands():
  scripts = {c['script'] for c in COMMANDS}
  assert len(COMMANDS) >= 20 and {'train', 'decode', 'evaluate', 'sweep'} <= scripts, (
      f'found only {len(COMMANDS)} commands ({sorted(s for s in scripts if s)}); has the '
      'extraction of fenced code blocks broken?')


@pytest.mark.parametrize('command', COMMANDS,
                         ids=[f'{c["file"]}:{c["line"]}' for c in COMMANDS])
def test_command_parses_as_written(command, parse_results):
  where = f'{command["file"]}:{command["line"]}: {command["text"]}'
  assert command['error'] is None, f'{where}\n  {command["error"]}'
  assert (ROOT / 'experiments' / f'{command["script"]}.py').is_file(), (
      f'{where}\n  experiments/{command["script"]}.py does not exist')
  error = parse_results[id(command)]
  assert error is None, f'{where}\n  {error}'


def test_readme_is_a_short_guide():
  lines = (ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f'README.md has {len(lines)} lines, more than {README_MAX_LINES}: move details to a '
      'page under docs/ and link to it.')


_LINK = re.compile(r'!?\[(?:[^\]`]|`[^`]*`)*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_CODE_SPAN = re.compile(r'`[^`\n]*`')


def _prose_lines(path: Path):
  """(line number, text) outside fenced code blocks, with inline code blanked."""
  inside = False
  for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if _FENCE.match(line):
      inside = not inside
      continue
    if not inside:
      yield number, _CODE_SPAN.sub('``', line)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading's text."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip().lower())
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def _anchors(path: Path) -> set[str]:
  anchors, seen, inside = set(), {}, False
  for line in path.read_text(encoding='utf-8').splitlines():
    if _FENCE.match(line):
      inside = not inside
      continue
    match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if match and not inside:
      slug = _slug(match.group(1))
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      anchors.add(slug if count == 0 else f'{slug}-{count}')
  return anchors


def test_relative_links_lead_somewhere():
  broken = []
  for path in DOCS:
    for number, line in _prose_lines(path):
      for target in _LINK.findall(line):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
          continue
        file_part, _, anchor = target.partition('#')
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f'{_rel(path)}:{number}: ({target})'
        if not linked.exists():
          broken.append(f'{where}: no file {file_part}')
        elif anchor and linked.suffix == '.md' and anchor not in _anchors(linked):
          broken.append(f'{where}: {_rel(linked)} has no heading #{anchor}')
  assert not broken, 'broken links:\n' + '\n'.join(broken)


# The docs state what lmjax is, does and measured; how it got there belongs in git history.
_HISTORY = re.compile(r'\b(sess(?:ion|ions)|first we tried|previously|now faster|'
                      r'before this change|this round|the earlier|was \S+, now)\b', re.IGNORECASE)


def test_docs_tell_no_history():
  found = [f'{_rel(path)}:{number}: {line.strip()}'
           for path in DOCS for number, line in _prose_lines(path) if _HISTORY.search(line)]
  assert not found, 'narrative of the making (keep the outcome, drop the path):\n' + '\n'.join(
      found)
