"""Trains a language model: --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.a.b=V].

Rerunning the same command resumes from the workdir's latest checkpoint. SIGTERM or Ctrl-C
stops after the current step with its checkpoint written. A mistake in the config, the
flags or the workdir is reported in one message, without a traceback (exit status 1).
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax.errors import run_script

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and tokenizer.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume the checkpoints in --workdir even though they were '
    'trained under a config that differs from this one.')
_RESTART = flags.DEFINE_bool(
    'restart_if_all_damaged', False, 'When every checkpoint in --workdir was damaged and set '
    'aside (in unreadable_checkpoints/), train again from step 0 instead of stopping; the '
    'damaged ones stay where they were put. A workdir with a readable checkpoint resumes '
    'from it as always.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run (jax.distributed): on a TPU pod slice or '
    'under SLURM JAX finds the other processes itself; elsewhere give --coordinator_address, '
    '--num_processes and --process_id. Every process runs the same command.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, e.g. host0:8476 (implies '
    '--distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes - 1.')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds a process waits for all of the run\'s processes to '
    'join before it stops with a message.', lower_bound=1)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    config = _CONFIG.value
    config.model  # noqa: B018  (a config that failed to load raises here, on first use)
  except OSError as e:  # ml_collections could not load the --config file
    detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    sys.exit(f'error: --config: {detail}. Name a Python file in configs/, e.g. '
             '--config=configs/shakespeare_char.py:tiny')
  from lmjax import runtime, train  # after the flags: a typo is reported fast

  runtime.stop_with_parent()  # a no-op unless a sweep started this run
  runtime.use_compilation_cache()

  # A UserError or a missing file: run_script prints it as one line.
  if _DISTRIBUTED.value or _COORDINATOR.value:
    runtime.start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                              timeout=_DISTRIBUTED_TIMEOUT.value)
  train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                           restart_if_all_damaged=_RESTART.value)


if __name__ == '__main__':
  run_script(main)
