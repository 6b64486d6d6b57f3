"""The model-agnostic decoder, driven by hand-written tokens_to_logits fakes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import decode

VOCAB = 7


def _counting_model(ids_BxT, state):
  """Always prefers (last token + 1) mod VOCAB; state counts the tokens it has seen."""
  logits_BxTxV = 5.0 * jax.nn.one_hot((ids_BxT + 1) % VOCAB, VOCAB)
  return logits_BxTxV, state + ids_BxT.shape[1]


def test_greedy_follows_the_argmax_and_threads_the_state():
  prompt = np.array([[0, 1, 2], [4, 4, 5]])
  out = decode.generate(_counting_model, jnp.zeros(()), prompt, max_new_tokens=5,
                        temperature=0.0)
  np.testing.assert_array_equal(out, [[3, 4, 5, 6, 0], [6, 0, 1, 2, 3]])


def test_top_k_one_sampling_equals_greedy():
  prompt = np.array([[3]])
  greedy = decode.generate(_counting_model, jnp.zeros(()), prompt, max_new_tokens=6,
                           temperature=0.0)
  sampled = decode.generate(_counting_model, jnp.zeros(()), prompt, max_new_tokens=6,
                            temperature=2.0, top_k=1, rng=jax.random.key(9))
  np.testing.assert_array_equal(greedy, sampled)


def test_sampling_matches_the_tempered_distribution():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.7]]))
  rngs = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda r: decode.sample_logits(logits, r, temperature=1.0, top_k=0))(rngs)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / draws.size
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.015)
  # temperature 0.5 squares the probabilities before renormalising
  draws = jax.vmap(lambda r: decode.sample_logits(logits, r, temperature=0.5, top_k=2))(rngs)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / draws.size
  np.testing.assert_allclose(freq, [0.0, 0.04 / 0.53, 0.49 / 0.53], atol=0.015)


@pytest.mark.parametrize('top_p', [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_with_that_mass(top_p):
  logits = jax.random.normal(jax.random.key(3), (64, 11)) * 2.0
  kept = np.isfinite(np.asarray(decode.top_p_mask(logits, top_p)))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  for row_probs, row_kept in zip(probs, kept):
    order = np.argsort(-row_probs)
    size = int(np.searchsorted(np.cumsum(row_probs[order]), top_p - 1e-7) + 1)
    expected = np.zeros_like(row_kept)
    expected[order[:size]] = True
    np.testing.assert_array_equal(row_kept, expected)


def test_top_p_sampling_renormalises_over_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  rngs = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda r: decode.sample_logits(logits, r, temperature=1.0, top_p=0.75))(rngs)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / draws.size
  np.testing.assert_allclose(freq, [0.625, 0.375, 0.0, 0.0], atol=0.015)


def test_same_seed_same_sample():
  def noisy(ids, state):
    return jnp.zeros(ids.shape + (VOCAB,)), state
  a = decode.generate(noisy, 0, np.array([[1]]), max_new_tokens=20, rng=jax.random.key(1))
  b = decode.generate(noisy, 0, np.array([[1]]), max_new_tokens=20, rng=jax.random.key(1))
  c = decode.generate(noisy, 0, np.array([[1]]), max_new_tokens=20, rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize('kwargs, field', [
    (dict(prompt=np.zeros((1, 0), np.int32)), 'prompt is empty'),
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(temperature=-1.0), 'temperature'),
    (dict(top_p=0.0), 'top_p'),
    (dict(top_p=1.5), 'top_p'),
    (dict(max_len=4), 'model.max_len'),
])
def test_bad_arguments_are_named(kwargs, field):
  args = dict(prompt=np.array([[1, 2]]), max_new_tokens=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    decode.generate(_counting_model, jnp.zeros(()), args.pop('prompt'), **args)
