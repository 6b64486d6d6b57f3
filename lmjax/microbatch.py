"""Gradient accumulation: a batch's gradients summed over k slices that run one after
another (a scan), in a k-th of the activation memory, with one all-reduce per step on a
data-parallel mesh."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import sharding
from lmjax.models import dropout

def gradients(loss_sums, params, batch: dict, carry, weights, *, k: int, rng,
              reduce_once: bool | None = None):
  """(gradients, loss sums, carry) of the whole batch's mean loss, run in `k` slices.

  `loss_sums(params, batch, carry, rng) -> (sums, carry)` scores one slice; slice j draws
  its dropout from `rng` folded with j. Each slice takes every k-th row (`split_rows`), so
  every device keeps its share of each slice and nothing moves between devices. Each
  slice's loss is divided by the whole batch's weight (`weights` summed), so the summed
  gradients are those of the batch's mean loss; they add up in float32.

  `reduce_once` (None: wherever it applies, see `reduces_once`): on a data-parallel mesh
  each device sums its own slices' gradients and the devices add them up once, after the
  last slice. Under GSPMD alone they are all-reduced after every slice. Same masks, same
  model; the sums are rounded in another order."""
  total_weight = jnp.sum(weights.astype(jnp.float32))
  accumulate = functools.partial(_accumulate, loss_sums, k=k, total_weight=total_weight,
                                 rng=rng)
  if reduce_once is None:
    reduce_once = reduces_once(carry)
  if reduce_once:
    grads, sums = summed_per_device(lambda params, batch: accumulate(params, batch, None)[:2],
                                    params, batch)
    carry = None
  else:
    grads, sums, carries = accumulate(params, batch, carry)
    carry = jax.tree.map(join_rows, carries)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return grads, sums, carry


def _accumulate(loss_sums, params, batch: dict, carry, *, k: int, total_weight, rng):
  """(gradient sums, loss sums, carries) over the `k` slices of `batch`."""
  slices = jax.tree.map(functools.partial(split_rows, k=k), (batch, carry))

  def one_slice(grads_and_sums, inputs):
    (slice_batch, slice_carry), index = inputs

    def loss_fn(params):
      sums, carry = loss_sums(params, slice_batch, slice_carry, jax.random.fold_in(rng, index))
      return sums['loss_sum'] / total_weight, (sums, carry)

    (_, (sums, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads_and_sums, (grads, sums)), carry

  first = jax.tree.map(lambda x: x[0], slices)
  sums_shape = jax.eval_shape(lambda: loss_sums(params, *first, rng)[0])
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                       (params, sums_shape))
  (grads, sums), carries = jax.lax.scan(one_slice, zeros, (slices, jnp.arange(k)))
  return grads, sums, carries


def reduces_once(carry) -> bool:
  """Whether the step can sum gradients per device and all-reduce once (`gradients`):
  the batch is split over the 'data' axis only, so every device holds all parameters,
  and no carry runs from step to step (a stateful carry stays with GSPMD)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (carry is None and not mesh.empty and mesh.shape.get('data', 1) > 1
          and all(size == 1 for name, size in mesh.shape.items() if name != 'data'))


def summed_per_device(accumulate, trained, batch: dict):
  """`accumulate(trained, batch)` run on each device's rows of the batch, inside a
  `shard_map` over 'data', and its results added up over the devices once.

  The parameters come in replicated, and their gradients stay each device's own until the
  final psum: with `check_vma` off, autodiff inside the body adds no psum of its own, which
  is the all-reduce after every slice that GSPMD places. Batch masks draw their device's
  rows of the whole batch's mask (`dropout.rows_of_batch`). Inside the body the 'data'
  axis is manual, so it leaves the logical axis rules."""
  rules = sharding.rules_without_axis(nn.get_logical_axis_rules(), 'data')

  def local(trained, batch):
    with dropout.rows_of_batch('data'), nn.logical_axis_rules(rules):
      return jax.lax.psum(accumulate(trained, batch), 'data')

  spec = jax.sharding.PartitionSpec
  return jax.shard_map(local, in_specs=(spec(), spec('data')), out_specs=spec(),
                       axis_names={'data'}, check_vma=False)(trained, batch)


def split_rows(x_BxN, k: int):
  """[B, ...] -> [k, B/k, ...], slice j holding rows j, j+k, j+2k, ...: a device holding a
  contiguous block of rows holds its share of every slice."""
  return jnp.swapaxes(x_BxN.reshape((x_BxN.shape[0] // k, k) + x_BxN.shape[1:]), 0, 1)


def join_rows(x_KxBxN):
  """The inverse of `split_rows`."""
  return jnp.swapaxes(x_KxBxN, 0, 1).reshape((-1,) + x_KxBxN.shape[2:])
