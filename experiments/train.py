"""Trains a language model: --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.a.b=V]."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from absl import logging  # noqa: E402

from lmjax import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and tokenizer.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Library INFO logs (TFDS, orbax, the metric writer's echo) would drown the progress lines.
  logging.set_verbosity(logging.WARNING)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
