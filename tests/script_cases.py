"""Many command lines of the experiments/ scripts, run in one fresh process.

Each case is what a user types: `python experiments/NAME.py FLAGS...`. The process loads each
script once, then for every case parses the flags anew and calls the script's entry point
through absl, as `python` would. It keeps what reached stdout and stderr and the exit status
Python would give: a SystemExit's code (its text printed, status 1), or a traceback and
status 1 for an exception nothing caught. One process instead of one per case saves the
seconds of importing JAX and TensorFlow for each.

  results = script_cases.run({'bad-step': ('decode.py', ['--workdir=w', '--step=-1'])})
  results['bad-step'].returncode, results['bad-step'].stderr
"""
import contextlib
import dataclasses
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str


def run(cases: dict[str, tuple[str, list[str]]], env: dict | None = None,
        timeout: float = 600) -> dict[str, Result]:
  """Runs every case {id: (script file name in experiments/, flags)} in one new process
  started in the repository root; returns {id: Result}."""
  with tempfile.TemporaryDirectory() as tmp:
    cases_file, results_file = os.path.join(tmp, 'cases.json'), os.path.join(tmp, 'out.json')
    with open(cases_file, 'w') as f:
      json.dump(cases, f)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), cases_file, results_file],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    with open(results_file) as f:
      return {key: Result(**value) for key, value in json.load(f).items()}


def _entry_point(script: str):
  """Runs the script as __main__ with absl's app.run held back; returns what the script
  would have called it with, its docstring (absl's usage message prints it) and the names
  of the flags it defined."""
  from absl import app, flags
  before = set(flags.FLAGS)
  calls = []
  real_run = app.run
  app.run = lambda main, *args, **kwargs: calls.append((main, args, kwargs))
  try:
    script_globals = runpy.run_path(os.path.join(REPO, 'experiments', script),
                                    run_name='__main__')
  finally:
    app.run = real_run
  assert len(calls) == 1, f'{script} did not call app.run once'
  return calls[0], script_globals['__doc__'], set(flags.FLAGS) - before


def _exit_status(code) -> tuple[int, str]:
  """Python's handling of SystemExit(code): status and what it prints to stderr."""
  if code is None:
    return 0, ''
  if isinstance(code, int):
    return code, ''
  return 1, f'{code}\n'


def _run_case(entry, script: str, argv: list[str]) -> dict:
  from absl import app, flags
  from absl import logging as absl_logging
  main, args, kwargs = entry
  flags.FLAGS.unparse_flags()
  defined = set(flags.FLAGS)
  out, err = io.StringIO(), io.StringIO()
  handler = absl_logging.get_absl_handler().python_handler
  stream, handler.stream = handler.stream, err
  sys_argv, sys.argv = sys.argv, [script, *argv]  # ml_collections reads overrides from it
  returncode = 0
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        app.run(main, *args, argv=[script, *argv], **kwargs)
      except SystemExit as e:
        returncode, text = _exit_status(e.code)
        err.write(text)
      except BaseException:  # noqa: BLE001 - Python would print it and exit 1
        traceback.print_exc(file=err)
        returncode = 1
  finally:
    handler.stream, sys.argv = stream, sys_argv
    _forget_flags(set(flags.FLAGS) - defined)  # ml_collections' --config.* overrides
  return dict(returncode=returncode, stdout=out.getvalue(), stderr=err.getvalue())


def _forget_flags(names: set[str]) -> None:
  """Drops the flags a script defined, so that the next can define its own."""
  from absl import flags
  for name in names:
    delattr(flags.FLAGS, name)


def _main(cases_file: str, results_file: str) -> None:
  sys.path.insert(0, REPO)
  with open(cases_file) as f:
    cases = json.load(f)
  results = {}
  for script in dict.fromkeys(script for script, _ in cases.values()):
    entry, doc, names = _entry_point(script)
    sys.modules['__main__'].__doc__ = doc
    for key, (name, argv) in cases.items():
      if name == script:
        results[key] = _run_case(entry, script, argv)
    _forget_flags(names)
  with open(results_file, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  _main(*sys.argv[1:])


def error_line(result: Result) -> str:
  """The one line a refused command prints, `error: ...`, with exit status 1; fails if
  stderr holds anything else (absl's help text, a traceback)."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), result
  return lines[0]
