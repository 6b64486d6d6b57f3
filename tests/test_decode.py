"""The model-agnostic decoder: hand-written tokens_to_logits fakes, brute force on tiny
vocabularies, the real Transformer's KV cache against recomputing the prefix (and, past the
context, each window), and experiments/decode.py writing 1,000 tokens past a context of 16."""
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import decode, optim, state as state_lib, workdir as workdir_lib
from lmjax.data import tokenizers
from lmjax.errors import UserError
from lmjax.models import transformer
from lmjax.models.transformer import Transformer
from tests import script_cases, xla
from tests.models.test_transformer import TINY, _random_params

VOCAB = 7


def _counting_model(ids_BxT, state):
  """Always prefers (last token + 1) mod VOCAB; the cache counts the tokens seen."""
  logits_BxTxV = 5.0 * jax.nn.one_hot((ids_BxT + 1) % VOCAB, VOCAB)
  return logits_BxTxV, {'cache': {'seen': state['cache']['seen'] + ids_BxT.shape[1]}}


def _counting_state(batch):
  return {'cache': {'seen': jnp.zeros((batch,), jnp.int32)}}


def _tokens(result):
  return [[c.tokens.tolist() for c in candidates] for candidates in result]


# A stateful fake: next-token logits depend on the last two tokens through a random
# table, so a beam search that reorders its cache wrongly gets the wrong scores.
TRIGRAM_VOCAB = 4


def _trigram_table(seed, vocab=TRIGRAM_VOCAB):
  return jax.random.normal(jax.random.key(seed), (vocab, vocab, vocab)) * 1.5


def _trigram_model(ids_BxT, state):
  table = state['params']
  prev_Bx2 = state['cache']['prev']
  outs = []
  for t in range(ids_BxT.shape[1]):
    prev_Bx2 = jnp.stack([prev_Bx2[:, 1], ids_BxT[:, t]], axis=1)
    outs.append(table[prev_Bx2[:, 0], prev_Bx2[:, 1]])
  return jnp.stack(outs, axis=1), {'params': table, 'cache': {'prev': prev_Bx2}}


def _trigram_state(table, batch):
  return {'params': table, 'cache': {'prev': jnp.zeros((batch, 2), jnp.int32)}}


def _trigram_log_prob(table, prompt, continuation):
  log_probs = jax.nn.log_softmax(table, axis=-1)
  seq = [0, 0] + list(prompt) + list(continuation)
  return sum(float(log_probs[seq[i - 2], seq[i - 1], seq[i]])
             for i in range(2 + len(prompt), len(seq)))


# ----------------------------------------------------------------- greedy and sampling


def test_greedy_follows_the_argmax_and_threads_the_state():
  out = decode.generate(_counting_model, _counting_state(2), [[0, 1, 2], [4, 4, 5]],
                        max_new_tokens=5)
  assert _tokens(out) == [[[3, 4, 5, 6, 0]], [[6, 0, 1, 2, 3]]]
  assert all(c.finish == 'length' for cs in out for c in cs)


def test_prompts_of_different_lengths_are_forced_then_continued():
  out = decode.generate(_counting_model, _counting_state(3), [[2], [0, 5, 5, 5], [6, 6]],
                        max_new_tokens=3)
  assert _tokens(out) == [[[3, 4, 5]], [[6, 0, 1]], [[0, 1, 2]]]


def test_eos_ends_a_row_and_is_not_returned():
  out = decode.generate(_counting_model, _counting_state(2), [[1], [5]], max_new_tokens=6,
                        eos_id=4)
  assert _tokens(out) == [[[2, 3]], [[6, 0, 1, 2, 3]]]
  assert [cs[0].finish for cs in out] == ['eos', 'eos']


def test_stop_sequence_ends_a_row_and_is_kept():
  out = decode.generate(_counting_model, _counting_state(2), [[0], [3, 4]], max_new_tokens=6,
                        stop_sequences=[[3, 4], [6, 0, 1]])
  # Row 2's prompt already holds 3 4: only a stop wholly in the new tokens counts.
  assert _tokens(out) == [[[1, 2, 3, 4]], [[5, 6, 0, 1]]]
  assert [cs[0].finish for cs in out] == ['stop', 'stop']


def test_repetition_penalty_avoids_tokens_already_in_the_row():
  def two_choice(ids_BxT, state):
    # Token 1 always scores 2.0, token 2 scores 1.5, others 0.
    logits = jnp.broadcast_to(jnp.array([0.0, 2.0, 1.5, 0.0]), ids_BxT.shape + (4,))
    return logits, state
  state = _counting_state(1)
  plain = decode.generate(two_choice, state, [[0]], max_new_tokens=3)
  # 2.0 / 1.5 = 1.33 < 1.5: once 1 is in the row, 2 wins; then both are penalised.
  penalised = decode.generate(two_choice, state, [[0]], max_new_tokens=3,
                              repetition_penalty=1.5)
  assert _tokens(plain) == [[[1, 1, 1]]]
  assert _tokens(penalised) == [[[1, 2, 1]]]
  # Tokens in the prompt count too.
  assert _tokens(decode.generate(two_choice, state, [[1]], max_new_tokens=1,
                                 repetition_penalty=1.5)) == [[[2]]]


def test_a_carry_state_model_decodes_as_stepping_it_by_hand():
  # The trigram fake keeps a recurrent carry (its last two tokens), as an RNN does: no
  # cache over positions. Ragged prompts force the prefix-then-step path.
  table = _trigram_table(6)
  prompts = [[1], [2, 3, 0, 1, 2], [3, 3, 3]]
  out = decode.generate(_trigram_model, _trigram_state(table, 3), prompts, max_new_tokens=7)
  for prompt, candidates in zip(prompts, out, strict=True):
    state = _trigram_state(table, 1)
    logits, state = _trigram_model(jnp.asarray([prompt]), state)
    by_hand = []
    for _ in range(7):
      token = int(jnp.argmax(logits[0, -1]))
      by_hand.append(token)
      logits, state = _trigram_model(jnp.asarray([[token]]), state)
    assert candidates[0].tokens.tolist() == by_hand


def test_top_k_one_sampling_equals_greedy():
  table = _trigram_table(1)
  greedy = decode.generate(_trigram_model, _trigram_state(table, 1), [[3, 1]],
                           max_new_tokens=8)
  sampled = decode.generate(_trigram_model, _trigram_state(table, 1), [[3, 1]],
                            max_new_tokens=8, strategy='sample', temperature=2.0, top_k=1,
                            num_samples=3, seed=9)
  assert _tokens(sampled) == [_tokens(greedy)[0] * 3]


def test_greedy_score_is_the_sum_of_log_probs():
  table = _trigram_table(2)
  out = decode.generate(_trigram_model, _trigram_state(table, 1), [[1, 2, 3]],
                        max_new_tokens=5)[0][0]
  assert out.score == pytest.approx(_trigram_log_prob(table, [1, 2, 3], out.tokens), abs=1e-5)


def test_sampling_matches_the_tempered_distribution():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.7]]))
  rngs = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda r: decode.sample_logits(logits, r, temperature=1.0))(rngs)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / draws.size
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.015)
  # temperature 0.5 squares the probabilities before renormalising
  draws = jax.vmap(lambda r: decode.sample_logits(logits, r, temperature=0.5, top_k=2))(rngs)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / draws.size
  np.testing.assert_allclose(freq, [0.0, 0.04 / 0.53, 0.49 / 0.53], atol=0.015)


def test_generate_samples_from_the_model_distribution():
  # One new token from a fixed distribution, many samples: the frequencies match.
  probs = np.array([0.05, 0.15, 0.3, 0.5])
  def fixed(ids_BxT, state):
    return jnp.broadcast_to(jnp.log(probs), ids_BxT.shape + (4,)), state
  out = decode.generate(fixed, _counting_state(1), [[0]], max_new_tokens=1, strategy='sample',
                        num_samples=4000, seed=3)
  freq = np.bincount([c.tokens[0] for c in out[0]], minlength=4) / 4000
  np.testing.assert_allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize('top_p', [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_with_that_mass(top_p):
  logits = jax.random.normal(jax.random.key(3), (64, 11)) * 2.0
  kept = np.isfinite(np.asarray(decode.top_p_mask(logits, top_p)))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  for row_probs, row_kept in zip(probs, kept, strict=True):
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
  def flat(ids, state):
    return jnp.zeros(ids.shape + (VOCAB,)), state
  def run(seed):
    return _tokens(decode.generate(flat, _counting_state(1), [[1]], max_new_tokens=20,
                                   strategy='sample', num_samples=2, seed=seed))
  a, b, c = run(1), run(1), run(2)
  assert a == b
  assert a != c
  assert a[0][0] != a[0][1]  # the samples of one prompt differ from each other


# ------------------------------------------------------------------------ beam search


def _lp(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _brute_force_best(table, prompt, max_new, eos_id, alpha):
  """Every continuation: those ending at EOS, and the ones that reach max_new without it."""
  scored = []
  for length in range(1, max_new + 1):
    for seq in itertools.product(range(TRIGRAM_VOCAB), repeat=length):
      if eos_id in seq[:-1]:
        continue
      if seq[-1] != eos_id and length < max_new:
        continue
      score = _trigram_log_prob(table, prompt, seq) / _lp(length, alpha)
      scored.append((score, list(seq)))
  scored.sort(key=lambda s: -s[0])
  return scored


@pytest.mark.parametrize('seed, alpha', [(0, 0.0), (1, 0.6), (2, 1.0), (5, 2.0)])
def test_wide_beam_finds_the_exhaustive_optimum(seed, alpha):
  table, prompt, max_new, eos = _trigram_table(seed), [2, 1], 4, 3
  expected = _brute_force_best(table, prompt, max_new, eos, alpha)
  beams = decode.generate(_trigram_model, _trigram_state(table, 1), [prompt],
                          max_new_tokens=max_new, strategy='beam', beam_size=64,
                          num_samples=3, length_penalty=alpha, eos_id=eos)[0]
  for beam, (score, seq) in zip(beams, expected[:3], strict=True):
    # The EOS is not returned with the tokens.
    assert beam.tokens.tolist() == [t for t in seq if t != eos]
    assert beam.score == pytest.approx(score, abs=1e-4)
  assert [b.score for b in beams] == sorted([b.score for b in beams], reverse=True)


@pytest.mark.parametrize('compat, eos_id', [('lmjax', None), ('hf', 3)])
def test_beam_size_one_equals_greedy(compat, eos_id):
  # With an EOS, lmjax's beam of one may still finish a sequence that was not the
  # argmax (the 2K extensions may all finish), which greedy never does; Hugging Face's
  # rule (only the K best may finish) makes it greedy exactly.
  for seed in range(4):
    table = _trigram_table(seed)
    kwargs = dict(max_new_tokens=6, eos_id=eos_id)
    greedy = decode.generate(_trigram_model, _trigram_state(table, 2), [[1], [2, 0]], **kwargs)
    beam = decode.generate(_trigram_model, _trigram_state(table, 2), [[1], [2, 0]],
                           strategy='beam', beam_size=1, length_penalty=1.0,
                           beam_compat=compat, **kwargs)
    assert _tokens(greedy) == _tokens(beam)


def test_beam_beats_greedy_where_greedy_is_short_sighted():
  # Greedy takes 1 (p=0.6) then faces a flat choice; 2 (p=0.4) leads to a sure token.
  def model(ids_BxT, state):
    last = ids_BxT
    logits = jnp.where(
        (last == 0)[..., None], jnp.log(jnp.array([1e-6, 0.6, 0.4, 1e-6])),
        jnp.where((last == 1)[..., None], jnp.log(jnp.array([0.25, 0.25, 0.25, 0.25])),
                  jnp.log(jnp.array([1e-6, 1e-6, 1e-6, 1.0]))))
    return logits, state
  greedy = decode.generate(model, _counting_state(1), [[0]], max_new_tokens=2)[0][0]
  beam = decode.generate(model, _counting_state(1), [[0]], max_new_tokens=2, strategy='beam',
                         beam_size=2, length_penalty=0.0)[0][0]
  assert greedy.tokens.tolist()[0] == 1
  assert beam.tokens.tolist() == [2, 3]
  assert beam.score == pytest.approx(np.log(0.4), abs=1e-4)


def _early_stopping_table():
  """A trigram table (EOS = 3) where, with 2 beams after prompt [1], EOS ends [3] at the
  first new token (p 0.25) and [2, 3] at the second (0.7 * 0.4 = 0.28), while the likeliest
  continuation, [2, 2, 3] (0.7 * 0.55 * 0.9 = 0.3465), ends only at the third."""
  table = np.full((4, 4, 4), np.log(0.25), np.float32)
  table[0, 1] = np.log([0.03, 0.02, 0.7, 0.25])  # after the prompt
  table[1, 2] = np.log([0.03, 0.02, 0.55, 0.4])  # after [2]
  table[2, 2] = np.log([0.04, 0.03, 0.03, 0.9])  # after [2, 2]
  return jnp.asarray(table)


def _steps_taken(early_stopping: bool):
  """(beams, new tokens the search stepped through) for prompt [1] of the table above.
  The fake model reports each call's rows: the prompt's prefill has 1, every step of the
  search 2 (one per beam)."""
  rows = []

  def counted_model(ids_BxT, state):
    jax.debug.callback(lambda ids: rows.append(ids.shape[0]), ids_BxT)
    return _trigram_model(ids_BxT, state)

  beams = decode.generate(counted_model, _trigram_state(_early_stopping_table(), 1), [[1]],
                          max_new_tokens=6, strategy='beam', beam_size=2, num_samples=2,
                          eos_id=3, length_penalty=0.0, early_stopping=early_stopping)[0]
  jax.effects_barrier()
  assert rows[0] == 1 and set(rows[1:]) == {2}, rows
  return beams, len(rows) - 1


def test_early_stopping_ends_a_prompt_at_its_beam_size_th_finished_beam():
  hasty, hasty_steps = _steps_taken(early_stopping=True)
  patient, patient_steps = _steps_taken(early_stopping=False)
  # With it: the search ends at the second new token, when [3] and [2, 3] have finished,
  # and returns those two (EOS is not returned with the tokens).
  assert hasty_steps == 2
  assert [c.tokens.tolist() for c in hasty] == [[2], []]
  assert [c.score for c in hasty] == pytest.approx([np.log(0.28), np.log(0.25)], abs=1e-5)
  assert all(c.finish == 'eos' for c in hasty)
  # Without it: the live [2, 2] (0.385) can still beat the worse finished beam (0.25), so
  # the search goes on to the third token, finds [2, 2, 3], and stops there, no live beam
  # (at most 0.0154) being able to beat 0.28: well before max_new_tokens.
  assert patient_steps == 3
  assert [c.tokens.tolist() for c in patient] == [[2, 2], [2]]
  assert [c.score for c in patient] == pytest.approx([np.log(0.3465), np.log(0.28)],
                                                     abs=1e-5)


def test_merging_finished_beams_keeps_each_field_with_its_score():
  # One prompt, K = 2: a finished beam (score -1, token 9s) and an empty slot, then four
  # extensions (tokens 0-3) of which 0 and 2 ended; the others come in as NEG, as the
  # loop passes them. The K best are extension 0 and the old beam, in that order.
  beams = decode._beam_init(jnp.zeros((1, VOCAB)), _counting_state(1),
                            jnp.zeros((1, 3), jnp.int32), jnp.array([1]), 1, 2, False)
  beams = beams.replace(
      finished_tokens_BxKxL=jnp.full((1, 2, 3), 9),
      finished_scores_BxK=jnp.array([[-1.0, decode.NEG]]),
      finished_flags_BxK=jnp.array([[True, False]]),
      finished_ends_BxK=jnp.array([[1, 0]]), finished_lens_BxK=jnp.array([[2, 0]]))
  merged = decode._merge_finished(
      beams, jnp.broadcast_to(jnp.arange(4)[None, :, None], (1, 4, 3)),
      jnp.array([[-0.5, decode.NEG, -2.0, decode.NEG]]),
      jnp.array([[True, False, True, False]]), jnp.array([[2, 1, 0, 1]]), jnp.array([3]))
  assert merged.finished_scores_BxK.tolist() == [[-0.5, -1.0]]
  assert merged.finished_tokens_BxKxL[0, :, 0].tolist() == [0, 9]
  assert merged.finished_flags_BxK.tolist() == [[True, True]]
  assert merged.finished_ends_BxK.tolist() == [[2, 1]]
  assert merged.finished_lens_BxK.tolist() == [[3, 2]]
  assert merged.live_scores_BxK.tolist() == beams.live_scores_BxK.tolist()  # untouched


# ----------------------------------------------------------- the real Transformer


@pytest.fixture(scope='module')
def tiny_decoder():
  params = _random_params(Transformer(**TINY))
  model = Transformer(**TINY, decode=True)
  return model, params


def _greedy_by_recomputing(params, prompt, max_new):
  apply = jax.jit(Transformer(**TINY).apply)
  ids = list(prompt)
  for _ in range(max_new):
    logits = apply({'params': params}, jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids[len(prompt):]


def test_cached_greedy_equals_recomputing_the_whole_prefix(tiny_decoder):
  model, params = tiny_decoder
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
  tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=2)
  out = decode.generate(tokens_to_logits, state, prompts, max_new_tokens=6,
                        max_len=TINY['max_len'])
  for prompt, candidates in zip(prompts, out, strict=True):
    assert candidates[0].tokens.tolist() == _greedy_by_recomputing(params, prompt, 6)


@pytest.mark.parametrize('options', [
    dict(strategy='greedy'),
    dict(strategy='beam', beam_size=3, num_samples=3, eos_id=0),
    dict(strategy='greedy', repetition_penalty=1.3, stop_sequences=[[5, 5]]),
])
def test_a_padded_batch_gives_what_one_prompt_at_a_time_gives(tiny_decoder, options):
  model, params = tiny_decoder
  prompts = [[3], [1, 2, 3, 4, 5, 6, 7], [9, 9, 2, 8]]
  tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=3)
  batched = decode.generate(tokens_to_logits, state, prompts, max_new_tokens=7,
                            max_len=TINY['max_len'], **options)
  for prompt, together in zip(prompts, batched, strict=True):
    tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=1)
    alone, = decode.generate(tokens_to_logits, state, [prompt], max_new_tokens=7,
                             max_len=TINY['max_len'], **options)
    assert [c.tokens.tolist() for c in together] == [c.tokens.tolist() for c in alone]
    np.testing.assert_allclose([c.score for c in together], [c.score for c in alone],
                               atol=1e-4)


# ------------------------------------------------------ text longer than the context


def _window_length(n, max_len, stride):
  """How many of the last tokens the token after token n (0-based, prompt included) is
  predicted from: the rule lmjax/decode.py's docstring states, written out again."""
  if n < max_len:
    return n + 1
  return max_len - stride + 1 + (n - max_len) % stride


WINDOW_VOCAB = 32


def _window_model(ids_BxT, state):
  """Prefers, after each token, the number of tokens its cache then holds: what it writes
  spells out the length of the window at every step."""
  held_B = state['cache']['held']
  held_BxT = held_B[:, None] + 1 + jnp.arange(ids_BxT.shape[1])[None]
  logits_BxTxV = 5.0 * jax.nn.one_hot(held_BxT % WINDOW_VOCAB, WINDOW_VOCAB)
  return logits_BxTxV, {'cache': {'held': held_B + ids_BxT.shape[1]}}


@pytest.mark.parametrize('strategy, stride', [
    ('greedy', 8), ('sample', 3), ('beam', 1), ('greedy', 'unbounded')])
def test_past_the_context_each_token_sees_the_window_the_rule_gives(strategy, stride):
  # Prompts of 2 and 5 tokens, and one of 11 that keeps its last 8, decoded together.
  prompts = [[1, 1], [2] * 5, [3] * 11]
  max_len = None if stride == 'unbounded' else 8
  out = decode.generate(
      _window_model, {'cache': {'held': jnp.zeros((3,), jnp.int32)}}, prompts,
      max_new_tokens=20, strategy=strategy, temperature=0.1, beam_size=2, max_len=max_len,
      window_stride=None if max_len is None else stride)
  for prompt, (best, *_) in zip(prompts, out, strict=True):
    if max_len is None:  # a recurrent model: nothing restarts, ever
      expected = [len(prompt) + i for i in range(20)]
    else:
      start = min(len(prompt), max_len)
      expected = [_window_length(start - 1 + i, max_len, stride) for i in range(20)]
    assert best.tokens.tolist() == expected and best.finish == 'length'


@functools.cache
def _full_forward():
  return jax.jit(Transformer(**TINY).apply)


def _recompute_windows(params, prompt, stride, steps, follow=None):
  """Greedy decoding (or the tokens `follow`) by a full forward pass over exactly the
  tokens the window holds at each step: (new tokens, their summed log-probability)."""
  max_len = TINY['max_len']
  ids, total = list(prompt)[-max_len:], 0.0
  for i in range(steps):
    length = _window_length(len(ids) - 1, max_len, stride)
    window = ids[len(ids) - length:]
    # Padding after the window changes nothing before it: the model is causal.
    logits = _full_forward()({'params': params},
                             jnp.asarray([window + [0] * (max_len - length)], jnp.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0, length - 1]))
    token = int(np.argmax(log_probs)) if follow is None else int(follow[i])
    ids.append(token)
    total += float(log_probs[token])
  return ids[-steps:], total


# Decoded past the context of 16 (40 new tokens: the window slides often), and within it.
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
ROOM = TINY['max_len'] - 7  # new tokens that fit the context whole
SLIDING = {
    'greedy': dict(strategy='greedy'),
    'sample': dict(strategy='sample', num_samples=2, temperature=1.5, window_stride=5, seed=3),
    'beam': dict(strategy='beam', beam_size=3, num_samples=3, length_penalty=0.0,
                 window_stride=5),
}


@pytest.fixture(scope='module')
def sliding(tiny_decoder):
  """strategy -> its candidates for PROMPTS with 40 new tokens (each run once)."""
  model, params = tiny_decoder

  @functools.cache
  def run(strategy):
    tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=2)
    return decode.generate(tokens_to_logits, state, PROMPTS, max_new_tokens=40,
                           max_len=TINY['max_len'], **SLIDING[strategy])
  return run


@pytest.mark.parametrize('strategy', SLIDING)
def test_past_the_context_the_cache_equals_recomputing_each_window(tiny_decoder, sliding,
                                                                   strategy):
  _, params = tiny_decoder
  options = SLIDING[strategy]
  stride = options.get('window_stride', TINY['max_len'] // 2)
  for prompt, candidates in zip(PROMPTS, sliding(strategy), strict=True):
    assert len(candidates) == options.get('num_samples', 1)
    if strategy == 'greedy':
      assert candidates[0].tokens.tolist() == _recompute_windows(params, prompt, stride, 40)[0]
    for c in candidates:  # every score is the log-probability of its tokens, window by window
      assert len(c.tokens) == 40 and c.finish == 'length'
      assert c.score == pytest.approx(
          _recompute_windows(params, prompt, stride, 40, c.tokens)[1], abs=2e-3)


@pytest.mark.parametrize('strategy', ['greedy', 'sample'])
def test_the_window_changes_nothing_until_it_is_full(tiny_decoder, sliding, strategy):
  model, params = tiny_decoder
  tokens_to_logits, state = transformer.decode_fns(model, params, batch_size=2)
  within = decode.generate(tokens_to_logits, state, PROMPTS, max_new_tokens=ROOM,
                           max_len=TINY['max_len'], **SLIDING[strategy])
  assert [[t[:ROOM] for t in row] for row in _tokens(sliding(strategy))] == _tokens(within)


# ------------------------------------------------ experiments/decode.py past the context

SCRIPT_MAX_LEN = 16
SCRIPT_CHARS = 'ROMEO: abcdefgh'


def _never_ending_params(abstract_params):
  """Random weights of a tiny Transformer whose logits put EOS (id 0) about 40 below every
  character, so each continuation runs its full length: the final norm's feature 0 is a
  constant 10, and the tied embedding has +2 there for characters, -2 for EOS."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(x.dtype),
                        abstract_params)
  params['final_norm']['scale'][0], params['final_norm']['bias'][0] = 0.0, 10.0
  embedding = params['token_embed']['embedding']
  embedding[0, 0], embedding[1:, 0] = -2.0, 2.0
  return params


def checkpointed_workdir(workdir: str, max_len: int, chars: str, make_params) -> str:
  """A workdir holding a one-layer character model with a context of `max_len`: its config,
  tokenizer and checkpoint 1, whose params are `make_params(abstract params)` (the rest of
  the state zeros)."""
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=max_len)
  config.train.update(seq_len=max_len)
  tokenizer = tokenizers.CharTokenizer(sorted(set(chars)))
  workdir_lib.save_config(config, workdir)
  tokenizer.save(workdir)
  abstract = jax.eval_shape(functools.partial(
      state_lib.init_state, model=state_lib.build_model(config, tokenizer.vocab_size),
      tx=optim.make_optimizer(config.opt, config.train.num_steps), seq_len=max_len),
      jax.random.key(0))
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  state = zeros.replace(step=np.int32(1), params=make_params(abstract.params))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(1, state, {'next_example': 0})
  checkpointer.wait()
  checkpointer.close()
  return workdir


@pytest.fixture(scope='module')
def short_context_workdir(tmp_path_factory):
  """A checkpointed workdir of an untrained character model with a context of 16."""
  return checkpointed_workdir(str(tmp_path_factory.mktemp('short_context')), SCRIPT_MAX_LEN,
                              SCRIPT_CHARS, _never_ending_params)


def test_decode_script_writes_1000_characters_past_a_context_of_16(short_context_workdir):
  flags = [f'--workdir={short_context_workdir}', '--prompt=ROMEO:', '--max_new_tokens=1000',
           '--output=-']
  long_prompt = 'ROMEO: ' + 'abcdefgh ' * 3  # 34 characters, decoded beside ROMEO:
  cases = {
      'greedy': [*flags, '--strategy=greedy', f'--prompt={long_prompt}', '--batch_size=2'],
      'sample': [*flags, '--strategy=sample', '--top_k=5', '--num_samples=2'],
      'beam': [*flags, '--strategy=beam', '--beam_size=2', '--window_stride=3'],
      'window_stride': [*flags, '--window_stride=17'],
  }
  runs = script_cases.run({key: ('decode.py', argv) for key, argv in cases.items()},
                          env=dict(os.environ, XLA_FLAGS=xla.flags()))
  assert script_cases.error_line(runs.pop('window_stride')) == (
      'error: window_stride=17; it must be in [1, 16] (model.max_len, the model\'s context); '
      'unset, it is half of that.')
  prompts = {'greedy': ['ROMEO:', long_prompt], 'sample': ['ROMEO:'] * 2, 'beam': ['ROMEO:']}
  for strategy, done in runs.items():
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row['prompt'] for row in rows] == prompts[strategy]
    for row in rows:
      assert row['finish'] == 'length'
      assert len(row['tokens']) == 1000 and len(row['text']) == 1000
  assert ('note: prompt 2 is 34 tokens; the model reads only its last 16 (model.max_len).'
          in runs['greedy'].stderr.splitlines())


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('kwargs, field', [
    (dict(prompts=[[]]), 'prompt is empty'),
    (dict(prompts=[]), 'no prompts'),
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(strategy='nucleus'), 'strategy'),
    (dict(strategy='sample', temperature=0.0), 'temperature'),
    (dict(strategy='sample', temperature=-1.0), 'temperature'),
    (dict(strategy='sample', top_p=0.0), 'top_p'),
    (dict(strategy='sample', top_p=1.5), 'top_p'),
    (dict(strategy='sample', top_k=-2), 'top_k'),
    (dict(strategy='beam', beam_size=0), 'beam_size'),
    (dict(strategy='beam', beam_size=2, num_samples=3), 'num_samples'),
    (dict(strategy='beam', beam_compat='fairseq'), 'beam_compat'),
    (dict(strategy='beam', length_penalty=-1.0), 'length_penalty'),
    (dict(repetition_penalty=0.0), 'repetition_penalty'),
    (dict(num_samples=0), 'num_samples'),
    (dict(stop_sequences=[[]]), 'stop sequence is empty'),
    (dict(max_len=4, window_stride=5), r'window_stride=5; it must be in \[1, 4\]'),
    (dict(max_len=4, window_stride=0), 'window_stride=0'),
])
def test_bad_arguments_are_named(kwargs, field):
  args = dict(prompts=[[1, 2]], max_new_tokens=3)
  args.update(kwargs)
  with pytest.raises(UserError, match=field):
    decode.generate(_counting_model, _counting_state(1), args.pop('prompts'), **args)
