"""TensorFlow imported for tf.data alone, on first use: decoding and evaluating never load it,
and Keras stays out until something asks for it."""
import subprocess
import sys

from lmjax import events

# Each check runs in a fresh interpreter: this one imported TensorFlow long ago. `loaded()`
# names which of these it holds.
LOADED = '''
import sys
def loaded(names=('keras', 'matplotlib', 'tensorflow')):
  return sorted({name.split('.')[0] for name in sys.modules} & set(names))
'''
AFTER_LMJAX = '''
from lmjax import evaluation, generation, workdir  # what decode.py and evaluate.py import
from lmjax.data.tfdata import tf
print(loaded())
print(int(tf.data.Dataset.range(4).reduce(tf.constant(0, tf.int64), lambda a, b: a + b)))
print(loaded())  # TensorFlow on first use, Keras still out
print(tf.keras.layers.Dense.__module__.split('.')[0])  # loaded now, on first use
'''
# The writer and the TFDS datasets are what first needs TensorFlow in a training run; it
# must come through lmjax.data.tfdata, which hides the GPU from it before its runtime starts
# and holds Keras back. Writing hyperparameters loads no Keras either (TensorBoard's
# `hparams.api` would).
WRITER = '''
import sys, tempfile
from lmjax import events, sweep, train
from lmjax.data import tfdata
print('tensorflow' in sys.modules)
writer = events.open_writer(tempfile.mkdtemp())
writer.write_hparams({'opt.lr': 0.5, 'model.name': 'transformer'})
writer.write_scalars(1, {'train/loss': 2.5})
writer.write_texts(1, {'sample': 'ROMEO:'})
writer.close()
print('tensorflow' in sys.modules, tfdata.tensorflow.cache_info().misses)
print(loaded(('keras', 'matplotlib')))
'''
DATASET = '''
import sys
from lmjax.data import corpora, tfdata
print(len(corpora.load_split_texts('milton', 'validation')) > 0,
      tfdata.tensorflow.cache_info().misses)
print(loaded(('keras', 'matplotlib')))
'''
# A sweep's summary reads the points' event files, and TensorBoard's reader imports
# TensorFlow itself.
READER = '''
import sys
from lmjax import events
from lmjax.data import tfdata
print(events.read_scalars(sys.argv[1]), tfdata.tensorflow.cache_info().misses)
print(loaded(('keras', 'matplotlib')))
'''
KERAS_FIRST = '''
import keras
from lmjax.data.tfdata import tf
import sys
print(sys.modules['keras'] is keras, tf.keras.layers.Dense is keras.layers.Dense)
'''


def _run(code, *args):
  done = subprocess.run([sys.executable, '-c', LOADED + code, *args], capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.splitlines()


def test_tensorflow_loads_on_first_use_without_keras_and_tf_keras_still_loads():
  assert _run(AFTER_LMJAX) == ['[]', '6', "['tensorflow']", 'keras']


def test_importing_training_loads_no_tensorflow_and_a_writer_loads_it_through_tfdata():
  assert _run(WRITER) == ['False', 'True 1', '[]']


def test_reading_a_tfds_dataset_loads_tensorflow_through_tfdata():
  assert _run(DATASET) == ['True 1', '[]']


def test_a_process_that_imported_keras_first_keeps_it():
  assert _run(KERAS_FIRST) == ['True True']


def test_reading_event_files_loads_tensorflow_through_tfdata(tmp_path):
  writer = events.open_writer(str(tmp_path))
  writer.write_scalars(3, {'eval/loss': 1.5})
  writer.close()
  assert _run(READER, str(tmp_path)) == ["{'eval/loss': {3: 1.5}} 1", '[]']
