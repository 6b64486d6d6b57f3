"""The train step, the evaluation step and the decoder's sampling loop, lowered for NVIDIA GPUs
('cuda') and TPUs from this CPU machine, on a mesh of 8 devices with FSDP and tensor
parallelism, in bfloat16.

Lowering only: JAX lowers a jitted function for a platform it does not have
(`lowering_platforms`), but compiling needs that platform's compiler (jaxlib for CPU has
neither XLA:GPU nor XLA:TPU), so these tests read the StableHLO text that would be compiled
there. They check what each platform's program must hold:

- `model.attention='cudnn'` reaches cuDNN's fused attention on CUDA, in the forward and the
  backward pass, and `'dot_product'` does not. On a mesh, JAX lowers cuDNN's attention as a
  `CustomSPMDPartitioning` call whose partitioner (cuDNN's, named by the test) writes the
  `__cudnn$fmha...` calls when XLA:GPU splits the program; on one device the calls are in the
  text itself.
- Every argument (parameters, optimizer state, batch) carries the sharding the mesh implies
  (`sdy.sharding` on a mesh of data 1 x fsdp 4 x tensor 2), parameters split over both axes.
- Nothing inside a step moves data to or from the host: no outfeed or infeed, no send or
  recv, no Python callback.

The model is built from the config without `config.validate_config`, which refuses cuDNN
on a machine without an NVIDIA GPU. JAX asks cuDNN for its version while tracing, and this
machine has no cuDNN: the tests give it 9.8, the oldest cuDNN the `cuda` extra accepts.
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import custom_partitioning
from jax._src.cudnn import fused_attention_stablehlo

from configs import shakespeare_char
from lmjax import decode, models, optim, sharding, state as state_lib, steps

MESH_SHAPE = (1, 4, 2)  # data, fsdp, tensor
VOCAB, BATCH, SEQ_LEN, LAYERS = 64, 8, 32, 2
# cuDNN 9.8 (major * 10000 + minor * 100), the oldest jax-cuda12-plugin 0.10.2 accepts.
CUDNN_VERSION = 90800
# What moves data between device and host inside a program: infeed / outfeed, send / recv
# (TPU host transfers), and the custom calls of jax.pure_callback / io_callback /
# jax.debug.* on every platform.
HOST_TRANSFERS = re.compile(
    r'outfeed|infeed|stablehlo\.send|stablehlo\.recv|host_transfer|host_callback'
    r'|xla_python_\w*callback|xla_ffi_python_\w*callback|xla_ffi_partitioned_python_\w*callback')
# The partitioner JAX calls back while XLA splits a program (at compile time, not while it
# runs). Each is named by its backend_config; the partitioners lmjax may use are cuDNN's.
CUSTOM_PARTITIONING = re.compile(
    r'custom_call @CustomSPMDPartitioning\(.*?backend_config = "(\d+)"')
CUDNN_CALLS = re.compile(r'custom_call @(__cudnn\$fmha\w*)')


@pytest.fixture
def cudnn(monkeypatch):
  """JAX's cuDNN attention traces on this machine, as on a GPU with cuDNN 9.8."""
  monkeypatch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: CUDNN_VERSION)


def _config(attention: str, mesh_shape=MESH_SHAPE):
  """A tiny bfloat16 Transformer (head width 16) with `attention`, on `mesh_shape`."""
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=LAYERS, num_heads=4, d_model=64, d_ff=128, max_len=SEQ_LEN,
                      dtype='bfloat16', attention=attention, dropout=0.0)
  config.train.update(batch_size=BATCH, seq_len=SEQ_LEN)
  config.mesh.shape = mesh_shape
  return config


def _parts(attention: str, mesh_shape=MESH_SHAPE):
  """(model, optimizer, mesh, rules, abstract state, state shardings): the state as
  ShapeDtypeStructs laid out as `state.create_train_state` lays it out, nothing allocated."""
  config = _config(attention, mesh_shape)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = state_lib.build_model(config, VOCAB)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  boxed = jax.eval_shape(functools.partial(
      state_lib.init_state, model=model, tx=tx, seq_len=SEQ_LEN, unbox=False),
      jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return model, tx, mesh, rules, abstract, shardings


def _batch(mesh, weights: bool = False):
  rows = sharding.batch_sharding(mesh)
  batch = {key: jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32, sharding=rows)
           for key in ('inputs', 'targets')}
  if weights:
    batch['weights'] = jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.float32, sharding=rows)
  return batch


def _lower_steps(platform: str, attention: str, mesh_shape=MESH_SHAPE):
  """(train step text, eval step text, expected argument specs of each) lowered for
  `platform` with lmjax's jitted steps (`steps.jit_steps`)."""
  model, tx, mesh, rules, state, shardings = _parts(attention, mesh_shape)
  step_fn, eval_fn = steps.jit_steps(model, tx, mesh, rules, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train = step_fn.trace(state, _batch(mesh), jax.random.key(0)).lower(
        lowering_platforms=(platform,))
    evaluate = eval_fn.trace(state.params, _batch(mesh, weights=True)).lower(
        lowering_platforms=(platform,))
  return train, evaluate, (state, _batch(mesh)), (state.params, _batch(mesh, weights=True))


def _arguments(text: str) -> list[tuple[str, tuple | None]]:
  """(shape, mesh axes of each dimension) of each argument of the lowered program's main
  function, from its `sdy.sharding` attribute; None for an argument without one."""
  signature = re.search(r'func\.func public @main\((.*?)\) ->', text).group(1)
  out = []
  for arg in re.split(r'%arg\d+: ', signature)[1:]:
    shape = re.match(r'tensor<((?:\d+x)*)', arg).group(1).rstrip('x')
    dims = re.search(r'#sdy\.sharding<@mesh, \[(.*?)\]>', arg)
    out.append((shape, None if dims is None else tuple(
        tuple(re.findall(r'"(\w+)"', dim)) for dim in re.findall(r'\{[^}]*\}', dims.group(1)))))
  return out


def _expected(args) -> list[tuple[str, tuple]]:
  """(shape, mesh axes of each dimension) of each array in `args`, by its sharding."""
  out = []
  for leaf in jax.tree.leaves(args):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      out.append(('2', ((),)))  # a key is lowered as its two uint32 words
      continue
    spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
    out.append(('x'.join(map(str, leaf.shape)), tuple(
        () if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec)))
  return out


def _partitioners(lowered) -> list[str]:
  """The module of the partitioner behind each CustomSPMDPartitioning call of `lowered`."""
  return [custom_partitioning._sharding_callbacks[key.encode()].partition.__module__
          for key in CUSTOM_PARTITIONING.findall(lowered.as_text())]


def _check_mesh_and_transfers(text: str, args) -> None:
  """The program runs on the 1 x 4 x 2 mesh, every argument laid out as its sharding says,
  and nothing in it moves data to or from the host."""
  assert 'sdy.mesh @mesh = <["data"=1, "fsdp"=4, "tensor"=2]>' in text
  arguments = _arguments(text)
  assert arguments == _expected(args)
  # Parameters split over both axes: an attention kernel's embed (fsdp) and heads (tensor).
  assert ('64x4x16', (('fsdp',), ('tensor',), ())) in arguments
  assert not HOST_TRANSFERS.findall(text)


@pytest.mark.usefixtures('cudnn')
def test_cudnn_attention_reaches_cudnn_on_a_gpu_mesh_in_training_and_evaluation():
  train, evaluate, train_args, eval_args = _lower_steps('cuda', 'cudnn')
  cudnn_module = fused_attention_stablehlo.__name__
  # One forward and one backward attention a layer in the train step, forward in evaluation.
  assert _partitioners(train) == [cudnn_module] * (2 * LAYERS)
  assert _partitioners(evaluate) == [cudnn_module] * LAYERS
  for lowered, args in ((train, train_args), (evaluate, eval_args)):
    _check_mesh_and_transfers(lowered.as_text(), args)


@pytest.mark.usefixtures('cudnn')
def test_cudnn_attention_on_one_gpu_calls_cudnn_forward_and_backward():
  train, evaluate, _, _ = _lower_steps('cuda', 'cudnn', mesh_shape=(1, 1, 1))
  calls = CUDNN_CALLS.findall(train.as_text())
  assert len(calls) == 2 * LAYERS and sum('Backward' in c for c in calls) == LAYERS, calls
  assert len(CUDNN_CALLS.findall(evaluate.as_text())) == LAYERS


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_xla_attention_lowers_for_gpu_and_tpu_without_cudnn(platform):
  train, evaluate, train_args, eval_args = _lower_steps(platform, 'dot_product')
  for lowered, args in ((train, train_args), (evaluate, eval_args)):
    text = lowered.as_text()
    assert 'cudnn' not in text and 'CustomSPMDPartitioning' not in text
    _check_mesh_and_transfers(text, args)


class _Captured(Exception):
  """Stops `decode.generate` once it has called the sampling loop."""


def _lower_sampling_loop(platform: str, attention: str, monkeypatch, mesh_shape=MESH_SHAPE):
  """(lowered, its arguments): the sampling loop as `decode.generate` calls it (prompts of
  5 and 7 tokens, 8 new ones, top-k sampling), parameters sharded over the mesh, lowered for
  `platform`."""
  config = _config(attention, mesh_shape)
  _, _, mesh, rules, state, _ = _parts(attention, mesh_shape)
  decode_model = models.build_model(config.model, VOCAB, decode=True)
  tokens_to_logits, decode_state = models.decode_fns(decode_model, state.params,
                                                     batch_size=2, cache_len=16)
  calls = []

  def capture(*args, **kwargs):
    calls.append((args, kwargs))
    raise _Captured

  loop = decode._sample_loop
  monkeypatch.setattr(decode, '_sample_loop', capture)
  with pytest.raises(_Captured):
    decode.generate(tokens_to_logits, decode_state, [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]],
                    max_new_tokens=8, strategy='sample', top_k=5, max_len=SEQ_LEN)
  (args, kwargs), = calls
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return loop.trace(*args, **kwargs).lower(lowering_platforms=(platform,)), args


@pytest.mark.usefixtures('cudnn')
@pytest.mark.parametrize('platform, attention', [('cuda', 'cudnn'), ('tpu', 'dot_product')])
def test_the_sampling_loop_lowers_for_gpu_and_tpu(platform, attention, monkeypatch):
  lowered, args = _lower_sampling_loop(platform, attention, monkeypatch)
  text = lowered.as_text()
  assert 'stablehlo.while' in text  # the loop runs on the device, not step by step from Python
  assert 'sdy.mesh @mesh = <["data"=1, "fsdp"=4, "tensor"=2]>' in text
  # The arguments start with the model's state: its cache, then the parameters as laid out.
  state = args[0]
  first = len(jax.tree.leaves(state['cache']))
  params = _arguments(text)[first:first + len(jax.tree.leaves(state['params']))]
  assert params == _expected(state['params'])
  assert ('64x4x16', (('fsdp',), ('tensor',), ())) in params
  assert not HOST_TRANSFERS.findall(text)
  # The decoder feeds the model from its cache, prompt included: XLA's attention throughout.
  assert 'cudnn' not in text and 'CustomSPMDPartitioning' not in text


def test_the_host_transfer_check_finds_a_callback():
  """A step that calls back into Python: the pattern finds it where it lowers (CPU), and a
  GPU or TPU lowering made here refuses it outright."""
  def step(x):
    jax.debug.print('x {}', x.sum())
    return x * 2

  traced = jax.jit(step).trace(jnp.ones(4))
  assert HOST_TRANSFERS.findall(traced.lower(lowering_platforms=('cpu',)).as_text())
  for platform in ('cuda', 'tpu'):
    with pytest.raises(ValueError, match='different from the lowering platform'):
      traced.lower(lowering_platforms=(platform,))
