"""lmjax/losses.py: the loss sums, the confusion matrix and the summaries against values
computed by hand (logits chosen so that every log-probability is a log of a fraction)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import losses

LN2, LN3, LN4, LN6 = math.log(2), math.log(3), math.log(4), math.log(6)


def test_token_sums_weigh_each_position_and_leave_out_padding():
  # Vocabulary of 4. Position 0: logits (ln 3, 0, 0, 0) give p = (1/2, 1/6, 1/6, 1/6).
  # Position 1: uniform, so argmax is 0 and the target 2 is wrong. Position 2 is padding
  # (weight 0) with an enormous loss that must not count. Position 3: p(target 1) = 1/2.
  logits = jnp.array([[[LN3, 0, 0, 0], [0, 0, 0, 0], [100.0, 0, 0, 0], [0, LN3, 0, 0]]])
  targets = jnp.array([[0, 2, 3, 1]])
  weights = jnp.array([[1.0, 2.0, 0.0, 0.5]])
  sums = losses.token_cross_entropy(logits, targets, weights)
  assert float(sums['loss_sum']) == pytest.approx(LN2 + 2 * LN4 + 0.5 * LN2, rel=1e-6)
  assert float(sums['correct_sum']) == pytest.approx(1.0 + 0.5)
  assert float(sums['weight_sum']) == pytest.approx(3.5)


def test_token_sums_of_two_halves_add_up_to_the_sums_of_the_whole():
  """What evaluation relies on: sums over batches of any fill add up, divided once."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 5, 7)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, 7, (4, 5)))
  weights = jnp.asarray((rng.random((4, 5)) < 0.6).astype(np.float32))
  sums = jax.jit(losses.token_cross_entropy)
  whole = sums(logits, targets, weights)
  first_row = (jnp.arange(4) == 0)[:, None]
  first = sums(logits, targets, weights * first_row)  # the other rows as padding
  rest = sums(logits, targets, weights * ~first_row)
  for key in whole:
    assert float(whole[key]) == pytest.approx(float(first[key] + rest[key]), rel=1e-6), key


def test_bfloat16_logits_are_scored_in_float32():
  logits = jnp.array([[[LN3, 0, 0, 0], [0, 0, 0, 0]]])
  sums = losses.token_cross_entropy(logits.astype(jnp.bfloat16), jnp.array([[1, 0]]),
                                    jnp.ones((1, 2), jnp.bfloat16))
  assert sums['loss_sum'].dtype == jnp.float32 and sums['weight_sum'].dtype == jnp.float32
  # ln 3 rounds to 1.1015625 in bfloat16: the first token's p(1) is 1 / (e^1.1015625 + 3).
  ln3_bf16 = float(jnp.bfloat16(LN3))
  expected = -math.log(1 / (math.exp(ln3_bf16) + 3)) + LN4
  assert float(sums['loss_sum']) == pytest.approx(expected, rel=1e-6)


def test_classification_sums_count_each_weighted_row_by_true_and_predicted_class():
  # Three classes. Rows: (true, predicted) = (0, 0), (1, 0), (1, 1), (2, 1) and a padding
  # row (true 2, predicted 2) of weight 0 that counts nowhere.
  logits = jnp.array([[LN3, 0, 0], [LN3, 0, 0], [0, LN2, 0], [0, LN2, 0], [0, 0, 9.0]])
  labels = jnp.array([0, 1, 1, 2, 2])
  weights = jnp.array([1.0, 1.0, 2.0, 1.0, 0.0])
  sums = losses.classification_sums(logits, labels, weights)
  # p under (ln 3, 0, 0) = (3/5, 1/5, 1/5); under (0, ln 2, 0) = (1/4, 1/2, 1/4).
  nll = [-math.log(3 / 5), -math.log(1 / 5), -math.log(1 / 2), -math.log(1 / 4)]
  assert float(sums['loss_sum']) == pytest.approx(nll[0] + nll[1] + 2 * nll[2] + nll[3],
                                                  rel=1e-6)
  assert float(sums['correct_sum']) == pytest.approx(3.0)
  assert float(sums['weight_sum']) == pytest.approx(5.0)
  np.testing.assert_array_equal(sums['confusion'], [[1, 0, 0], [1, 2, 0], [0, 1, 0]])


def test_metrics_equal_precision_recall_and_f1_counted_from_the_predictions():
  true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
  predicted = [0, 1, 0, 1, 2, 2, 2, 0, 1, 1]
  names = ('w', 'x', 'y', 'z')  # 'z' is present once and never predicted
  confusion = np.zeros((4, 4))
  for t, p in zip(true, predicted):
    confusion[t, p] += 1
  got = losses.classification_metrics(confusion, names)
  want = {'accuracy': 5 / 10}
  per_class = {}
  for c, name in enumerate(names):
    tp = sum(t == c and p == c for t, p in zip(true, predicted))
    fp = sum(t != c and p == c for t, p in zip(true, predicted))
    fn = sum(t == c and p != c for t, p in zip(true, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_class[name] = (precision, recall, f1)
  for i, metric in enumerate(('precision', 'recall', 'f1')):
    for name in names:
      want[f'{metric}/{name}'] = per_class[name][i]
    want[f'{metric}_macro'] = sum(v[i] for v in per_class.values()) / len(names)
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key
  # The counts behind them, spelled out: 'x' is predicted 4 times, right once.
  assert got['precision/x'] == pytest.approx(1 / 4) and got['recall/x'] == pytest.approx(1 / 2)
  assert got['precision/z'] == 0.0 and got['recall/z'] == 0.0 and got['f1/z'] == 0.0


def test_metrics_of_an_empty_confusion_matrix_are_zero_not_nan():
  got = losses.classification_metrics(np.zeros((2, 2)), ('a', 'b'))
  assert all(value == 0.0 for value in got.values()), got


def test_summary_gives_perplexity_accuracy_and_bits_per_char_of_the_mean_loss():
  sums = {'loss_sum': 10 * LN4, 'correct_sum': 4.0, 'weight_sum': 10.0}
  got = losses.summarize(sums, bits_per_char=True)
  assert got['loss'] == pytest.approx(LN4)
  assert got['perplexity'] == pytest.approx(4.0)
  assert got['bits_per_char'] == pytest.approx(2.0)
  assert got['accuracy'] == pytest.approx(0.4)
  assert 'bits_per_char' not in losses.summarize(sums)


def test_summary_of_no_tokens_or_a_huge_loss_stays_finite():
  empty = losses.summarize({'loss_sum': 0.0, 'correct_sum': 0.0, 'weight_sum': 0.0})
  assert empty == {'loss': 0.0, 'perplexity': 1.0, 'accuracy': 0.0}
  huge = losses.summarize({'loss_sum': 1e4, 'correct_sum': 0.0, 'weight_sum': 1.0})
  assert huge['loss'] == 1e4 and huge['perplexity'] == pytest.approx(math.exp(80.0))


def test_classifier_summary_has_loss_per_example_metrics_and_the_confusion_matrix():
  confusion = np.array([[3.0, 1.0], [0.0, 2.0]])
  sums = {'loss_sum': 3.0, 'correct_sum': 5.0, 'weight_sum': 6.0, 'confusion': confusion}
  got = losses.summarize(sums, class_names=('a', 'b'))
  assert got['loss'] == pytest.approx(0.5)
  assert got['accuracy'] == pytest.approx(5 / 6)
  assert got['precision/b'] == pytest.approx(2 / 3) and got['recall/a'] == pytest.approx(3 / 4)
  assert got['confusion_matrix'] == [[3, 1], [0, 2]]
  assert 'perplexity' not in got
