"""Runs a config file's sweep: --config=configs/NAME.py[:ARG] --workdir=ROOT.

Each point of `get_sweep(ARG)` trains in ROOT/<point name> through experiments/train.py,
one after another or --parallel=N at a time; points that finished are skipped and
interrupted ones resume. At the end (or with --summarize alone) ROOT gets summary.md,
summary.csv and curves.png, read back from the points' event files. --dry_run prints one
train command per point (for a cluster scheduler) and runs nothing.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import os
import sys

from absl import app, flags

from lmjax import storage, sweep
from lmjax.errors import UserError, run_script

_CONFIG = flags.DEFINE_string('config', None, 'Config file with get_sweep, and its argument: '
                              'configs/NAME.py[:ARG].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep root; each point trains in ROOT/<name>.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'How many points train at the same time.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print one train command per point; run nothing.')
_SUMMARIZE = flags.DEFINE_bool('summarize', False, 'Only write the summary of what ROOT holds '
                               '(no --config needed).')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if not _SUMMARIZE.value:
      if not _CONFIG.value:
        raise UserError('--config is needed to run a sweep (only --summarize goes without).')
      outcome = sweep.run(_CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value,
                          dry_run=_DRY_RUN.value)
      if _DRY_RUN.value:
        return
    rows = sweep.summarize(_WORKDIR.value)
  except KeyboardInterrupt:  # the trainers got Ctrl-C too and wrote their checkpoints
    print('\nInterrupted; run the same command to resume the unfinished points.')
    sys.exit(130)
  print('\n' + storage.read_text(os.path.join(_WORKDIR.value, 'summary.md')))
  print(f'Summary: {_WORKDIR.value}/summary.md, summary.csv and curves.png '
        f'({len(rows)} points). TensorBoard: tensorboard --logdir={_WORKDIR.value}')
  if not _SUMMARIZE.value:
    failed = [name for name, result in outcome.items() if result == 'failed']
    stopped = [name for name, result in outcome.items() if result == 'stopped']
    if stopped:
      print(f'Stopped before the end: {", ".join(stopped)}. Run the same command to go on.')
    if failed:
      sys.exit(f'error: {len(failed)} point(s) failed: {", ".join(failed)}; see their '
               f'{sweep.LOG_FILE}. Fix the cause and run the same command: finished points '
               'are skipped.')


if __name__ == '__main__':
  run_script(main)
