"""What the scripts in experiments/ print: lmjax's own lines, and the libraries' logs only
when something is wrong; and `progress`, the one progress bar they draw (a dataset build).

Left alone, TensorFlow (under tf.data and TFDS) writes C++ log lines when it loads, and
TFDS and orbax log at INFO every file they open. Each script calls
`quiet_libraries()` before it imports anything else, and `errors.run_script` calls
`quiet_python_logs()` once the flags are parsed. A variable the user set, or absl's
--verbosity flag, wins over both (docs/guide/training.md says how to get the logs back).
"""
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

# Read by the C++ libraries as they load, so set before the first import of TensorFlow
# or JAX. A value already in the environment is kept.
ENVIRONMENT = {
    # TensorFlow's and XLA's C++ logs: errors only (0 shows everything).
    'TF_CPP_MIN_LOG_LEVEL': '2',
    # TensorFlow announces its oneDNN kernels at import with an INFO line that no log level
    # holds back (absl prints everything logged before its logging is set up). lmjax runs
    # only tf.data's integer and string ops, which do not use those kernels.
    'TF_ENABLE_ONEDNN_OPTS': '0',
    # No probe for a Google Cloud metadata server (a wait, then a warning, off that cloud).
    'NO_GCE_CHECK': 'true',
}


def quiet_libraries() -> None:
  """Sets the environment variables of ENVIRONMENT that the user has not set."""
  for name, value in ENVIRONMENT.items():
    os.environ.setdefault(name, value)


def quiet_python_logs() -> None:
  """Lets through Python logs at ERROR and above (orbax naming a damaged checkpoint, say),
  and JAX's warnings (an accelerator it found but cannot use); the INFO and WARNING lines
  of absl, TFDS, orbax and TensorFlow are held back. Does nothing when the command
  line gave absl's --verbosity (or -v): then that level holds for every library."""
  from absl import flags
  from absl import logging as absl_logging

  if flags.FLAGS['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger('jax').setLevel(logging.WARNING)


# Where progress goes while a library's own prints are held back (see `progress_to`).
_progress_stream = None
# How often a progress line is printed where it cannot be redrawn (a log file, a pipe).
PLAIN_SECONDS = 10.0
_now = time.monotonic  # the clock of the intervals above (the tests set their own)


@contextlib.contextmanager
def progress_to(stream):
  """Progress bars opened inside go to `stream` (the console, while stdout is redirected
  away from a library's prints)."""
  global _progress_stream
  before, _progress_stream = _progress_stream, stream
  try:
    yield
  finally:
    _progress_stream = before


def progress(items: Iterable, label: str, total: int, unit: str = 'examples') -> Iterator:
  """Yields `items`, counting them against `total`. On a terminal, one line redrawn in
  place: `  countdown train [#########-----------]  55,012 / 120,833 examples`; elsewhere
  (a log file, a pipe) a plain line every PLAIN_SECONDS, and nothing for quick work."""
  stream = _progress_stream or sys.stdout
  redraw = stream.isatty()
  done, shown = 0, _now()

  def line() -> str:
    if not redraw:
      return f'  {label}: {done:,} of {total:,} {unit}\n'
    filled = min(20, 20 * done // total) if total else 20
    count = f'{done:,}'.rjust(len(f'{total:,}'))
    return f'\r  {label} [{"#" * filled}{"-" * (20 - filled)}] {count} / {total:,} {unit}'

  for item in items:
    yield item
    done += 1
    now = _now()
    if now - shown >= (0.2 if redraw else PLAIN_SECONDS):
      shown = now
      stream.write(line())
      stream.flush()
  if redraw:
    stream.write(line() + '\n')
    stream.flush()
