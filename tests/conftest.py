"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

import jax  # noqa: E402  (must come after XLA_FLAGS)
import tensorflow as tf  # noqa: E402

# tf.data must not grab the accelerator JAX uses, nor fight it for threads.
tf.config.set_visible_devices([], 'GPU')
jax.config.update('jax_platforms', 'cpu')
