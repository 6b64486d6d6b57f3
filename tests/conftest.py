"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

# XLA:CPU aborts the process when one device's thread reaches a collective more than
# 40 s after the others. On a loaded 2-core machine (8 fake devices, tf.data threads,
# another job beside the tests) that aborted the training tests in 3 of 4 runs; a late
# thread is slow, not stuck, so the tests give it 10 minutes.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=600').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

import jax  # noqa: E402  (must come after XLA_FLAGS)
import tensorflow as tf  # noqa: E402

# tf.data must not grab the accelerator JAX uses, nor fight it for threads.
tf.config.set_visible_devices([], 'GPU')
jax.config.update('jax_platforms', 'cpu')
