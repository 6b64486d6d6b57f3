"""Sharded training: state init, the jitted train / eval steps, and the training loop."""
import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from flax import struct

from lmjax import checkpoint as ckpt_lib
from lmjax import decode, events, finetune, flops, losses, models, optim, runtime, sharding
from lmjax.errors import UserError
from lmjax.data import corpora, external, pipeline, tokenizers
from lmjax.models import dropout, rnn, transformer


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  # Stateful training of a recurrent model: the carry each batch row ends on, where the
  # next batch's row continues (one row per sequence of the global batch). None otherwise.
  carry: Any = None
  # Parameters the run does not train (train.freeze, LoRA's base): no gradient, no
  # optimizer state, stored once beside the checkpoints. None when it trains them all.
  frozen: Any = None


# ----------------------------------------------------------------------------- config

# What a step with a NaN or Inf loss or gradient does (train.nonfinite): stop the run
# (nothing after the last checkpoint is kept), or drop that update and go on.
NONFINITE_MODES = ('stop', 'skip')


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Rejects impossible configs with a message naming the field, before any compiling."""
  m, t, o, d = config.model, config.train, config.opt, config.data
  if m.name not in models.MODEL_NAMES:
    raise UserError(f'model.name={m.name!r}; known models: {", ".join(models.MODEL_NAMES)}.')
  if m.name == 'transformer':
    if m.d_model % m.num_heads:
      raise UserError(f'model.d_model={m.d_model} does not divide by model.num_heads='
                       f'{m.num_heads}; pick a width that is a multiple of the head count.')
    if t.seq_len > m.max_len:
      raise UserError(f'train.seq_len={t.seq_len} is longer than the position table '
                       f'(model.max_len={m.max_len}); raise model.max_len or lower '
                       'train.seq_len.')
    if m.get('attention', 'dot_product') not in transformer.ATTENTION_KINDS:
      raise UserError(f'model.attention={m.attention!r}; use one of '
                      f'{", ".join(transformer.ATTENTION_KINDS)}.')
    if m.get('attention') == 'cudnn' and (jax.default_backend() != 'gpu'
                                          or m.dtype != 'bfloat16'
                                          or (m.d_model // m.num_heads) % 8):
      raise UserError(
          f"model.attention='cudnn' is cuDNN's flash attention: it needs an NVIDIA GPU "
          f'(this is {jax.default_backend()}), model.dtype=bfloat16 (it is {m.dtype}) and a '
          f'head width that is a multiple of 8 (it is {m.d_model // m.num_heads}); use '
          "model.attention='dot_product' otherwise.")
    block = m.get('attention_block', 0)
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
      raise UserError(f'model.attention_block={block!r}; use 0 (attention whole) or a '
                      'positive number of queries per block, e.g. 32.')
    if m.get('remat', 'none') not in transformer.REMAT_POLICIES:
      raise UserError(f'model.remat={m.remat!r}; use one of '
                      f'{", ".join(transformer.REMAT_POLICIES)}.')
  else:
    if m.hidden_size < 0:
      raise UserError(f'model.hidden_size={m.hidden_size}; use 0 (same as model.d_model) '
                       'or a positive width.')
    for field in ('dropout', 'embed_dropout', 'weight_dropout'):
      if not 0.0 <= m[field] < 1.0:
        raise UserError(f'model.{field}={m[field]} must be in [0, 1).')
    if m.scan_unroll < 1:
      raise UserError(f'model.scan_unroll={m.scan_unroll}; it must be at least 1.')
  if not m.get('causal', True):
    if m.name != 'transformer':
      raise UserError(f'model.causal=False makes a bidirectional encoder, which only the '
                      f'Transformer has; model.name={m.name!r} reads left to right.')
    if not 0 < t.get('mask_rate', 0.15) < 1:
      raise UserError(f'train.mask_rate={t.mask_rate}; the share of tokens a masked LM '
                      'predicts must be between 0 and 1 (BERT: 0.15).')
  lora_rank = m.get('lora_rank', 0)
  if lora_rank < 0:
    raise UserError(f'model.lora_rank={lora_rank}; use 0 (no adapters) or a positive rank.')
  if lora_rank:
    if m.name != 'transformer':
      raise UserError(f'model.lora_rank={lora_rank}: LoRA adapters attach to the '
                      f"Transformer's projections, and model.name={m.name!r} has none; set "
                      'model.lora_rank=0 (freeze parts with train.freeze instead).')
    if m.lora_alpha <= 0:
      raise UserError(f'model.lora_alpha={m.lora_alpha}; it must be positive (the '
                      'adapters are scaled by lora_alpha / lora_rank).')
    unknown = [name for name in m.lora_targets if name not in transformer.LORA_TARGETS]
    if unknown or not m.lora_targets:
      raise UserError(f'model.lora_targets={tuple(m.lora_targets)}; name one or more of '
                      f'{", ".join(transformer.LORA_TARGETS)}.')
  if config.get('init_from') and config.init_from.step < 0:
    raise UserError(f'init_from.step={config.init_from.step}; use 0 for the latest '
                    'checkpoint or a step the run saved.')
  if t.get('stateful', False) and corpora.class_names(d.name):
    raise UserError(f'train.stateful=True reads one long text stream, and data.name='
                    f'{d.name!r} is a classification dataset of separate passages; set '
                    'train.stateful=False.')
  if t.get('stateful', False) and not models.is_recurrent(m):
    raise UserError(f'train.stateful=True carries a recurrent state between batches, and '
                     f'model.name={m.name!r} has none; use one of {", ".join(rnn.CELLS)} or '
                     'set train.stateful=False.')
  dp = sharding.data_parallel_size(mesh)
  for field in ('batch_size', 'eval_batch_size'):
    value = t[field]
    if value <= 0 or value % dp or value % jax.process_count():
      raise UserError(
          f'train.{field}={value} does not divide by the {dp} data-parallel devices '
          f"(mesh axes {sharding.BATCH_AXES} of mesh {dict(mesh.shape)}) and "
          f'{jax.process_count()} process(es); use a multiple of {dp}.')
  microbatches = t.get('microbatches', 1)
  if microbatches < 1 or t.batch_size % (microbatches * dp):
    raise UserError(f'train.microbatches={microbatches}: the batch of {t.batch_size} must '
                    f'split into that many slices of whole rows on each of the {dp} '
                    f'data-parallel devices; use a divisor of {t.batch_size // dp} '
                    '(1: no accumulation).')
  if t.get('nonfinite', 'stop') not in NONFINITE_MODES:
    raise UserError(f'train.nonfinite={t.nonfinite!r}; use one of {", ".join(NONFINITE_MODES)}.')
  if t.num_steps < 1:
    raise UserError(f'train.num_steps={t.num_steps}; it must be at least 1.')
  if not 0 <= o.warmup_steps < t.num_steps:
    raise UserError(f'opt.warmup_steps={o.warmup_steps} must be below train.num_steps='
                     f'{t.num_steps}.')
  for field in ('eval_every', 'checkpoint_every', 'log_every'):
    if t[field] < 1:
      raise UserError(f'train.{field}={t[field]}; it must be at least 1.')
  profile = tuple(t.get('profile_steps', ()))
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1] <= t.num_steps):
    raise UserError(f'train.profile_steps={profile}; give the first and last step to trace, '
                    f'1 <= first <= last <= train.num_steps={t.num_steps}, e.g. '
                    "--config.train.profile_steps='(10,12)', or () for no trace.")
  if d.tokenizer not in tokenizers.KINDS:
    raise UserError(f'data.tokenizer={d.tokenizer!r}; use one of {tokenizers.KINDS}.')
  if d.tokenizer == 'sentencepiece' and d.vocab_size <= 0:
    raise UserError('data.tokenizer=sentencepiece needs data.vocab_size > 0 '
                     '(e.g. --config.data.vocab_size=2000).')
  if external.is_external(d.name):  # its splits and feature are checked when it is opened
    external.check_name(d.name)
  elif d.name not in corpora.DATASETS:
    raise UserError(f'data.name={d.name!r}; known datasets: {", ".join(corpora.DATASETS)}, '
                    "or any prepared TFDS text dataset as 'tfds:NAME' (e.g. 'tfds:lm1b').")
  else:
    for field, default in (('train_split', 'train'), ('eval_split', 'validation')):
      if d.get(field, default) not in corpora.SPLITS:
        raise UserError(f'data.{field}={d[field]!r}; {d.name} has the splits '
                        f'{", ".join(corpora.SPLITS)}.')
  mixture_tasks(config)


def mixture_tasks(config) -> list[tuple[str, float]]:
  """The (dataset, weight) pairs of data.mixture, checked; [] when the run reads data.name
  alone."""
  tasks = []
  for entry in config.data.get('mixture', ()):
    name, _, weight = str(entry).partition(':')
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if name not in corpora.DATASETS or corpora.class_names(name) or not weight > 0:
      known = ', '.join(n for n in corpora.DATASETS if not corpora.class_names(n))
      raise UserError(f'data.mixture entry {entry!r}: write DATASET:WEIGHT with a '
                      f'language-modelling dataset ({known}) and a positive weight, e.g. '
                      "--config.data.mixture=\"('shakespeare:0.7','milton:0.3')\".")
    tasks.append((name, weight))
  if len({name for name, _ in tasks}) < len(tasks):
    raise UserError(f'data.mixture={tuple(config.data.mixture)} names a dataset twice.')
  if tasks and (config.train.get('stateful', False) or not config.model.get('causal', True)):
    raise UserError('data.mixture trains a left-to-right model on independent windows; '
                    'set train.stateful=False and model.causal=True, or drop the mixture.')
  return tasks


def task_data(data_config, name: str):
  """`data_config` reading dataset `name` (one task of a mixture)."""
  return ml_collections.ConfigDict({**data_config.to_dict(), 'name': name})


def check_config_change(config, workdir: str, allow_change: bool = False) -> None:
  """A workdir with checkpoints keeps the config it was trained with: resuming it under a
  different one is refused, naming the fields, unless `allow_change`.

  Fields that only one side has come from a different lmjax version (a field added or
  removed since the run started), not from the user: they are reported, not refused."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    previous = json.load(f)
  changes, versioned = _config_changes(previous, json.loads(config.to_json()))
  # The mesh says where the arrays live, not what is computed: a run checkpointed on one
  # mesh (or number of hosts) resumes on another.
  remeshed = [change for change in changes if change.startswith('mesh.')]
  changes = [change for change in changes if not change.startswith('mesh.')]
  if remeshed:
    print(f'note: resuming on another mesh ({"; ".join(remeshed)}); the checkpoint is '
          'resharded onto it.')
  if versioned:
    print(f'note: {path} was written by another lmjax version; fields that differ in '
          f'presence: {", ".join(versioned[:6])}{" ..." if len(versioned) > 6 else ""}')
  if not changes:
    return
  has_checkpoints = bool(ckpt_lib.complete_steps(workdir))
  if has_checkpoints and not allow_change:
    shown = '\n'.join(f'  {change}' for change in changes[:12])
    more = f'\n  ... and {len(changes) - 12} more' if len(changes) > 12 else ''
    raise UserError(
        f'{workdir} holds checkpoints of a run with another config; this one differs '
        f'in:\n{shown}{more}\nUse a new --workdir for a new run, or pass '
        '--allow_config_change to resume these checkpoints under the new config.')
  print(f'note: the config differs from {path} in {", ".join(changes[:4])}'
        f'{" ..." if len(changes) > 4 else ""}; the new one replaces it.')


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:  # atomically: a kill mid-write leaves the old file whole
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json(indent=2))
    os.replace(path + '.tmp', path)


def _config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """'field: old -> new' for every leaf both configs have and that differs, and
  'field: (absent) -> new' (or the reverse) for leaves only one of them has."""
  old, new = _flatten(old), _flatten(new)

  def shown(values, k):
    return repr(values[k]) if k in values else '(absent)'

  differ = [k for k in sorted(set(old) | set(new)) if shown(old, k) != shown(new, k)]
  line = lambda k: f'{k}: {shown(old, k)} -> {shown(new, k)}'  # noqa: E731
  return ([line(k) for k in differ if k in old and k in new],
          [line(k) for k in differ if (k in old) != (k in new)])


RESULT_FILE = 'result.json'


def write_result(workdir: str, result: dict) -> None:
  """`WORKDIR/result.json`, written (atomically) when a run has done all its steps: a sweep
  takes its presence to mean the point is finished."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULT_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(result, f, indent=2)
    os.replace(path + '.tmp', path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'no config.json in {workdir}: is it a training workdir '
                    '(experiments/train.py --workdir=...)?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


# ------------------------------------------------------------------------------ state


def is_encoder(config) -> bool:
  """A bidirectional Transformer (model.causal=False): trained as a masked LM, it has one
  more id than its tokenizer, the mask token's, `masking(config, ...).mask_id`."""
  return not config.model.get('causal', True)


def masking(config, tokenizer) -> pipeline.Masking | None:
  """The masked-LM corruption of an encoder's language-model training; None otherwise."""
  if not is_encoder(config) or corpora.class_names(config.data.name):
    return None
  return pipeline.Masking(rate=config.train.get('mask_rate', 0.15),
                          mask_id=tokenizer.vocab_size, vocab_size=tokenizer.vocab_size)


def build_model(config, vocab_size: int, *, decode: bool = False):
  """The model of `config`: a language model, or a classifier with one output per class
  when data.name is a classification dataset. `vocab_size` is the tokenizer's."""
  if is_encoder(config):
    vocab_size += 1  # the mask token
  return models.build_model(config.model, vocab_size, decode=decode,
                            num_classes=len(corpora.class_names(config.data.name)))



def _init_state(rng, *, model, tx, seq_len: int, carry_rows: int = 0,
                unbox: bool = True, trainable=None) -> TrainState:
  """A fresh state; `carry_rows` > 0 adds a zero carry of that many rows (stateful).
  `trainable` (parameter name -> bool) splits off the parameters not trained."""
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
  if unbox:
    params = nn.meta.unbox(params)
  frozen = None
  if trainable is not None:
    params, frozen = finetune.split(params, trainable)
  carry = rnn.model_initial_carry(model, carry_rows) if carry_rows else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    carry=carry, frozen=frozen)


def create_train_state(model, tx, mesh, rules, seed: int, seq_len: int, carry_rows: int = 0,
                       trainable=None):
  """Initialises the state directly into its shardings; no full host copy of the params."""
  init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len,
                           carry_rows=carry_rows, trainable=trainable)

  rng = jax.random.key(seed)
  abstract_boxed = jax.eval_shape(functools.partial(init, unbox=False), rng)
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  for note in sharding.unsplit_dims(abstract_boxed.params, mesh, rules):
    print(f'note: parameter {note}.', flush=True)
  # A carry row belongs with the batch row it continues.
  state_shardings = state_shardings.replace(carry=jax.tree.map(
      lambda _: sharding.batch_sharding(mesh), abstract_boxed.carry))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(functools.partial(init, unbox=True), out_shardings=state_shardings)(rng)
  return state, state_shardings


# ------------------------------------------------------------------------------ steps


def _loss_sums(model, params, batch: dict, weights, **kwargs):
  """Loss sums of a batch: of every next token ('targets'), or of one class label per row
  ('labels', with the 'mask' of real tokens)."""
  if 'labels' in batch:
    logits = model.apply({'params': params}, batch['inputs'], mask_BxT=batch['mask'], **kwargs)
    return losses.classification_sums(logits, batch['labels'], weights)
  logits = model.apply({'params': params}, batch['inputs'], **kwargs)
  return losses.token_cross_entropy(logits, batch['targets'], weights)


def train_step(state: TrainState, batch: dict, rng, *, model, tx, microbatches: int = 1,
               reduce_once: bool | None = None):
  """One optimizer step: (state, batch, rng) -> (state, metrics).

  With `microbatches` k > 1 the batch is split into k slices that run one after another
  (a scan), their gradients summed: the step of the whole batch in a k-th of the
  activation memory. Each slice takes every k-th row, so every device keeps its share of
  each slice and nothing moves between devices. Gradients add up in float32; with dropout,
  each slice draws its own masks.

  `reduce_once` (None: wherever it applies, see `_reduces_once`): on a data-parallel mesh
  each device sums its own slices' gradients and the devices add them up once, after the
  last slice. Under GSPMD alone they are all-reduced after every slice. Same masks, same
  model; the sums are rounded in another order."""
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

  def accumulate(trained, batch, carry, total_weight):
    """(gradient sums, loss sums, carries) over the microbatches of `batch`."""
    slices = jax.tree.map(functools.partial(_split_rows, k=microbatches), (batch, carry))

    def one_slice(grads_and_sums, inputs):
      (slice_batch, slice_carry), index = inputs
      def loss_fn(trained):
        sums, carry = loss_sums(trained, slice_batch, slice_carry,
                                jax.random.fold_in(dropout_rng, index))
        return sums['loss_sum'] / total_weight, (sums, carry)
      (_, (sums, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
      return jax.tree.map(jnp.add, grads_and_sums, (grads, sums)), carry

    first = jax.tree.map(lambda x: x[0], slices)
    sums_shape = jax.eval_shape(lambda: loss_sums(trained, *first, dropout_rng)[0])
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                         (trained, sums_shape))
    (grads, sums), carries = jax.lax.scan(one_slice, zeros, (slices, jnp.arange(microbatches)))
    return grads, sums, carries

  if microbatches == 1:
    def loss_fn(trained):
      sums, carry = loss_sums(trained, batch, state.carry, dropout_rng)
      return sums['loss_sum'] / sums['weight_sum'], (sums, carry)

    (loss, (sums, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    # Each slice's loss is divided by the whole batch's weight, so the summed gradients
    # are those of the whole batch's mean loss.
    total_weight = jnp.sum(_weights(batch).astype(jnp.float32))
    if reduce_once is None:
      reduce_once = _reduces_once(state)
    if reduce_once:
      grads, sums = _summed_per_device(
          lambda trained, batch: accumulate(trained, batch, None, total_weight)[:2],
          state.params, batch)
      carry = None
    else:
      grads, sums, carries = accumulate(state.params, batch, state.carry, total_weight)
      carry = jax.tree.map(_join_rows, carries)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    loss = sums['loss_sum'] / sums['weight_sum']
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # A NaN or Inf loss or gradient never reaches the parameters, the optimizer state or the
  # carry: the step only counts. The loop reads `nonfinite` and stops or goes on
  # (train.nonfinite).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
      step=state.step + 1,
      params=if_finite(optax.apply_updates(state.params, updates), state.params),
      opt_state=if_finite(opt_state, state.opt_state), carry=if_finite(carry, state.carry))
  metrics = {'loss': loss, 'grad_norm': grad_norm,
             'accuracy': sums['correct_sum'] / sums['weight_sum'],
             'nonfinite': 1.0 - finite.astype(jnp.float32)}
  return new_state, metrics


def _reduces_once(state: TrainState) -> bool:
  """Whether the step can sum gradients per device and all-reduce once (`train_step`):
  the batch is split over the 'data' axis only, so every device holds all parameters,
  and no carry runs from step to step (a stateful carry stays with GSPMD)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (state.carry is None and not mesh.empty and mesh.shape.get('data', 1) > 1
          and all(size == 1 for name, size in mesh.shape.items() if name != 'data'))


def _summed_per_device(accumulate, trained, batch: dict):
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


def _weights(batch: dict):
  """Each target's loss weight: the batch's 'weights', else 1 for every target."""
  targets = batch['labels'] if 'labels' in batch else batch['targets']
  return batch.get('weights', jnp.ones(targets.shape, jnp.float32))


def _split_rows(x_BxN, k: int):
  """[B, ...] -> [k, B/k, ...], slice j holding rows j, j+k, j+2k, ...: a device holding a
  contiguous block of rows holds its share of every slice."""
  return jnp.swapaxes(x_BxN.reshape((x_BxN.shape[0] // k, k) + x_BxN.shape[1:]), 0, 1)


def _join_rows(x_KxBxN):
  """The inverse of `_split_rows`."""
  return jnp.swapaxes(x_KxBxN, 0, 1).reshape((-1,) + x_KxBxN.shape[2:])


def eval_step(params, batch: dict, *, model):
  return _loss_sums(model, params, batch, batch['weights'], train=False)


def stateful_eval_step(params, batch: dict, carry, *, model):
  """`eval_step` continuing from `carry`: (loss sums, the carry for the next batch)."""
  logits, carry = model.apply({'params': params}, batch['inputs'], carry, train=False,
                              resets_BxT=batch['resets'])
  return losses.token_cross_entropy(logits, batch['targets'], batch['weights']), carry


def evaluate(eval_fn, params, evals: pipeline.EvalSet, batch_sharding, bits_per_char: bool,
             carry=None, class_names=()):
  """Loss sums over the whole set -> metrics (`losses.summarize`; a classifier's with its
  `class_names`). With `carry` (stateful evaluation) the carry passes from each batch to
  the next, starting from the one given."""
  totals = None
  for local in evals.batches():
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


def restore_checkpoint(checkpointer, abstract, step: int | None = None, *,
                       set_aside_unreadable: bool = False):
  """(step, state, data state) of checkpoint `step`, or of the latest one; None if there is
  none. `abstract` (ShapeDtypeStructs with shardings) says what the state should be.

  Parameters of other shapes than `abstract`'s are refused, naming the first that differs.
  An unreadable checkpoint (damaged or missing files) is an error; with
  `set_aside_unreadable` (resuming training) it is moved aside instead, with a message,
  and the one before it is tried.
  """
  steps = checkpointer.all_steps()
  if step is not None and step not in steps:
    raise UserError(f'no checkpoint of step {step} in {checkpointer.directory}; it has '
                    f'{_steps_text(steps)}.')
  expected = ckpt_lib.shapes_by_path(abstract.params)
  for candidate in reversed(steps if step is None else [step]):
    reason = None
    try:
      stored = checkpointer.param_shapes(candidate)
      fits = stored == expected
      if fits:
        state, data_state = checkpointer.restore(candidate, abstract)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      detail = (str(e).strip().splitlines() or [''])[0][:300]
      reason = (f'checkpoint {candidate} in {checkpointer.directory} cannot be read '
                f'({type(e).__name__}: {detail})')
    if _failed_anywhere(reason is not None) and reason is None:
      # Each host reads its own shards: one that read them all must still go where the
      # others go.
      reason = (f'checkpoint {candidate} in {checkpointer.directory} cannot be read on '
                'another process')
    if reason is not None:
      if not set_aside_unreadable:
        others = [s for s in steps if s != candidate]
        raise UserError(f'{reason}. Other checkpoints: {_steps_text(others)} (--step=N).'
                        ) from None
      where = checkpointer.set_aside(candidate, reason)
      print(f'{reason}; moved it to {where} and trying the one before it.', flush=True)
      continue
    if not fits:
      raise UserError(_shape_mismatch(candidate, checkpointer.directory, stored, expected))
    return candidate, state, data_state
  return None


def _failed_anywhere(failed: bool) -> bool:
  """Whether `failed` holds on any process (on one process: whether it holds)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.any(multihost_utils.process_allgather(np.asarray([failed]))))


def _steps_text(steps) -> str:
  if not steps:
    return 'none'
  return f'step{"s" if len(steps) > 1 else ""} {", ".join(map(str, steps))}'


def _shape_mismatch(step, directory, stored: dict, expected: dict) -> str:
  for path in sorted(set(stored) | set(expected)):
    if stored.get(path) != expected.get(path):
      return (f'checkpoint {step} in {directory} does not fit the model of this config: '
              f'parameter {path} is {stored.get(path, "absent")} there and '
              f'{expected.get(path, "absent")} here (of {len(expected)} parameters, '
              f'{len(stored)} stored). Restore it with the config it was trained with, or '
              'train in a new --workdir.')
  return f'checkpoint {step} in {directory} does not fit the model of this config.'


def restore_state(workdir: str, step: int | None = None):
  """(config, tokenizer, TrainState, step) of a training workdir (latest step by default),
  on the host's first device. A fine-tuning run's state keeps its frozen parameters apart
  (state.frozen) and its adapters unmerged; `load_trained` gives the whole model."""
  config = load_config(workdir)
  tokenizer = tokenizers.load_tokenizer(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  model = build_model(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)

  init = functools.partial(_init_state, model=model, tx=tx, seq_len=config.train.seq_len,
                           carry_rows=carry_rows(config),
                           trainable=finetune.trainable_filter(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = ckpt_lib.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  restored = restore_checkpoint(checkpointer, abstract, step)
  checkpointer.close()
  if restored is None:
    raise UserError(f'no checkpoint in {checkpointer.directory}; train first '
                    '(experiments/train.py --workdir=...).')
  step, state, _ = restored
  return config, tokenizer, state, step


def load_trained(workdir: str, step: int | None = None):
  """(config, tokenizer, params, step) of a training workdir, params on the default device:
  the whole tree (frozen parts joined, LoRA adapters merged), for the config returned."""
  config, tokenizer, state, step = restore_state(workdir, step)
  config, params = finetune.for_decoding(config, finetune.join(state.params, state.frozen))
  return config, tokenizer, params, step


# ----------------------------------------------------------------------------- sample


def decoder_fns(config, params, vocab_size: int):
  """`decoder_fns(batch_size=, cache_len=) -> (tokens_to_logits, state)` for the decoder and
  the tree search: the KV-cached Transformer or the recurrent model (its carry is the
  state) of `config`, with `params` on the host's device."""
  if corpora.class_names(config.data.name):
    raise UserError(f'this run is a classifier (data.name={config.data.name!r}): it scores '
                    'passages and generates no text; evaluate it with '
                    'experiments/evaluate.py instead.')
  if is_encoder(config):
    raise UserError('this run is a bidirectional encoder (model.causal=False), trained to '
                    'fill in masked tokens: it cannot continue a prompt. Evaluate it with '
                    'experiments/evaluate.py, or fine-tune it into a classifier.')
  decode_model = build_model(config, vocab_size, decode=True)
  return functools.partial(models.decode_fns, decode_model, host_copy(params))


def host_copy(tree):
  """A NumPy copy of a tree of (possibly sharded) arrays, whole on every process: each
  process holds only its own shards of parameters that FSDP or tensor parallelism split
  over several hosts."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return multihost_utils.process_allgather(tree, tiled=True)


def generate_texts(config, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
                   stop_strings: tuple[str, ...] = (), **options) -> list[list[dict]]:
  """Continues each prompt with the KV-cached model; `options` go to `decode.generate`
  (strategy, num_samples, temperature, top_k, top_p, repetition_penalty, beam_size,
  length_penalty, beam_compat, early_stopping, seed).

  Returns, per prompt, one dict per continuation: 'text' (the new text only), 'tokens',
  'score' and 'finish' ('eos', 'stop' or 'length'). A continuation ends at the
  tokenizer's EOS and at any of `stop_strings`; its text is cut before the stop string.
  Raises ValueError with a readable message for bad prompts or options.
  """
  encoded = []
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f'prompt {i + 1} is empty; give some text to continue.')
    encoded.append(tokenizer.encode(prompt))
  stops = []
  for stop in stop_strings:
    if not stop:
      raise ValueError('a stop string is empty; drop it or give some text.')
    stops.append(tokenizer.encode(stop))
  needed = max(len(e) for e in encoded) + max_new_tokens
  tokens_to_logits, state = decoder_fns(config, params, tokenizer.vocab_size)(
      batch_size=len(encoded), cache_len=decode.buffer_length(needed, context_length(config)))
  results = decode.generate(tokens_to_logits, state, encoded, max_new_tokens=max_new_tokens,
                            eos_id=tokenizer.eos_id, stop_sequences=stops,
                            max_len=context_length(config), **options)
  out = []
  for candidates in results:
    rows = []
    for c in candidates:
      text, finish = tokenizer.decode(c.tokens), c.finish
      # A stop string may come out as tokens other than its own encoding; the text
      # decides.
      cuts = [text.find(stop) for stop in stop_strings if stop in text]
      if cuts:
        text, finish = text[:min(cuts)], 'stop'
      rows.append({'text': text, 'tokens': c.tokens.tolist(), 'score': c.score,
                   'finish': finish})
    out.append(rows)
  return out


def context_length(config) -> int | None:
  """The most tokens the model can read and write in one decode: the Transformer's
  position table; None (no bound) for a recurrent model."""
  return None if models.is_recurrent(config.model) else config.model.max_len


def continue_prompt(config, params, tokenizer, prompt: str, num_tokens: int, *,
                    seed: int = 0, temperature: float = 0.8) -> str:
  """One sampled continuation of `prompt`, prompt included (the end-of-training sample)."""
  result, = generate_texts(config, params, tokenizer, [prompt], max_new_tokens=num_tokens,
                           strategy='sample', temperature=temperature, seed=seed)
  return prompt + result[0]['text']


# ------------------------------------------------------------------------------- loop


def jit_steps(model, tx, mesh, rules, state_shardings, stateful_eval: bool = False,
              microbatches: int = 1):
  """(train step, eval step), jitted with explicit shardings; the train step donates the
  state it is given. `stateful_eval` gives `stateful_eval_step` (carry in, carry out)."""
  batch_sharding = sharding.batch_sharding(mesh)
  # Evaluation reads the whole parameter tree, trained and frozen parts joined.
  params_sharding = finetune.join(state_shardings.params, state_shardings.frozen)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, microbatches=microbatches),
        in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    if stateful_eval:
      eval_fn = jax.jit(functools.partial(stateful_eval_step, model=model),
                        in_shardings=(params_sharding, batch_sharding, batch_sharding),
                        out_shardings=(sharding.replicated(mesh), batch_sharding))
    else:
      eval_fn = jax.jit(functools.partial(eval_step, model=model),
                        in_shardings=(params_sharding, batch_sharding),
                        out_shardings=sharding.replicated(mesh))
  return step_fn, eval_fn


def compile_train_step(step_fn, state, batch, rng, mesh, rules):
  """The train step compiled for these arguments. Prints what each device holds (its shards
  of the parameters and optimizer state) and what the step needs at its peak (XLA's
  memory analysis), and refuses to start when that exceeds the device's memory."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(state, batch, rng).compile()
  use = memory_use(compiled, state, mesh)
  mib = lambda n: f'{n / 2**20:,.1f} MiB'  # noqa: E731
  line = (f'Mesh {dict(mesh.shape)}; per device: parameters {mib(use["params_bytes"])}, '
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


def lm_eval_set(config, tokenizer, tokens, batch_size: int) -> pipeline.EvalSet:
  """A language model's evaluation windows (independent ones, not stateful): next-token
  targets, or for an encoder masked ones, drawn once under train.seed."""
  mlm = masking(config, tokenizer)
  if mlm:
    return pipeline.masked_eval_set(tokens, seq_len=config.train.seq_len,
                                    batch_size=batch_size, masking=mlm, seed=config.train.seed)
  return pipeline.eval_set(tokens, seq_len=config.train.seq_len, batch_size=batch_size)


def carry_rows(config) -> int:
  """Rows of the carry kept in the train state: the global batch when stateful, else 0."""
  return config.train.batch_size if config.train.get('stateful', False) else 0


def eval_carry(model, mesh, batch_size: int):
  """The zero carry a stateful evaluation starts from, rows split as the batch is."""
  return jax.jit(lambda: rnn.model_initial_carry(model, batch_size),
                 out_shardings=sharding.batch_sharding(mesh))()


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  """Means of (step, host metrics) pairs, in float64: a resumed run, which reads part of
  the list back from its checkpoint, logs the very same numbers."""
  return {k: float(np.mean(np.asarray([m[k] for _, m in history], np.float64)))
          for k in history[0][1]}


class _StopSignals:
  """While active, SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the
  current step and write its checkpoint; a second Ctrl-C aborts at once. On several
  processes JAX's preemption sync point picks the step, the same on every host."""

  def __init__(self):
    self.received = None  # the signal's name once one came
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.received == signal.Signals(signum).name:
      return  # the same notice again (a sweep's death and its own SIGTERM): said already
    self.received = signal.Signals(signum).name
    # os.write, not print: a handler may run in the middle of another print.
    os.write(1, f'\n{self.received} received: stopping after this step, once its '
                'checkpoint is written (press Ctrl-C again to abort without it).\n'.encode())

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'preemption notice'
        return True
      return False
    return self.received is not None


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable before anything is computed."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} cannot be written ({e.strerror or e}: '
                    f'{e.filename or workdir}); choose a directory you can write to.') from None


def _check_disk_space(workdir: str, state) -> None:
  """Refuses to start when the disk cannot hold two checkpoints (one complete while the
  next is written)."""
  checkpoint_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  free = shutil.disk_usage(workdir).free
  if free < 2 * checkpoint_bytes:
    raise UserError(f'the disk of {workdir} has {free / 2**20:,.1f} MiB free; a checkpoint of '
                    f'this model takes {checkpoint_bytes / 2**20:,.1f} MiB and two must fit. '
                    'Free some space or choose another --workdir.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None, *,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns final eval
  (empty if a signal stopped the run first).

  `devices` defaults to all of them; a subset is for comparisons (tests, benchmarks).
  `allow_config_change` resumes checkpoints that were written under another config.
  """
  process_start = time.perf_counter()  # start-up counts in the run's train_seconds
  workdir = os.path.abspath(workdir)
  t = config.train
  nonfinite = t.get('nonfinite', 'stop')
  runtime.keep_freed_host_memory()
  note = runtime.split_cpu(config.mesh.get('cpu_devices', 0))
  if note and jax.process_index() == 0:
    print(f'note: {note}', flush=True)
  mesh = sharding.make_mesh(config.mesh, devices)
  validate_config(config, mesh)
  base = finetune.base_workdir(config, workdir)  # the run fine-tuned from, if any
  _prepare_workdir(workdir)
  check_config_change(config, workdir, allow_config_change)
  rules = sharding.rules_as_tuples(config.mesh.rules)

  # Data and tokenizer. The tokenizer is trained once and then reused from the workdir.
  data = config.data
  train_split = data.get('train_split', 'train')
  class_names = corpora.class_names(data.name)  # () for language modelling
  # Read once: a split of many small documents (Countdown's 120,833) takes seconds to read.
  if class_names:
    train_passages = corpora.load_split_passages(data.name, train_split, data.data_dir or None)
    train_texts = [text for _, _, text, _ in train_passages]
    tasks = [(data.name, 1.0)]
  elif external.is_external(data.name):
    # Far too large to hold as text: it is streamed into a token file, and a tokenizer to
    # train learns from the split's first documents only.
    tasks, train_works, train_texts = [(data.name, 1.0)], None, None
  else:  # one corpus, or each of a mixture's (its tokenizer learns from all of them)
    tasks = mixture_tasks(config) or [(data.name, 1.0)]
    task_works = {name: corpora.load_split_texts(name, train_split, data.data_dir or None)
                  for name, _ in tasks}
    train_works = task_works[tasks[0][0]]
    train_texts = [text for works in task_works.values() for _, text in works]
  tokenizer_dir = data.get('tokenizer_dir', '')
  if base and tokenizer_dir:
    raise UserError(f'data.tokenizer_dir={tokenizer_dir!r} and init_from.workdir={base!r}: a '
                    "fine-tuned run takes its base's tokenizer; set data.tokenizer_dir=''.")

  def tokenizer_texts():
    if train_texts is None:
      return external.sample_texts(data, train_split)
    return train_texts

  def build_tokenizer():
    has_tokenizer = os.path.exists(os.path.join(workdir, tokenizers.CONFIG_FILE))
    # Fine-tuning: the base run's tokenizer is this run's (its parameters come later).
    if base and not has_tokenizer:
      tokenizers.load_tokenizer(base).save(workdir)
    if tokenizer_dir and not has_tokenizer:  # e.g. GPT-2's, to pretrain with it
      try:
        given = tokenizers.read_tokenizer_dir(tokenizer_dir)
      except (OSError, ValueError) as e:
        raise UserError(f'data.tokenizer_dir={tokenizer_dir!r}: {e}') from None
      if given.kind != data.tokenizer:
        raise UserError(f'data.tokenizer_dir={tokenizer_dir!r} holds a {given.kind!r} '
                        f'tokenizer, and data.tokenizer={data.tokenizer!r}; set '
                        f'data.tokenizer={given.kind!r}.')
      given.save(workdir)
    # A given tokenizer has its own size; data.vocab_size is for one trained here.
    return tokenizers.build_tokenizer(
        data.tokenizer, workdir, tokenizer_texts,
        vocab_size=None if tokenizer_dir else data.vocab_size or None,
        model_type=data.spm_model_type)

  if jax.process_count() > 1:  # process 0 trains and saves it; the others then read it
    from jax.experimental import multihost_utils  # noqa: PLC0415
    if jax.process_index() == 0:
      build_tokenizer()
    multihost_utils.sync_global_devices('lmjax: tokenizer saved')
  tokenizer = build_tokenizer()
  stateful = t.get('stateful', False)
  # A tfds: dataset's split is tokenized once into a file here (or in data.cache_dir) and
  # read as a memmap; a second process or run waits for the first to write it.
  token_cache = external.cache_dir(data, workdir)
  if class_names:
    train_examples = pipeline.load_examples(data, train_split, tokenizer, t.seq_len,
                                            train_passages)
    evals = pipeline.classification_eval_set(
        pipeline.load_examples(data, data.eval_split, tokenizer, t.seq_len),
        batch_size=t.eval_batch_size)
    counts = np.bincount(train_examples['labels'], minlength=len(class_names))
    if t.get('balance_classes', False):
      train_examples['weights'] = balanced_weights(train_examples['labels'], counts)
    train_size = (f'{len(train_passages):,} training passages (' +
                  ', '.join(f'{n:,} {c}' for c, n in zip(class_names, counts)) + ')')
  elif len(tasks) > 1:
    task_tokens = [pipeline.load_tokens(task_data(data, name), train_split, tokenizer,
                                        task_works[name]) for name, _ in tasks]
    train_tokens = np.concatenate(task_tokens)
    mixture_starts, _ = pipeline.mixture_schedule(
        [len(x) for x in task_tokens], [w for _, w in tasks], seq_len=t.seq_len,
        num_examples=t.num_steps * t.batch_size, seed=t.seed)
    task_evals = {name: lm_eval_set(config, tokenizer, pipeline.load_tokens(
        task_data(data, name), data.eval_split, tokenizer), t.eval_batch_size)
                  for name, _ in tasks}
    train_size = 'a mixture of ' + ', '.join(
        f'{name} ({len(x):,} training tokens, weight {w:g})'
        for (name, w), x in zip(tasks, task_tokens))
  else:
    train_tokens = pipeline.load_tokens(data, train_split, tokenizer, train_works,
                                        cache_dir=token_cache)
    # Read whole (the evaluation windows are cut from an array in memory): keep it small,
    # e.g. data.eval_split='train[-1000:]' for a dataset with one split.
    eval_tokens = pipeline.load_tokens(data, data.eval_split, tokenizer, cache_dir=token_cache)
    train_size = f'{len(train_tokens):,} training tokens'
    if stateful:
      pipeline.stream_rows(len(train_tokens), seq_len=t.seq_len, global_batch=t.batch_size)
      evals = pipeline.stream_eval_set(eval_tokens, seq_len=t.seq_len,
                                       batch_size=t.eval_batch_size, eos_id=tokenizer.eos_id)
    else:
      evals = lm_eval_set(config, tokenizer, eval_tokens, t.eval_batch_size)
  mlm = masking(config, tokenizer)
  # Bits per character of a masked LM would not compare with a left-to-right model's.
  bits_per_char = data.tokenizer == 'char' and mlm is None

  model = build_model(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, t.num_steps)
  schedule = optim.learning_rate_schedule(config.opt, t.num_steps)
  trainable = finetune.trainable_filter(config)
  state, state_shardings = create_train_state(model, tx, mesh, rules, t.seed, t.seq_len,
                                              carry_rows=carry_rows(config), trainable=trainable)
  if trainable is not None:
    finetune.check_trainable(config, finetune.param_names(
        finetune.join(state.params, state.frozen)))
  num_trained = models.count_params(state.params)
  num_params = num_trained + models.count_params(state.frozen or {})
  _check_disk_space(workdir, state)

  # The data state travels with each checkpoint: where the stream resumes, the metrics of
  # the steps since the last log line (so a resumed run logs the same means), and the
  # count of skipped non-finite steps.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_shardings)
  restored = restore_checkpoint(checkpointer, abstract, set_aside_unreadable=True)
  save_config(config, workdir)  # only now: a config whose model does not fit is not kept
  if restored is not None:
    start_step, state, data_state = restored
    next_example = int(data_state['next_example'])
    history = [(s, m) for s, m in data_state.get('pending_metrics', [])]
    skipped = int(data_state.get('skipped_steps', 0))
    seconds_before = float(data_state.get('train_seconds', 0.0))
    print(f'Resuming from step {start_step} of {t.num_steps} '
          f'(checkpoint {checkpointer.directory}/{start_step}).', flush=True)
  else:
    start_step, next_example, history, skipped, seconds_before = 0, 0, [], 0, 0.0
    trained_text = f' ({num_trained:,} trained)' if num_trained != num_params else ''
    print(f'Starting a new run in {workdir}: {num_params:,} parameters{trained_text}, '
          f'vocabulary {tokenizer.vocab_size}, {train_size}.',
          flush=True)
    if base:
      state = _start_from_base(config, base, state, state_shardings, trainable, mesh)

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn, eval_fn = jit_steps(model, tx, mesh, rules, state_shardings, stateful_eval=stateful,
                               microbatches=t.get('microbatches', 1))

  # Every stateful evaluation starts from this zero carry (the eval step does not donate it).
  eval_start = eval_carry(model, mesh, t.eval_batch_size) if stateful else None

  def run_eval(state):
    params = finetune.join(state.params, state.frozen)
    if len(tasks) == 1:
      return evaluate(eval_fn, params, evals, batch_sharding, bits_per_char, eval_start,
                      class_names)
    return mixture_metrics({name: evaluate(eval_fn, params, task_evals[name],
                                           batch_sharding, bits_per_char)
                            for name in task_evals}, tasks, bits_per_char)

  @contextlib.contextmanager
  def writing(what: str):
    """Turns a failed write (a full disk, a vanished directory) into one clear message."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  (orbax, tensorstore and TensorFlow raise many kinds)
      cause = e
      while cause.__cause__ is not None:  # the writers wrap the OS error
        cause = cause.__cause__
      detail = (str(cause).strip().splitlines() or [''])[0][:300]
      raise UserError(
          f'writing {what} failed ({type(cause).__name__}: {detail}). The last complete '
          f'checkpoint is {_steps_text(checkpointer.complete_steps()[-1:])} in '
          f'{checkpointer.directory}; free some space or fix the directory, then rerun the '
          'same command to resume from it.') from e

  if start_step == 0 and state.frozen is not None:  # written before any checkpoint
    with writing(f'the frozen parameters to {workdir}/{ckpt_lib.FROZEN_DIR}'):
      ckpt_lib.save_frozen(workdir, state.frozen)
  with writing(f'TensorBoard events to {workdir}'):
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    if start_step == 0:
      writer.write_hparams({'num_params': num_params, 'num_trained_params': num_trained,
                            **_flatten(config.to_dict())})
      # Indented four spaces: TensorBoard's text tab shows it as a code block.
      writer.write_texts(0, {'config': '\n'.join(
          '    ' + line for line in config.to_json(indent=2).splitlines())})
  if class_names:
    dataset = pipeline.classification_train_dataset(
        train_examples, global_batch=t.batch_size, seed=t.seed, start_example=next_example)
  elif len(tasks) > 1:
    dataset = pipeline.mixture_dataset(train_tokens, mixture_starts, seq_len=t.seq_len,
                                       global_batch=t.batch_size, start_example=next_example)
  elif stateful:
    dataset = pipeline.stream_dataset(train_tokens, seq_len=t.seq_len,
                                      global_batch=t.batch_size, seed=t.seed,
                                      eos_id=tokenizer.eos_id, start_example=next_example)
  else:
    dataset = pipeline.train_dataset(train_tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                     seed=t.seed, start_example=next_example, masking=mlm)
  batches = iter(dataset.as_numpy_iterator())
  dropout_rng = jax.random.key(t.seed + 1)
  if start_step < t.num_steps:  # compiled now, to know its memory before step one
    first = next(batches)
    # The global batch's shapes (each process holds its rows): nothing is transferred.
    global_batch = {k: jax.ShapeDtypeStruct((len(v) * jax.process_count(),) + v.shape[1:],
                                            v.dtype, sharding=batch_sharding)
                    for k, v in first.items()}
    step_fn = compile_train_step(step_fn, state, global_batch, dropout_rng, mesh, rules)
    batches = itertools.chain([first], batches)
  tokens_per_step = t.batch_size * t.seq_len
  # Counted on the whole model: frozen parts still run forwards and pass gradients back.
  flops_per_token = models.train_flops_per_token(
      config.model, finetune.join(state.params, state.frozen), t.seq_len)
  peak_flops = flops.peak_flops_per_device(mesh.devices.flat[0])
  peak_flops = peak_flops * mesh.size if peak_flops else None
  eval_metrics = {}
  # Throughput is timed over train steps only: the compiling first step, evaluations and
  # checkpoint writes restart the interval timer instead of counting against it.
  timer_start, timer_step, steps_per_sec = None, start_step, 0.0
  checked_step = start_step  # metrics of steps up to here have been checked for NaN / Inf

  def check_finite():
    """Brings the pending metrics to the host and acts on non-finite steps among them."""
    nonlocal history, skipped, checked_step
    history = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in history]
    for s, m in history:
      if s <= checked_step or not m['nonfinite']:
        continue
      if nonfinite == 'stop':
        checkpointer.wait()
        last = checkpointer.complete_steps()[-1:]
        saved = (f'checkpoint {last[0]} in {checkpointer.directory} is the last good one'
                 if last else 'no checkpoint had been written yet')
        raise UserError(
            f'the loss or gradient is not finite at step {s} (loss {m["loss"]}, gradient '
            f'norm {m["grad_norm"]}); training stopped, and {saved}. Lower opt.lr, lengthen '
            'opt.warmup_steps or set opt.grad_clip, then rerun (it resumes from the last '
            'checkpoint); or set train.nonfinite=skip to drop such updates and go on.')
      skipped += 1
      print(f'step {s}: loss {m["loss"]}, gradient norm {m["grad_norm"]}: not finite; the '
            f'update is skipped ({skipped} skipped so far).', flush=True)
    checked_step = history[-1][0] if history else checked_step

  def sample_text(state):
    """A sampled continuation of train.sample_prompt, cut to what the model's context
    holds (a short model.max_len must not fail a run); the same seed at every call, so
    samples of successive evaluations differ only by what the model learned."""
    num_tokens = t.sample_tokens
    if context_length(config) is not None:
      num_tokens = min(num_tokens,
                       context_length(config) - len(tokenizer.encode(t.sample_prompt)))
    if num_tokens <= 0:
      return t.sample_prompt
    decode_config, params = finetune.for_decoding(
        config, finetune.join(state.params, state.frozen))
    return continue_prompt(decode_config, params, tokenizer, t.sample_prompt, num_tokens,
                           seed=t.seed)

  sample = None  # the latest evaluation's sample

  def save(step):
    check_finite()
    # A copy: orbax writes the JSON in the background while the loop appends to `history`.
    data_state = {'next_example': step * t.batch_size, 'skipped_steps': skipped,
                  'pending_metrics': list(history),
                  'train_seconds': seconds_before + time.perf_counter() - process_start}
    # An asynchronous write that failed earlier surfaces here, at the next save.
    with writing(f'a checkpoint (noticed when saving step {step})'):
      checkpointer.save(step, state, data_state)

  def finish_writes(step):
    with writing(f'a checkpoint (noticed when finishing step {step})'):
      checkpointer.wait()

  def log(step, scalars):
    with writing(f'TensorBoard events to {workdir}'):
      writer.write_scalars(step, scalars)

  profile = tuple(t.get('profile_steps', ()))
  stop = _StopSignals()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), stop:
    for step in range(start_step + 1, t.num_steps + 1):
      if profile and step == profile[0]:
        jax.profiler.start_trace(workdir)  # into WORKDIR/plugins/profile, for TensorBoard
      state, metrics = step_fn(state, pipeline.to_global(next(batches), batch_sharding),
                               dropout_rng)
      history.append((step, metrics))
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        print(f'Profiled steps {profile[0]}-{profile[1]} into {workdir}/plugins/profile; '
              'open the profile tab of TensorBoard on the workdir to read it.', flush=True)
      if timer_start is None:
        jax.block_until_ready(metrics)
        timer_start, timer_step = time.perf_counter(), step

      if step % t.log_every == 0 or step == t.num_steps:
        check_finite()  # waits for the step to finish
        scalars = _mean_metrics(history)
        history = []
        del scalars['nonfinite']
        scalars['skipped_steps'] = skipped
        if step > timer_step:
          steps_per_sec = (step - timer_step) / (time.perf_counter() - timer_start)
          timer_start, timer_step = time.perf_counter(), step
        scalars['tokens_per_sec'] = steps_per_sec * tokens_per_step
        if peak_flops:
          scalars['mfu'] = scalars['tokens_per_sec'] * flops_per_token / peak_flops
        scalars['learning_rate'] = float(schedule(step - 1))
        log(step, {f'train/{k}': v for k, v in scalars.items()})
        eta = (t.num_steps - step) / steps_per_sec if steps_per_sec else float('nan')
        print(f'step {step:>6}/{t.num_steps}  loss {scalars["loss"]:.4f}  '
              f'lr {scalars["learning_rate"]:.2e}  {scalars["tokens_per_sec"]:,.0f} tokens/s  '
              f'MFU {scalars.get("mfu", float("nan")):.1%}  ETA {_format_seconds(eta)}',
              flush=True)

      if step % t.eval_every == 0 or step == t.num_steps:
        eval_metrics = run_eval(state)
        scalars = {k: v for k, v in eval_metrics.items() if isinstance(v, float)}
        log(step, {f'eval/{k}': v for k, v in scalars.items()})
        print(f'eval at step {step}: ' +
              '  '.join(f'{k} {v:.4f}' for k, v in scalars.items()), flush=True)
        if class_names:
          texts = {'confusion_matrix': confusion_table(eval_metrics['confusion_matrix'],
                                                       class_names)}
        elif mlm:
          texts = {}  # an encoder writes no text
        else:
          sample = sample_text(state)
          texts = {'sample': sample}
        if texts:
          with writing(f'TensorBoard events to {workdir}'):
            writer.write_texts(step, texts)

      stopping = stop.should_stop(step)
      if step % t.checkpoint_every == 0 or step == t.num_steps or stopping:
        save(step)

      if stopping:
        finish_writes(step)
        checkpointer.close()
        writer.flush()
        writer.close()
        print(f'Stopped by {stop.received} at step {step} of {t.num_steps}; checkpoint '
              f'{checkpointer.directory}/{step} is complete. Run the same command to '
              'resume.', flush=True)
        return {}

      if step % t.eval_every == 0 or step % t.checkpoint_every == 0:
        timer_start, timer_step = time.perf_counter(), step

    finish_writes(t.num_steps)
  checkpointer.close()
  if not eval_metrics:  # resumed a finished run: report where it stands
    eval_metrics = run_eval(state)
    sample = None if class_names or mlm else sample_text(state)
  writer.flush()
  writer.close()
  # The best evaluation over the whole run, resumed segments included: the event files
  # hold them all.
  eval_losses = {t.num_steps: eval_metrics['loss']}
  if jax.process_index() == 0:  # the one that writes events
    eval_losses = events.read_scalars(workdir).get('eval/loss') or eval_losses
  best_step = min(eval_losses, key=lambda s: (eval_losses[s], s))
  if class_names:
    eval_metrics = {**eval_metrics, 'classes': list(class_names)}
  write_result(workdir, {
      'step': t.num_steps, 'eval': eval_metrics, 'best_eval_loss': eval_losses[best_step],
      'best_eval_step': best_step, 'num_params': num_params,
      'num_trained_params': num_trained, 'skipped_steps': skipped,
      'train_seconds': seconds_before + time.perf_counter() - process_start})
  done = (f'\nDone: eval loss {eval_metrics["loss"]:.4f} at step {t.num_steps} (best '
          f'{eval_losses[best_step]:.4f}, at step {best_step}); checkpoints in '
          f'{checkpointer.directory}, results in {workdir}/{RESULT_FILE}.\n')
  if class_names or mlm:
    table = confusion_table(eval_metrics['confusion_matrix'], class_names) if class_names else ''
    print(f'{done}Score another split with: python experiments/evaluate.py '
          f'--workdir={workdir} --split=test\n\n{table}', flush=True)
  else:
    print(f'{done}Decode more with: python experiments/decode.py --workdir={workdir} '
          f"--prompt='{t.sample_prompt.strip()}'\n"
          f'\n--- sample ---\n{sample}\n--------------', flush=True)
  return eval_metrics


def _start_from_base(config, base: str, state, state_shardings, trainable, mesh):
  """`state` with the base run's parameters in place of the fresh ones (LoRA adapters
  excepted), on this run's shardings; the optimizer state stays fresh."""
  full = finetune.join(state.params, state.frozen)
  abstract = ckpt_lib.abstract_with_shardings(
      jax.eval_shape(lambda: full),
      finetune.join(state_shardings.params, state_shardings.frozen))
  base_params, base_step = finetune.load_base_params(config, base, abstract,
                                                     sharding.replicated(mesh))
  full = finetune.join(full, base_params)
  params, frozen = finetune.split(full, trainable) if trainable else (full, None)
  print(f'Fine-tuning from {base}, step {base_step}: its parameters and tokenizer; a fresh '
        'optimizer.', flush=True)
  return state.replace(params=params, frozen=frozen)


def mixture_metrics(per_task: dict[str, dict], tasks, bits_per_char: bool) -> dict:
  """One evaluation of a mixture: each task's metrics under 'TASK/...', and loss and
  accuracy averaged with the mixture's weights (the expectation training minimises)."""
  total = sum(w for _, w in tasks)
  out = {k: sum(w * per_task[name][k] for name, w in tasks) / total
         for k in ('loss', 'accuracy')}
  out['perplexity'] = math.exp(min(out['loss'], 80.0))
  if bits_per_char:
    out['bits_per_char'] = out['loss'] / math.log(2)
  for name, metrics in per_task.items():
    out.update({f'{name}/{k}': v for k, v in metrics.items()})
  return out


def balanced_weights(labels, counts) -> np.ndarray:
  """Per-example loss weights that give every class the same total weight, and the
  examples a mean weight of 1 (scikit-learn's class_weight='balanced')."""
  present = counts > 0
  per_class = np.zeros(len(counts))
  per_class[present] = len(labels) / (present.sum() * counts[present])
  return per_class[labels].astype(np.float32)


def confusion_table(confusion: list[list[int]], class_names) -> str:
  """A Markdown table of a confusion matrix (rows: true class, columns: predicted), as
  TensorBoard's text tab and a terminal both show it."""
  lines = ['| true \\ predicted | ' + ' | '.join(class_names) + ' |',
           '| --- |' + ' ---: |' * len(class_names)]
  for name, row in zip(class_names, confusion):
    lines.append(f'| {name} | ' + ' | '.join(str(n) for n in row) + ' |')
  return '\n'.join(lines)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, name + '.'))
    else:
      out[name] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _format_seconds(seconds: float) -> str:
  if seconds != seconds:  # nan
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
