"""The optimizer from `config.opt`: AdamW, warmup + cosine schedule, clipping."""
import jax
import optax


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `num_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.lr, warmup_steps=opt_config.warmup_steps,
      decay_steps=num_steps, end_value=opt_config.min_lr)


# Which parameters weight decay applies to, by name (the last key of the parameter's path):
# the embedding tables and the projection kernels, LoRA's included. Biases and norms never
# decay, whatever their rank: an attention bias is [heads, head_dim], a recurrent cell's
# [gates, hidden], and scanned layers give every parameter a leading `layers` axis.
DECAYED = frozenset({'embedding', 'position_embed', 'kernel', 'input_kernel',
                     'recurrent_kernel', 'output_kernel', 'lora_a', 'lora_b'})
NOT_DECAYED = frozenset({'bias', 'scale', 'output_bias', 'recurrent_bias'})


def decay_mask(params):
  """True for each parameter that weight decay applies to (see DECAYED)."""
  def decays(path, _) -> bool:
    # The last dict key: a boxed parameter (flax's logical axes) adds an attribute after it.
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    if name in DECAYED or name in NOT_DECAYED:
      return name in DECAYED
    raise ValueError(f'parameter {jax.tree_util.keystr(path)}: whether {name!r} takes weight '
                     'decay is not said; add it to DECAYED or NOT_DECAYED in lmjax/optim.py.')
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_config, num_steps)
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=decay_mask)
  if opt_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw)
  return adamw
