"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
  """Something the user gave (a config field, a flag, a file, a workdir) is wrong, or a run
  stopped for a reason the user must act on. The message names the problem and the fix;
  the entry scripts print it without a traceback and exit with status 1."""


def one_line(text) -> str:
  """`text` (an exception's message, another program's output) with its runs of
  whitespace, line ends included, as single spaces: it fits an `error: ...` line."""
  return ' '.join(str(text).split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag it refuses (a bad value, a missing required flag,
  an error inside a --config file, an override of a config field that does not exist)
  reported as one `error: ...` line and exit status 1, instead of absl's two lines or a
  traceback."""
  import re
  import sys

  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # An exception inside a config file arrives as a formatted traceback: its last line
    # is the exception, 'module.TypeName: message'.
    if any(line.startswith('Traceback') for line in lines):
      message = re.sub(r'^[\w.]+: ', '', lines[-1])
    else:
      message = one_line(e)
    sys.exit(f'error: {message} (--helpfull lists the flags)')
  except SyntaxError as e:  # a --config file that is not Python
    sys.exit(f'error: {e.filename}, line {e.lineno}: {e.msg}; a --config file is Python, '
             'e.g. --config=configs/shakespeare_char.py:tiny')
  except (KeyError, AttributeError) as e:  # a --config.* override names no field
    name = str(e).strip('"\'')
    culprits = [a for a in argv if a.startswith('--config.') and name in a.split('=')[0]]
    sys.exit(f'error: {culprits[0] if culprits else name}: the config has no such field '
             f'({e}); every field is listed, with a comment, in the --config file.')


def run_script(main, **kwargs) -> None:
  """absl's `app.run(main, **kwargs)` for the scripts in experiments/: a mistake the user
  can fix (a UserError, a missing file, a flag refused by `app.UsageError` or by absl's
  parsing) ends the process with one line, `error: ...`, and exit status 1, instead of a
  traceback or absl's whole help text before the message. Ctrl-C that reaches it prints
  `interrupted (Ctrl-C)` and exits with status 130, the shell's code for it. The libraries'
  Python logs are held back below ERROR (`console.quiet_python_logs`)."""
  import sys

  from absl import app

  from lmjax import console

  def checked_main(argv):
    console.quiet_python_logs()
    try:
      return main(argv)
    except (app.UsageError, UserError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')
    except KeyboardInterrupt:  # Ctrl-C outside training's stop handling, or a second one
      print('\ninterrupted (Ctrl-C)', file=sys.stderr, flush=True)
      sys.exit(130)

  kwargs.setdefault('flags_parser', parse_flags)
  try:
    app.run(checked_main, **kwargs)
  except SystemExit as e:
    if e.code not in (None, 0):
      raise
    _exit_without_teardown()


def _exit_without_teardown() -> None:
  """Ends a script that finished well without Python's teardown of every module, which for
  JAX, TensorFlow and orbax takes about 1.5 s of a CPU and does nothing the script needs:
  first the rest of a normal exit is done (other threads finished, the atexit functions
  run, jax.distributed's shutdown and logging's among them, stdout and stderr flushed),
  then the process exits with status 0. The scripts close their own files, checkpointers
  and TensorBoard writers before they return."""
  import atexit
  import os
  import sys
  import threading

  for thread in threading.enumerate():
    if thread is not threading.main_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # what Python's own exit runs at this point
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)
