"""Masked cross-entropy (over tokens or over class labels) and the metrics derived from it."""
import math

import numpy as np

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """Sums of per-token loss, correct predictions and weight (the token count).

  Sums rather than means, so that evaluation can add them over batches of
  different fill and divide once at the end.
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  weights_BxL = weights_BxL.astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(nll_BxL * weights_BxL),
      'correct_sum': jnp.sum(correct_BxL * weights_BxL),
      'weight_sum': jnp.sum(weights_BxL),
  }


def classification_sums(logits_BxC, labels_B, weights_B):
  """`token_cross_entropy`'s sums over one label per row, plus the confusion matrix
  (weighted counts; row: true class, column: predicted class)."""
  sums = token_cross_entropy(logits_BxC, labels_B, weights_B)
  num_classes = logits_BxC.shape[-1]
  true_BxC = jax.nn.one_hot(labels_B, num_classes) * weights_B.astype(jnp.float32)[:, None]
  predicted_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, axis=-1), num_classes)
  sums['confusion'] = jnp.einsum('bt,bp->tp', true_BxC, predicted_BxC)
  return sums


def classification_metrics(confusion_CxC, class_names) -> dict:
  """Accuracy, then precision, recall and F1 of each class and their unweighted (macro)
  means, from a confusion matrix of counts (row: true class, column: predicted).

  A class never predicted has precision 0, one never present recall 0, and F1 is 0 when
  both are: scikit-learn's `zero_division=0`.
  """
  confusion = np.asarray(confusion_CxC, np.float64)
  hits_C = np.diag(confusion)

  def ratio(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

  precision_C = ratio(hits_C, confusion.sum(axis=0))
  recall_C = ratio(hits_C, confusion.sum(axis=1))
  f1_C = ratio(2 * precision_C * recall_C, precision_C + recall_C)
  out = {'accuracy': float(hits_C.sum() / max(confusion.sum(), 1.0))}
  for name, values in (('precision', precision_C), ('recall', recall_C), ('f1', f1_C)):
    for class_name, value in zip(class_names, values):
      out[f'{name}/{class_name}'] = float(value)
    out[f'{name}_macro'] = float(values.mean())
  return out


def summarize(sums: dict, bits_per_char: bool = False, class_names=()) -> dict:
  """Mean loss (nats/token), perplexity, accuracy and, for character models, bits/char;
  for a classifier (`class_names`), mean loss per example and `classification_metrics`,
  with the confusion matrix as nested lists."""
  weight = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / weight
  if class_names:
    confusion = np.asarray(sums['confusion'])
    return {'loss': loss, **classification_metrics(confusion, class_names),
            'confusion_matrix': np.rint(confusion).astype(int).tolist()}
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 80.0)),
         'accuracy': float(sums['correct_sum']) / weight}
  if bits_per_char:
    out['bits_per_char'] = loss / math.log(2)
  return out


def confusion_table(confusion: list[list[int]], class_names) -> str:
  """A Markdown table of a confusion matrix (rows: true class, columns: predicted), as
  TensorBoard's text tab and a terminal both show it."""
  lines = ['| true \\ predicted | ' + ' | '.join(class_names) + ' |',
           '| --- |' + ' ---: |' * len(class_names)]
  for name, row in zip(class_names, confusion):
    lines.append(f'| {name} | ' + ' | '.join(str(n) for n in row) + ' |')
  return '\n'.join(lines)
