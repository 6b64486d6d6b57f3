"""TensorFlow as lmjax uses it, for tf.data alone: `from lmjax.data.tfdata import tf`.

`import tensorflow` also imports Keras 3 whole (TensorFlow registers Keras's optimizers as
it loads, and Keras loads matplotlib), which lmjax never uses. Keras is held back while
TensorFlow loads; `tf.keras` still imports it on first use, and a process that imported
Keras before keeps it. A training run loads it anyway, when it opens its TensorBoard writer
(TensorBoard's hparams plugin defines a Keras callback as it loads); decoding does not:
`experiments/decode.py` on a tiny run took 9.95 s against 11.94 s with Keras (median of 4
runs each, alternating, 2-core AMD EPYC, 2026-12-04). TensorFlow is also kept off the GPU
that JAX trains on.
"""
import sys


def _import_tensorflow():
  hold_keras = 'keras' not in sys.modules
  if hold_keras:
    sys.modules['keras'] = None  # an import of keras fails at once; TensorFlow allows it
  try:
    import tensorflow
  finally:
    if hold_keras:
      del sys.modules['keras']
  tensorflow.config.set_visible_devices([], 'GPU')
  return tensorflow


tf = _import_tensorflow()
