"""Model-agnostic autoregressive decoding: greedy, sampling and beam search.

The decoder knows nothing of model classes. It takes

    tokens_to_logits(ids_BxT, state) -> (logits_BxTxV, state)

and an initial `state` made for one row per prompt. `state` is a dict; its 'cache'
entry is the per-row decoding state (the Transformer's KV cache, an RNN's carry): every
leaf of rank >= 1 has the batch as its leading axis, and rank-0 leaves (a shared
position index) belong to all rows. The decoder repeats those rows for several samples
or beams and reorders them as beams move; everything else in `state` (the params)
passes through untouched, so a jitted loop takes it as an argument rather than baking
it in.

Beams move without copying a cache that says how to read it: a dict cache with a
'beam_rows' entry, int32[rows, 1, S] (the Transformer's `decode_fns` puts one there), is
read through it. In beam search the decoder makes it [prompts, K, S]: entry [b, i, s] is
the beam of prompt b whose cache row holds position s of beam i's text. A beam that
moves then takes its parent's entries (K x S integers), the model writes each new
position into the beam's own row and attends through the entries, and the cache's rows
never move. Other caches (an RNN's carry) are copied row by row as beams move.

How a call runs:
  * Prompts of different lengths share one buffer, right-padded. The prefix every
    prompt has (its length rounded down to a bucket, so few shapes compile) is fed in one
    call (prefill). After that, one token per step: a row whose prompt is not used up
    yet is fed its own next prompt token (forced), the others their new token. Rows
    therefore never need per-row positions, and the RNN family works the same way.
  * The loop is a `lax.while_loop` under jit: it stops as soon as every row has ended
    (EOS, a stop sequence, `max_new_tokens`), or for beam search, when no live beam
    can beat the finished ones. It compiles once per (rows, prefill bucket, buffer
    length) and set of static switches; temperature, top-p, penalties, lengths and
    the EOS id are traced values.
  * Text longer than the model's context (`max_len`, W below) slides through a window.
    The model's cache holds at most W tokens. When it is full and a token must be fed,
    the cache restarts from the state the caller gave, and the last `keep` = W - stride + 1
    tokens of the text (the new one included) go in at once, at positions 0..keep-1; one
    such re-read every `stride` tokens. Precisely: with the text's tokens numbered from 0,
    prompt included, the token after token n is predicted from the last n + 1 tokens while
    n < W, and from the last keep + (n - W) % stride tokens from then on, a length that
    cycles keep, keep + 1, ..., W. stride 1 re-reads the whole window at every token (the
    model always sees the last W tokens); the default W // 2 re-reads about half of it
    every W // 2 tokens. A prompt longer than W keeps only its last W tokens.

Strategies: 'greedy'; 'sample' (temperature, top-k, top-p, repetition penalty);
'beam' (length penalty, EOS handling, early stopping, n best). See `generate`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmjax.errors import UserError

STRATEGIES = ('greedy', 'sample', 'beam')
BEAM_COMPAT = ('lmjax', 'hf')
# Scores of impossible candidates. Finite (not -inf) so that sums and differences of
# them stay ordered and never turn into NaN; real log-probabilities never get near it.
NEG = -1.0e9
# No stop sequence may be longer than this many tokens (the window the loop compares).
MAX_STOP_TOKENS = 32

TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One continuation: its new tokens (EOS not included) and how it ended.

  `score`: for greedy and sampling, the sum of the model's log-probabilities of the new
  tokens (before temperature, top-k/top-p and penalties); for beam search, the
  length-penalised score the beams were ranked by. `finish`: 'eos', 'stop' (a stop
  sequence, which is kept at the end of `tokens`) or 'length' (max_new_tokens reached).
  """
  tokens: np.ndarray
  score: float
  finish: str


# ------------------------------------------------------------------ logits processing


def top_p_mask(logits_BxV, top_p):
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


def top_k_mask(logits_BxV, top_k: int):
  """Logits below the k-th largest of their row set to -inf (ties with it are kept)."""
  kth_best_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
  return jnp.where(logits_BxV < kth_best_Bx1, -jnp.inf, logits_BxV)


def repetition_penalty(scores_BxV, seen_BxV, penalty):
  """The CTRL paper's penalty (Keskar et al., 2019), as Hugging Face applies it: a token
  already in the row has its positive score divided by `penalty`, its negative score
  multiplied by it. 1 changes nothing; above 1 discourages repeats."""
  penalised_BxV = jnp.where(scores_BxV > 0, scores_BxV / penalty, scores_BxV * penalty)
  return jnp.where(seen_BxV, penalised_BxV, scores_BxV)


def sample_logits(logits_BxV, rng, *, temperature, top_k: int = 0, top_p=None):
  """One token per row, drawn from the tempered logits after top-k (0: off), then top-p
  (None: off; may be a traced value)."""
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BxV.shape[-1]:
    logits_BxV = top_k_mask(logits_BxV, top_k)
  if top_p is not None:
    logits_BxV = top_p_mask(logits_BxV, top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------- cache helpers


def _map_rows(fn, state):
  """Applies `fn` to every per-row leaf of state['cache'] (rank >= 1)."""
  cache = jax.tree.map(lambda x: fn(x) if x.ndim >= 1 else x, state['cache'])
  return {**state, 'cache': cache}


def _repeat_rows(state, times: int):
  """Each row's cache repeated `times` times, copies adjacent (row b -> rows b*times...)."""
  if times == 1:
    return state
  return _map_rows(lambda x: jnp.repeat(x, times, axis=0), state)


def _reads_rows(state) -> bool:
  """Whether the model reads its cache through 'beam_rows' (see the module docstring)."""
  return isinstance(state['cache'], dict) and 'beam_rows' in state['cache']


def _own_rows(state, k: int):
  """`state` with its 'beam_rows' for K beams per prompt, each beam reading only its own
  cache row: [rows // K, K, S] (after each prompt's row is repeated K times, or when the
  window restarts the cache)."""
  rows = state['cache']['beam_rows']
  own_BxKxS = jnp.broadcast_to(jnp.arange(k, dtype=rows.dtype)[None, :, None],
                               (rows.shape[0] * rows.shape[1] // k, k, rows.shape[2]))
  return {**state, 'cache': {**state['cache'], 'beam_rows': own_BxKxS}}


def _feed(tokens_to_logits, model_state, token_N, tokens_NxL, pos, start, *, initial_cache,
          copies: int, window):
  """Feeds every row its token at `pos` (`token_N`, already written in `tokens_NxL`);
  returns the logits for the token at pos + 1, (N, V) float32, the model's state, and the
  buffer position of the first token the model's cache holds (`start` before the call).

  Without a `window` this is one step of the model. With one, (size, keep), a cache that
  already holds `size` tokens restarts from `initial_cache` (row n from row n // copies,
  the row of its prompt) and takes the last `keep` tokens up to `pos` in one call (see
  the module docstring).
  """
  def step():
    logits_Nx1xV, new_state = tokens_to_logits(token_N[:, None], model_state)
    return logits_Nx1xV[:, -1].astype(jnp.float32), new_state, start

  if window is None:
    return step()
  size, keep = window
  # Sliced outside the branch, so that the branch takes these few tokens, not the buffer.
  kept_NxT = jax.lax.dynamic_slice_in_dim(tokens_NxL, pos + 1 - keep, keep, axis=1)

  def slide():
    prompt_N = jnp.arange(tokens_NxL.shape[0]) // copies
    cache = jax.tree.map(lambda x: x[prompt_N] if x.ndim >= 1 else x, initial_cache)
    restarted = {**model_state, 'cache': cache}
    if _reads_rows(model_state):  # each row re-reads its own text into itself
      restarted = _own_rows(restarted, model_state['cache']['beam_rows'].shape[1])
    logits_NxTxV, new_state = tokens_to_logits(kept_NxT, restarted)
    return logits_NxTxV[:, -1].astype(jnp.float32), new_state, pos + 1 - keep

  return jax.lax.cond(pos - start >= size, slide, step)


def _stop_hits(tokens_BxL, pos, stops_SxW, stop_lens_S, prompt_lens_B):
  """True where the tokens up to `pos` end with a stop sequence that lies wholly after
  the prompt. `stops_SxW` is right-aligned, -1 where shorter than the window W."""
  num_stops, width = stops_SxW.shape
  if num_stops == 0:
    return jnp.zeros(tokens_BxL.shape[0], bool)
  index_W = pos - width + 1 + jnp.arange(width)
  window_BxW = jnp.take(tokens_BxL, jnp.clip(index_W, 0), axis=1)
  window_BxW = jnp.where(index_W >= 0, window_BxW, -2)  # never matches a token or -1
  match_BxSxW = (stops_SxW[None] == -1) | (stops_SxW[None] == window_BxW[:, None])
  inside_BxS = pos - stop_lens_S[None, :] + 1 >= prompt_lens_B[:, None]
  return jnp.any(jnp.all(match_BxSxW, axis=-1) & inside_BxS, axis=-1)


def _seen_in_prompt(tokens_BxL, prompt_lens_B, vocab_size: int):
  """(B, V) bool: which tokens each row's prompt holds (for the repetition penalty)."""
  in_prompt_BxL = jnp.arange(tokens_BxL.shape[1])[None] < prompt_lens_B[:, None]
  index_BxL = jnp.where(in_prompt_BxL, tokens_BxL, vocab_size)  # out of range: dropped
  rows_Bx1 = jnp.arange(tokens_BxL.shape[0])[:, None]
  return jnp.zeros((tokens_BxL.shape[0], vocab_size), bool).at[rows_Bx1, index_BxL].set(
      True, mode='drop')


# ------------------------------------------------------------------ greedy / sampling

FINISH_NAMES = ('length', 'eos', 'stop')  # codes 0, 1, 2


@struct.dataclass
class SampleState:
  """What the greedy and sampling loop carries from one step to the next: N = B*copies rows,
  sample j of prompt b in row b*copies + j."""
  pos: jax.Array  # () int32: the buffer position this step writes
  start: jax.Array  # () int32: buffer position of the first token the model's cache holds
  tokens_NxL: jax.Array  # int32: prompt, then new tokens; 0 after a row is done
  logits_NxV: jax.Array  # float32: the model's logits for the token at `pos`
  model_state: Any  # the model's state (see the module docstring), one cache row per row
  done_N: jax.Array  # bool: rows that have ended
  finish_N: jax.Array  # int32: how each row ended, a FINISH_NAMES code
  length_N: jax.Array  # int32: new tokens so far (EOS included)
  score_N: jax.Array  # float32: summed log-probabilities of the new tokens
  seen_NxV: Any  # bool: tokens in each row, for the repetition penalty; None when it is off


@functools.partial(jax.jit, static_argnames=(
    'tokens_to_logits', 'prefill_len', 'copies', 'greedy', 'top_k', 'use_top_p',
    'use_penalty', 'window'))
def _sample_loop(state, tokens_BxL, prompt_lens_B, rng, max_new_tokens, temperature, top_p,
                 penalty, eos_id, stops_SxW, stop_lens_S, *, tokens_to_logits, prefill_len,
                 copies, greedy, top_k, use_top_p, use_penalty, window):
  feed = functools.partial(_feed, tokens_to_logits, initial_cache=state['cache'],
                           copies=copies, window=window)
  logits_BxPxV, state = tokens_to_logits(tokens_BxL[:, :prefill_len], state)
  # Every prompt is repeated `copies` times (samples), after the shared prefill.
  state = _repeat_rows(state, copies)
  tokens_NxL = jnp.repeat(tokens_BxL, copies, axis=0)
  prompt_lens_N = jnp.repeat(prompt_lens_B, copies, axis=0)
  logits_NxV = jnp.repeat(logits_BxPxV[:, -1], copies, axis=0).astype(jnp.float32)
  num_rows = tokens_NxL.shape[0]
  rows_N = jnp.arange(num_rows)
  end_N = prompt_lens_N + max_new_tokens  # position one past each row's last new token
  seen_NxV = None
  if use_penalty:
    seen_NxV = _seen_in_prompt(tokens_NxL, prompt_lens_N, logits_NxV.shape[-1])

  def cond(samples):
    return (samples.pos < jnp.max(end_N)) & ~jnp.all(samples.done_N)

  def body(samples):
    pos, logits_NxV, done_N = samples.pos, samples.logits_NxV, samples.done_N
    forced_N = pos < prompt_lens_N
    log_probs_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    if use_penalty:
      logits_NxV = repetition_penalty(logits_NxV, samples.seen_NxV, penalty)
    if greedy:
      choice_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    else:
      choice_N = sample_logits(logits_NxV, jax.random.fold_in(rng, pos),
                               temperature=temperature, top_k=top_k,
                               top_p=top_p if use_top_p else None)
    new_N = ~forced_N & ~done_N  # rows that really generate at this position
    token_N = jnp.where(forced_N, samples.tokens_NxL[:, pos], jnp.where(done_N, 0, choice_N))
    tokens_NxL = samples.tokens_NxL.at[:, pos].set(token_N)
    score_N = samples.score_N + jnp.where(new_N, log_probs_NxV[rows_N, token_N], 0.0)
    length_N = jnp.where(new_N, pos + 1 - prompt_lens_N, samples.length_N)
    seen_NxV = samples.seen_NxV
    if use_penalty:
      seen_NxV = seen_NxV.at[rows_N, token_N].set(True)

    eos_N = new_N & (token_N == eos_id)
    stop_N = new_N & _stop_hits(tokens_NxL, pos, stops_SxW, stop_lens_S, prompt_lens_N)
    full_N = new_N & (pos + 1 >= end_N)
    finish_N = jnp.where(eos_N, 1, jnp.where(stop_N, 2, samples.finish_N))
    done_N = done_N | eos_N | stop_N | full_N
    # The token goes in even when this was the last step: one spare forward pass per
    # call spares the loop body a test for it.
    logits_NxV, model_state, start = feed(samples.model_state, token_N, tokens_NxL, pos,
                                          samples.start)
    return SampleState(pos=pos + 1, start=start, tokens_NxL=tokens_NxL, logits_NxV=logits_NxV,
                       model_state=model_state, done_N=done_N, finish_N=finish_N,
                       length_N=length_N, score_N=score_N, seen_NxV=seen_NxV)

  samples = jax.lax.while_loop(cond, body, SampleState(
      pos=jnp.asarray(prefill_len, jnp.int32), start=jnp.zeros((), jnp.int32),
      tokens_NxL=tokens_NxL, logits_NxV=logits_NxV,
      model_state=state, done_N=jnp.zeros(num_rows, bool),
      finish_N=jnp.zeros(num_rows, jnp.int32), length_N=jnp.zeros(num_rows, jnp.int32),
      score_N=jnp.zeros(num_rows, jnp.float32), seen_NxV=seen_NxV))
  # Each prompt's samples as its K = copies slots, all kept, as `_beam_loop` returns beams.
  num_prompts = tokens_BxL.shape[0]

  def slots(x_Nx):
    return x_Nx.reshape((num_prompts, copies) + x_Nx.shape[1:])
  return (slots(samples.tokens_NxL), slots(samples.score_N),
          jnp.ones((num_prompts, copies), bool), slots(samples.finish_N), slots(samples.length_N))


# ------------------------------------------------------------------------ beam search


def length_penalty_divisor(length, alpha, compat: str):
  """What a finished beam's log-probability is divided by.

  'lmjax': GNMT's ((5 + length) / 6) ** alpha (Wu et al., 2016), as the Flax WMT example
  and T5X use. 'hf': length ** alpha, Hugging Face's `length_penalty`. alpha = 0 ranks
  by log-probability alone; larger alpha favours longer outputs.
  """
  length = jnp.asarray(length, jnp.float32)
  if compat == 'hf':
    return length ** alpha
  return ((5.0 + length) / 6.0) ** alpha


@struct.dataclass
class BeamState:
  """What the beam loop carries from one step to the next: B prompts with K beams each,
  N = B*K rows of the model's state, beam k of prompt b in row b*K + k."""
  pos: jax.Array  # () int32: the buffer position this step writes
  start: jax.Array  # () int32: buffer position of the first token the model's cache holds
  logits_NxV: jax.Array  # float32: the model's logits for the token at `pos`, per live beam
  model_state: Any  # the model's state (see the module docstring), one cache row per beam
  seen_NxV: Any  # bool: tokens in each live beam, for the repetition penalty; None when off
  live_scores_BxK: jax.Array  # summed log-probabilities, best first; NEG: no beam
  live_tokens_BxKxL: jax.Array  # int32: each live beam's prompt and new tokens
  finished_tokens_BxKxL: jax.Array  # int32: each finished beam's prompt and new tokens
  finished_scores_BxK: jax.Array  # length-penalised scores, best first; NEG: empty slot
  finished_flags_BxK: jax.Array  # bool: which slots hold a finished beam
  finished_ends_BxK: jax.Array  # int32: how each ended, a FINISH_NAMES code
  finished_lens_BxK: jax.Array  # int32: new tokens of each (EOS included)
  searching_B: jax.Array  # bool: prompts whose live beams may still beat their finished


def _beam_init(logits_BxV, state, tokens_BxL, prompt_lens_B, prefill_len: int, k: int,
               use_penalty: bool) -> BeamState:
  """The state after the prefill: only beam 0 of each prompt is alive, so that the K beams
  do not start as K copies of one, and no beam has finished."""
  num_prompts = tokens_BxL.shape[0]
  seen_NxV = None
  if use_penalty:
    seen_BxV = _seen_in_prompt(tokens_BxL, prompt_lens_B, logits_BxV.shape[-1])
    seen_NxV = jnp.repeat(seen_BxV, k, axis=0)
  live_tokens_BxKxL = jnp.repeat(tokens_BxL[:, None], k, axis=1)
  return BeamState(
      pos=jnp.asarray(prefill_len, jnp.int32), start=jnp.zeros((), jnp.int32),
      logits_NxV=jnp.repeat(logits_BxV, k, axis=0).astype(jnp.float32),
      model_state=(_own_rows(_repeat_rows(state, k), k) if _reads_rows(state) else
                   _repeat_rows(state, k)), seen_NxV=seen_NxV,
      live_scores_BxK=jnp.full((num_prompts, k), NEG).at[:, 0].set(0.0),
      live_tokens_BxKxL=live_tokens_BxKxL, finished_tokens_BxKxL=live_tokens_BxKxL,
      finished_scores_BxK=jnp.full((num_prompts, k), NEG),
      finished_flags_BxK=jnp.zeros((num_prompts, k), bool),
      finished_ends_BxK=jnp.zeros((num_prompts, k), jnp.int32),
      finished_lens_BxK=jnp.zeros((num_prompts, k), jnp.int32),
      searching_B=jnp.ones(num_prompts, bool))


def _gather_beams(x_BxKx, index_BxJ):
  """Entries `index_BxJ` of axis 1 (the beams) of `x_BxKx`, for every prompt."""
  return jnp.take_along_axis(x_BxKx, index_BxJ.reshape(index_BxJ.shape + (1,) * (
      x_BxKx.ndim - 2)), axis=1)


def _extend_beams(beams: BeamState, prompt_token_B, forced_B, penalty, use_penalty: bool):
  """The 2K best (beam, token) extensions of each prompt's live beams by summed
  log-probability: their scores, the live beam each extends, the token it adds, and the
  extended beams' tokens."""
  num_prompts, k, _ = beams.live_tokens_BxKxL.shape
  vocab_size = beams.logits_NxV.shape[-1]
  log_probs_NxV = jax.nn.log_softmax(beams.logits_NxV, axis=-1)
  if use_penalty:
    log_probs_NxV = repetition_penalty(log_probs_NxV, beams.seen_NxV, penalty)
  log_probs_BxKxV = log_probs_NxV.reshape(num_prompts, k, vocab_size)
  # A prompt token is the only possible extension while the prompt lasts.
  forced_BxV = jnp.where(jnp.arange(vocab_size)[None] == prompt_token_B[:, None], 0.0, NEG)
  log_probs_BxKxV = jnp.where(forced_B[:, None, None], forced_BxV[:, None], log_probs_BxKxV)

  totals_BxKV = (beams.live_scores_BxK[:, :, None] + log_probs_BxKxV).reshape(num_prompts, -1)
  scores_Bx2K, index_Bx2K = jax.lax.top_k(totals_BxKV, 2 * k)
  origin_Bx2K = index_Bx2K // vocab_size
  token_Bx2K = (index_Bx2K % vocab_size).astype(jnp.int32)
  tokens_Bx2KxL = _gather_beams(beams.live_tokens_BxKxL, origin_Bx2K).at[:, :, beams.pos].set(
      token_Bx2K)
  return scores_Bx2K, origin_Bx2K, token_Bx2K, tokens_Bx2KxL


def _merge_finished(beams: BeamState, tokens_Bx2KxL, scores_Bx2K, eligible_Bx2K, ends_Bx2K,
                    new_length_B) -> BeamState:
  """`beams` with the eligible extensions (`scores_Bx2K` NEG where not) merged into each
  prompt's K best finished."""
  finished_scores_BxK, best_BxK = jax.lax.top_k(
      jnp.concatenate([beams.finished_scores_BxK, scores_Bx2K], axis=1),
      beams.finished_scores_BxK.shape[1])

  def merge(finished_BxKx, extensions_Bx2Kx):
    return _gather_beams(jnp.concatenate([finished_BxKx, extensions_Bx2Kx], axis=1), best_BxK)

  new_lens_Bx2K = jnp.broadcast_to(new_length_B[:, None], scores_Bx2K.shape)
  return beams.replace(
      finished_tokens_BxKxL=merge(beams.finished_tokens_BxKxL, tokens_Bx2KxL),
      finished_scores_BxK=finished_scores_BxK,
      finished_flags_BxK=merge(beams.finished_flags_BxK, eligible_Bx2K),
      finished_ends_BxK=merge(beams.finished_ends_BxK, ends_Bx2K),
      finished_lens_BxK=merge(beams.finished_lens_BxK, new_lens_Bx2K))


def _follow_parents(beams: BeamState, parent_BxK, next_token_N, use_penalty: bool):
  """The model state and seen tokens of the new live beams: their parents' rows, with the
  tokens they add marked seen."""
  num_prompts, k = parent_BxK.shape
  flat_parent_N = (jnp.arange(num_prompts)[:, None] * k + parent_BxK).reshape(-1)
  if _reads_rows(beams.model_state):  # K x S integers move, not the cache
    cache = beams.model_state['cache']
    model_state = {**beams.model_state, 'cache': {
        **cache, 'beam_rows': _gather_beams(cache['beam_rows'], parent_BxK)}}
  else:
    model_state = _map_rows(lambda x: x[flat_parent_N], beams.model_state)
  seen_NxV = beams.seen_NxV
  if use_penalty:
    seen_NxV = seen_NxV[flat_parent_N].at[jnp.arange(num_prompts * k), next_token_N].set(True)
  return model_state, seen_NxV


@functools.partial(jax.jit, static_argnames=(
    'tokens_to_logits', 'prefill_len', 'beam_size', 'compat', 'early_stopping',
    'use_penalty', 'window'))
def _beam_loop(state, tokens_BxL, prompt_lens_B, max_new_tokens, alpha, penalty, eos_id,
               stops_SxW, stop_lens_S, *, tokens_to_logits, prefill_len, beam_size, compat,
               early_stopping, use_penalty, window):
  """Beam search over B prompts with K beams each; returns the K best finished beams.

  Each step takes the 2K best (beam, token) extensions by summed log-probability. The
  ones that end (EOS, stop sequence, or the length limit) are scored with the length
  penalty and merged into the K best finished; the K best that do not end stay live.
  A prompt stops when no live beam can beat its K-th finished one. `compat` picks
  between two definitions of that (see `generate`).
  """
  num_prompts, buffer_len = tokens_BxL.shape
  k = beam_size
  feed = functools.partial(_feed, tokens_to_logits, initial_cache=state['cache'], copies=k,
                           window=window)
  logits_BxPxV, state = tokens_to_logits(tokens_BxL[:, :prefill_len], state)
  end_B = prompt_lens_B + max_new_tokens

  def cond(beams):
    return (beams.pos < jnp.max(end_B)) & jnp.any(beams.searching_B)

  def body(beams):
    pos = beams.pos
    forced_B = pos < prompt_lens_B
    scores_Bx2K, origin_Bx2K, token_Bx2K, tokens_Bx2KxL = _extend_beams(
        beams, tokens_BxL[:, pos], forced_B, penalty, use_penalty)
    new_length_B = pos + 1 - prompt_lens_B
    generating_B = ~forced_B & beams.searching_B
    is_eos_Bx2K = token_Bx2K == eos_id
    stops_Bx2K = _stop_hits(tokens_Bx2KxL.reshape(num_prompts * 2 * k, buffer_len), pos,
                            stops_SxW, stop_lens_S,
                            jnp.repeat(prompt_lens_B, 2 * k)).reshape(num_prompts, 2 * k)
    at_limit_B = pos + 1 >= end_B
    ends_Bx2K = generating_B[:, None] & (is_eos_Bx2K | stops_Bx2K | at_limit_B[:, None])

    # Live beams for the next step: the K best extensions that did not end.
    live_scores_BxK, pick_BxK = jax.lax.top_k(jnp.where(ends_Bx2K, NEG, scores_Bx2K), k)
    parent_BxK = _gather_beams(origin_Bx2K, pick_BxK)
    next_token_N = _gather_beams(token_Bx2K, pick_BxK).reshape(-1)

    # Finished beams: merge the extensions that ended into the K best so far.
    eligible_Bx2K = ends_Bx2K
    if compat == 'hf':
      # Hugging Face only lets the K best of the 2K extensions finish.
      eligible_Bx2K = eligible_Bx2K & (jnp.arange(2 * k) < k)[None]
    if early_stopping:
      eligible_Bx2K = eligible_Bx2K & ~jnp.all(beams.finished_flags_BxK, axis=1, keepdims=True)
    divisor_B = length_penalty_divisor(jnp.maximum(new_length_B, 1), alpha, compat)
    ended_scores_Bx2K = jnp.where(eligible_Bx2K, scores_Bx2K / divisor_B[:, None], NEG)
    end_kind_Bx2K = jnp.where(is_eos_Bx2K, 1, jnp.where(stops_Bx2K, 2, 0))
    beams = _merge_finished(beams, tokens_Bx2KxL, ended_scores_Bx2K, eligible_Bx2K,
                            end_kind_Bx2K, new_length_B)

    # Can a live beam still beat the worst of the K finished?
    if compat == 'hf':
      # Hugging Face's default heuristic (early_stopping=False): judge the best live
      # beam as if it ended now.
      bound_B = live_scores_BxK[:, 0] / divisor_B
    else:
      # Exact: log-probabilities only fall as a beam grows and the divisor only grows
      # (alpha >= 0), so the best a live beam can reach is its score now over the
      # divisor of the longest allowed output.
      bound_B = live_scores_BxK[:, 0] / length_penalty_divisor(max_new_tokens, alpha, compat)
    full_B = jnp.all(beams.finished_flags_BxK, axis=1)
    worst_B = jnp.where(full_B, jnp.min(beams.finished_scores_BxK, axis=1), NEG)
    still_B = (bound_B > worst_B) & ~at_limit_B
    if early_stopping:
      still_B = still_B & ~full_B

    model_state, seen_NxV = _follow_parents(beams, parent_BxK, next_token_N, use_penalty)
    live_tokens_BxKxL = _gather_beams(tokens_Bx2KxL, pick_BxK)
    logits_NxV, model_state, start = feed(model_state, next_token_N,
                                          live_tokens_BxKxL.reshape(k * num_prompts, -1), pos,
                                          beams.start)
    return beams.replace(
        pos=pos + 1, start=start, logits_NxV=logits_NxV, model_state=model_state,
        seen_NxV=seen_NxV, live_scores_BxK=live_scores_BxK, live_tokens_BxKxL=live_tokens_BxKxL,
        searching_B=beams.searching_B & (forced_B | still_B))

  beams = jax.lax.while_loop(cond, body, _beam_init(
      logits_BxPxV[:, -1], state, tokens_BxL, prompt_lens_B, prefill_len, k, use_penalty))
  return (beams.finished_tokens_BxKxL, beams.finished_scores_BxK, beams.finished_flags_BxK,
          beams.finished_ends_BxK, beams.finished_lens_BxK)


# -------------------------------------------------------------------------- front end


def _buckets():
  """1, 2, 3, 4, 6, 8, 12, 16, 24, ...: powers of two and 1.5 times them."""
  power = 1
  while True:
    yield power
    if power >= 2:
      yield power * 3 // 2
    power *= 2


def _bucket_down(n: int) -> int:
  """The largest bucket <= n."""
  best = 1
  for size in _buckets():
    if size > n:
      return best
    best = size


def buffer_length(needed: int, max_len: int | None = None) -> int:
  """Positions the decoder allocates for `needed` (longest prompt + new tokens): the
  smallest bucket that holds them, so that few shapes compile, capped at the model's
  context. A KV cache this long (rather than max_len) is enough for `generate`, and
  attention and beam reordering then touch no more memory than that."""
  length = next(size for size in _buckets() if size >= needed)
  return min(length, max_len) if max_len else length


def _stop_array(stop_sequences: Sequence[Sequence[int]]):
  """Right-aligned (S, W) int32 array, -1 padded, and the lengths."""
  stops = [list(map(int, s)) for s in stop_sequences]
  for s in stops:
    if not s:
      raise UserError('a stop sequence is empty; every stop string must encode to at '
                      'least one token.')
    if len(s) > MAX_STOP_TOKENS:
      raise UserError(f'a stop sequence is {len(s)} tokens long; at most '
                      f'{MAX_STOP_TOKENS} are supported.')
  width = max((len(s) for s in stops), default=1)
  array = np.full((len(stops), width), -1, np.int32)
  for i, s in enumerate(stops):
    array[i, width - len(s):] = s
  return jnp.asarray(array), jnp.asarray([len(s) for s in stops], jnp.int32)


def _check_options(prompts, *, max_new_tokens, strategy, num_samples, temperature, top_k,
                   top_p, repetition_penalty, beam_size, length_penalty, beam_compat,
                   max_len, window_stride) -> None:
  """Rejects `generate`'s impossible arguments with a message naming the argument."""
  if strategy not in STRATEGIES:
    raise UserError(f'strategy={strategy!r}; use one of {", ".join(STRATEGIES)}.')
  if not prompts:
    raise UserError('no prompts given.')
  if any(len(p) == 0 for p in prompts):
    raise UserError('a prompt is empty; give at least one token (--prompt).')
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens}; it must be at least 1.')
  if num_samples < 1:
    raise UserError(f'num_samples={num_samples}; it must be at least 1.')
  if repetition_penalty <= 0:
    raise UserError(f'repetition_penalty={repetition_penalty}; it must be positive '
                    '(1 means no penalty).')
  if strategy == 'sample':
    if temperature <= 0:
      raise UserError(f'temperature={temperature}; sampling needs a positive temperature '
                      "(use strategy='greedy' for argmax decoding).")
    if top_k < 0:
      raise UserError(f'top_k={top_k}; use 0 for no limit or a positive count.')
    if not 0.0 < top_p <= 1.0:
      raise UserError(f'top_p={top_p}; it must be in (0, 1] (1 keeps every token).')
  if strategy == 'beam':
    if beam_size < 1:
      raise UserError(f'beam_size={beam_size}; it must be at least 1.')
    if num_samples > beam_size:
      raise UserError(f'num_samples={num_samples} beams asked for but beam_size='
                      f'{beam_size}; raise beam_size or lower num_samples.')
    if beam_compat not in BEAM_COMPAT:
      raise UserError(f'beam_compat={beam_compat!r}; use one of {", ".join(BEAM_COMPAT)}.')
    if length_penalty < 0:
      raise UserError(f'length_penalty={length_penalty}; it must be >= 0 (0: none).')
  if max_len is not None and window_stride is not None and not 1 <= window_stride <= max_len:
    raise UserError(f'window_stride={window_stride}; it must be in [1, {max_len}] '
                    "(model.max_len, the model's context); unset, it is half of that.")


def _sliding_window(max_len: int | None, needed: int, window_stride: int | None = None):
  """(size, keep) of the window a decode that needs `needed` positions (prompt + new
  tokens) slides through, or None when they fit `max_len` (None: unbounded). The window
  is the model's context; `keep` = size - stride + 1 tokens are re-read every `stride`
  (default max_len // 2) tokens; see the module docstring."""
  if max_len is None or needed <= max_len:
    return None
  stride = max(max_len // 2, 1) if window_stride is None else window_stride
  return max_len, max_len - stride + 1



def generate(tokens_to_logits: TokensToLogits, state, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, strategy: str = 'greedy', num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, beam_size: int = 4,
             length_penalty: float = 0.6, beam_compat: str = 'lmjax',
             early_stopping: bool = False, eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
             max_len: int | None = None,
             window_stride: int | None = None) -> list[list[Candidate]]:
  """Continues each prompt; returns, per prompt, a list of `Candidate`s.

  Args:
    tokens_to_logits, state: the model (see the module docstring); `state` has one row
      per prompt.
    prompts: token id sequences, any lengths >= 1.
    max_new_tokens: tokens to add at most (fewer where EOS or a stop sequence comes).
    strategy: 'greedy' | 'sample' | 'beam'.
    num_samples: continuations per prompt (greedy and sample). For beam search, the
      number of best beams returned (at most `beam_size`).
    temperature, top_k, top_p: sampling only. top_k 0 and top_p 1 switch them off.
    repetition_penalty: > 1 discourages tokens already in the row (prompt included).
    beam_size, length_penalty (alpha), early_stopping: beam search only.
      early_stopping=True ends a prompt as soon as it has `beam_size` finished beams.
    beam_compat: 'lmjax' (default) scores with GNMT's length penalty, lets any of the
      2K extensions of a step finish, and stops when no live beam can beat the K-th
      finished one, exactly. 'hf' reproduces Hugging Face `generate` (num_beams=K,
      do_sample=False): penalty length ** alpha, only the K best extensions may finish,
      and its stopping heuristic (the best live beam judged as if it ended now).
    eos_id: the token that ends a continuation (not returned); None: never ends early.
    stop_sequences: token sequences that end a continuation (kept in its tokens).
    seed: sampling is a pure function of it.
    max_len: the model's context, if bounded. A prompt longer than it keeps its last
      max_len tokens (the repetition penalty sees only those), and text longer than it
      slides through a window (see the module docstring). `state`'s cache must hold
      `buffer_length(longest prompt + max_new_tokens, max_len)` positions.
    window_stride: tokens between two re-reads of the window, in [1, max_len]; None:
      max_len // 2. Only text longer than max_len uses it.
  """
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  _check_options(prompts, max_new_tokens=max_new_tokens, strategy=strategy,
                 num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, beam_size=beam_size,
                 length_penalty=length_penalty, beam_compat=beam_compat, max_len=max_len,
                 window_stride=window_stride)
  if max_len is not None:
    prompts = [p[-max_len:] for p in prompts]
  longest = max(len(p) for p in prompts)
  window = _sliding_window(max_len, longest + max_new_tokens, window_stride)
  # The cache holds at most max_len positions; the token buffer holds the whole text.
  buffer_len = buffer_length(longest + max_new_tokens, None if window else max_len)
  tokens_BxL = np.zeros((len(prompts), buffer_len), np.int32)
  for row, p in enumerate(prompts):
    tokens_BxL[row, :len(p)] = p
  prompt_lens_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
  prefill_len = _bucket_down(min(len(p) for p in prompts))
  stops_SxW, stop_lens_S = _stop_array(stop_sequences)
  # An id outside the vocabulary never matches: no EOS.
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  use_penalty = repetition_penalty != 1.0
  max_new = jnp.asarray(max_new_tokens, jnp.int32)
  penalty = jnp.asarray(repetition_penalty, jnp.float32)

  if strategy == 'beam':
    slots = _beam_loop(
        state, jnp.asarray(tokens_BxL), prompt_lens_B, max_new,
        jnp.asarray(length_penalty, jnp.float32), penalty, eos, stops_SxW, stop_lens_S,
        tokens_to_logits=tokens_to_logits, prefill_len=prefill_len, beam_size=beam_size,
        compat=beam_compat, early_stopping=bool(early_stopping), use_penalty=use_penalty,
        window=window)
  else:
    slots = _sample_loop(
        state, jnp.asarray(tokens_BxL), prompt_lens_B, jax.random.key(seed), max_new,
        jnp.asarray(temperature if strategy == 'sample' else 1.0, jnp.float32),
        jnp.asarray(top_p, jnp.float32), penalty, eos, stops_SxW, stop_lens_S,
        tokens_to_logits=tokens_to_logits, prefill_len=prefill_len, copies=num_samples,
        greedy=strategy == 'greedy', top_k=int(top_k) if strategy == 'sample' else 0,
        use_top_p=strategy == 'sample' and top_p < 1.0, use_penalty=use_penalty,
        window=window)
  return _candidates(prompts, slots, num_samples)


def _candidates(prompts, slots, count: int) -> list[list[Candidate]]:
  """Per prompt, a `Candidate` for each of its first `count` kept slots. `slots` is what
  the loops return: (tokens_BxKxL, scores_BxK, kept_BxK, ends_BxK, lens_BxK)."""
  tokens_BxKxL, scores_BxK, kept_BxK, ends_BxK, lens_BxK = jax.device_get(slots)
  results = []
  for row, p in enumerate(prompts):
    kept = [j for j in range(kept_BxK.shape[1]) if kept_BxK[row, j]][:count]
    results.append([_candidate(tokens_BxKxL[row, j], len(p), lens_BxK[row, j],
                               FINISH_NAMES[ends_BxK[row, j]], scores_BxK[row, j])
                    for j in kept])
  return results


def _candidate(row_tokens, prompt_len: int, length: int, finish: str, score) -> Candidate:
  """The `length` new tokens after the prompt, less a final EOS."""
  new = np.asarray(row_tokens[prompt_len:prompt_len + int(length)])
  if finish == 'eos':
    new = new[:-1]
  return Candidate(tokens=new, score=float(score), finish=finish)
