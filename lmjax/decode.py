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


@functools.partial(jax.jit, static_argnames=(
    'tokens_to_logits', 'prefill_len', 'copies', 'greedy', 'top_k', 'use_top_p',
    'use_penalty'))
def _sample_loop(state, tokens_BxL, prompt_lens_B, rng, max_new_tokens, temperature, top_p,
                 penalty, eos_id, stops_SxW, stop_lens_S, *, tokens_to_logits, prefill_len,
                 copies, greedy, top_k, use_top_p, use_penalty):
  logits_BxPxV, state = tokens_to_logits(tokens_BxL[:, :prefill_len], state)
  # Every prompt is repeated `copies` times (samples), after the shared prefill.
  state = _repeat_rows(state, copies)
  tokens_BxL = jnp.repeat(tokens_BxL, copies, axis=0)
  prompt_lens_B = jnp.repeat(prompt_lens_B, copies, axis=0)
  logits_BxV = jnp.repeat(logits_BxPxV[:, -1], copies, axis=0).astype(jnp.float32)
  num_rows, buffer_len = tokens_BxL.shape
  vocab_size = logits_BxV.shape[-1]
  rows_B = jnp.arange(num_rows)
  end_B = prompt_lens_B + max_new_tokens  # position one past each row's last new token
  seen_BxV = None
  if use_penalty:
    seen_BxV = _seen_in_prompt(tokens_BxL, prompt_lens_B, vocab_size)

  def cond(carry):
    pos, _, _, _, done_B, *_ = carry
    return (pos < jnp.max(end_B)) & ~jnp.all(done_B)

  def body(carry):
    pos, tokens_BxL, logits_BxV, state, done_B, finish_B, length_B, score_B, seen_BxV = carry
    forced_B = pos < prompt_lens_B
    log_probs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    if use_penalty:
      logits_BxV = repetition_penalty(logits_BxV, seen_BxV, penalty)
    if greedy:
      choice_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    else:
      choice_B = sample_logits(logits_BxV, jax.random.fold_in(rng, pos),
                               temperature=temperature, top_k=top_k,
                               top_p=top_p if use_top_p else None)
    new_B = ~forced_B & ~done_B  # rows that really generate at this position
    token_B = jnp.where(forced_B, tokens_BxL[:, pos], jnp.where(done_B, 0, choice_B))
    tokens_BxL = tokens_BxL.at[:, pos].set(token_B)
    score_B = score_B + jnp.where(new_B, log_probs_BxV[rows_B, token_B], 0.0)
    length_B = jnp.where(new_B, pos + 1 - prompt_lens_B, length_B)
    if use_penalty:
      seen_BxV = seen_BxV.at[rows_B, token_B].set(True)

    eos_B = new_B & (token_B == eos_id)
    stop_B = new_B & _stop_hits(tokens_BxL, pos, stops_SxW, stop_lens_S, prompt_lens_B)
    full_B = new_B & (pos + 1 >= end_B)
    finish_B = jnp.where(eos_B, 1, jnp.where(stop_B, 2, finish_B))
    done_B = done_B | eos_B | stop_B | full_B
    # The token goes in even when this was the last step: one spare forward pass per
    # call buys a loop body with no branches.
    logits_Bx1xV, state = tokens_to_logits(token_B[:, None], state)
    return (pos + 1, tokens_BxL, logits_Bx1xV[:, -1].astype(jnp.float32), state, done_B,
            finish_B, length_B, score_B, seen_BxV)

  carry = (jnp.asarray(prefill_len, jnp.int32), tokens_BxL, logits_BxV, state,
           jnp.zeros(num_rows, bool), jnp.zeros(num_rows, jnp.int32),
           jnp.zeros(num_rows, jnp.int32), jnp.zeros(num_rows, jnp.float32), seen_BxV)
  _, tokens_BxL, _, _, _, finish_B, length_B, score_B, _ = jax.lax.while_loop(
      cond, body, carry)
  return tokens_BxL, finish_B, length_B, score_B


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


@functools.partial(jax.jit, static_argnames=(
    'tokens_to_logits', 'prefill_len', 'beam_size', 'compat', 'early_stopping',
    'use_penalty'))
def _beam_loop(state, tokens_BxL, prompt_lens_B, max_new_tokens, alpha, penalty, eos_id,
               stops_SxW, stop_lens_S, *, tokens_to_logits, prefill_len, beam_size, compat,
               early_stopping, use_penalty):
  """Beam search over B prompts with K beams each; returns the K best finished beams.

  Each step takes the 2K best (beam, token) extensions by summed log-probability. The
  ones that end (EOS, stop sequence, or the length limit) are scored with the length
  penalty and merged into the K best finished; the K best that do not end stay live.
  A prompt stops when no live beam can beat its K-th finished one. `compat` picks
  between two definitions of that (see `generate`).
  """
  num_prompts, buffer_len = tokens_BxL.shape
  k = beam_size
  logits_BxPxV, state = tokens_to_logits(tokens_BxL[:, :prefill_len], state)
  state = _repeat_rows(state, k)
  vocab_size = logits_BxPxV.shape[-1]
  logits_NxV = jnp.repeat(logits_BxPxV[:, -1], k, axis=0).astype(jnp.float32)  # N = B*K
  end_B = prompt_lens_B + max_new_tokens
  prompt_BxL = tokens_BxL
  seen_NxV = None
  if use_penalty:
    seen_NxV = jnp.repeat(_seen_in_prompt(tokens_BxL, prompt_lens_B, vocab_size), k, axis=0)

  # Only beam 0 is alive at first, so the K beams do not start as K copies of one.
  live_scores_BxK = jnp.full((num_prompts, k), NEG).at[:, 0].set(0.0)
  live_tokens_BxKxL = jnp.repeat(tokens_BxL[:, None], k, axis=1)
  finished_tokens_BxKxL = live_tokens_BxKxL
  finished_scores_BxK = jnp.full((num_prompts, k), NEG)
  finished_flags_BxK = jnp.zeros((num_prompts, k), bool)
  finished_ends_BxK = jnp.zeros((num_prompts, k), jnp.int32)  # 1 eos, 2 stop, 0 length
  finished_lens_BxK = jnp.zeros((num_prompts, k), jnp.int32)
  searching_B = jnp.ones(num_prompts, bool)
  rank_2K = jnp.arange(2 * k)

  def gather_beams(x_BxKx, index_BxJ):
    return jnp.take_along_axis(x_BxKx, index_BxJ.reshape(index_BxJ.shape + (1,) * (
        x_BxKx.ndim - 2)), axis=1)

  def cond(carry):
    pos, searching_B = carry[0], carry[-1]
    return (pos < jnp.max(end_B)) & jnp.any(searching_B)

  def body(carry):
    (pos, logits_NxV, state, seen_NxV, live_scores_BxK, live_tokens_BxKxL,
     finished_tokens_BxKxL, finished_scores_BxK, finished_flags_BxK, finished_ends_BxK,
     finished_lens_BxK, searching_B) = carry
    log_probs_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    if use_penalty:
      log_probs_NxV = repetition_penalty(log_probs_NxV, seen_NxV, penalty)
    log_probs_BxKxV = log_probs_NxV.reshape(num_prompts, k, vocab_size)
    forced_B = pos < prompt_lens_B
    # A prompt token is the only possible extension while the prompt lasts.
    prompt_token_B = prompt_BxL[:, pos]
    forced_BxV = jnp.where(jnp.arange(vocab_size)[None] == prompt_token_B[:, None], 0.0, NEG)
    log_probs_BxKxV = jnp.where(forced_B[:, None, None], forced_BxV[:, None], log_probs_BxKxV)

    totals_BxKV = (live_scores_BxK[:, :, None] + log_probs_BxKxV).reshape(num_prompts, -1)
    top_scores_Bx2K, top_index_Bx2K = jax.lax.top_k(totals_BxKV, 2 * k)
    origin_Bx2K = top_index_Bx2K // vocab_size
    token_Bx2K = (top_index_Bx2K % vocab_size).astype(jnp.int32)
    cand_tokens_Bx2KxL = gather_beams(live_tokens_BxKxL, origin_Bx2K).at[:, :, pos].set(
        token_Bx2K)

    new_length_B = pos + 1 - prompt_lens_B
    generating_B = ~forced_B & searching_B
    is_eos_Bx2K = token_Bx2K == eos_id
    stops_Bx2K = _stop_hits(cand_tokens_Bx2KxL.reshape(num_prompts * 2 * k, buffer_len), pos,
                            stops_SxW, stop_lens_S,
                            jnp.repeat(prompt_lens_B, 2 * k)).reshape(num_prompts, 2 * k)
    at_limit_B = pos + 1 >= end_B
    ends_Bx2K = generating_B[:, None] & (is_eos_Bx2K | stops_Bx2K | at_limit_B[:, None])

    # Live beams for the next step: the K best extensions that did not end.
    live_pick_Bx2K = jnp.where(ends_Bx2K, NEG, top_scores_Bx2K)
    live_scores_BxK, pick_BxK = jax.lax.top_k(live_pick_Bx2K, k)
    live_tokens_BxKxL = gather_beams(cand_tokens_Bx2KxL, pick_BxK)
    parent_BxK = gather_beams(origin_Bx2K, pick_BxK)
    next_token_N = gather_beams(token_Bx2K, pick_BxK).reshape(-1)

    # Finished beams: merge the extensions that ended into the K best so far.
    eligible_Bx2K = ends_Bx2K
    if compat == 'hf':
      # Hugging Face only lets the K best of the 2K extensions finish.
      eligible_Bx2K = eligible_Bx2K & (rank_2K < k)[None]
    if early_stopping:
      eligible_Bx2K = eligible_Bx2K & ~jnp.all(finished_flags_BxK, axis=1, keepdims=True)
    divisor_B = length_penalty_divisor(jnp.maximum(new_length_B, 1), alpha, compat)
    ended_scores_Bx2K = jnp.where(eligible_Bx2K, top_scores_Bx2K / divisor_B[:, None], NEG)
    end_kind_Bx2K = jnp.where(is_eos_Bx2K, 1, jnp.where(stops_Bx2K, 2, 0))
    merged_scores = jnp.concatenate([finished_scores_BxK, ended_scores_Bx2K], axis=1)
    finished_scores_BxK, best_BxK = jax.lax.top_k(merged_scores, k)
    finished_tokens_BxKxL = gather_beams(
        jnp.concatenate([finished_tokens_BxKxL, cand_tokens_Bx2KxL], axis=1), best_BxK)
    finished_flags_BxK = gather_beams(
        jnp.concatenate([finished_flags_BxK, eligible_Bx2K], axis=1), best_BxK)
    finished_ends_BxK = gather_beams(
        jnp.concatenate([finished_ends_BxK, end_kind_Bx2K], axis=1), best_BxK)
    new_lens_Bx2K = jnp.broadcast_to(new_length_B[:, None], (num_prompts, 2 * k))
    finished_lens_BxK = gather_beams(
        jnp.concatenate([finished_lens_BxK, new_lens_Bx2K], axis=1), best_BxK)

    # Can a live beam still beat the worst of the K finished?
    if compat == 'hf':
      # Hugging Face's default heuristic (early_stopping=False): judge the best live
      # beam as if it ended now.
      bound_B = live_scores_BxK[:, 0] / length_penalty_divisor(
          jnp.maximum(new_length_B, 1), alpha, compat)
    else:
      # Exact: log-probabilities only fall as a beam grows and the divisor only grows
      # (alpha >= 0), so the best a live beam can reach is its score now over the
      # divisor of the longest allowed output.
      bound_B = live_scores_BxK[:, 0] / length_penalty_divisor(max_new_tokens, alpha, compat)
    full_B = jnp.all(finished_flags_BxK, axis=1)
    worst_B = jnp.where(full_B, jnp.min(finished_scores_BxK, axis=1), NEG)
    still_B = (bound_B > worst_B) & ~at_limit_B
    if early_stopping:
      still_B = still_B & ~full_B
    searching_B = searching_B & (forced_B | still_B)

    flat_parent_N = (jnp.arange(num_prompts)[:, None] * k + parent_BxK).reshape(-1)
    state = _map_rows(lambda x: x[flat_parent_N], state)
    if use_penalty:
      seen_NxV = seen_NxV[flat_parent_N].at[jnp.arange(num_prompts * k), next_token_N].set(
          True)
    logits_Nx1xV, state = tokens_to_logits(next_token_N[:, None], state)
    return (pos + 1, logits_Nx1xV[:, -1].astype(jnp.float32), state, seen_NxV,
            live_scores_BxK, live_tokens_BxKxL, finished_tokens_BxKxL, finished_scores_BxK,
            finished_flags_BxK, finished_ends_BxK, finished_lens_BxK, searching_B)

  carry = (jnp.asarray(prefill_len, jnp.int32), logits_NxV, state, seen_NxV, live_scores_BxK,
           live_tokens_BxKxL, finished_tokens_BxKxL, finished_scores_BxK, finished_flags_BxK,
           finished_ends_BxK, finished_lens_BxK, searching_B)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[6:11]


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
      raise ValueError('a stop sequence is empty; every stop string must encode to at '
                       'least one token.')
    if len(s) > MAX_STOP_TOKENS:
      raise ValueError(f'a stop sequence is {len(s)} tokens long; at most '
                       f'{MAX_STOP_TOKENS} are supported.')
  width = max((len(s) for s in stops), default=1)
  array = np.full((len(stops), width), -1, np.int32)
  for i, s in enumerate(stops):
    array[i, width - len(s):] = s
  return jnp.asarray(array), jnp.asarray([len(s) for s in stops], jnp.int32)


def generate(tokens_to_logits: TokensToLogits, state, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, strategy: str = 'greedy', num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, beam_size: int = 4,
             length_penalty: float = 0.6, beam_compat: str = 'lmjax',
             early_stopping: bool = False, eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
             max_len: int | None = None) -> list[list[Candidate]]:
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
    max_len: the model's context (prompt + new tokens must fit), if bounded.
  """
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy={strategy!r}; use one of {", ".join(STRATEGIES)}.')
  if not prompts:
    raise ValueError('no prompts given.')
  if any(len(p) == 0 for p in prompts):
    raise ValueError('a prompt is empty; give at least one token (--prompt).')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}; it must be at least 1.')
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples}; it must be at least 1.')
  if repetition_penalty <= 0:
    raise ValueError(f'repetition_penalty={repetition_penalty}; it must be positive '
                     '(1 means no penalty).')
  if strategy == 'sample':
    if temperature <= 0:
      raise ValueError(f'temperature={temperature}; sampling needs a positive temperature '
                       "(use strategy='greedy' for argmax decoding).")
    if top_k < 0:
      raise ValueError(f'top_k={top_k}; use 0 for no limit or a positive count.')
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f'top_p={top_p}; it must be in (0, 1] (1 keeps every token).')
  if strategy == 'beam':
    if beam_size < 1:
      raise ValueError(f'beam_size={beam_size}; it must be at least 1.')
    if num_samples > beam_size:
      raise ValueError(f'num_samples={num_samples} beams asked for but beam_size='
                       f'{beam_size}; raise beam_size or lower num_samples.')
    if beam_compat not in BEAM_COMPAT:
      raise ValueError(f'beam_compat={beam_compat!r}; use one of {", ".join(BEAM_COMPAT)}.')
    if length_penalty < 0:
      raise ValueError(f'length_penalty={length_penalty}; it must be >= 0 (0: none).')
  longest = max(len(p) for p in prompts)
  if max_len is not None and longest + max_new_tokens > max_len:
    raise ValueError(
        f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the '
        f"model's context of {max_len} tokens (model.max_len); shorten the prompt or ask "
        'for fewer tokens.')

  buffer_len = buffer_length(longest + max_new_tokens, max_len)
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
    tokens_BxKxL, scores_BxK, flags_BxK, ends_BxK, lens_BxK = jax.device_get(_beam_loop(
        state, jnp.asarray(tokens_BxL), prompt_lens_B, max_new,
        jnp.asarray(length_penalty, jnp.float32), penalty, eos, stops_SxW, stop_lens_S,
        tokens_to_logits=tokens_to_logits, prefill_len=prefill_len, beam_size=beam_size,
        compat=beam_compat, early_stopping=bool(early_stopping), use_penalty=use_penalty))
    results = []
    for row, p in enumerate(prompts):
      kept = [j for j in range(beam_size) if flags_BxK[row, j]][:num_samples]
      results.append([_candidate(tokens_BxKxL[row, j], len(p), lens_BxK[row, j],
                                 FINISH_NAMES[ends_BxK[row, j]], scores_BxK[row, j])
                      for j in kept])
    return results

  tokens_NxL, finish_N, length_N, score_N = jax.device_get(_sample_loop(
      state, jnp.asarray(tokens_BxL), prompt_lens_B, jax.random.key(seed), max_new,
      jnp.asarray(temperature if strategy == 'sample' else 1.0, jnp.float32),
      jnp.asarray(top_p, jnp.float32), penalty, eos, stops_SxW, stop_lens_S,
      tokens_to_logits=tokens_to_logits, prefill_len=prefill_len, copies=num_samples,
      greedy=strategy == 'greedy', top_k=int(top_k) if strategy == 'sample' else 0,
      use_top_p=strategy == 'sample' and top_p < 1.0, use_penalty=use_penalty))
  results = []
  for row, p in enumerate(prompts):
    rows = range(row * num_samples, (row + 1) * num_samples)
    results.append([_candidate(tokens_NxL[n], len(p), length_N[n], FINISH_NAMES[finish_N[n]],
                               score_N[n]) for n in rows])
  return results


def _candidate(row_tokens, prompt_len: int, length: int, finish: str, score) -> Candidate:
  """The `length` new tokens after the prompt, less a final EOS."""
  new = np.asarray(row_tokens[prompt_len:prompt_len + int(length)])
  if finish == 'eos':
    new = new[:-1]
  return Candidate(tokens=new, score=float(score), finish=finish)
