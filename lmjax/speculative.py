"""Speculative decoding: a cheap draft proposes k tokens, the target model scores all of them
in one call, and an acceptance rule keeps exactly what the target alone would produce.

    results, stats = speculative.generate(target_fn, target_state, prompts,
                                          draft=speculative.ModelDraft(draft_fn, draft_state),
                                          num_draft_tokens=4, max_new_tokens=200)

Both models follow `lmjax.decode`'s contract, `tokens_to_logits(ids_BxT, state) -> (logits,
state)`. The target must be able to rewind its cache: its state's cache holds a shared
position index (an integer leaf of rank 0, as the KV-cached Transformer's does), so that
forgetting the rejected tokens is moving that index back. The draft may be any model with
the same vocabulary (a small Transformer, an LSTM: a cache without an index is rewound to
a copy kept after each of its steps), or `NgramDraft`, which needs no model: it copies what
followed the last occurrence of the text's final n tokens earlier in the text (prompt
lookup), a good guess wherever the output repeats the prompt.

One round, with the text's last token (pending, not yet fed) at position pos - 1:
  1. The draft feeds that token and then its own proposals d_1..d_k, one call each (k + 1
     calls: the last puts d_k in its cache for the next round).
  2. The target feeds [last, d_1..d_k] in one call: the logits p_1..p_{k+1} for positions
     pos..pos+k.
  3. Greedy: d_i is accepted while it is the target's argmax. Sampling (Leviathan et al.,
     2023; Chen et al., 2023): d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)),
     q the draft's distribution; the first rejected position is drawn from the residual
     max(0, p - q) renormalised, and when all k are accepted a last token is drawn from
     p_{k+1}. Either way each kept token has the target's distribution, exactly.
  4. Every row advances by the same m + 1 tokens, m the fewest accepted in the batch: the
     caches share one position index. A row that accepted more keeps its (accepted) d_{m+1}
     as its last token; the extra accepted tokens are proposed again next round. So a
     batch gains less than a single prompt, and the output stays exact.
  5. Both caches move back to hold the text up to pos + m - 1.

Rows still inside their prompt (prompts of different lengths share the buffer) have their
prompt tokens as proposals, always accepted, as `lmjax.decode` forces them. Probabilities
use the same temperature, top-k and top-p for the target and the draft (`sample_logits`'s
processing), so sampling keeps the distribution plain sampling draws from. Not offered
here: beam search, the repetition penalty, and text longer than either model's context
(no sliding window): `generate` refuses them in one line.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import decode
from lmjax.errors import UserError

# The n-gram draft tries the last NGRAM_MAX tokens first, then shorter suffixes down to one.
NGRAM_MAX = 3


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDraft:
  """A draft model: its `tokens_to_logits` and its initial state, one row per prompt."""
  tokens_to_logits: Any
  state: Any


@dataclasses.dataclass(frozen=True)
class NgramDraft:
  """Prompt lookup: proposes what followed the latest earlier occurrence of the text's last
  n tokens (n = max_n, then shorter), copying its own proposals where the copy runs on."""
  max_n: int = NGRAM_MAX


@dataclasses.dataclass(frozen=True)
class Stats:
  """How a call went: `rounds` target calls after the prompt, `new_tokens` tokens they kept
  (all `rows`, each up to its end), and the draft's proposals accepted out of those made
  (prompt positions not counted)."""
  rounds: int
  new_tokens: int
  proposed: int
  accepted: int
  rows: int = 1

  @property
  def acceptance(self) -> float:
    return self.accepted / self.proposed if self.proposed else 0.0

  @property
  def tokens_per_round(self) -> float:
    """New tokens a row gets from a call of the target, on average."""
    return self.new_tokens / self.rounds / self.rows if self.rounds else 0.0


def _has_index(state) -> bool:
  return any(x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)
             for x in jax.tree.leaves(state['cache']))


def _rewind(state, back):
  """The state with its cache's position index moved `back` tokens earlier."""
  cache = jax.tree.map(
      lambda x: x - back if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer) else x,
      state['cache'])
  return {**state, 'cache': cache}


def _probs(logits_xV, temperature, top_p, *, top_k: int, use_top_p: bool):
  """The distribution sampling draws from: tempered, then top-k, then top-p (any leading
  axes)."""
  logits_NxV = logits_xV.reshape(-1, logits_xV.shape[-1]).astype(jnp.float32) / temperature
  if 0 < top_k < logits_NxV.shape[-1]:
    logits_NxV = decode.top_k_mask(logits_NxV, top_k)
  if use_top_p:
    logits_NxV = decode.top_p_mask(logits_NxV, top_p)
  return jax.nn.softmax(logits_NxV, axis=-1).reshape(logits_xV.shape)


def _ngram_proposals(tokens_BxL, pos, k: int, max_n: int):
  """(B, k) proposals from the text tokens_BxL[:, :pos]: the tokens that followed the latest
  earlier match of its last n tokens, for the longest n <= max_n that has one (zeros where
  none does: they are rejected like any wrong guess)."""
  num_rows, length = tokens_BxL.shape
  start_L = jnp.arange(length)
  best_B = jnp.full((num_rows,), -1, jnp.int32)  # where the copied continuation starts
  for n in range(1, max_n + 1):  # a longer match, where there is one, wins
    suffix_BxN = jax.lax.dynamic_slice_in_dim(tokens_BxL, jnp.maximum(pos - n, 0), n, axis=1)
    match_BxL = start_L[None] + n < pos  # the match ends before the suffix's last token
    for offset in range(n):
      shifted_BxL = jnp.roll(tokens_BxL, -offset, axis=1)
      match_BxL &= shifted_BxL == suffix_BxN[:, offset:offset + 1]
    match_BxL &= pos >= n + 1
    latest_B = jnp.max(jnp.where(match_BxL, start_L[None], -1), axis=1)
    best_B = jnp.where(latest_B >= 0, latest_B + n, best_B)
  rows_B = jnp.arange(num_rows)

  def copy(i, proposals_BxK):
    source_B = best_B + i  # a source at or past pos is one of these proposals
    from_text_B = tokens_BxL[rows_B, jnp.clip(source_B, 0, length - 1)]
    from_own_B = proposals_BxK[rows_B, jnp.clip(source_B - pos, 0, k - 1)]
    token_B = jnp.where(source_B < pos, from_text_B, from_own_B)
    return proposals_BxK.at[:, i].set(jnp.where(best_B >= 0, token_B, 0))

  return jax.lax.fori_loop(0, k, copy, jnp.zeros((num_rows, k), tokens_BxL.dtype))


def _forced(tokens_BxL, prompt_lens_B, first, count: int):
  """(B, count): which of positions first..first+count-1 lie in each row's prompt, and the
  buffer's tokens there."""
  positions_C = first + jnp.arange(count)
  in_prompt_BxC = positions_C[None] < prompt_lens_B[:, None]
  tokens_BxC = jax.lax.dynamic_slice_in_dim(tokens_BxL, first, count, axis=1)
  return in_prompt_BxC, tokens_BxC


def _draft_round(draft, draft_state, tokens_BxL, prompt_lens_B, pos, rng, k: int, greedy: bool,
                 process):
  """The draft's k proposals for positions pos..pos+k-1, (B, k); their distributions
  (B, k, V), one-hot for the n-gram draft and greedy; and the draft's state after feeding
  [last, d_1..d_k] (for a model whose cache has no index, with the copies after each
  feed, leading axis k + 1)."""
  forced_BxK, prompt_BxK = _forced(tokens_BxL, prompt_lens_B, pos, k)
  if isinstance(draft, NgramDraft):
    proposals_BxK = _ngram_proposals(tokens_BxL, pos, k, draft.max_n)
    proposals_BxK = jnp.where(forced_BxK, prompt_BxK, proposals_BxK)
    return proposals_BxK, None, draft_state
  fn, keep_copies = draft

  def step(carry, i):
    state, token_B, rng = carry
    logits_Bx1xV, state = fn(token_B[:, None], state)
    logits_BxV = logits_Bx1xV[:, -1]
    rng, key = jax.random.split(rng)
    if greedy:
      q_BxV = None
      choice_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    else:
      q_BxV = process(logits_BxV)
      choice_B = jax.random.categorical(key, jnp.log(q_BxV), axis=-1).astype(jnp.int32)
    i_k = jnp.minimum(i, k - 1)  # the (k+1)-th call only feeds d_k
    choice_B = jnp.where(forced_BxK[:, i_k], prompt_BxK[:, i_k], choice_B)
    copy = state['cache'] if keep_copies else None
    return (state, choice_B, rng), (choice_B, q_BxV, copy)

  last_B = jax.lax.dynamic_index_in_dim(tokens_BxL, pos - 1, axis=1, keepdims=False)
  (state, _, _), (choices_KxB, q_KxBxV, copies) = jax.lax.scan(
      step, (draft_state, last_B, rng), jnp.arange(k + 1))
  proposals_BxK = choices_KxB[:k].T
  q_BxKxV = None if greedy else jnp.moveaxis(q_KxBxV[:k], 0, 1)
  if keep_copies:
    state = {**state, 'cache': copies}
  return proposals_BxK, q_BxKxV, state


def _judge(logits_BxTxV, proposals_BxK, q_BxKxV, forced_BxT, prompt_BxT, done_B, accept_key,
           correct_key, *, greedy: bool, process):
  """Which proposals the target accepts: each row's run of leading accepted ones, m (the
  fewest of the rows still going), and the token each row would keep at index m had it
  stopped accepting there (the target's argmax, or a draw from the residual)."""
  num_rows, k = proposals_BxK.shape
  rows_B = jnp.arange(num_rows)
  forced_BxK = forced_BxT[:, :k]
  if greedy:
    best_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
    accepted_BxK = forced_BxK | (best_BxT[:, :k] == proposals_BxK)
  else:
    p_BxTxV = process(logits_BxTxV)
    if q_BxKxV is None:  # a deterministic draft: all of q on the proposal
      q_BxKxV = jax.nn.one_hot(proposals_BxK, p_BxTxV.shape[-1], dtype=jnp.float32)
    p_prop_BxK = jnp.take_along_axis(p_BxTxV[:, :k], proposals_BxK[..., None], -1)[..., 0]
    q_prop_BxK = jnp.take_along_axis(q_BxKxV, proposals_BxK[..., None], -1)[..., 0]
    u_BxK = jax.random.uniform(accept_key, (num_rows, k))
    accepted_BxK = forced_BxK | (u_BxK * q_prop_BxK <= p_prop_BxK)
  run_B = jnp.sum(jnp.cumprod(accepted_BxK, axis=1), axis=1)
  m = jnp.min(jnp.where(done_B, k, run_B))
  if greedy:
    correction_B = best_BxT[rows_B, m]
  else:
    p_next_BxV = p_BxTxV[rows_B, m]
    q_next_BxV = jnp.where(m < k, q_BxKxV[rows_B, jnp.minimum(m, k - 1)], 0.0)
    residual_BxV = jnp.maximum(p_next_BxV - q_next_BxV, 0.0)
    residual_BxV = jnp.where(jnp.sum(residual_BxV, -1, keepdims=True) > 0, residual_BxV,
                             p_next_BxV)
    correction_B = jax.random.categorical(correct_key, jnp.log(residual_BxV), axis=-1)
  correction_B = jnp.where(forced_BxT[rows_B, m], prompt_BxT[rows_B, m], correction_B)
  return run_B, m, correction_B


def _ended(tokens_BxL, new_BxT, pos, m, prompt_lens_B, eos_id, stops_SxW, stop_lens_S):
  """Rows whose kept tokens (positions pos..pos+m) hold an EOS or end a stop sequence
  after the prompt."""
  num_new = new_BxT.shape[1]
  kept_T = jnp.arange(num_new) <= m
  at_T = pos + jnp.arange(num_new)
  new_part_BxT = at_T[None] >= prompt_lens_B[:, None]
  eos_B = jnp.any(kept_T[None] & new_part_BxT & (new_BxT == eos_id), axis=1)
  stop_BxT = jax.vmap(
      lambda at: decode._stop_hits(tokens_BxL, at, stops_SxW, stop_lens_S, prompt_lens_B),
      out_axes=1)(at_T)
  return eos_B | jnp.any(kept_T[None] & stop_BxT, axis=1)


@functools.partial(jax.jit, static_argnames=(
    'target_fn', 'draft', 'k', 'greedy', 'top_k', 'use_top_p', 'prefill_len'))
def _loop(target_state, draft_state, tokens_BxL, prompt_lens_B, rng, max_new_tokens,
          temperature, top_p, eos_id, stops_SxW, stop_lens_S, *, target_fn, draft, k, greedy,
          top_k, use_top_p, prefill_len):
  """The rounds, under one jit: returns the buffer, each position's target log-probability,
  and the counts of `Stats` (rounds, proposed, accepted)."""
  process = functools.partial(_probs, temperature=temperature, top_p=top_p, top_k=top_k,
                              use_top_p=use_top_p)
  num_rows = tokens_BxL.shape[0]
  model_draft = not isinstance(draft, NgramDraft)
  if prefill_len > 1:  # both caches take the text up to, not including, position pos - 1
    _, target_state = target_fn(tokens_BxL[:, :prefill_len - 1], target_state)
    if model_draft:
      _, draft_state = draft[0](tokens_BxL[:, :prefill_len - 1], draft_state)
  end_B = prompt_lens_B + max_new_tokens
  rows_B = jnp.arange(num_rows)

  def cond(carry):
    pos, done_B = carry[0], carry[4]
    return (pos < jnp.max(end_B)) & ~jnp.all(done_B)

  def body(carry):
    pos, tokens_BxL, logp_BxL, states, done_B, rng, counts = carry
    target_state, draft_state = states
    rng, draft_key, accept_key, correct_key = jax.random.split(rng, 4)
    proposals_BxK, q_BxKxV, draft_state = _draft_round(
        draft, draft_state, tokens_BxL, prompt_lens_B, pos, draft_key, k, greedy, process)
    last_B = jax.lax.dynamic_index_in_dim(tokens_BxL, pos - 1, axis=1, keepdims=False)
    fed_BxT = jnp.concatenate([last_B[:, None], proposals_BxK], axis=1)
    logits_BxTxV, target_state = target_fn(fed_BxT, target_state)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    forced_BxT, prompt_BxT = _forced(tokens_BxL, prompt_lens_B, pos, k + 1)
    forced_BxK = forced_BxT[:, :k]

    run_B, m, correction_B = _judge(
        logits_BxTxV, proposals_BxK, q_BxKxV, forced_BxT, prompt_BxT, done_B, accept_key,
        correct_key, greedy=greedy, process=process)
    correction_B = correction_B.astype(tokens_BxL.dtype)
    kept_B = jnp.where(run_B > m, proposals_BxK[rows_B, jnp.minimum(m, k - 1)], correction_B)
    # Positions pos..pos+k: d_1..d_m, the kept token, then ones the next round overwrites.
    new_BxT = jnp.concatenate([proposals_BxK, kept_B[:, None]], axis=1).at[rows_B, m].set(
        kept_B)
    new_BxT = jnp.where(forced_BxT, prompt_BxT, new_BxT)  # prompts stay as they are
    tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, new_BxT, pos, axis=1)
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    logp_BxT = jnp.take_along_axis(log_probs_BxTxV, new_BxT[..., None], -1)[..., 0]
    logp_BxL = jax.lax.dynamic_update_slice_in_dim(logp_BxL, logp_BxT, pos, axis=1)

    ended_B = _ended(tokens_BxL, new_BxT, pos, m, prompt_lens_B, eos_id, stops_SxW,
                     stop_lens_S)
    done_B = done_B | ended_B | (pos + m + 1 >= end_B)

    # Both caches forget the tokens after pos + m - 1 (each fed k + 1 from pos - 1).
    target_state = _rewind(target_state, k - m)
    if model_draft and draft[1]:
      draft_state = {**draft_state, 'cache': jax.tree.map(lambda x: x[m], draft_state['cache'])}
    elif model_draft:
      draft_state = _rewind(draft_state, k - m)
    live_B = ~carry[4]
    from_draft_BxK = ~forced_BxK & live_B[:, None]
    used_BxK = jnp.arange(k)[None] < jnp.minimum(run_B, m + 1)[:, None]
    counts = counts + jnp.stack([jnp.ones((), jnp.int32), jnp.sum(from_draft_BxK),
                                 jnp.sum(from_draft_BxK & used_BxK)]).astype(jnp.int32)
    return (pos + m + 1, tokens_BxL, logp_BxL, (target_state, draft_state), done_B, rng,
            counts)

  pos = jnp.asarray(prefill_len, jnp.int32)
  carry = (pos, tokens_BxL, jnp.zeros(tokens_BxL.shape, jnp.float32),
           (target_state, draft_state), jnp.zeros(num_rows, bool), rng,
           jnp.zeros(3, jnp.int32))
  pos, tokens_BxL, logp_BxL, _, _, _, counts = jax.lax.while_loop(cond, body, carry)
  return tokens_BxL, logp_BxL, pos, counts


def _finish(row_tokens, row_logp, prompt_len: int, last: int, max_new: int, eos_id,
            stops) -> decode.Candidate:
  """The row's continuation ended as the plain decoder ends it: at EOS (dropped), after a
  stop sequence (kept) or at max_new tokens."""
  new = [int(t) for t in row_tokens[prompt_len:min(last, prompt_len + max_new)]]
  finish, length = 'length', len(new)
  for i, token in enumerate(new):
    if eos_id is not None and token == eos_id:
      finish, length = 'eos', i + 1
      break
    if any(len(s) <= i + 1 and new[i + 1 - len(s):i + 1] == list(s) for s in stops):
      finish, length = 'stop', i + 1
      break
  score = float(np.sum(row_logp[prompt_len:prompt_len + length]))
  tokens = np.asarray(new[:length - 1] if finish == 'eos' else new[:length], np.int32)
  return decode.Candidate(tokens=tokens, score=score, finish=finish)


def generate(target_fn, target_state, prompts, *, draft, num_draft_tokens: int,
             max_new_tokens: int, strategy: str = 'greedy', temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             stop_sequences=(), seed: int = 0,
             max_len: int | None = None) -> tuple[list[list[decode.Candidate]], Stats]:
  """Continues each prompt as `decode.generate` would with the target alone (greedy: the
  same tokens; sampling: the same distribution), one `Candidate` per prompt, and the
  call's `Stats`.

  `draft` is a `ModelDraft` (its state one row per prompt, a cache as long as the
  target's) or `NgramDraft()`; `num_draft_tokens` the k proposed per round. The target's
  cache (and a Transformer draft's) must hold `buffer_length(longest prompt +
  max_new_tokens + k)` positions; `max_len` the smaller context of the two models.
  """
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if strategy not in ('greedy', 'sample'):
    raise UserError(f'strategy={strategy!r} with a draft; speculative decoding is greedy or '
                    "sample (beam search has no draft: drop --draft for it).")
  decode._check_options(prompts, max_new_tokens=max_new_tokens, strategy=strategy,
                        num_samples=1, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=1.0, beam_size=1, length_penalty=0.0,
                        beam_compat='lmjax', max_len=max_len, window_stride=None)
  k = int(num_draft_tokens)
  if k < 1:
    raise UserError(f'num_draft_tokens={k}; the draft must propose at least 1 token.')
  if not _has_index(target_state):
    raise UserError('speculative decoding needs a target whose cache can move back (a '
                    "Transformer's KV cache); this target is a recurrent model: decode it "
                    'without a draft.')
  longest = max(len(p) for p in prompts)
  needed = decode.buffer_length(longest + max_new_tokens + k)
  if max_len is not None and longest + max_new_tokens + k > max_len:
    raise UserError(
        f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + num_draft_tokens '
        f'({k}) = {longest + max_new_tokens + k} is more than the context of {max_len} '
        'tokens; speculative decoding does not slide a window: shorten them, or decode '
        'without a draft.')
  tokens_BxL = np.zeros((len(prompts), needed), np.int32)
  for row, p in enumerate(prompts):
    tokens_BxL[row, :len(p)] = p
  prompt_lens = [len(p) for p in prompts]
  if isinstance(draft, ModelDraft):
    static_draft = (draft.tokens_to_logits, not _has_index(draft.state))
    draft_state = draft.state
  elif isinstance(draft, NgramDraft):
    static_draft, draft_state = draft, None
  else:
    raise UserError(f'draft={draft!r}; give a ModelDraft or NgramDraft.')
  stops_SxW, stop_lens_S = decode._stop_array(stop_sequences)
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  tokens, logp, last, counts = _loop(
      target_state, draft_state, jnp.asarray(tokens_BxL), jnp.asarray(prompt_lens, jnp.int32),
      jax.random.key(seed), jnp.asarray(max_new_tokens, jnp.int32),
      jnp.asarray(temperature if strategy == 'sample' else 1.0, jnp.float32),
      jnp.asarray(top_p, jnp.float32), eos, stops_SxW, stop_lens_S, target_fn=target_fn,
      draft=static_draft, k=k, greedy=strategy == 'greedy',
      top_k=int(top_k) if strategy == 'sample' else 0,
      use_top_p=strategy == 'sample' and top_p < 1.0,
      prefill_len=decode._bucket_down(min(prompt_lens)))
  tokens, logp, last, counts = jax.device_get((tokens, logp, last, counts))
  stops = [list(map(int, s)) for s in stop_sequences]
  results = [[_finish(tokens[row], logp[row], prompt_lens[row], int(last), max_new_tokens,
                      eos_id, stops)] for row in range(len(prompts))]
  new_tokens = sum(len(r[0].tokens) + (r[0].finish == 'eos') for r in results)
  rounds, proposed, accepted = (int(c) for c in counts)
  return results, Stats(rounds=rounds, new_tokens=new_tokens, proposed=proposed,
                        accepted=accepted, rows=len(prompts))
