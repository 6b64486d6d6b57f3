"""TensorFlow as lmjax uses it, for tf.data alone: `from lmjax.data.tfdata import tf`.

`tf` stands for the module and imports it on first use, so a process that never builds a
tf.data pipeline never loads TensorFlow: `experiments/decode.py` and `evaluate.py` read
checkpoints, tokenizers and token arrays only. On a tiny run `decode.py` took 3.72
CPU-seconds against 6.37 with TensorFlow imported (median of 4 runs each, alternating,
2-core AMD EPYC, 2026-12-05).

`import tensorflow` also imports Keras 3 whole (TensorFlow registers Keras's optimizers as
it loads, and Keras loads matplotlib), which lmjax never uses. Keras is held back while
TensorFlow loads; `tf.keras` still imports it on first use, and a process that imported
Keras before keeps it. TensorFlow is also kept off the GPU that JAX trains on. TFDS and
TensorBoard import TensorFlow themselves on first use, so what needs them in a training run
(lmjax.events' writer, the dataset builders in lmjax.data.corpora and lmjax.data.external)
calls `tensorflow()` first: a training process then loads neither Keras nor matplotlib, about
1 CPU-second less at its start (a `:tiny` run 12.2-13.5 against 13.3-14.0 CPU-seconds, three
runs each, alternated, 2026-12-05).
"""
import functools
import sys


@functools.cache
def tensorflow():
  """TensorFlow, imported on the first call, without Keras and off the GPU."""
  hold_keras = 'keras' not in sys.modules
  if hold_keras:
    sys.modules['keras'] = None  # an import of keras fails at once; TensorFlow allows it
  try:
    import tensorflow as tf_module
  finally:
    if hold_keras:
      del sys.modules['keras']
  tf_module.config.set_visible_devices([], 'GPU')
  return tf_module


class _LazyTensorFlow:
  """Stands for the `tensorflow` module; the first attribute read imports it."""

  def __getattr__(self, name):
    return getattr(tensorflow(), name)


tf = _LazyTensorFlow()
