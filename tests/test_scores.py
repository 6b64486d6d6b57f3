"""Scores of generations (lmjax/scores.py) on examples worked out by hand."""
import math
import subprocess
import sys

import pytest

from lmjax import scores


def test_answers_are_normalized_as_squad_normalizes_them():
  assert scores.normalize_answer('The  Cat, sat!') == 'cat sat'
  assert scores.normalize_answer('An apple a day') == 'apple day'
  assert scores.exact_match('the Eiffel Tower.', ['Paris', 'Eiffel tower']) == 1.0
  assert scores.exact_match('Eiffel', ['Eiffel tower']) == 0.0


def test_token_f1_counts_shared_words_and_takes_the_best_reference():
  # 'cat sat on mat' against 'cat on mat': 3 shared, precision 3/4, recall 1.
  assert scores.token_f1('the cat sat on the mat', ['a cat on a mat']) == pytest.approx(6 / 7)
  assert scores.token_f1('the cat sat on the mat', ['dog', 'cat sat on mat']) == 1.0
  assert scores.token_f1('dog', ['cat']) == 0.0
  assert scores.token_f1('', ['']) == 1.0 and scores.token_f1('', ['cat']) == 0.0
  # Words count with their multiplicity: 'cat cat' shares one 'cat' with 'cat dog'.
  assert scores.token_f1('cat cat', ['cat dog']) == pytest.approx(0.5)


def test_rouge_of_a_prefix_of_the_reference():
  # 'the cat sat' in 'the cat sat on the mat': 3 of 6 words, 2 of 5 bigrams, LCS 3.
  got = scores.rouge('the cat sat', ['the cat sat on the mat'])
  assert got['rouge1'] == pytest.approx(2 * 0.5 / 1.5)
  assert got['rouge2'] == pytest.approx(2 * 0.4 / 1.4)
  assert got['rougeL'] == pytest.approx(2 * 0.5 / 1.5)
  assert scores.rouge('the cat sat', ['dogs bark', 'the cat sat'])['rouge2'] == 1.0


def test_bleu_is_sacrebleus_geometric_mean_of_clipped_ngram_precisions():
  # Against 'the cat sat on a mat': 5/6 words (the second 'the' is clipped), 3/5 bigrams,
  # 2/4 trigrams, 1/3 four-grams; equal lengths, so no brevity penalty.
  expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 2)
                             + math.log(1 / 3)) / 4)
  assert scores.bleu(['the cat sat on the mat'], [['the cat sat on a mat']]) == pytest.approx(
      expected, abs=0.01)
  assert scores.sentence_bleu('the cat sat on the mat', ['the cat sat on a mat']) == (
      pytest.approx(expected, abs=0.01))
  assert scores.bleu(['the cat sat on the mat'], [['the cat sat on the mat']]) == (
      pytest.approx(100))


def test_bleu_takes_examples_with_different_numbers_of_references():
  predictions = ['the cat sat on the mat', 'a dog barked at the moon']
  one = scores.bleu(predictions, [['the cat sat on a mat'], ['a dog howled at a moon']])
  more = scores.bleu(predictions, [['the cat sat on a mat'],
                                   ['a dog howled at a moon', 'a dog barked at the moon']])
  assert 0 < one < more


def test_label_accuracy_reads_the_first_word():
  assert scores.label_accuracy('Positive. A fine film.', ['positive']) == 1.0
  assert scores.label_accuracy('negative', ['positive']) == 0.0
  assert scores.label_accuracy('', ['positive']) == 0.0


def test_per_example_rows_and_their_summary():
  predictions = ['the cat sat', 'positive']
  references = [['the cat sat on the mat'], ['positive']]
  rows = [scores.per_example(p, r) for p, r in zip(predictions, references, strict=True)]
  assert set(rows[0]) == set(scores.METRICS)
  summary = scores.summarize(predictions, references, rows)
  assert summary['exact_match'] == 0.5 and summary['label_accuracy'] == 0.5
  assert summary['rouge1'] == pytest.approx((2 * 0.5 / 1.5 + 1.0) / 2)
  assert summary['bleu'] == pytest.approx(scores.bleu(predictions, references))
  only = scores.per_example('the cat', ['the cat'], metrics=('exact_match',))
  assert only == {'exact_match': 1.0}
  with pytest.raises(ValueError, match='unknown metrics'):
    scores.per_example('a', ['a'], metrics=('meteor',))


def test_training_does_not_import_the_rouge_scorer():
  """rouge-score brings NLTK and SciPy's statistics (2.4 s of a start-up on the 2-core
  machine); a process imports it only when it scores ROUGE."""
  code = ('import sys, lmjax.train; '
          "print([m for m in ('rouge_score', 'nltk', 'scipy.stats') if m in sys.modules])")
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, check=True)
  assert done.stdout.split('\n')[-2] == '[]', done.stdout
  assert scores.rouge('the cat', ['the cat'])['rouge1'] == 1.0
