"""Fine-tuning: start from another run's parameters; train only some of them.

Parameters are named by their path, '/'-joined: 'layer_0/attention/query/kernel'.
What a run does not train (`train.freeze` patterns, or everything but the LoRA adapters
when `model.lora_rank` > 0) is split off into `TrainState.frozen`: it gets no gradient
and no optimizer state, and is stored once in WORKDIR/frozen_params instead of in
every checkpoint.
"""
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

import ml_collections

from lmjax import checkpoint as ckpt_lib
from lmjax import models, sharding, storage
from lmjax.errors import UserError
from lmjax.models import heads, transformer

LORA_LEAVES = ('lora_a', 'lora_b')


def _flat(params) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _unflat(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def is_lora(name: str) -> bool:
  return name.rsplit('/', 1)[-1] in LORA_LEAVES


def is_head(name: str) -> bool:
  """A classifier's output layer: new when a language model is fine-tuned into one."""
  return name.split('/', 1)[0] == heads.HEAD_NAME


def param_names(params) -> list[str]:
  return sorted(_flat(params))


def trainable_filter(config) -> Callable[[str], bool] | None:
  """name -> whether the run trains that parameter, from train.freeze and model.lora_rank;
  None when the config trains every parameter. With LoRA, a classifier's head trains
  beside the adapters (it starts from scratch)."""
  if not config.train.freeze and not config.model.lora_rank:
    return None
  patterns = []
  for pattern in config.train.freeze:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise UserError(f'train.freeze pattern {pattern!r} is not a regular expression ({e}).'
                      ) from None
  lora = bool(config.model.lora_rank)

  def trainable(name: str) -> bool:
    if lora and not (is_lora(name) or is_head(name)):
      return False
    return not any(p.search(name) for p in patterns)
  return trainable


def check_trainable(config, names: list[str]) -> None:
  """Every freeze pattern names some parameter, and something is left to train."""
  for pattern in config.train.freeze:
    if not any(re.search(pattern, n) for n in names):
      scanned = ''
      if config.model.scan_layers:
        scanned = (" model.scan_layers=True stacks every block's weights into one array "
                   "under 'layers/', so single layers cannot be frozen; set "
                   'model.scan_layers=False to freeze layer by layer.')
      raise UserError(f'train.freeze pattern {pattern!r} matches no parameter of this model; '
                      f'parameter names look like {", ".join(names[:3])}, ... (regular '
                      "expressions, searched anywhere in the name, e.g. 'token_embed' or "
                      "'layer_[01]/')." + scanned)
  trainable = trainable_filter(config)
  if not any(trainable(n) for n in names):
    raise UserError(f'train.freeze={tuple(config.train.freeze)} freezes every parameter; '
                    'leave something to train.')


def split(params, trainable: Callable[[str], bool]):
  """(trained part, frozen part or None) of a params tree."""
  flat = _flat(params)
  kept = {k: v for k, v in flat.items() if trainable(k)}
  frozen = {k: v for k, v in flat.items() if not trainable(k)}
  return _unflat(kept), (_unflat(frozen) if frozen else None)


def join(trained, frozen):
  """The whole params tree from `split`'s two parts; where both have a parameter (not
  from `split`), `frozen`'s wins."""
  if frozen is None:
    return trained
  return _unflat({**_flat(trained), **_flat(frozen)})


def for_decoding(config, params):
  """(config, params) with LoRA adapters merged into their kernels: a plain model with
  the same logits, for the decoder and for exporting."""
  if not config.model.lora_rank:
    return config, params
  merged = transformer.merge_lora(params, models.lora_spec(config.model))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.lora_rank = 0
  return config, merged


# ----------------------------------------------------------------------- starting point


def _base_config(base: str) -> ml_collections.ConfigDict:
  """The base run's config, a field its lmjax version lacked at its default."""
  from lmjax import config as config_lib  # here: config imports tasks, which import this
  config = config_lib.read_saved(base)
  if config is None:
    raise UserError(f'init_from.workdir={base!r} holds no config.json; name a training '
                    'workdir (one experiments/train.py wrote).')
  return config


def base_workdir(config, workdir: str) -> str | None:
  """The absolute workdir `config.init_from` names, checked; None when it names none, or
  when `workdir` has checkpoints already: a run that started needs its base no more."""
  init_from = config.init_from
  if not init_from.workdir:
    return None
  base = storage.absolute(init_from.workdir)
  if base == storage.absolute(workdir):
    raise UserError('init_from.workdir is the run\'s own --workdir; to continue a run, '
                    'rerun it without init_from; to fine-tune, give a new --workdir.')
  if ckpt_lib.complete_steps(workdir):
    return None
  if not storage.isdir(base):
    raise UserError(f'init_from.workdir={init_from.workdir!r} does not exist.')
  base_data = _base_config(base).data
  for field in ('tokenizer', 'vocab_size'):
    if base_data[field] != config.data[field]:
      raise UserError(
          f'data.{field}={config.data[field]!r}, but the run in init_from.workdir='
          f'{init_from.workdir!r} used {base_data[field]!r}; a fine-tuned model keeps '
          f'its base\'s tokenizer, so set data.{field}={base_data[field]!r}.')
  base_step(config, base)
  return base


def base_step(config, base: str) -> int:
  """The base run's checkpoint that init_from.step names (0: its latest); UserError if the
  base has no such checkpoint."""
  steps = ckpt_lib.complete_steps(base)
  if not steps:
    raise UserError(f'init_from.workdir={config.init_from.workdir!r} has no checkpoint; '
                    'fine-tuning starts from a trained run.')
  wanted = config.init_from.step or steps[-1]
  if wanted not in steps:
    raise UserError(f'init_from.workdir={config.init_from.workdir!r} has no checkpoint of '
                    f'step {wanted}; it has {", ".join(map(str, steps))} '
                    '(init_from.step=0 takes the latest).')
  return wanted


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) for name, leaf in _flat(tree or {}).items()}


def _stored_shapes(base: str, step: int):
  """({name: shape} of the parameters in the checkpoint, {name: shape} of those stored once
  in frozen_params); read from metadata, no array loaded."""
  checkpointer = ckpt_lib.Checkpointer(base, read_only=True)
  try:
    in_checkpoint = _shapes(checkpointer.param_metadata(step))
  finally:
    checkpointer.close()
  return in_checkpoint, _shapes(ckpt_lib.frozen_metadata(base))


def load_base_params(config, base: str, abstract_params, replicated):
  """(params, step): the base run's parameters at init_from.step (0: its latest), every
  one the new model has except its LoRA adapters (which stay as initialised), restored
  into `abstract_params`' shardings whatever mesh the base trained on. A base that had
  adapters of its own comes merged; a base's frozen parameters are read from its
  frozen_params. A language model fine-tuned into a classifier gives every parameter but
  its output layer; the classifier's head starts as initialised.

  `abstract_params`: the new model's params, ShapeDtypeStructs with shardings.
  `replicated`: a sharding for the base's own adapters, which the new model lacks.
  """
  wanted = base_step(config, base)
  in_checkpoint, in_frozen = _stored_shapes(base, wanted)
  stored = {**in_checkpoint, **in_frozen}
  base_model = _base_config(base).model
  base_scanned = base_model.scan_layers
  if base_scanned != config.model.scan_layers:
    raise UserError(
        f'model.scan_layers={config.model.scan_layers}, but the run in '
        f'init_from.workdir={config.init_from.workdir!r} used {base_scanned}: its layers '
        f'are stored {"stacked" if base_scanned else "one by one"}. Set '
        f'model.scan_layers={base_scanned}.')
  stored_plain = {k: v for k, v in stored.items() if not is_lora(k)}
  new_flat = _flat(abstract_params)
  expected = {k: tuple(v.shape) for k, v in new_flat.items() if not is_lora(k)}
  if any(map(is_head, expected)) and not any(map(is_head, stored_plain)):
    unused = sorted(set(stored_plain) - set(expected))
    print('The base is a language model and this run a classifier: its head starts from '
          'scratch' + (f', and the base\'s {", ".join(unused)} go unused.' if unused else '.'),
          flush=True)
    stored_plain = {k: v for k, v in stored_plain.items() if k in expected}
    expected = {k: v for k, v in expected.items() if not is_head(k)}
  for name in sorted(set(stored_plain) | set(expected)):
    if stored_plain.get(name) != expected.get(name):
      raise UserError(
          f'init_from.workdir={config.init_from.workdir!r} (step {wanted}) does not fit this '
          f'model: parameter {name} is {stored_plain.get(name, "absent")} there and '
          f'{expected.get(name, "absent")} here. Fine-tuning keeps the base\'s shapes: use '
          f'its model settings (model.name={base_model.name!r}, '
          f'num_layers={base_model.num_layers}, d_model={base_model.d_model}, '
          '...), changing only dropout, LoRA and the training fields.')

  def targets(names):
    out = {}
    for name in names:
      leaf = new_flat.get(name)
      out[name] = jax.ShapeDtypeStruct(
          stored[name], leaf.dtype if leaf is not None else np.float32,
          sharding=leaf.sharding if leaf is not None else replicated)
    return _unflat(out)

  params = ckpt_lib.restore_params(base, wanted, targets(in_checkpoint))
  if in_frozen:
    params = join(params, ckpt_lib.restore_frozen(base, targets(in_frozen)))
  # Only what this model has (and the base's own adapters, merged next).
  params = _unflat({k: v for k, v in _flat(params).items() if k in new_flat or is_lora(k)})
  spec = models.lora_spec(base_model)
  if spec:
    merged = _flat(transformer.merge_lora(params, spec))
    params = _unflat({k: jax.device_put(v, new_flat[k].sharding) for k, v in merged.items()})
  return params, wanted


def start_from_base(config, base: str, state, state_shardings, trainable, mesh):
  """`state` with the base run's parameters in place of the fresh ones (LoRA adapters
  excepted), on this run's shardings; the optimizer state stays fresh."""
  full = join(state.params, state.frozen)
  abstract = ckpt_lib.abstract_with_shardings(
      jax.eval_shape(lambda: full),
      join(state_shardings.params, state_shardings.frozen))
  base_params, base_step = load_base_params(config, base, abstract,
                                                     sharding.replicated(mesh))
  full = join(full, base_params)
  params, frozen = split(full, trainable) if trainable else (full, None)
  print(f'Fine-tuning from {base}, step {base_step}: its parameters and tokenizer; a fresh '
        'optimizer.', flush=True)
  return state.replace(params=params, frozen=frozen)
