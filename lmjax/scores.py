"""Scores of generated text against references, for evaluating what a model writes.

  exact_match, token_f1   SQuAD's definitions: answers compared after lower-casing and
                          removing punctuation, articles and extra spaces; the best over
                          an example's references
  rouge                   ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Google's rouge-score,
                          with its Porter stemmer), the best over the references
  bleu                    corpus BLEU as sacreBLEU computes it (its default 13a
                          tokenization), on a 0-100 scale
  label_accuracy          whether the first word of the generation is the label word

Every function takes a list of generations and, for each, a list of its references (one or
more). `per_example` gives each example's scores, for a file a user can read line by line;
`summarize` their means (and the corpus BLEU, which is not a mean of per-example scores).
"""
import collections
import re
import string

import sacrebleu

METRICS = ('exact_match', 'token_f1', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'label_accuracy')
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = str.maketrans('', '', string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalization: lower case, no punctuation, no articles, one space
  between words."""
  text = _ARTICLES.sub(' ', text.lower().translate(_PUNCTUATION))
  return ' '.join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
  """1.0 if the normalized generation equals a normalized reference, else 0.0."""
  return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
  """The best F1, over the references, of the normalized words shared (counted with
  multiplicity). Two empty answers agree (1.0); one empty answer agrees with nothing."""
  def f1(reference: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not wanted:
      return float(predicted == wanted)
    shared = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if shared == 0:
      return 0.0
    precision, recall = shared / len(predicted), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)
  return max(f1(r) for r in references)


_ROUGE = ('rouge1', 'rouge2', 'rougeL')


def rouge(prediction: str, references: list[str]) -> dict[str, float]:
  """ROUGE-1/2/L F-measures of the generation against its best-matching reference."""
  # Imported here: rouge-score brings NLTK and SciPy's statistics, about 2 s of every
  # lmjax process's start-up, and only a generative evaluation scores ROUGE.
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(_ROUGE), use_stemmer=True)
  scores = scorer.score_multi(references, prediction)
  return {name: scores[name].fmeasure for name in _ROUGE}


def bleu(predictions: list[str], references: list[list[str]]) -> float:
  """Corpus BLEU (0-100); examples may have different numbers of references."""
  streams = [[refs[i] if i < len(refs) else None for refs in references]
             for i in range(max(map(len, references)))]
  return sacrebleu.corpus_bleu(predictions, streams).score


def sentence_bleu(prediction: str, references: list[str]) -> float:
  """One example's BLEU (0-100), smoothed as sacreBLEU smooths single sentences."""
  return sacrebleu.sentence_bleu(prediction, references).score


def label_accuracy(prediction: str, references: list[str]) -> float:
  """1.0 if the generation's first word, normalized, is one of the label words."""
  words = normalize_answer(prediction).split()
  return float(bool(words) and words[0] in {normalize_answer(r) for r in references})


def per_example(prediction: str, references: list[str], metrics=METRICS) -> dict[str, float]:
  """The scores of one generation against its references, for each of `metrics`."""
  _check(metrics)
  out = {}
  if 'exact_match' in metrics:
    out['exact_match'] = exact_match(prediction, references)
  if 'token_f1' in metrics:
    out['token_f1'] = token_f1(prediction, references)
  if any(name in metrics for name in _ROUGE):
    out.update({k: v for k, v in rouge(prediction, references).items() if k in metrics})
  if 'bleu' in metrics:
    out['bleu'] = sentence_bleu(prediction, references)
  if 'label_accuracy' in metrics:
    out['label_accuracy'] = label_accuracy(prediction, references)
  return out


def summarize(predictions: list[str], references: list[list[str]], rows: list[dict],
              metrics=METRICS) -> dict[str, float]:
  """The means of the per-example `rows` over all examples; BLEU is the corpus BLEU."""
  _check(metrics)
  if len(predictions) != len(references) or len(rows) != len(predictions):
    raise ValueError(f'{len(predictions)} generations, {len(references)} reference lists and '
                     f'{len(rows)} rows of scores; they must match.')
  out = {name: sum(row[name] for row in rows) / len(rows) for name in metrics if name != 'bleu'}
  if 'bleu' in metrics:
    out['bleu'] = bleu(predictions, references)
  return out


def _check(metrics) -> None:
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f'unknown metrics {unknown}; known: {", ".join(METRICS)}')
