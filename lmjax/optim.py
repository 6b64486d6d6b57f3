"""The optimizer from `config.opt`: AdamW, warmup + cosine schedule, clipping."""
import jax
import optax


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `num_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.lr, warmup_steps=opt_config.warmup_steps,
      decay_steps=num_steps, end_value=opt_config.min_lr)


def decay_mask(params):
  """Weight decay on matrices only: biases, LayerNorm and other vectors are left alone."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_config, num_steps)
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=decay_mask)
  if opt_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw)
  return adamw
