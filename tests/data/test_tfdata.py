"""TensorFlow imported for tf.data alone: Keras stays out until something asks for it."""
import subprocess
import sys

# Each check runs in a fresh interpreter: this one imported TensorFlow long ago.
AFTER_LMJAX = '''
import sys
from lmjax import generation, workdir  # what experiments/decode.py imports
from lmjax.data.tfdata import tf
print(sorted({name.split('.')[0] for name in sys.modules} & {'keras', 'matplotlib'}))
print(int(tf.data.Dataset.range(4).reduce(tf.constant(0, tf.int64), lambda a, b: a + b)))
print(tf.keras.layers.Dense.__module__.split('.')[0])  # loaded now, on first use
'''
KERAS_FIRST = '''
import keras
from lmjax.data.tfdata import tf
import sys
print(sys.modules['keras'] is keras, tf.keras.layers.Dense is keras.layers.Dense)
'''


def _run(code):
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.splitlines()


def test_decoding_imports_tensorflow_without_keras_and_tf_keras_still_loads():
  assert _run(AFTER_LMJAX) == ['[]', '6', 'keras']


def test_a_process_that_imported_keras_first_keeps_it():
  assert _run(KERAS_FIRST) == ['True True']
