"""The jitted steps: one optimizer step (state, batch, rng) -> (state, metrics) and the
evaluation steps, with explicit shardings; the train step compiled with a memory check."""
import functools
import itertools
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import finetune, losses, microbatch, sharding
from lmjax.data import pipeline
from lmjax.errors import UserError
from lmjax.models import rnn
from lmjax.state import TrainState

def _loss_sums(model, params, batch: dict, weights, **kwargs):
  """Loss sums of a batch: of every next token ('targets'), or of one class label per row
  ('labels', with the 'mask' of real tokens). Packed rows ('segment_ids', 'positions')
  keep their examples apart (`packed_kwargs`)."""
  if 'labels' in batch:
    logits = model.apply({'params': params}, batch['inputs'], mask_BxT=batch['mask'], **kwargs)
    return losses.classification_sums(logits, batch['labels'], weights)
  logits = model.apply({'params': params}, batch['inputs'], **packed_kwargs(model, batch),
                       **kwargs)
  return losses.token_cross_entropy(logits, batch['targets'], weights)


def packed_kwargs(model, batch: dict) -> dict:
  """What `model` needs to read a batch of packed rows, several examples in a row, as if
  each were alone: the Transformer masks attention between examples and reads each
  token's position in its example; a recurrent model starts from a zero carry at each
  example's first token. {} for a batch that is not packed."""
  if 'segment_ids' not in batch:
    return {}
  if isinstance(model, rnn.RecurrentLM):
    return {'resets_BxT': batch['positions'] == 0}
  return {'segment_ids_BxT': batch['segment_ids'], 'positions_BxT': batch['positions']}


def train_step(state: TrainState, batch: dict, rng, *, model, tx, microbatches: int = 1,
               reduce_once: bool | None = None):
  """One optimizer step: (state, batch, rng) -> (state, metrics).

  With `microbatches` k > 1 the batch runs in k slices, one after another, their
  gradients summed (`microbatch.gradients`, where `reduce_once` is explained): the step of
  the whole batch in a k-th of the activation memory. With dropout, each slice draws its
  own masks."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_sums(trained, batch, carry, rng):
    """(loss sums, new carry) of `batch` under the trained parameters `trained`."""
    params = finetune.join(trained, state.frozen)
    if carry is None:  # independent windows, or passages to classify
      weights = _weights(batch)  # per-example weights come with the batch (balanced classes)
      return _loss_sums(model, params, batch, weights, train=True, rngs={'dropout': rng}), None
    # Truncated BPTT: gradients stop at the window's start.
    logits, carry = model.apply({'params': params}, batch['inputs'],
                                jax.lax.stop_gradient(carry), train=True,
                                resets_BxT=batch['resets'], rngs={'dropout': rng})
    return losses.token_cross_entropy(logits, batch['targets'],
                                      jnp.ones(batch['targets'].shape, jnp.float32)), carry

  if microbatches == 1:
    def loss_fn(trained):
      sums, carry = loss_sums(trained, batch, state.carry, dropout_rng)
      return sums['loss_sum'] / sums['weight_sum'], (sums, carry)

    (loss, (sums, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    grads, sums, carry = microbatch.gradients(
        loss_sums, state.params, batch, state.carry, _weights(batch), k=microbatches,
        rng=dropout_rng, reduce_once=reduce_once)
    loss = sums['loss_sum'] / sums['weight_sum']
  grad_norm = optax.tree.norm(grads)
  # A NaN or Inf loss or gradient never reaches the parameters, the optimizer state or the
  # carry: the step only counts. The loop reads `nonfinite` and stops or goes on
  # (train.nonfinite). A conditional rather than a select on every leaf: the same numbers;
  # the `:tiny` step has 292 fusions and 1 copy against 439 and 74, and compiles in 3.3-3.5
  # CPU-seconds against 3.9-4.1.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, carry=carry)

  new_state = jax.lax.cond(finite, update, lambda: state).replace(step=state.step + 1)
  metrics = {'loss': loss, 'grad_norm': grad_norm,
             'accuracy': sums['correct_sum'] / sums['weight_sum'],
             'nonfinite': 1.0 - finite.astype(jnp.float32)}
  return new_state, metrics


def train_steps(state: TrainState, batches: dict, rng, **kwargs):
  """`train_step` once for each batch of `batches` (every field with a leading axis of k
  batches), in one compiled loop: (state, batches, rng) -> (state, metrics of each step,
  with that leading axis). The same steps as k calls of `train_step`, crossing from Python
  to the runtime once."""
  return jax.lax.scan(lambda s, batch: train_step(s, batch, rng, **kwargs), state, batches)


def _weights(batch: dict):
  """Each target's loss weight: the batch's 'weights', else 1 for every target."""
  targets = batch['labels'] if 'labels' in batch else batch['targets']
  return batch.get('weights', jnp.ones(targets.shape, jnp.float32))


def eval_step(params, batch: dict, *, model):
  return _loss_sums(model, params, batch, batch['weights'], train=False)


def stateful_eval_step(params, batch: dict, carry, *, model):
  """`eval_step` continuing from `carry`: (loss sums, the carry for the next batch)."""
  logits, carry = model.apply({'params': params}, batch['inputs'], carry, train=False,
                              resets_BxT=batch['resets'])
  return losses.token_cross_entropy(logits, batch['targets'], batch['weights']), carry


def evaluate(eval_fn, params, evals: pipeline.EvalSet, batch_sharding, bits_per_char: bool,
             carry=None, class_names=(), max_batches: int = 0):
  """Loss sums over the whole set (or its first `max_batches` batches, when above 0) ->
  metrics (`losses.summarize`; a classifier's with its `class_names`). With `carry`
  (stateful evaluation) the carry passes from each batch to the next, starting from the one
  given."""
  totals = None
  for local in itertools.islice(evals.batches(), max_batches or None):
    batch = pipeline.to_global(local, batch_sharding)
    if carry is None:
      sums = eval_fn(params, batch)
    else:
      sums, carry = eval_fn(params, batch, carry)
    # Each batch's sums come to the host before the next batch is dispatched. With many
    # independent eval steps in flight, XLA:CPU with several host devices (the tests' 8
    # fake ones) was seen to hang under load: one device never joined an all-reduce. One
    # program at a time was no slower (a tiny model's validation split on 8 devices:
    # 1.07-1.15 s a pass, against 1.17-1.18 s before) and sums in float64.
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(sums))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return losses.summarize(totals, bits_per_char, class_names)


def jit_steps(model, tx, mesh, rules, state_shardings, stateful_eval: bool = False,
              microbatches: int = 1):
  """(train step, eval step), jitted with explicit shardings; the train step donates the
  state it is given. `stateful_eval` gives `stateful_eval_step` (carry in, carry out)."""
  step_fn = jit_train_step(model, tx, mesh, rules, state_shardings, microbatches)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Evaluation reads the whole parameter tree, trained and frozen parts joined.
    eval_fn = jit_eval_step(model, mesh,
                            finetune.join(state_shardings.params, state_shardings.frozen),
                            stateful_eval)
  return step_fn, eval_fn


def jit_train_step(model, tx, mesh, rules, state_shardings, microbatches: int = 1,
                   several: bool = False):
  """`train_step` jitted with explicit shardings, donating the state it is given; with
  `several`, `train_steps` (batches stacked on a leading axis)."""
  batches = (sharding.stacked_batch_sharding if several else sharding.batch_sharding)(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(
        functools.partial(train_steps if several else train_step, model=model, tx=tx,
                          microbatches=microbatches),
        in_shardings=(state_shardings, batches, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(model, mesh, params_sharding, stateful: bool = False):
  """`eval_step` (or with `stateful`, `stateful_eval_step`) jitted for parameters laid out
  as `params_sharding` and batches split over the mesh's data-parallel axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  if stateful:
    return jax.jit(functools.partial(stateful_eval_step, model=model),
                   in_shardings=(params_sharding, batch_sharding, batch_sharding),
                   out_shardings=(sharding.replicated(mesh), batch_sharding))
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(params_sharding, batch_sharding),
                 out_shardings=sharding.replicated(mesh))


def compile_train_step(step_fn, state, batch, rng, mesh, rules):
  """The train step compiled for these arguments. Prints what each device holds (its shards
  of the parameters and optimizer state) and what the step needs at its peak (XLA's
  memory analysis), and refuses to start when that exceeds the device's memory. Says that
  it compiles (seconds to minutes, in which nothing else is printed) and for how long."""
  print('Compiling the train step ...', flush=True)
  began = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(state, batch, rng).compile()
  use = memory_use(compiled, state, mesh)
  mib = lambda n: f'{n / 2**20:,.1f} MiB'
  line = (f'Compiled in {time.perf_counter() - began:.1f} s. '
          f'Mesh {dict(mesh.shape)}; per device: parameters {mib(use["params_bytes"])}, '
          f'optimizer state {mib(use["optimizer_bytes"])}')
  peak, limit = use['step_peak_bytes'], use['limit_bytes']
  if peak is not None:
    line += (f', the compiled train step {mib(peak)} at its peak (temporaries '
             f'{mib(use["temp_bytes"])})' + (f' of {mib(limit)}' if limit else ''))
  print(line + '.', flush=True)
  if peak is not None and limit and peak > limit:
    raise UserError(
        f'this config does not fit: the train step needs {mib(peak)} on each '
        f'{mesh.local_devices[0].platform} device and one has {mib(limit)}. Lower '
        'train.batch_size or train.seq_len, raise train.microbatches (accumulate gradients '
        'over slices of the batch), set model.remat, or shard the parameters over more '
        'devices (mesh.shape with an fsdp or tensor entry above 1).')
  return compiled


def memory_use(compiled, state, mesh) -> dict:
  """Bytes per device: its shards of the parameters and optimizer state; the compiled
  step's peak and temporaries by XLA's memory analysis (None where the backend has none);
  and what one device may use (None if unknown)."""
  analysis = compiled.memory_analysis()
  peak = temp = None
  if analysis is not None:
    # Arguments (the state and batch) and outputs live at once, less what donation lets the
    # outputs reuse, plus XLA's temporaries (activations kept for the backward pass).
    temp = analysis.temp_size_in_bytes
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + temp)
  return {'params_bytes': per_device_bytes((state.params, state.frozen)),
          'optimizer_bytes': per_device_bytes(state.opt_state),
          'step_peak_bytes': peak, 'temp_bytes': temp,
          'limit_bytes': device_memory_limit(mesh.local_devices[0])}


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of the arrays in `tree` (shards are of equal size)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def device_memory_limit(device) -> int | None:
  """Bytes one device may use: what its runtime reports, or on CPU, the host's memory
  shared by its local devices; None if unknown."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()
  return None
