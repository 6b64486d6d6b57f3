"""Speculative decoding: greedy gives the target's own greedy tokens, scores and endings with
a Transformer, an LSTM and the n-gram draft, batched over prompts of different lengths;
sampling draws the target's distribution (a chi-square test with a fixed seed, which the
draft's own distribution fails); decode.py's --draft flags."""
import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy import stats as scipy_stats

from lmjax import decode, speculative
from lmjax.errors import UserError
from lmjax.models import rnn, transformer
from lmjax.models.transformer import Transformer
from tests import script_cases, test_decode, xla
from tests.models.test_transformer import TINY, _random_params

CONTEXT = 48
TARGET = dict(TINY, max_len=CONTEXT)
DRAFT = dict(TARGET, num_layers=1, d_model=16, d_ff=32, num_heads=2)
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [4, 4, 2], [7, 8, 9, 1, 2, 7, 8]]
NEW = 24


@pytest.fixture(scope='module')
def models():
  """Random-weight target (2 layers) and drafts: a 1-layer Transformer, an LSTM, and the
  target's own weights with noise added (a draft that mostly agrees)."""
  target_params = _random_params(Transformer(**TARGET), seed=0, stddev=0.4)
  draft_params = _random_params(Transformer(**DRAFT), seed=3, stddev=0.4)
  lstm = rnn.RecurrentLM(vocab_size=TARGET['vocab_size'], cell='lstm', num_layers=1,
                         d_model=8, hidden_size=16, tie_embeddings=False)
  lstm_params = nn.meta.unbox(lstm.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  noisy = jax.tree.map(
      lambda x, k: x + 0.03 * jax.random.normal(k, x.shape, x.dtype), target_params,
      jax.tree.unflatten(jax.tree.structure(target_params),
                         list(jax.random.split(jax.random.key(9),
                                               len(jax.tree.leaves(target_params))))))
  return {'target': target_params, 'transformer': draft_params, 'lstm': (lstm, lstm_params),
          'noisy': noisy}


def _target(models, rows):
  return transformer.decode_fns(Transformer(**TARGET, decode=True), models['target'],
                                batch_size=rows, cache_len=CONTEXT)


def _draft(models, name, rows):
  if name == 'ngram':
    return speculative.NgramDraft()
  if name == 'lstm':
    return speculative.ModelDraft(*rnn.decode_fns(*models['lstm'], batch_size=rows))
  config = DRAFT if name == 'transformer' else TARGET
  return speculative.ModelDraft(*transformer.decode_fns(
      Transformer(**config, decode=True), models[name], batch_size=rows, cache_len=CONTEXT))


def _plain(models, prompts, **options):
  return decode.generate(*_target(models, len(prompts)), prompts, max_new_tokens=NEW,
                         max_len=CONTEXT, **options)


def _assert_same(plain, spec):
  for want, got in zip(plain, spec):
    want, got = want[0], got[0]
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.finish == want.finish
    assert got.score == pytest.approx(want.score, abs=1e-3)


@pytest.mark.parametrize('draft, k', [('transformer', 1), ('transformer', 3), ('lstm', 3),
                                      ('ngram', 4)])
def test_greedy_gives_the_targets_own_greedy_tokens_and_endings(models, draft, k):
  # An EOS id and a stop sequence that end two of the rows (read off the target's output).
  options = dict(eos_id=3, stop_sequences=[[1, 10]])
  plain = _plain(models, PROMPTS, **options)
  assert [c[0].finish for c in plain] == ['stop', 'length', 'eos']
  spec, stats = speculative.generate(
      *_target(models, len(PROMPTS)), PROMPTS, draft=_draft(models, draft, len(PROMPTS)),
      num_draft_tokens=k, max_new_tokens=NEW, max_len=CONTEXT, **options)
  _assert_same(plain, spec)
  assert stats.new_tokens == sum(len(c[0].tokens) + (c[0].finish == 'eos') for c in plain)
  assert 0 <= stats.accepted <= stats.proposed


def test_a_draft_that_is_the_target_is_always_right_and_saves_target_calls(models):
  prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
  k = 3
  plain = _plain(models, prompts)
  spec, stats = speculative.generate(
      *_target(models, 2), prompts, draft=speculative.ModelDraft(*_target(models, 2)),
      num_draft_tokens=k, max_new_tokens=NEW, max_len=CONTEXT)
  _assert_same(plain, spec)
  assert stats.acceptance == 1.0
  assert stats.rounds == -(-NEW // (k + 1))  # k accepted plus the target's own, each round


def test_the_ngram_draft_copies_what_followed_the_last_match():
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 5, 6, 0, 0, 0, 0, 0],
                        [1, 2, 1, 2, 1, 2, 1, 0, 0, 0, 0, 0],
                        [3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0]], jnp.int32)
  proposals = speculative._ngram_proposals(tokens, jnp.int32(7), 4, 3).tolist()
  assert proposals[0] == [7, 8, 9, 5]  # what followed '5 6' at 0
  # The latest '1 2 1' starts at 2: '2 1' follows in the text, then the copy reads its own.
  assert proposals[1] == [2, 1, 2, 1]
  assert proposals[2] == [0, 0, 0, 0]  # '9' never came before: nothing to copy


def _joint(models, prompt, temperature):
  """Exact probabilities of the first two new tokens under the target, (V, V)."""
  model = Transformer(**TARGET)
  vocab = TARGET['vocab_size']
  first = jax.nn.softmax(model.apply({'params': models['target']}, jnp.asarray([prompt]))[0, -1]
                         / temperature)
  seconds = jnp.asarray([prompt + [t] for t in range(vocab)])
  second = jax.nn.softmax(model.apply({'params': models['target']}, seconds)[:, -1] / temperature)
  return np.asarray(first[:, None] * second, np.float64)


def _chi_square_p(counts, expected_probs):
  """p-value of a chi-square test of counts against probabilities; cells expected fewer
  than 5 times are pooled into one."""
  counts, expected = counts.ravel(), expected_probs.ravel() / expected_probs.sum()
  expected = expected * counts.sum()
  small = expected < 5
  counts = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  return scipy_stats.chisquare(counts, expected).pvalue


def test_sampling_draws_the_targets_distribution_and_the_test_can_tell(models):
  prompt, temperature, rows, calls = [1, 2, 3, 4], 1.5, 16, 60
  vocab = TARGET['vocab_size']
  target_fns = _target(models, rows)
  counts = np.zeros((vocab, vocab))
  accepted = 0
  for seed in range(calls):
    spec, stats = speculative.generate(
        *target_fns, [prompt] * rows, draft=_draft(models, 'noisy', rows), num_draft_tokens=2,
        max_new_tokens=2, strategy='sample', temperature=temperature, seed=seed,
        max_len=CONTEXT)
    accepted += stats.accepted
    for c in spec:
      counts[c[0].tokens[0], c[0].tokens[1]] += 1
  exact = _joint(models, prompt, temperature)
  assert _chi_square_p(counts, exact) > 1e-3  # 960 pairs; fixed seeds, so it never flakes
  assert accepted > 0.5 * calls * rows  # the rule took the draft's tokens, not only its own
  # The same test, on as many pairs, tells apart the distribution the draft alone samples,
  # although the draft is the target with its weights moved by 3% noise.
  draft_counts = np.zeros((vocab, vocab))
  draft_fns = _draft(models, 'noisy', rows)
  for seed in range(calls):
    out = decode.generate(draft_fns.tokens_to_logits, draft_fns.state, [prompt] * rows,
                          max_new_tokens=2, strategy='sample', temperature=temperature,
                          seed=seed, max_len=CONTEXT)
    for c in out:
      draft_counts[c[0].tokens[0], c[0].tokens[1]] += 1
  assert _chi_square_p(draft_counts, exact) < 1e-4


def _workdir(path, chars: str) -> str:
  """A checkpointed workdir of an untrained character model with a context of CONTEXT."""
  path.mkdir()
  rng = np.random.default_rng(0)
  return test_decode.checkpointed_workdir(
      str(path), CONTEXT, chars, lambda abstract: jax.tree.map(
          lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), abstract))


def test_decode_script_with_a_draft_writes_what_it_writes_without_one(tmp_path):
  target = _workdir(tmp_path / 'target', string.ascii_letters + ' :\n')
  other = _workdir(tmp_path / 'other', string.digits)
  flags = [f'--workdir={target}', '--prompt=ROMEO:', '--prompt=To be', '--max_new_tokens=30',
           '--output=-', '--strategy=greedy']
  cases = {
      'plain': flags,
      'ngram': [*flags, '--draft=ngram', '--num_draft_tokens=3'],
      'model': [*flags, f'--draft_workdir={target}'],
      'sample': [*flags[:-1], '--strategy=sample', f'--draft_workdir={target}'],
      'beam': [*flags[:-1], '--strategy=beam', '--draft=ngram'],
      'other_tokenizer': [*flags, f'--draft_workdir={other}'],
      'too_long': [*flags[:3], '--max_new_tokens=45', '--draft=ngram'],
  }
  bench = [f'--workdir={target}', f'--draft_workdir={target}', '--batch_sizes=2',
           '--new_tokens=12', '--repeats=1', '--prompt=ROMEO:']
  runs = script_cases.run({**{key: ('decode.py', argv) for key, argv in cases.items()},
                           'benchmark': ('benchmark.py', bench)},
                          env=dict(os.environ, XLA_FLAGS=xla.flags()))
  assert runs['benchmark'].returncode == 0, runs['benchmark'].stderr
  rows = [json.loads(line) for line in runs['benchmark'].stdout.splitlines()]
  assert [(r['strategy'], r['batch'], r['acceptance']) for r in rows] == [
      ('greedy', 2, 1.0), ('sample', 2, 1.0)]  # the draft is the target
  assert all(r['speedup'] > 0 and r['tokens_per_call'] > 1 for r in rows)
  texts = {}
  for key in ('plain', 'ngram', 'model', 'sample'):
    assert runs[key].returncode == 0, runs[key].stderr
    texts[key] = [json.loads(line) for line in runs[key].stdout.splitlines()]
  scores = {key: [row.pop('score') for row in rows] for key, rows in texts.items()}
  assert texts['ngram'] == texts['model'] == texts['plain']
  assert scores['ngram'] == pytest.approx(scores['plain'], abs=1e-3)
  for row in texts['sample']:  # the untrained model may sample its EOS
    assert (row['finish'], len(row['text'])) == ('length', 30) or row['finish'] == 'eos'
  assert '# draft ngram: ' in runs['ngram'].stderr
  assert '100% of its tokens accepted' in runs['model'].stderr  # the draft is the target
  assert script_cases.error_line(runs['beam']).startswith(
      'error: --strategy=beam has no draft: speculative decoding is greedy or sample')
  assert script_cases.error_line(runs['other_tokenizer']).startswith(
      f'error: the draft in {other} has another tokenizer than the target')
  assert script_cases.error_line(runs['too_long']) == (
      'error: prompt (6 tokens) + max_new_tokens (45) + num_draft_tokens (4) = 55 is more '
      f'than the context of {CONTEXT} tokens; speculative decoding does not slide a window: '
      'shorten them, or decode without a draft.')


@pytest.mark.parametrize('call, message', [
    (dict(strategy='beam'), "strategy='beam' with a draft"),
    (dict(num_draft_tokens=0), 'num_draft_tokens=0'),
    (dict(max_new_tokens=46), r'\+ num_draft_tokens \(2\) = 52 is more than the context'),
    (dict(target='lstm'), 'this target is a recurrent model'),
])
def test_what_speculative_decoding_cannot_do_is_refused_in_one_line(models, call, message):
  args = dict(max_new_tokens=4, num_draft_tokens=2, max_len=CONTEXT)
  if call.pop('target', None) == 'lstm':
    target = rnn.decode_fns(*models['lstm'], batch_size=1)
  else:
    target = _target(models, 1)
  args.update(call)
  with pytest.raises(UserError, match=message) as raised:
    speculative.generate(*target, [[1, 2, 3, 4]], draft=speculative.NgramDraft(), **args)
  assert type(raised.value) is UserError
