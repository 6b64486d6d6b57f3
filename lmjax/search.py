"""Tree-of-thought search over a language model's generations (Yao et al., 2023).

A *thought* is a span of generated tokens that ends at a delimiter (a newline, say) or at
the end-of-text id. The searcher grows a tree of partial generations: at each step it
proposes `proposals` candidate next thoughts for a state, sampled or by a beam search
within the thought (all states of a level, of all prompts, in one batched
`decode.generate` call), scores the new states with a value
function, drops those valued -inf, and keeps going:

  * `bfs`: breadth-first, level by level, keeping the best `breadth` open states per
    prompt (the beam of states of Yao et al.'s ToT-BFS);
  * `dfs`: depth-first, best child first, skipping children valued below `threshold`
    and backtracking when a subtree holds no answer; it stops at the first finished
    state that clears the threshold, or after `max_expansions` states were expanded.

A state is *finished* when its last thought ended with the end-of-text id or when it has
`max_depth` thoughts. Values order states; ties (a verifier that only says valid or not)
are broken by the model's own mean log-probability per token.

Value functions take the prompts and the nodes to value (one prompt per node) and return
one float per node; -inf (or NaN) prunes. Three are provided: `model_value` (the mean
log-probability per generated token, which the sampler already knows), `scorer_value`
(the mean log-probability under another model, teacher-forced) and `verifier_value`
(a Python function of the text). Like the decoder, the search never sees a model class:
it takes `decoder_fns(batch_size=, cache_len=) -> (tokens_to_logits, state)`, e.g.
`functools.partial(transformer.decode_fns, decode_model, params)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import decode
from lmjax.errors import UserError

DecoderFns = Callable[..., tuple[decode.TokensToLogits, Any]]
PROPOSAL_METHODS = ('sample', 'beam')


@dataclasses.dataclass(frozen=True)
class Node:
  """A partial generation: the thoughts so far (token ids; the delimiter ends each but the
  last may end in EOS, which is not kept), their total model log-probability (EOS
  included) and how many tokens were generated for them (EOS included)."""
  thoughts: tuple[tuple[int, ...], ...] = ()
  logprob: float = 0.0
  num_generated: int = 0
  finished: bool = False
  value: float = 0.0

  @property
  def tokens(self) -> list[int]:
    return [t for thought in self.thoughts for t in thought]

  @property
  def mean_logprob(self) -> float:
    return self.logprob / max(self.num_generated, 1)

  def rank_key(self) -> tuple[float, float]:
    return (self.value, self.mean_logprob)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """`best`: the best finished node (None when every branch was pruned); `finished`: all
  finished nodes kept, best first. `tokens_generated` counts every token the sampler
  produced, pruned branches and EOS included; `expansions` the states expanded; `pruned`
  the new states a value of -inf removed."""
  best: Node | None
  finished: tuple[Node, ...]
  tokens_generated: int
  expansions: int
  pruned: int


ValueFn = Callable[[Sequence[Sequence[int]], Sequence[Node]], Sequence[float]]


# ------------------------------------------------------------------------ value functions


def model_value(prompts: Sequence[Sequence[int]], nodes: Sequence[Node]) -> list[float]:
  """The proposing model's own mean log-probability per generated token."""
  del prompts
  return [node.mean_logprob for node in nodes]


@functools.partial(jax.jit, static_argnames=('tokens_to_logits',))
def _token_logprobs(state, ids_BxT, *, tokens_to_logits):
  logits_BxTxV, _ = tokens_to_logits(ids_BxT, state)
  log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_BxTxV, ids_BxT[:, 1:, None], axis=-1)[..., 0]


def scorer_value(decoder_fns: DecoderFns, *, eos_id: int | None,
                 max_len: int | None = None) -> ValueFn:
  """Values a node by another model's mean log-probability per token of its generated
  tokens (EOS included where the node ended with it) given the prompt, in one forward
  pass per call. The scoring model must use the same tokenizer as the proposer."""

  def value(prompts, nodes):
    if not nodes:
      return []
    rows = []
    for prompt, node in zip(prompts, nodes):
      # Only an EOS is generated without being kept in the thoughts.
      ended_with_eos = eos_id is not None and node.num_generated > len(node.tokens)
      end = [eos_id] if ended_with_eos else []
      rows.append((len(prompt), list(prompt) + node.tokens + end))
    longest = max(len(r) for _, r in rows)
    if max_len is not None and longest > max_len:
      raise UserError(f'a node of {longest} tokens does not fit the scoring model '
                      f'(max_len={max_len}).')
    length = decode.buffer_length(longest, max_len)
    num_rows = _bucket_up(len(rows))
    ids = np.zeros((num_rows, length), np.int32)
    for i, (_, row) in enumerate(rows):
      ids[i, :len(row)] = row
    tokens_to_logits, state = decoder_fns(batch_size=num_rows, cache_len=length)
    logprobs = np.asarray(_token_logprobs(state, jnp.asarray(ids),
                                          tokens_to_logits=tokens_to_logits))
    # Position j of `logprobs` is the log-probability of token j + 1.
    return [float(logprobs[i, start - 1:len(row) - 1].mean()) if len(row) > start else 0.0
            for i, (start, row) in enumerate(rows)]

  return value


def verifier_value(verifier: Callable[[str, list[str], bool], float | None],
                   decode_text: Callable[[Sequence[int]], str]) -> ValueFn:
  """Values a node with `verifier(prompt_text, thought_texts, finished)`: a float, or
  None to prune. `decode_text` is the tokenizer's decode."""

  def value(prompts, nodes):
    values = []
    for prompt, node in zip(prompts, nodes):
      score = verifier(decode_text(prompt), [decode_text(t) for t in node.thoughts],
                       node.finished)
      values.append(-math.inf if score is None else float(score))
    return values

  return value


# ---------------------------------------------------------------------------- proposing


def _bucket_up(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Proposer:
  """Proposes candidate next thoughts with the decoder (the settings shared by BFS and DFS).

  `method`: 'sample' draws `proposals` thoughts independently (at `temperature`, top-k,
  top-p; duplicates are merged, so fewer may come back), as Yao et al.'s "sample"
  proposals; 'beam' returns the `proposals` most likely distinct thoughts, by a beam search
  of that width within the thought (log-probability, no length penalty), close to their
  "propose" prompt that lists different next steps. temperature 0 with 'sample' proposes
  the greedy thought once per state. Thoughts end at any of `delimiters` (token
  sequences, kept in the thought), at `eos_id`, or after `max_thought_tokens`.
  """
  decoder_fns: DecoderFns
  delimiters: Sequence[Sequence[int]]
  eos_id: int | None
  max_thought_tokens: int
  method: str = 'sample'
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_len: int | None = None

  def __post_init__(self):
    if self.method not in PROPOSAL_METHODS:
      raise UserError(f'method={self.method!r}; use one of {", ".join(PROPOSAL_METHODS)}.')

  def __call__(self, rows: list[list[int]], proposals: int, seed: int):
    """Per row: the proposed thoughts, each (tokens, logprob, generated count, ended with
    EOS), and the tokens the decoder generated for them (a beam search's width times its
    longest thought)."""
    beam = self.method == 'beam'
    greedy = not beam and self.temperature == 0
    samples = 1 if greedy else proposals
    longest = max(len(r) for r in rows)
    room = self.max_thought_tokens
    if self.max_len is not None:
      room = min(room, self.max_len - longest)
      if room < 1:
        raise UserError(f'a state of {longest} tokens fills the context (max_len='
                        f'{self.max_len}); lower max_depth or max_thought_tokens.')
    # Padding the batch to a power of two keeps the number of compiled shapes small.
    padded = rows + [rows[0]] * (_bucket_up(len(rows)) - len(rows))
    cache_len = decode.buffer_length(longest + room, self.max_len)
    tokens_to_logits, state = self.decoder_fns(batch_size=len(padded), cache_len=cache_len)
    if beam:
      options = {'strategy': 'beam', 'beam_size': proposals, 'length_penalty': 0.0}
    else:
      options = {'strategy': 'greedy' if greedy else 'sample',
                 'temperature': 1.0 if greedy else self.temperature,
                 'top_k': self.top_k, 'top_p': self.top_p, 'seed': seed}
    results = decode.generate(tokens_to_logits, state, padded, max_new_tokens=room,
                              num_samples=samples, eos_id=self.eos_id,
                              stop_sequences=self.delimiters, max_len=self.max_len, **options)
    out = []
    for candidates in results[:len(rows)]:
      # With length_penalty 0 a beam's score is its log-probability, as a sample's is.
      thoughts = [(tuple(int(t) for t in c.tokens), c.score,
                   len(c.tokens) + (c.finish == 'eos'), c.finish == 'eos') for c in candidates]
      counts = [generated for _, _, generated, _ in thoughts]
      out.append((thoughts, proposals * max(counts, default=0) if beam else sum(counts)))
    return out


def _children(node: Node, proposed, at_limit: bool) -> list[Node]:
  """The distinct states one expansion of `node` reaches (duplicate samples merged)."""
  seen, children = set(), []
  for thought, logprob, generated, eos in proposed:
    if (thought, eos) in seen:
      continue
    seen.add((thought, eos))
    children.append(Node(thoughts=node.thoughts + (thought,), logprob=node.logprob + logprob,
                         num_generated=node.num_generated + generated,
                         finished=eos or at_limit))
  return children


def _level_seed(seed: int, step: int) -> int:
  # Distinct, reproducible sampling seeds per level (BFS) or expansion (DFS).
  return (seed * 1_000_003 + step) % (2**31 - 1)


def _valued(value_fn: ValueFn, prompts, nodes) -> list[Node]:
  values = value_fn(prompts, nodes) if nodes else []
  if len(values) != len(nodes):
    raise UserError(f'the value function returned {len(values)} values for {len(nodes)} '
                    'nodes; it must return one per node.')
  return [dataclasses.replace(n, value=float(v)) for n, v in zip(nodes, values)]


def _kept(node: Node) -> bool:
  return not (math.isnan(node.value) or node.value == -math.inf)


# ------------------------------------------------------------------------------ search


def bfs(propose: Proposer, prompts: Sequence[Sequence[int]], value_fn: ValueFn, *,
        breadth: int, proposals: int, max_depth: int, seed: int = 0) -> list[SearchResult]:
  """Breadth-first tree-of-thought search for every prompt at once; one result each."""
  if breadth < 1 or proposals < 1 or max_depth < 1:
    raise UserError(f'breadth={breadth}, proposals={proposals} and max_depth={max_depth} '
                    'must all be at least 1.')
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(not p for p in prompts):
    raise UserError('bfs needs at least one prompt, and no empty prompt.')
  frontiers = [[Node()] for _ in prompts]
  finished = [[] for _ in prompts]
  tokens = [0] * len(prompts)
  expansions = [0] * len(prompts)
  pruned = [0] * len(prompts)
  for depth in range(max_depth):
    jobs = [(p, node) for p, frontier in enumerate(frontiers) for node in frontier]
    if not jobs:
      break
    proposed = propose([prompts[p] + node.tokens for p, node in jobs], proposals,
                       _level_seed(seed, depth))
    children = [[] for _ in prompts]
    for (p, node), (candidates, cost) in zip(jobs, proposed):
      expansions[p] += 1
      tokens[p] += cost
      children[p].extend(_children(node, candidates, at_limit=depth + 1 == max_depth))
    # Children of different parents may coincide; one copy is enough.
    children = [list({tuple(c.tokens) + (c.finished,): c for c in cs}.values())
                for cs in children]
    flat = [(p, c) for p, cs in enumerate(children) for c in cs]
    valued = _valued(value_fn, [prompts[p] for p, _ in flat], [c for _, c in flat])
    frontiers = [[] for _ in prompts]
    for (p, _), node in zip(flat, valued):
      if not _kept(node):
        pruned[p] += 1
      elif node.finished:
        finished[p].append(node)
      else:
        frontiers[p].append(node)
    frontiers = [sorted(f, key=Node.rank_key, reverse=True)[:breadth] for f in frontiers]
  results = []
  for p in range(len(prompts)):
    done = tuple(sorted(finished[p], key=Node.rank_key, reverse=True))
    results.append(SearchResult(best=done[0] if done else None, finished=done,
                                tokens_generated=tokens[p], expansions=expansions[p],
                                pruned=pruned[p]))
  return results


def dfs(propose: Proposer, prompt: Sequence[int], value_fn: ValueFn, *, proposals: int,
        max_depth: int, threshold: float = -math.inf, max_expansions: int = 64,
        seed: int = 0) -> SearchResult:
  """Depth-first tree-of-thought search with backtracking, for one prompt."""
  if proposals < 1 or max_depth < 1 or max_expansions < 1:
    raise UserError(f'proposals={proposals}, max_depth={max_depth} and max_expansions='
                    f'{max_expansions} must all be at least 1.')
  prompt = list(map(int, prompt))
  if not prompt:
    raise UserError('dfs needs a non-empty prompt.')
  counts = {'tokens': 0, 'expansions': 0, 'pruned': 0}

  def visit(node: Node, depth: int) -> Node | None:
    if counts['expansions'] >= max_expansions:
      return None
    (candidates, cost), = propose([prompt + node.tokens], proposals,
                                  _level_seed(seed, counts['expansions']))
    counts['expansions'] += 1
    counts['tokens'] += cost
    children = _children(node, candidates, at_limit=depth + 1 == max_depth)
    children = _valued(value_fn, [prompt] * len(children), children)
    for child in sorted(children, key=Node.rank_key, reverse=True):
      if not _kept(child) or child.value < threshold:
        counts['pruned'] += 1
        continue
      found = child if child.finished else visit(child, depth + 1)
      if found is not None:
        return found
    return None

  best = visit(Node(), 0)
  return SearchResult(best=best, finished=(best,) if best else (),
                      tokens_generated=counts['tokens'], expansions=counts['expansions'],
                      pruned=counts['pruned'])
