"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import atexit
import os
import shutil
import tempfile

# XLA:CPU aborts the process when one device's thread reaches a collective more than
# 40 s after the others. On a loaded 2-core machine (8 fake devices, tf.data threads,
# another job beside the tests) a thread can be that late without being stuck: 120 s lets
# such runs pass, and still keeps a real hang (a thread that never arrives) from stalling
# the suite for long. The compile level is tests/xla.py's.
from lmjax import console  # imports nothing of JAX or TensorFlow
from tests import xla  # imports nothing of JAX

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + f' {xla.flags(devices=8)}'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=120').strip()
# Many tests train the same tiny models: a compilation cache shared by the whole test run
# (subprocesses included, through the environment) compiles each program once. It starts
# empty at every run, so no test depends on an earlier one.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lmjax-test-xla-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
console.quiet_libraries()  # as the scripts do: no TensorFlow lines in the test output

import jax  # must come after XLA_FLAGS

from lmjax.data import tfdata  # noqa: F401  (TensorFlow as the scripts import it)

jax.config.update('jax_platforms', 'cpu')


def pytest_configure(config):
  """With several workers (`pytest -n 3`, as `make test` runs), the datasets are built here,
  once, before the workers start: the workers would race to download the archive and write
  the same TFDS directory on a fresh machine."""
  if hasattr(config, 'workerinput') or not config.getoption('numprocesses', default=None):
    return
  from lmjax.data import corpora
  for name in corpora.DATASETS:
    corpora.get_builder(name).download_and_prepare()


# The modules that take longest, longest first (worker seconds of `make test` on 2 cores,
# 2026-12-03, in brackets; the whole run took 30.5 minutes that day). `make test` gives each
# module to one worker whole, in the order collected (--no-loadscope-reorder); started first,
# they end beside the short ones instead of after them. A module not listed keeps its place
# after these.
SLOWEST_FIRST = (
    'test_faults.py',  # 486: training processes killed and resumed, the soak
    'test_sharding.py',  # 307
    'test_decode.py',  # 267
    'test_transformer.py',  # 258
    'test_multihost.py',  # 256: two processes of four devices, preempted and resumed
    'test_finetune.py',  # 241
    'test_completion.py',  # 236
    'test_speculative.py',  # 223
    'test_golden.py',  # 192
    'test_train.py',  # 188
    'test_sweep.py',  # 185
    'test_rnn_train.py',  # 170
    'test_storage.py',  # 110 alone: a run at gs:// against a storage emulator
    'test_hf.py',  # 119
    'test_accelerator_check.py',  # 117
    'test_gpt2_tasks.py',  # 117
    'test_rnn.py',  # 103
    'test_tot.py',  # 102: a trained model, then every search strategy
    'test_evaluation.py',  # 95
    'test_dropout.py',  # 94
    'test_console.py',  # 92
    'test_external.py',  # 90
    'test_classify.py',  # 90
    'test_benchmark.py',  # 90
    'test_bad_inputs.py',  # 88
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest
