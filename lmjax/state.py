"""The train state: the model a config describes, and its state initialised straight into
its shardings."""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lmjax import finetune, models, sharding
from lmjax.data import corpora, pipeline
from lmjax.models import rnn

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


def is_encoder(config) -> bool:
  """A bidirectional Transformer (model.causal=False): trained as a masked LM, it has one
  more id than its tokenizer, the mask token's, `masking(config, ...).mask_id`."""
  return not config.model.causal


def masking(config, tokenizer) -> pipeline.Masking | None:
  """The masked-LM corruption of an encoder's language-model training; None otherwise."""
  if not is_encoder(config) or corpora.class_names(config.data.name):
    return None
  return pipeline.Masking(rate=config.train.mask_rate,
                          mask_id=tokenizer.vocab_size, vocab_size=tokenizer.vocab_size)


def build_model(config, vocab_size: int, *, decode: bool = False):
  """The model of `config`: a language model, or a classifier with one output per class
  when data.name is a classification dataset. `vocab_size` is the tokenizer's."""
  if is_encoder(config):
    vocab_size += 1  # the mask token
  return models.build_model(config.model, vocab_size, decode=decode,
                            num_classes=len(corpora.class_names(config.data.name)))


def init_state(rng, *, model, tx, seq_len: int, carry_rows: int = 0,
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
                       trainable=None, check_shapes=None):
  """Initialises the state directly into its shardings; no full host copy of the params.
  `check_shapes`, if given, is called with the state's shapes before anything is allocated."""
  init = functools.partial(init_state, model=model, tx=tx, seq_len=seq_len,
                           carry_rows=carry_rows, trainable=trainable)

  rng = jax.random.key(seed)
  abstract_boxed = jax.eval_shape(functools.partial(init, unbox=False), rng)
  if check_shapes is not None:
    check_shapes(abstract_boxed)
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  for note in sharding.unsplit_dims(abstract_boxed.params, mesh, rules):
    print(f'note: parameter {note}.', flush=True)
  # A carry row belongs with the batch row it continues.
  state_shardings = state_shardings.replace(carry=jax.tree.map(
      lambda _: sharding.batch_sharding(mesh), abstract_boxed.carry))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(functools.partial(init, unbox=True), out_shardings=state_shardings)(rng)
  return state, state_shardings


def param_counts(state: TrainState) -> tuple[int, int]:
  """(all parameters, trained ones)."""
  trained = models.count_params(state.params)
  return trained + models.count_params(state.frozen or {}), trained


def carry_rows(config) -> int:
  """Rows of the carry kept in the train state: the global batch when stateful, else 0."""
  return config.train.batch_size if config.train.stateful else 0


def eval_carry(model, mesh, batch_size: int):
  """The zero carry a stateful evaluation starts from, rows split as the batch is."""
  return jax.jit(lambda: rnn.model_initial_carry(model, batch_size),
                 out_shardings=sharding.batch_sharding(mesh))()
