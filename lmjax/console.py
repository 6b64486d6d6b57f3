"""What the scripts in experiments/ print: lmjax's own lines, and the libraries' logs only
when something is wrong.

Left alone, TensorFlow (under tf.data and TFDS) writes C++ log lines when it loads, and
TFDS, orbax and clu log at INFO every file they open. Each script calls
`quiet_libraries()` before it imports anything else, and `errors.run_script` calls
`quiet_python_logs()` once the flags are parsed. A variable the user set, or absl's
--verbosity flag, wins over both (docs/guide/training.md says how to get the logs back).
"""
import logging
import os

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
  of absl, TFDS, orbax, clu and TensorFlow are held back. Does nothing when the command
  line gave absl's --verbosity (or -v): then that level holds for every library."""
  from absl import flags
  from absl import logging as absl_logging

  if flags.FLAGS['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger('jax').setLevel(logging.WARNING)
