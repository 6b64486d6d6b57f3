"""The kinds of training, one class each: what a run reads, how it is scored, what it writes.

The trainer and `evaluation` ask the task, never the config, what differs between kinds:
the texts a tokenizer trained here learns from (`read`, `tokenizer_texts`), the tokenized
data and evaluation sets (`load`), the training stream from any example on
(`train_dataset`), the metrics of an evaluation (`evaluate`), the texts it writes to
TensorBoard (`texts`), the run's last lines (`closing`), and a split of a finished run
scored (`split_eval_set`, `split_report`). Each kind checks the fields it depends on
(`check_config`, called by `config.validate_config`).

  LanguageModel   next-token prediction on one corpus (one of lmjax's, or `tfds:NAME`)
  MaskedLM        a bidirectional encoder filling in masked tokens (model.causal=False)
  Stream          a recurrent model carrying its state from batch to batch (train.stateful)
  Mixture         a language model on a weighted mixture of corpora (data.mixture)
  Classification  one label per passage (a dataset with classes, e.g. authorship)
  Completion      prompt -> completion pairs, the completion scored (data.format='completion')

A new kind is one class here and one line in `task_class`.
"""
import math

import ml_collections
import numpy as np

from lmjax import finetune, generation, losses, models, scores, state as state_lib, steps
from lmjax.data import completions, corpora, external, pipeline, puzzles
from lmjax.errors import UserError
from lmjax.models import rnn


def task_class(config) -> type:
  """The kind of training `config` describes."""
  if config.data.format == 'completion':
    return Completion
  if corpora.class_names(config.data.name):
    return Classification
  if config.data.mixture:
    return Mixture
  if config.train.stateful:
    return Stream
  if not config.model.causal:
    return MaskedLM
  return LanguageModel


def scoring_task(config, dataset: str | None = None):
  """The task that scores splits of a finished run of `config`: its own, or a language
  model on corpus `dataset` (which a run on a mixture must name)."""
  kind = task_class(config)
  if dataset is None:
    return kind(config).scored()
  if kind is Completion:
    raise UserError(f'--dataset={dataset!r}: this run learned to complete the prompts of '
                    f"{completions.source(config.data)!r}; it scores those completions only.")
  if kind is Classification:
    raise UserError(f'--dataset={dataset!r}: this run is a classifier of '
                    f"{config.data.name!r}; it scores that dataset's passages only.")
  if external.is_external(dataset):  # prepared, or the command that prepares it is named
    external.builder(on_dataset(config, dataset).data)
  elif dataset not in corpora.DATASETS or corpora.class_names(dataset):
    raise UserError(f'--dataset={dataset!r}; score a language model on one of '
                    f"{', '.join(lm_datasets())}, or a prepared TFDS text dataset as "
                    "'tfds:NAME'.")
  if kind is Mixture:  # each of its corpora is scored as a language model on its own
    kind = LanguageModel
  return kind(on_dataset(config, dataset))


def lm_datasets() -> list[str]:
  """lmjax's language-modelling corpora (not its classification datasets)."""
  return [name for name in corpora.DATASETS if not corpora.class_names(name)]


def on_dataset(config, name: str):
  """`config` reading dataset `name` (one task of a mixture)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.name = name
  config.data.mixture = ()
  return config


class Task:
  """What every kind shares; see the module docstring for the interface."""
  stateful = False  # whether a carry runs from batch to batch (train and evaluation)
  class_names = ()  # a classifier's classes, in label order

  def __init__(self, config):
    self.config, self.data, self.tokenizer = config, config.data, None

  @classmethod
  def check_config(cls, config) -> None:
    """Refuses fields this kind cannot honour, naming the field and the fix."""
    if not config.model.causal:
      if config.model.name != 'transformer':
        raise UserError(f'model.causal=False makes a bidirectional encoder, which only the '
                        f'Transformer has; model.name={config.model.name!r} reads left to '
                        'right.')
      if not 0 < config.train.mask_rate < 1:
        raise UserError(f'train.mask_rate={config.train.mask_rate}; the share of tokens a '
                        'masked LM predicts must be between 0 and 1 (BERT: 0.15).')

  def check_sample_prompt(self, tokenizer) -> None:
    """Refuses a train.sample_prompt this kind cannot sample from (only kinds that write
    samples check it)."""
    del tokenizer

  def scored(self):
    """This task as it scores a finished run's splits."""
    return self

  def final_metrics(self, metrics: dict) -> dict:
    """The last evaluation as the run returns it and writes it to result.json."""
    return metrics


class LanguageModel(Task):
  """Next-token prediction on independent windows of one corpus's token stream."""

  def read(self) -> None:
    """Reads the training split's text, once (a split of many small documents takes
    seconds). A `tfds:` corpus is far too large to hold as text: it is streamed into a
    token file, and a tokenizer trained here learns from its first documents only."""
    self.works = None
    if not external.is_external(self.data.name):
      self.works = corpora.load_split_texts(self.data.name, self.data.train_split,
                                            self.data.data_dir or None)

  def tokenizer_texts(self) -> list[str]:
    if self.works is None:
      return external.sample_texts(self.data, self.data.train_split)
    return [text for _, text in self.works]

  def load(self, tokenizer, workdir: str) -> None:
    """Tokenizes the training split and cuts the evaluation set. A `tfds:` split is
    tokenized once into a file in the workdir (or data.cache_dir) and read as a memmap; a
    second process or run waits for the first to write it."""
    self.tokenizer = tokenizer
    cache = external.cache_dir(self.data, workdir)
    self.tokens = pipeline.load_tokens(self.data, self.data.train_split, tokenizer,
                                       self.works, cache_dir=cache)
    # Read whole (the evaluation windows are cut from an array in memory): keep it small,
    # e.g. data.eval_split='train[-1000:]' for a dataset with one split.
    eval_tokens = pipeline.load_tokens(self.data, self.data.eval_split, tokenizer,
                                       cache_dir=cache)
    self.evals = self.eval_set(eval_tokens, self.config.train.eval_batch_size, tokenizer)

  def eval_set(self, tokens, batch_size: int, tokenizer) -> pipeline.EvalSet:
    """The windows a split's `tokens` are scored in."""
    del tokenizer
    return pipeline.eval_set(tokens, seq_len=self.config.train.seq_len, batch_size=batch_size)

  @property
  def bits_per_char(self) -> bool:
    """Whether the loss is also logged in bits per character."""
    return self.data.tokenizer == 'char'

  def describe(self) -> str:
    return f'{len(self.tokens):,} training tokens'

  def check_sample_prompt(self, tokenizer) -> None:
    """The samples written at each evaluation continue train.sample_prompt: it must be
    text the tokenizer can encode (train.sample_tokens=0 writes none)."""
    t = self.config.train
    if t.sample_tokens <= 0:
      return
    if not t.sample_prompt:
      raise UserError('train.sample_prompt is empty; give the text the samples continue, or '
                      'set train.sample_tokens=0 for no samples.')
    unknown = (sorted(set(t.sample_prompt) - set(tokenizer.chars))
               if tokenizer.kind == 'char' else [])
    if unknown:
      raise UserError(f'train.sample_prompt={t.sample_prompt!r} has characters outside the '
                      f'character vocabulary: {", ".join(map(repr, unknown[:10]))}; change '
                      'the prompt, or set train.sample_tokens=0 for no samples.')

  def train_dataset(self, start_example: int):
    t = self.config.train
    return pipeline.train_dataset(self.tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                  seed=t.seed, start_example=start_example)

  def evaluate(self, eval_fn, params, batch_sharding, carry=None) -> dict:
    return steps.evaluate(eval_fn, params, self.evals, batch_sharding, self.bits_per_char,
                          carry, max_batches=self.config.train.eval_batches)

  def texts(self, params, metrics: dict) -> dict[str, str]:
    """TensorBoard texts of an evaluation: a sampled continuation of train.sample_prompt."""
    del metrics
    return {'sample': generation.sample_text(self.config, params, self.tokenizer)}

  def closing(self, workdir: str, metrics: dict, texts: dict) -> str:
    del metrics
    return (f'Decode more with: python experiments/decode.py --workdir={workdir} '
            f"--prompt='{self.config.train.sample_prompt.strip()}'\n"
            f"\n--- sample ---\n{texts['sample']}\n--------------")

  def split_eval_set(self, split: str, tokenizer, batch_size: int,
                     workdir: str) -> pipeline.EvalSet:
    """Split `split` of the run's corpus, cut as training's evaluation cuts it."""
    tokens = pipeline.load_tokens(self.data, split, tokenizer,
                                  cache_dir=external.cache_dir(self.data, workdir))
    try:
      return self.eval_set(tokens, batch_size, tokenizer)
    except ValueError as e:  # a split shorter than one window
      raise UserError(f'--split={split}: {e}') from None

  def split_report(self, metrics: dict, evals: pipeline.EvalSet, tokenizer) -> dict:
    """A split's metrics with bits per byte of the text the scored targets stand for
    (counted on the host: padding has weight 0, the end-of-document separator 0 bytes)."""
    scored = evals.arrays['weights'] > 0
    num_tokens = int(scored.sum())
    num_bytes = int(tokenizer.byte_lengths()[evals.arrays['targets'][scored]].sum())
    loss_bits = metrics['loss'] * num_tokens / math.log(2)  # the whole split's, in bits
    report = {
        'loss': metrics['loss'], 'perplexity': metrics['perplexity'],
        'accuracy': metrics['accuracy'], 'bits_per_token': metrics['loss'] / math.log(2),
        'bits_per_byte': loss_bits / num_bytes if num_bytes else None,
        'num_tokens': num_tokens, 'num_bytes': num_bytes, 'dataset': self.data.name}
    if tokenizer.kind == 'char':
      report['bits_per_char'] = report['bits_per_token']
    return report


class MaskedLM(LanguageModel):
  """A bidirectional encoder predicting the tokens masked out of each window (BERT's
  corruption, `pipeline.Masking`). It writes no text."""

  def load(self, tokenizer, workdir: str) -> None:
    self.masking = state_lib.masking(self.config, tokenizer)
    super().load(tokenizer, workdir)

  def eval_set(self, tokens, batch_size: int, tokenizer) -> pipeline.EvalSet:
    # Masks drawn once, under train.seed: every evaluation scores the same ones.
    return pipeline.masked_eval_set(tokens, seq_len=self.config.train.seq_len,
                                    batch_size=batch_size,
                                    masking=state_lib.masking(self.config, tokenizer),
                                    seed=self.config.train.seed)

  @property
  def bits_per_char(self) -> bool:
    return False  # a masked LM's would not compare with a left-to-right model's

  def check_sample_prompt(self, tokenizer) -> None:
    del tokenizer  # it writes no samples

  def train_dataset(self, start_example: int):
    t = self.config.train
    return pipeline.train_dataset(self.tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                  seed=t.seed, start_example=start_example,
                                  masking=self.masking)

  def texts(self, params, metrics: dict) -> dict[str, str]:
    del params, metrics
    return {}

  def closing(self, workdir: str, metrics: dict, texts: dict) -> str:
    return (f'Score another split with: python experiments/evaluate.py --workdir={workdir} '
            '--split=test\n\n')


class Stream(LanguageModel):
  """A recurrent model reading the corpus as parallel streams (truncated BPTT): each batch
  row continues where the same row of the previous batch ended, carry included."""
  stateful = True

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    if not models.is_recurrent(config.model):
      raise UserError(f'train.stateful=True carries a recurrent state between batches, and '
                      f'model.name={config.model.name!r} has none; use one of '
                      f'{", ".join(rnn.CELLS)} or set train.stateful=False.')

  def load(self, tokenizer, workdir: str) -> None:
    super().load(tokenizer, workdir)
    t = self.config.train
    pipeline.stream_rows(len(self.tokens), seq_len=t.seq_len, global_batch=t.batch_size)

  def eval_set(self, tokens, batch_size: int, tokenizer) -> pipeline.EvalSet:
    return pipeline.stream_eval_set(tokens, seq_len=self.config.train.seq_len,
                                    batch_size=batch_size, eos_id=tokenizer.eos_id)

  def train_dataset(self, start_example: int):
    t = self.config.train
    return pipeline.stream_dataset(self.tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                   seed=t.seed, eos_id=self.tokenizer.eos_id,
                                   start_example=start_example)


class Mixture(LanguageModel):
  """A left-to-right model on several corpora at once, each window drawn from one of them
  with the mixture's weights (`pipeline.mixture_schedule`); each is evaluated on its own
  and the mixture's loss is their weighted mean."""

  def __init__(self, config):
    super().__init__(config)
    self.weights = dict(mixture_weights(config))

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    mixture_weights(config)

  def read(self) -> None:
    """Each corpus's training text; a tokenizer trained here learns from all of them."""
    self.works = {name: corpora.load_split_texts(name, self.data.train_split,
                                                 self.data.data_dir or None)
                  for name in self.weights}

  def tokenizer_texts(self) -> list[str]:
    return [text for works in self.works.values() for _, text in works]

  def load(self, tokenizer, workdir: str) -> None:
    del workdir
    self.tokenizer, t = tokenizer, self.config.train
    task_tokens = [pipeline.load_tokens(on_dataset(self.config, name).data,
                                        self.data.train_split, tokenizer, self.works[name])
                   for name in self.weights]
    self.lengths = [len(x) for x in task_tokens]
    self.tokens = np.concatenate(task_tokens)
    self.starts, _ = pipeline.mixture_schedule(
        self.lengths, list(self.weights.values()), seq_len=t.seq_len,
        num_examples=t.num_steps * t.batch_size, seed=t.seed)
    self.evals = {name: self.eval_set(pipeline.load_tokens(
        on_dataset(self.config, name).data, self.data.eval_split, tokenizer),
        t.eval_batch_size, tokenizer) for name in self.weights}

  def describe(self) -> str:
    return 'a mixture of ' + ', '.join(
        f'{name} ({n:,} training tokens, weight {w:g})'
        for (name, w), n in zip(self.weights.items(), self.lengths))

  def train_dataset(self, start_example: int):
    t = self.config.train
    return pipeline.mixture_dataset(self.tokens, self.starts, seq_len=t.seq_len,
                                    global_batch=t.batch_size, start_example=start_example)

  def evaluate(self, eval_fn, params, batch_sharding, carry=None) -> dict:
    """Each corpus's metrics under 'NAME/...', and loss and accuracy averaged with the
    mixture's weights (the expectation training minimises)."""
    per_task = {name: steps.evaluate(eval_fn, params, evals, batch_sharding,
                                     self.bits_per_char,
                                     max_batches=self.config.train.eval_batches)
                for name, evals in self.evals.items()}
    total = sum(self.weights.values())
    out = {k: sum(w * per_task[name][k] for name, w in self.weights.items()) / total
           for k in ('loss', 'accuracy')}
    out['perplexity'] = math.exp(min(out['loss'], 80.0))
    if self.bits_per_char:
      out['bits_per_char'] = out['loss'] / math.log(2)
    for name, metrics in per_task.items():
      out.update({f'{name}/{k}': v for k, v in metrics.items()})
    return out

  def scored(self):
    raise UserError(f'this run trained on a mixture of {", ".join(self.weights)}; name the '
                    f'corpus to score with --dataset={next(iter(self.weights))} (each is '
                    'scored on its own).')


def mixture_weights(config) -> list[tuple[str, float]]:
  """The (dataset, weight) pairs of data.mixture, checked; [] without a mixture."""
  tasks = []
  for entry in config.data.mixture:
    name, _, weight = str(entry).partition(':')
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if name not in corpora.DATASETS or corpora.class_names(name) or not weight > 0:
      raise UserError(f'data.mixture entry {entry!r}: write DATASET:WEIGHT with a '
                      f'language-modelling dataset ({", ".join(lm_datasets())}) and a '
                      "positive weight, e.g. --config.data.mixture=\"('shakespeare:0.7',"
                      "'milton:0.3')\".")
    tasks.append((name, weight))
  if len({name for name, _ in tasks}) < len(tasks):
    raise UserError(f'data.mixture={tuple(config.data.mixture)} names a dataset twice.')
  if tasks and (config.train.stateful or not config.model.causal):
    raise UserError('data.mixture trains a left-to-right model on independent windows; '
                    'set train.stateful=False and model.causal=True, or drop the mixture.')
  return tasks


class Classification(Task):
  """One label per passage: the model's pooled output scored against the passage's class
  (accuracy, precision, recall, F1 and the confusion matrix)."""

  def __init__(self, config):
    super().__init__(config)
    self.class_names = corpora.class_names(config.data.name)

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    if config.train.stateful:
      raise UserError(f'train.stateful=True reads one long text stream, and data.name='
                      f'{config.data.name!r} is a classification dataset of separate '
                      'passages; set train.stateful=False.')

  def read(self) -> None:
    self.passages = corpora.load_split_passages(self.data.name, self.data.train_split,
                                                self.data.data_dir or None)
    pipeline.check_one_batch(len(self.passages), self.config.train.batch_size)

  def tokenizer_texts(self) -> list[str]:
    return [text for _, _, text, _ in self.passages]

  def load(self, tokenizer, workdir: str) -> None:
    del workdir
    self.tokenizer, t = tokenizer, self.config.train
    self.examples = pipeline.load_examples(self.data, self.data.train_split, tokenizer,
                                           t.seq_len, self.passages)
    self.evals = pipeline.classification_eval_set(
        pipeline.load_examples(self.data, self.data.eval_split, tokenizer, t.seq_len),
        batch_size=t.eval_batch_size)
    self.counts = np.bincount(self.examples['labels'], minlength=len(self.class_names))
    if t.balance_classes:
      self.examples['weights'] = balanced_weights(self.examples['labels'], self.counts)

  def describe(self) -> str:
    return (f'{len(self.passages):,} training passages (' +
            ', '.join(f'{n:,} {c}' for c, n in zip(self.class_names, self.counts)) + ')')

  def train_dataset(self, start_example: int):
    t = self.config.train
    return pipeline.classification_train_dataset(
        self.examples, global_batch=t.batch_size, seed=t.seed, start_example=start_example)

  def evaluate(self, eval_fn, params, batch_sharding, carry=None) -> dict:
    return steps.evaluate(eval_fn, params, self.evals, batch_sharding, False, carry,
                          self.class_names, max_batches=self.config.train.eval_batches)

  def texts(self, params, metrics: dict) -> dict[str, str]:
    del params
    return {'confusion_matrix': losses.confusion_table(metrics['confusion_matrix'],
                                                       self.class_names)}

  def final_metrics(self, metrics: dict) -> dict:
    return {**metrics, 'classes': list(self.class_names)}

  def closing(self, workdir: str, metrics: dict, texts: dict) -> str:
    table = losses.confusion_table(metrics['confusion_matrix'], self.class_names)
    return (f'Score another split with: python experiments/evaluate.py --workdir={workdir} '
            f'--split=test\n\n{table}')

  def split_eval_set(self, split: str, tokenizer, batch_size: int,
                     workdir: str) -> pipeline.EvalSet:
    del workdir
    self.scored = pipeline.load_examples(self.data, split, tokenizer,
                                         self.config.train.seq_len)
    return pipeline.classification_eval_set(self.scored, batch_size=batch_size)

  def split_report(self, metrics: dict, evals: pipeline.EvalSet, tokenizer) -> dict:
    del evals, tokenizer
    return {**metrics, 'classes': list(self.class_names),
            'num_examples': len(self.scored['labels'])}


def balanced_weights(labels, counts) -> np.ndarray:
  """Per-example loss weights that give every class the same total weight, and the
  examples a mean weight of 1 (scikit-learn's class_weight='balanced')."""
  present = counts > 0
  per_class = np.zeros(len(counts))
  per_class[present] = len(labels) / (present.sum() * counts[present])
  return per_class[labels].astype(np.float32)


class Completion(LanguageModel):
  """Prompt -> completion pairs (supervised fine-tuning), trained as a language model whose
  loss and metrics count the completion's tokens and its eos only, several examples packed
  in a row or one a row (`lmjax.data.completions`). An evaluation also completes a few
  validation prompts greedily; on Countdown, the puzzle checker scores them
  (eval/solve_rate), and train.completion_metrics names scores of lmjax.scores to log
  (eval/exact_match, eval/bleu, ...)."""

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    d, t, m = config.data, config.train, config.model
    refused = [(not m.causal, 'model.causal=False: a completion is written left to right'),
               (t.stateful, 'train.stateful=True: examples are read independently'),
               (bool(d.mixture), 'data.mixture: one dataset of prompts and completions'),
               (not d.train_file and bool(corpora.class_names(d.name)),
                f'data.name={d.name!r}: it has labels')]
    for refuse, why in refused:
      if refuse:
        raise UserError(f"data.format='completion' cannot take {why}.")
    if d.pack and m.name == 'transformer' and m.attention == 'cudnn':
      raise UserError("data.pack=True keeps packed examples apart with a mask that "
                      "model.attention='cudnn' does not take; use model.attention="
                      "'dot_product', or data.pack=False (one example a row).")
    if t.eval_completions < 0:
      raise UserError(f'train.eval_completions={t.eval_completions}; use 0 (none) or the '
                      'number of validation prompts to complete at each evaluation.')
    unknown = sorted(set(t.completion_metrics) - set(scores.METRICS))
    if unknown:
      raise UserError(f'train.completion_metrics: unknown {unknown}; use some of '
                      f'{", ".join(scores.METRICS)}.')

  def read(self) -> None:
    """The training split's (prompt, completion) pairs."""
    self.pairs = completions.read_examples(self.data, self.data.train_split)

  def tokenizer_texts(self) -> list[str]:
    return [text for pair in self.pairs for text in pair]

  def _tokenized(self, pairs, split: str, tokenizer) -> completions.Examples:
    return completions.tokenize(pairs, tokenizer, seq_len=self.config.train.seq_len,
                                what=f'{completions.source(self.data)} {split}',
                                drop_unknown_chars=self.data.drop_unknown_chars)

  def load(self, tokenizer, workdir: str) -> None:
    """Tokenizes both splits, and keeps the first validation pairs for the completions
    written at each evaluation."""
    del workdir
    self.tokenizer, t = tokenizer, self.config.train
    self.examples = self._tokenized(self.pairs, self.data.train_split, tokenizer)
    eval_pairs = completions.read_examples(self.data, self.data.eval_split)
    self.evals = completions.eval_set(
        self._tokenized(eval_pairs, self.data.eval_split, tokenizer), seq_len=t.seq_len,
        batch_size=t.eval_batch_size, packed=self.data.pack)
    self.samples = eval_pairs[:t.eval_completions] if t.sample_tokens > 0 else []
    self.generated = []

  def describe(self) -> str:
    t = self.config.train
    _, bounds = completions.epoch_plan(self.examples, 0, seed=t.seed, seq_len=t.seq_len,
                                       packed=self.data.pack)
    num_rows, spans = len(bounds) - 1, self.examples.spans
    scored = spans.sum() - self.examples.prompt_lengths.sum() + len(spans)
    return (f'{len(spans):,} training examples (prompt -> completion) in {num_rows:,} rows '
            f'of {t.seq_len} an epoch, {spans.sum() / (num_rows * t.seq_len):.0%} of their '
            f'positions filled, {scored:,} scored tokens')

  def check_sample_prompt(self, tokenizer) -> None:
    del tokenizer  # the completions written continue validation prompts

  def train_dataset(self, start_example: int):
    t = self.config.train
    return completions.train_dataset(self.examples, seq_len=t.seq_len,
                                     global_batch=t.batch_size, seed=t.seed,
                                     packed=self.data.pack, start_example=start_example)

  def evaluate(self, eval_fn, params, batch_sharding, carry=None) -> dict:
    """Loss, perplexity and accuracy over the validation completions; the greedy
    completions of the first validation prompts, and on Countdown the share they solve."""
    metrics = super().evaluate(eval_fn, params, batch_sharding, carry)
    self.generated = self._complete(params)
    if self.generated and completions.source(self.data) == 'countdown':
      solved = [puzzles.solves(prompt, text)
                for (prompt, _), text in zip(self.samples, self.generated)]
      metrics['solve_rate'] = sum(solved) / len(solved)
    wanted = tuple(self.config.train.completion_metrics)
    if self.generated and wanted:
      references = [[reference] for _, reference in self.samples]
      rows = [scores.per_example(text, refs, wanted)
              for text, refs in zip(self.generated, references)]
      metrics.update(scores.summarize(self.generated, references, rows, wanted))
    return metrics

  def _complete(self, params) -> list[str]:
    """Greedy completions, train.sample_tokens at most, of the sampled validation prompts."""
    if not self.samples:
      return []
    config, params = finetune.for_decoding(self.config, params)
    results = generation.generate_texts(config, params, self.tokenizer,
                                        [prompt for prompt, _ in self.samples],
                                        max_new_tokens=self.config.train.sample_tokens,
                                        strategy='greedy')
    return [candidates[0]['text'] for candidates in results]

  def texts(self, params, metrics: dict) -> dict[str, str]:
    """TensorBoard text of an evaluation: each validation prompt, the model's completion and
    the reference, as a code block."""
    del params, metrics
    if not self.generated:
      return {}
    blocks = []
    for (prompt, reference), text in zip(self.samples, self.generated):
      blocks.append(f'prompt:     {prompt!r}\ncompletion: {text!r}\nreference:  {reference!r}')
    # Indented four spaces: TensorBoard's text tab shows it as a code block.
    return {'completions': '    ' + '\n\n'.join(blocks).replace('\n', '\n    ')}

  def closing(self, workdir: str, metrics: dict, texts: dict) -> str:
    del metrics
    prompt = self.samples[0][0].strip() if self.samples else 'PROMPT'
    shown = ('\n\n--- greedy completions of validation prompts ---\n'
             + texts['completions'] if texts.get('completions') else '')
    return (f'Complete a prompt with: python experiments/decode.py --workdir={workdir} '
            f"--prompt='{prompt}' --strategy=greedy{shown}")

  def split_eval_set(self, split: str, tokenizer, batch_size: int,
                     workdir: str) -> pipeline.EvalSet:
    """Split `split`'s examples, laid out as training's evaluation lays them."""
    del workdir
    return completions.eval_set(
        self._tokenized(completions.read_examples(self.data, split), split, tokenizer),
        seq_len=self.config.train.seq_len, batch_size=batch_size, packed=self.data.pack)

  def split_report(self, metrics: dict, evals: pipeline.EvalSet, tokenizer) -> dict:
    return {**super().split_report(metrics, evals, tokenizer),
            'dataset': completions.source(self.data)}
