"""The same behaviour: five kinds of tiny run against the scalars, texts and final
parameters recorded in tests/golden.json.

On the kind of machine the file was recorded on (the same jaxlib, the same vector
extensions of the processor, the tests' compile flags, as many cores) every number must be
equal bit for bit. Elsewhere numbers are compared to a relative 1e-5: XLA compiles for the
processor it runs on, and the same run on a machine with AVX-512 and on one without differs
in the last bits of a float32 (seen: 1e-7 relative in a loss after four steps). A change in
what a run computes moves them far more than that. The attention key biases are left out of that
comparison: a bias added to every key shifts all of a query's scores alike, so the softmax
gives it a zero gradient in exact arithmetic, and what it receives is rounding noise that
Adam's normalised step turns into moves the size of the learning rate, whose sign differs
from one processor to another.

Any change to what a run computes (a default, the data order, a loss, the optimizer, the
sample) shows here. A change meant to alter results re-records the file, and says so in its
commit:

    LMJAX_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py
"""
import json
import os

import jax
import jaxlib
import numpy as np
import pytest

from configs import authorship, rnn_shakespeare_char, shakespeare_char
from lmjax import events
from tests import xla

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden.json')
# Wall-clock figures differ from run to run; everything else must not.
TIMED = ('train/tokens_per_sec', 'train/mfu')


def _short(config, **train):
  config.unlock()
  # The whole validation split, as golden.json was recorded.
  config.train.update(num_steps=4, eval_every=4, log_every=2, checkpoint_every=4,
                      eval_batches=0, **train)
  config.opt.warmup_steps = 2
  return config


def _runs() -> dict:
  """name -> (config, number of devices) of each kind of run; the language model and the
  stream accumulate gradients over 2 slices on 2 devices (the one all-reduce, and GSPMD
  with a carry)."""
  lm = _short(shakespeare_char.get_config('tiny'), sample_tokens=12, microbatches=2)
  stream = _short(rnn_shakespeare_char.get_config('tiny'), sample_tokens=12, microbatches=2)
  mlm = _short(shakespeare_char.get_config('tiny'))
  mlm.model.causal = False
  mixture = _short(shakespeare_char.get_config('tiny'), sample_tokens=12)
  mixture.data.update(mixture=('shakespeare:0.7', 'milton:0.3'), drop_unknown_chars=True)
  classifier = _short(authorship.get_config('tiny'))
  return {'transformer_lm': (lm, 2), 'lstm_stream': (stream, 2), 'masked_lm': (mlm, 1),
          'mixture': (mixture, 1), 'classifier': (classifier, 2)}


def _summary(x) -> dict:
  """A parameter in a few numbers: its shape and dtype, its sum, the sum of its magnitudes
  and its first and last entries."""
  x = np.asarray(x)
  flat = x.astype(np.float64).ravel()
  return {'shape': f'{x.dtype}{list(x.shape)}', 'sum': float(flat.sum()),
          'abs_sum': float(np.abs(flat).sum()), 'first': float(flat[0]), 'last': float(flat[-1])}


def observe(config, devices: int, workdir: str) -> dict:
  """What a run leaves behind that must not change: its logged scalars and texts, its
  result, and a summary of each final parameter."""
  from lmjax import train, workdir as workdir_lib
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:devices])
  scalars = {tag: {str(s): v for s, v in sorted(values.items())}
             for tag, values in events.read_scalars(workdir).items() if tag not in TIMED}
  texts = _texts(workdir)
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  del result['train_seconds']
  _, _, params, _ = workdir_lib.load_trained(workdir)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  summaries = {jax.tree_util.keystr(path): _summary(leaf) for path, leaf in leaves}
  return {'scalars': scalars, 'texts': texts, 'result': result, 'params': summaries}


def _texts(workdir: str) -> dict:
  """{tag: {step: text}} of the text summaries but the config (whose JSON lists fields)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  tags = [tag for tag in acc.Tags()['tensors'] if tag != 'config' and
          acc.SummaryMetadata(tag).plugin_data.plugin_name == 'text']
  return {tag: {str(e.step): e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
          for tag in tags}


RECORD = bool(os.environ.get('LMJAX_RECORD_GOLDEN'))
# Instruction-set extensions that change the code XLA emits for a CPU.
_VECTOR = ('sse4', 'avx', 'fma', 'f16c', 'amx')


def machine() -> str:
  """What the compiled numbers depend on besides lmjax: jaxlib's version, the processor's
  vector extensions, the compile flags of the tests and the cores the process may use
  (XLA:CPU splits some reductions by them: on one core of this 2-core machine three of the
  five runs differed in the last bits)."""
  extensions = []
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      line = next((line for line in f if line.startswith('flags')), '')
    extensions = sorted(f for f in line.split()[2:] if f.startswith(_VECTOR))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'jaxlib {jaxlib.__version__}; {xla.COMPILE}; {" ".join(extensions)}; {cores} cores'


@pytest.fixture(scope='module')
def golden():
  if RECORD:
    recorded = {'machine': machine()}
    yield recorded
    with open(GOLDEN, 'w') as f:
      json.dump(recorded, f, indent=1, sort_keys=True)
      f.write('\n')
    return
  with open(GOLDEN) as f:
    yield json.load(f)


@pytest.mark.parametrize('name', list(_runs()))
def test_a_tiny_run_computes_what_it_always_has(name, golden, tmp_path):
  config, devices = _runs()[name]
  observed = observe(config, devices, str(tmp_path))
  if RECORD:
    golden[name] = observed
  expected = golden[name]
  assert observed['texts'] == expected['texts']
  if golden['machine'] == machine():
    assert _numbers(observed) == _numbers(expected)  # bit for bit
  else:
    assert _rounded(observed) == pytest.approx(_rounded(expected), rel=1e-5, abs=1e-6)
  assert _strings(observed) == _strings(expected)


def _flat(tree, prefix=()) -> dict:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, (*prefix, key)).items()}
  return {'/'.join(prefix): tree}


def _numbers(observed) -> dict:
  """Every number of `observed` by its path (every field and step is there, or the keys
  differ)."""
  return {k: v for k, v in _flat(observed).items() if isinstance(v, (int, float))}


# Parameters whose gradient is zero in exact arithmetic (see the module's docstring).
_NOISE = "['key']['bias']"


def _rounded(observed) -> dict:
  """_numbers but the parameters that only rounding moves."""
  return {k: v for k, v in _numbers(observed).items() if _NOISE not in k}


def _strings(observed) -> dict:
  return {k: v for k, v in _flat(observed).items() if not isinstance(v, (int, float))}
