"""Tree-of-thought search on a hand-written model whose best answer greedy decoding misses."""
import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import decode, search
from lmjax.errors import UserError
from tests.test_decode import _trigram_model, _trigram_table

# Tokens of the fake: EOS, the thought delimiter, the prompt, and one-letter thoughts.
EOS, NL, P, A, B, C, D, E, F = range(9)
VOCAB = 9
NAMES = {EOS: '', NL: '\n', P: 'P', A: 'A', B: 'B', C: 'C', D: 'D', E: 'E', F: 'F'}

# Next-token probabilities by the last two tokens. From the prompt, thought "A" (0.6) beats
# "B" (0.4); but after A the model spreads over C, D, E, while after B it is sure of F. The
# most likely answer is B F (0.4 * 0.9 = 0.36), greedy takes A C (0.6 * 0.34 = 0.20).
_RULES = {
    (EOS, P): {A: 0.6, B: 0.4},
    (P, A): {NL: 1.0},
    (P, B): {NL: 1.0},
    (A, NL): {C: 0.34, D: 0.33, E: 0.33},
    (B, NL): {F: 0.9, C: 0.1},
    (NL, C): {EOS: 1.0},
    (NL, D): {EOS: 1.0},
    (NL, E): {EOS: 1.0},
    (NL, F): {EOS: 1.0},
}


def _table():
  table = np.full((VOCAB, VOCAB, VOCAB), -30.0, np.float32)
  for (a, b), probs in _RULES.items():
    for token, p in probs.items():
      table[a, b, token] = math.log(p)
  return jnp.asarray(table)


def _decoder_fns(table, *, batch_size, cache_len):
  del cache_len  # the fake keeps only the last two tokens
  return _trigram_model, {'params': table,
                          'cache': {'prev': jnp.zeros((batch_size, 2), jnp.int32)}}


def _proposer(table=None, temperature=1.0, delimiter=NL, method='sample'):
  fns = functools.partial(_decoder_fns, _table() if table is None else table)
  return search.Proposer(fns, delimiters=[[delimiter]], eos_id=EOS, max_thought_tokens=4,
                         method=method, temperature=temperature)


def _text(tokens):
  return ''.join(NAMES[t] for t in tokens)


def _greedy(prompt, max_new_tokens, table=None, eos_id=EOS):
  fns = functools.partial(_decoder_fns, _table() if table is None else table)
  tokens_to_logits, state = fns(batch_size=1, cache_len=None)
  out, = decode.generate(tokens_to_logits, state, [prompt], max_new_tokens=max_new_tokens,
                         eos_id=eos_id)
  return out[0].tokens.tolist()


def test_greedy_misses_the_best_answer():
  # The premise of the other tests.
  assert _text(_greedy([P], 8)) == 'A\nC'


def test_bfs_with_the_models_value_finds_the_most_likely_answer():
  result, = search.bfs(_proposer(), [[P]], search.model_value, breadth=2, proposals=8,
                       max_depth=3)
  assert _text(result.best.tokens) == 'B\nF'
  assert result.best.finished
  # B\n F EOS: four tokens, log(0.4 * 0.9).
  assert result.best.mean_logprob == pytest.approx(math.log(0.36) / 4, abs=1e-4)
  # Breadth 1 keeps only A after the first level, and so ends where greedy does.
  narrow, = search.bfs(_proposer(), [[P]], search.model_value, breadth=1, proposals=8,
                       max_depth=3)
  assert _text(narrow.best.tokens).startswith('A\n')


def test_beam_proposals_are_the_most_likely_distinct_thoughts():
  (thoughts, cost), = _proposer(method='beam')([[P]], 2, seed=0)
  assert [(_text(t), round(lp, 4), n, eos) for t, lp, n, eos in thoughts] == [
      ('A\n', round(math.log(0.6), 4), 2, False), ('B\n', round(math.log(0.4), 4), 2, False)]
  assert cost == 2 * 2  # two beams, two tokens each
  # After A, the three most likely thoughts are C, D, E, each ending the text.
  (thoughts, _), = _proposer(method='beam')([[P, A, NL]], 3, seed=0)
  assert sorted(_text(t) for t, *_ in thoughts) == ['C', 'D', 'E']
  assert all(eos for *_, eos in thoughts)
  # Deterministic proposals still let BFS find the best answer greedy misses.
  result, = search.bfs(_proposer(method='beam'), [[P]], search.model_value, breadth=2,
                       proposals=2, max_depth=3)
  assert _text(result.best.tokens) == 'B\nF'
  assert result.tokens_generated == 2 * 2 + 2 * (2 * 2)  # the root, then A and B
  with pytest.raises(UserError, match="method='best'"):
    _proposer(method='best')


def _accepts_only_f(prompt_text, thoughts, finished):
  """A verifier: every state is fine, but the only correct final thought is F."""
  assert prompt_text == 'P'
  if finished:
    return 1.0 if thoughts[-1] == 'F' else None
  return 0.0


def _decode_text(tokens):
  return _text(tokens)


def test_dfs_backtracks_out_of_the_greedy_branch():
  value = search.verifier_value(_accepts_only_f, _decode_text)
  result = search.dfs(_proposer(), [P], value, proposals=8, max_depth=3)
  assert _text(result.best.tokens) == 'B\nF'
  # The verifier ties A and B, so the model's preference orders them: A is expanded
  # (and its finished children C, D, E pruned) before the search backtracks to B.
  assert result.expansions == 3
  assert result.pruned >= 3


def test_bfs_with_a_verifier_finds_the_answer_at_breadth_one():
  rejects_a = lambda prompt, thoughts, finished: None if thoughts[0] == 'A\n' else (
      _accepts_only_f(prompt, thoughts, finished))
  value = search.verifier_value(rejects_a, _decode_text)
  result, = search.bfs(_proposer(), [[P]], value, breadth=1, proposals=8, max_depth=3)
  assert _text(result.best.tokens) == 'B\nF'
  # A was pruned at the first level, so only the root and B were expanded.
  assert result.expansions == 2
  assert result.pruned == 1
  assert [_text(n.tokens) for n in result.finished] == ['B\nF']


def test_a_verifier_that_rejects_everything_leaves_no_answer():
  value = search.verifier_value(lambda *_: None, _decode_text)
  result, = search.bfs(_proposer(), [[P]], value, breadth=4, proposals=8, max_depth=3)
  assert result.best is None and result.finished == ()
  assert result.expansions == 1  # nothing survived the first level
  assert result.pruned == 2  # A and B
  dfs_result = search.dfs(_proposer(), [P], value, proposals=8, max_depth=3)
  assert dfs_result.best is None and dfs_result.expansions == 1


def test_dfs_threshold_prunes_low_valued_thoughts():
  # The verifier accepts only F as an answer but values B's first thought at 0.2.
  # Without a threshold DFS backtracks from A's dead ends into B and finds F; a
  # threshold of 0.5 keeps it out of B, so it ends with no answer.
  doubts_b = lambda prompt, thoughts, finished: (
      (2.0 if thoughts[-1] == 'F' else None) if finished else
      {'A\n': 1.0, 'B\n': 0.2}[thoughts[0]])
  value = search.verifier_value(doubts_b, _decode_text)
  without = search.dfs(_proposer(), [P], value, proposals=8, max_depth=3)
  assert _text(without.best.tokens) == 'B\nF'
  assert without.expansions == 3
  with_threshold = search.dfs(_proposer(), [P], value, proposals=8, max_depth=3,
                              threshold=0.5)
  assert with_threshold.best is None
  assert with_threshold.expansions == 2  # the root and A; B was pruned
  assert with_threshold.pruned == without.pruned + 1


def test_breadth_one_greedy_proposals_equal_greedy_decoding_thought_by_thought():
  # A random stateful model in which the delimiter is likely, so thoughts are short.
  for seed in range(4):
    table = _trigram_table(seed, vocab=6).at[:, :, 2].add(1.5)
    propose = search.Proposer(functools.partial(_decoder_fns, table), delimiters=[[2]],
                              eos_id=None, max_thought_tokens=6, temperature=0)
    result, = search.bfs(propose, [[1, 3]], search.model_value, breadth=1, proposals=3,
                         max_depth=4)
    node = result.best
    assert result.expansions == 4
    assert node.tokens == _greedy([1, 3], len(node.tokens), table=table, eos_id=None)
    for thought in node.thoughts[:-1]:
      assert thought[-1] == 2 or len(thought) == 6
    # The sampler's log-probabilities are the model's: the scorer (teacher forcing the
    # same model) agrees.
    scorer = search.scorer_value(functools.partial(_decoder_fns, table), eos_id=None)
    assert scorer([[1, 3]], [node])[0] == pytest.approx(node.mean_logprob, abs=1e-5)


def test_scorer_value_counts_the_eos_and_matches_the_rules():
  scorer = search.scorer_value(functools.partial(_decoder_fns, _table()), eos_id=EOS)
  result, = search.bfs(_proposer(), [[P]], scorer, breadth=2, proposals=8, max_depth=3)
  assert _text(result.best.tokens) == 'B\nF'
  assert result.best.value == pytest.approx(math.log(0.36) / 4, abs=1e-4)


def test_search_is_a_function_of_the_seed():
  table = _trigram_table(7, vocab=6).at[:, :, 2].add(1.0)
  propose = search.Proposer(functools.partial(_decoder_fns, table), delimiters=[[2]],
                            eos_id=0, max_thought_tokens=5)

  def run(seed):
    results = search.bfs(propose, [[1, 3], [4]], search.model_value, breadth=3,
                         proposals=4, max_depth=3, seed=seed)
    return [[(n.tokens, n.logprob) for n in r.finished] for r in results]

  assert run(0) == run(0)
  assert run(0) != run(1)
  one = search.dfs(propose, [1, 3], search.model_value, proposals=3, max_depth=3, seed=5)
  assert one == search.dfs(propose, [1, 3], search.model_value, proposals=3, max_depth=3,
                           seed=5)


def test_bad_arguments_are_named():
  with pytest.raises(UserError, match='breadth=0'):
    search.bfs(_proposer(), [[P]], search.model_value, breadth=0, proposals=2, max_depth=2)
  with pytest.raises(UserError, match='empty prompt'):
    search.bfs(_proposer(), [[]], search.model_value, breadth=1, proposals=2, max_depth=2)
  with pytest.raises(UserError, match='one per node'):
    search.bfs(_proposer(), [[P]], lambda prompts, nodes: [], breadth=1, proposals=2,
               max_depth=2)
  context = search.Proposer(functools.partial(_decoder_fns, _table()), delimiters=[[NL]],
                            eos_id=EOS, max_thought_tokens=4, max_len=1)
  with pytest.raises(UserError, match='fills the context'):
    search.dfs(context, [P], search.model_value, proposals=2, max_depth=2)
  short_scorer = search.scorer_value(functools.partial(_decoder_fns, _table()), eos_id=EOS,
                                     max_len=2)
  with pytest.raises(UserError, match='does not fit the scoring model'):
    search.bfs(_proposer(), [[P]], short_scorer, breadth=1, proposals=2, max_depth=2)
