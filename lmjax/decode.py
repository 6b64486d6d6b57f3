"""Model-agnostic autoregressive decoding: greedy and temperature / top-k / top-p sampling.

The decoder knows nothing of model classes. It takes
  tokens_to_logits(ids_BxT, state) -> (logits_BxTxV, state)
and an initial `state` (for the Transformer: its params and an empty KV cache). The
prompt is fed in one call (prefill), then one token per step inside a jitted loop.
"""
import functools

import jax
import jax.numpy as jnp


def top_p_mask(logits_BxV, top_p: float):
  """Logits outside the nucleus set to -inf: the smallest set of most likely tokens whose
  probabilities add up to at least `top_p` (ties at the boundary are all kept)."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  sorted_BxV = jnp.sort(probs_BxV, axis=-1)[:, ::-1]
  # Mass of the tokens strictly more likely than each sorted one; a token is kept while
  # that mass is still short of top_p.
  mass_before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
  kept_BxV = mass_before_BxV < top_p
  threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(probs_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample_logits(logits_BxV, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """One token per row: argmax at temperature 0, else a draw from the tempered top-k / top-p."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    kth_best = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_best, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    logits_BxV = top_p_mask(logits_BxV, top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('tokens_to_logits', 'max_new_tokens',
                                             'temperature', 'top_k', 'top_p'))
def _generate(state, prompt_BxP, rng, *, tokens_to_logits, max_new_tokens, temperature,
              top_k, top_p):
  logits_BxPxV, state = tokens_to_logits(prompt_BxP, state)

  def step(carry, step_rng):
    last_logits_BxV, state = carry
    token_B = sample_logits(last_logits_BxV, step_rng, temperature=temperature, top_k=top_k,
                            top_p=top_p)
    logits_Bx1xV, state = tokens_to_logits(token_B[:, None], state)
    return (logits_Bx1xV[:, -1], state), token_B

  # The last step's logits are computed and dropped; that keeps the loop body uniform.
  rngs = jax.random.split(rng, max_new_tokens)
  _, tokens_NxB = jax.lax.scan(step, (logits_BxPxV[:, -1], state), rngs)
  return tokens_NxB.T


def generate(tokens_to_logits, state, prompt_BxP, *, max_new_tokens: int, rng=None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             max_len: int | None = None):
  """Continues each prompt row by `max_new_tokens` tokens; returns only the new ones.

  `temperature=0` is greedy decoding; top-k and top-p (nucleus) restrict sampling and
  combine (top-k first). `max_len` is the model's context, if bounded.
  """
  prompt_len = prompt_BxP.shape[1]
  if prompt_len == 0:
    raise ValueError('the prompt is empty; give at least one token (--prompt).')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}; it must be at least 1.')
  if temperature < 0:
    raise ValueError(f'temperature={temperature}; use 0 for greedy or a positive value.')
  if top_k < 0:
    raise ValueError(f'top_k={top_k}; use 0 for no limit or a positive count.')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p}; it must be in (0, 1] (1 keeps every token).')
  if max_len is not None and prompt_len + max_new_tokens > max_len:
    raise ValueError(
        f'prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the '
        f"model's context of {max_len} tokens (model.max_len); shorten the prompt or ask "
        'for fewer tokens.')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(state, jnp.asarray(prompt_BxP, jnp.int32), rng,
                   tokens_to_logits=tokens_to_logits, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
