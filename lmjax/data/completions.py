"""Prompt -> completion examples (supervised fine-tuning): read from Countdown, JSONL files or
a TFDS dataset, tokenized, and laid out in rows of train.seq_len tokens.

An example is its prompt's tokens, its completion's and the tokenizer's eos, trained as a
language model reads a window: the inputs are all its tokens but the last, the targets all
but the first, and only the targets that are completion tokens or the eos weigh 1 (the
prompt's and the padding's weigh 0). An example of n tokens takes n - 1 positions of a row:
its prompt and completion, which together must fit in train.seq_len.

Rows hold several examples one after another (data.pack=True, as T5X and MaxText pack) or
one each, right-padded (data.pack=False). Packed rows carry 'segment_ids' (1, 2, ... for
the examples of a row, 0 for padding) and 'positions' (each token's position in its own
example, from 0); the model keeps the examples of a row apart by them
(`steps.packed_kwargs`), so a packed row computes what its examples would alone. Padded
rows need neither: attention is causal and the padding comes last.

Training order is a pure function of (seed, row index): epoch e visits the examples in an
order shuffled by (seed, e), each packed into the first of the last few rows with room for
it (`pack`). The only state is the number of rows read, so a
resumed run, or a run on another number of processes, reads the rows an uninterrupted one
would. Examples are held in memory, tokenized: datasets of up to a few million examples.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import string
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from lmjax.data import corpora, external, pipeline, puzzles
from lmjax.data.tfdata import tf
from lmjax.errors import UserError, one_line

# data.format: documents modelled whole, or prompt -> completion pairs.
FORMATS = ('text', 'completion')
JSONL_SPLITS = ('train', 'validation')
_READ_BATCH = 1024  # TFDS examples per read
# Packing places each example in the first of this many most recent rows with room for it.
OPEN_ROWS = 16


def is_jsonl(data_config) -> bool:
  """Whether the examples come from JSONL files (data.train_file) rather than data.name."""
  return bool(data_config.train_file)


def source(data_config) -> str:
  """What the examples are read from, as messages and reports name it."""
  return data_config.train_file if is_jsonl(data_config) else data_config.name


# ------------------------------------------------------------------------------ sources


def read_examples(data_config, split: str) -> list[tuple[str, str]]:
  """The (prompt, completion) pairs of split `split` of data.train_file's JSONL files, or
  else of data.name, in a fixed order."""
  name = data_config.name
  if is_jsonl(data_config):
    return _jsonl_split(data_config, split)
  if external.is_external(name):
    return _tfds_examples(data_config, split)
  if name == 'countdown':
    return [puzzles.prompt_and_solution(text)
            for _, text in corpora.load_split_texts(name, split, data_config.data_dir or None)]
  raise UserError(f"data.format='completion' reads prompts and completions, and "
                  f'data.name={name!r} has none; use countdown (the puzzle line is the '
                  "prompt), a TFDS dataset 'tfds:NAME' with data.prompt_feature and "
                  'data.completion_feature, or JSONL files (data.train_file).')


def jsonl_paths(pattern: str, field: str) -> list[str]:
  """The files a JSONL path or glob pattern names, sorted; UserError if there are none."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise UserError(f'{field}: no file matches {pattern!r}; give the path of a JSONL file '
                    '(or a glob pattern) of {"prompt": ..., "completion": ...} lines.')
  return paths


def read_jsonl(path: str, prompt_key: str, completion_key: str) -> list[tuple[str, str]]:
  """The (prompt, completion) pair of every non-blank line of a JSONL file; UserError
  naming the file and line of the first that is not a JSON object with both keys as
  strings."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: cannot read it as UTF-8 text ({one_line(e)}).') from None
  pairs = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{number} is not JSON ({e.msg}); each line must be one object '
                      f'such as {{"{prompt_key}": "...", "{completion_key}": "..."}}.') from None
    for key in (prompt_key, completion_key):
      if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise UserError(f'{path}:{number} has no text field {key!r}; each line must be one '
                        f'object with the strings {prompt_key!r} and {completion_key!r} '
                        '(data.prompt_feature, data.completion_feature).')
    pairs.append((record[prompt_key], record[completion_key]))
  return pairs


def held_out(prompt: str, completion: str, share: float) -> bool:
  """Whether an example belongs to the validation split held out of data.train_file:
  decided by a hash of its text, so a copy of an example lands where the example does."""
  digest = hashlib.sha256(json.dumps([prompt, completion]).encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < share


def _jsonl_split(d, split: str) -> list[tuple[str, str]]:
  """Split 'train' or 'validation' of JSONL examples: with data.eval_file, the first is
  data.train_file's and the second data.eval_file's; without, data.holdout of
  data.train_file's examples (by `held_out`) are the validation split and the rest train."""
  if split not in JSONL_SPLITS:
    raise UserError(f'split {split!r} of data.train_file={d.train_file!r}: JSONL examples '
                    f'have the splits {" and ".join(JSONL_SPLITS)} (data.eval_file, or '
                    'examples held out by data.holdout, are the validation split).')
  if split == 'validation' and d.eval_file:
    field, pattern = 'data.eval_file', d.eval_file
  else:
    field, pattern = 'data.train_file', d.train_file
  pairs = [pair for path in jsonl_paths(pattern, f'{field}={pattern!r}')
           for pair in read_jsonl(path, d.prompt_feature, d.completion_feature)]
  if not d.eval_file:
    keep = split == 'validation'
    pairs = [pair for pair in pairs if held_out(*pair, d.holdout) == keep]
  if not pairs:
    how = ('' if d.eval_file else f' ({d.holdout:g} of its examples are held out for '
           'validation by data.holdout; give data.eval_file, or more examples)')
    raise UserError(f'the {split} split of {field}={pattern!r} has no examples{how}.')
  return pairs


def _tfds_examples(d, split: str) -> list[tuple[str, str]]:
  """The (prompt, completion) features of a prepared TFDS dataset's split, in the order
  TFDS reads them; either may be a template of features (`template_fields`)."""
  builder_ = external.builder(d)
  try:
    builder_.info.splits[split]  # raises for a split (or slice) the dataset lacks
  except (KeyError, ValueError) as e:
    raise UserError(f'split {split!r} is not a split of {builder_.info.full_name}: '
                    f'{one_line(e)} Its splits: {", ".join(builder_.info.splits)}.') from None
  templates = {'prompt_feature': d.prompt_feature, 'completion_feature': d.completion_feature}
  if not any(template_fields(t) for t in templates.values()):
    external.check_text_feature(builder_, d.prompt_feature, 'data.prompt_feature')
    external.check_text_feature(builder_, d.completion_feature, 'data.completion_feature')
    keys = (d.prompt_feature, d.completion_feature)
    ds = builder_.as_dataset(split=split, shuffle_files=False,
                             decoders=tfds.decode.PartialDecoding({k: True for k in keys}))
    ds = ds.map(lambda example: tuple(example[k] for k in keys)).batch(_READ_BATCH)
    return [(p.decode('utf-8', 'replace'), c.decode('utf-8', 'replace'))
            for prompts, completions in tfds.as_numpy(ds)
            for p, c in zip(prompts, completions)]
  # A plain feature name on one side is the template of that feature alone.
  templates = {field: t if template_fields(t) else '{' + t + '}' for field, t in templates.items()}
  features = builder_.info.features
  paths = {field: template_fields(t) for field, t in templates.items()}
  for field, field_paths in paths.items():
    for path in field_paths:
      if path.split('/')[0] not in features:
        raise UserError(f'data.{field}={templates[field]!r}: {path!r} is not a feature of '
                        f'{builder_.info.full_name}; its features: {", ".join(sorted(features))}.')
  tops = {path.split('/')[0] for field_paths in paths.values() for path in field_paths}
  # Only the features named are decoded, where the features are a plain dict of them (a
  # translation pair, WMT's, is read whole).
  partial = (tfds.decode.PartialDecoding({k: True for k in tops})
             if type(features) is tfds.features.FeaturesDict else None)
  ds = builder_.as_dataset(split=split, shuffle_files=False, decoders=partial)
  pairs = []
  for example in tfds.as_numpy(ds):
    pairs.append(tuple(templates[field].format(**{
        path: _feature_text(example, features, path) for path in paths[field]})
        for field in ('prompt_feature', 'completion_feature')))
  return pairs


def template_fields(text: str) -> list[str]:
  """The features a template names, '{context}' and '{answers/text}' ('/' reaches into a
  feature of features); [] for a plain feature name (no braces)."""
  if '{' not in text:
    return []
  try:
    fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
  except ValueError as e:
    raise UserError(f'{text!r} is not a template of features: {e}; write feature names in '
                    "braces, e.g. '{context}\\nQuestion: {question}\\nAnswer:'.") from None
  if not all(fields):
    raise UserError(f'{text!r}: a pair of braces names no feature; write one in them, e.g. '
                    '{question}.')
  return fields


def _feature_text(example: dict, features, path: str) -> str:
  """The text of feature `path` of a decoded example: a string as it is, a class label as
  its name, a number in digits; of a sequence (SQuAD's answers), its first element."""
  value, feature = example, features
  for part in path.split('/'):
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    if not isinstance(value, dict) or part not in value:
      raise UserError(f'{path!r} is not a feature of the dataset: {part!r} is not among '
                      f'{", ".join(value) if isinstance(value, dict) else "its parts"}.')
    value, feature = value[part], feature[part]
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  if isinstance(value, np.ndarray) and value.ndim > 0:
    value = value[0] if len(value) else b''
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.int2str(int(value))
  return str(value.item() if isinstance(value, np.generic) else value)


# ---------------------------------------------------------------------------- tokenized


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples laid end to end: example i is tokens[starts[i]:starts[i + 1]], its
  prompt, its completion and eos; its first prompt_lengths[i] tokens are the prompt."""
  tokens: np.ndarray  # int32
  starts: np.ndarray  # int64 [N + 1]
  prompt_lengths: np.ndarray  # int64 [N]

  def __len__(self) -> int:
    return len(self.prompt_lengths)

  @property
  def spans(self) -> np.ndarray:
    """The positions of a row each example takes: its tokens less one."""
    return np.diff(self.starts) - 1


def _known_chars(texts: list[str], tokenizer) -> tuple[list[str], int]:
  """`texts` without the characters a char tokenizer has no id for, and how many went."""
  known = set(tokenizer.chars)
  kept = [''.join(c for c in text if c in known) for text in texts]
  return kept, sum(len(a) - len(b) for a, b in zip(texts, kept))


def tokenize(pairs: list[tuple[str, str]], tokenizer, *, seq_len: int, what: str,
             drop_unknown_chars: bool = False) -> Examples:
  """`pairs` tokenized (prompt and completion each on its own, as a decode reads the prompt
  alone). UserError for an empty prompt, and for an example longer than a row, naming the
  first and how many there are; `what` names the split in messages."""
  prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
  if drop_unknown_chars and tokenizer.kind == 'char':
    (prompts, dropped_p), (completions, dropped_c) = (_known_chars(prompts, tokenizer),
                                                      _known_chars(completions, tokenizer))
    if dropped_p + dropped_c:
      print(f'data.drop_unknown_chars: dropped {dropped_p + dropped_c} characters of {what} '
            'that the vocabulary lacks.', flush=True)
  prompt_ids = tokenizer.encode_batch(prompts)
  completion_ids = tokenizer.encode_batch(completions)
  prompt_lengths = np.array([len(p) for p in prompt_ids], np.int64)
  spans = prompt_lengths + np.array([len(c) for c in completion_ids], np.int64)
  if (prompt_lengths == 0).any():
    first = int(np.argmax(prompt_lengths == 0))
    raise UserError(f'example {first + 1} of {what} has an empty prompt; every completion '
                    'continues a prompt of at least one token.')
  if (spans > seq_len).any():
    first, count = int(np.argmax(spans > seq_len)), int((spans > seq_len).sum())
    raise UserError(f'example {first + 1} of {what} (prompt {prompts[first][:40]!r}) is '
                    f'{spans[first]} tokens long, more than a row of train.seq_len={seq_len} '
                    f'({count:,} of {len(pairs):,} examples are); raise train.seq_len (and '
                    'model.max_len), or shorten or drop them.')
  pieces = []
  for p, c in zip(prompt_ids, completion_ids):
    pieces += [p, c, np.array([tokenizer.eos_id], np.int32)]
  tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
  starts = np.concatenate([[0], np.cumsum(spans + 1)]).astype(np.int64)
  return Examples(tokens, starts, prompt_lengths)


# ------------------------------------------------------------------------------- rows


def pack(spans: np.ndarray, seq_len: int,
         open_rows: int = OPEN_ROWS) -> tuple[np.ndarray, np.ndarray]:
  """(members, bounds): examples of `spans` positions, taken in order, packed into rows of
  `seq_len`; row r holds examples members[bounds[r]:bounds[r + 1]]. Each example goes to
  the first of the last `open_rows` rows with room for it (a new row if none has): first
  fit over a few rows fills them nearly as well as over all, and keeps the order's
  randomness. Rows come out as they close: full, or the oldest of too many open ones."""
  members, bounds = [], [0]
  open_members, room = [], []

  def close(j):
    members.extend(open_members.pop(j))
    room.pop(j)
    bounds.append(len(members))

  for i, span in enumerate(spans.tolist()):
    j = next((j for j, left in enumerate(room) if left >= span), None)
    if j is None:
      if len(room) == open_rows:
        close(0)
      open_members.append([])
      room.append(seq_len)
      j = len(room) - 1
    open_members[j].append(i)
    room[j] -= span
    if room[j] == 0:
      close(j)
  while room:
    close(0)
  return np.asarray(members, np.int64), np.asarray(bounds, np.int64)


def epoch_plan(examples: Examples, epoch: int, *, seed: int, seq_len: int,
               packed: bool) -> tuple[np.ndarray, np.ndarray]:
  """(order, row bounds) of training epoch `epoch`: row r holds examples
  order[bounds[r]:bounds[r + 1]], drawn in an order shuffled by (seed, epoch) and packed
  (`pack`), or one example a row unless `packed`."""
  order = np.random.default_rng([seed, epoch]).permutation(len(examples))
  if not packed:
    return order, np.arange(len(examples) + 1, dtype=np.int64)
  members, bounds = pack(examples.spans[order], seq_len)
  return order[members], bounds


def rows(examples: Examples, order: np.ndarray, bounds: np.ndarray, row_ids, *,
         seq_len: int, packed: bool) -> dict[str, np.ndarray]:
  """Rows `row_ids` of a plan as [len(row_ids), seq_len] arrays: 'inputs', 'targets',
  'weights' (1 on completion and eos targets), and with `packed` 'segment_ids' and
  'positions'. Padding is id 0 at weight 0, in segment 0 at position 0."""
  shape = (len(row_ids), seq_len)
  out = {'inputs': np.zeros(shape, np.int32), 'targets': np.zeros(shape, np.int32),
         'weights': np.zeros(shape, np.float32)}
  if packed:
    out.update(segment_ids=np.zeros(shape, np.int32), positions=np.zeros(shape, np.int32))
  for row, r in enumerate(row_ids):
    offset = 0
    for segment, i in enumerate(order[bounds[r]:bounds[r + 1]], 1):
      ids = examples.tokens[examples.starts[i]:examples.starts[i + 1]]
      span = slice(offset, offset + len(ids) - 1)
      out['inputs'][row, span] = ids[:-1]
      out['targets'][row, span] = ids[1:]
      # Target t is token t + 1: the completion's first token is target prompt_length - 1.
      out['weights'][row, offset + examples.prompt_lengths[i] - 1:span.stop] = 1.0
      if packed:
        out['segment_ids'][row, span] = segment
        out['positions'][row, span] = np.arange(len(ids) - 1)
      offset = span.stop
  return out


def row_stream(examples: Examples, *, seq_len: int, seed: int, packed: bool,
               start_row: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """(order, bounds, row) of every training row from `start_row` on, epoch after epoch."""
  epoch, skip = 0, start_row
  while True:
    order, bounds = epoch_plan(examples, epoch, seed=seed, seq_len=seq_len, packed=packed)
    num_rows = len(bounds) - 1
    for r in range(min(skip, num_rows), num_rows):
      yield order, bounds, r
    skip = max(skip - num_rows, 0)
    epoch += 1


def train_dataset(examples: Examples, *, seq_len: int, global_batch: int, seed: int,
                  packed: bool, start_example: int = 0) -> tf.data.Dataset:
  """Endless batches of this process's rows (`rows`' arrays), from row `start_example` of
  the training stream on (an example of the stream is a row, as the trainer counts them)."""
  if not len(examples):
    raise UserError('the training split has no examples.')
  row_start, row_stop = pipeline.local_rows(global_batch)

  def batches():
    pending = []
    for item in row_stream(examples, seq_len=seq_len, seed=seed, packed=packed,
                           start_row=start_example):
      pending.append(item)
      if len(pending) == global_batch:
        mine = pending[row_start:row_stop]
        # The rows of a batch may come from two epochs' plans.
        parts = [rows(examples, order, bounds, [r], seq_len=seq_len, packed=packed)
                 for order, bounds, r in mine]
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pending = []

  local = row_stop - row_start
  signature = {k: tf.TensorSpec((local, seq_len), tf.float32 if k == 'weights' else tf.int32)
               for k in ('inputs', 'targets', 'weights')
               + (('segment_ids', 'positions') if packed else ())}
  return pipeline.read_ahead(
      tf.data.Dataset.from_generator(batches, output_signature=signature))


def eval_set(examples: Examples, *, seq_len: int, batch_size: int,
             packed: bool) -> pipeline.EvalSet:
  """Every example once, in order (packed as training packs them, or one a row), padded
  with weight-0 rows to whole batches; the same every time."""
  if not len(examples):
    raise UserError('the evaluation split has no examples.')
  if packed:
    order, bounds = pack(examples.spans, seq_len)
  else:
    order, bounds = np.arange(len(examples)), np.arange(len(examples) + 1)
  num_rows = -(-(len(bounds) - 1) // batch_size) * batch_size
  arrays = rows(examples, order, bounds, range(len(bounds) - 1), seq_len=seq_len,
                packed=packed)
  arrays = {k: np.concatenate([v, np.zeros((num_rows - len(v), seq_len), v.dtype)])
            for k, v in arrays.items()}
  return pipeline.EvalSet(arrays, batch_size)
