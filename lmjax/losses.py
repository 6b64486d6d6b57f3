"""Masked token cross-entropy and the metrics derived from it."""
import math

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """Sums of per-token loss, correct predictions and weight (the token count).

  Sums rather than means, so that evaluation can add them over batches of
  different fill and divide once at the end.
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  weights_BxL = weights_BxL.astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(nll_BxL * weights_BxL),
      'correct_sum': jnp.sum(correct_BxL * weights_BxL),
      'weight_sum': jnp.sum(weights_BxL),
  }


def summarize(sums: dict, bits_per_char: bool) -> dict:
  """Mean loss (nats/token), perplexity, accuracy and, for character models, bits/char."""
  weight = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / weight
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 80.0)),
         'accuracy': float(sums['correct_sum']) / weight}
  if bits_per_char:
    out['bits_per_char'] = loss / math.log(2)
  return out
