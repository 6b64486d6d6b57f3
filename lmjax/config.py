"""The config schema and its checks.

`base_config()` holds every field with its default and the comment that defines it; a file in
configs/ starts from it and sets what its experiment changes. A default is the value lmjax
used before the field existed, so that a run saved without it resumes as it ran
(`with_defaults`). `validate_config` refuses every impossible setting before anything
compiles, with a message naming the field and the fix; each kind of training checks its own
fields (`tasks.task_class(config).check_config`).
"""
import importlib.util
import inspect
import io
import json
import os
import re
import tokenize

import jax
import ml_collections

from lmjax import models, sharding, storage, tasks
from lmjax.data import completions, corpora, external, tokenizers
from lmjax.errors import UserError
from lmjax.models import transformer

# What a step with a NaN or Inf loss or gradient does (train.nonfinite): stop the run
# (nothing after the last checkpoint is kept), or drop that update and go on.
NONFINITE_MODES = ('stop', 'skip')


def base_config() -> ml_collections.ConfigDict:
  """Every field of every config at its default, locked: a config file changes values only."""
  c = ml_collections.ConfigDict()
  for section in _SECTIONS:
    c[section.__name__.removeprefix('_')] = section()
  c.lock()
  return c


def load_file(path: str):
  """The config file at `path` as a module, loaded from the file itself: configs/ is not a
  package on sys.path, so train.py's --config, the sweep and `sibling` all load by path."""
  path = os.path.abspath(path)
  spec = importlib.util.spec_from_file_location(
      '_lmjax_config_' + re.sub(r'\W', '_', path.removesuffix('.py')), path)
  if spec is None:  # a name without .py
    raise ImportError('not a Python file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str):
  """The config file `name` beside `config_file`: how one config file builds on another
  (`gpt2 = config.sibling(__file__, 'gpt2.py')`)."""
  return load_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def _model() -> ml_collections.ConfigDict:
  """Section `model`: the model: family, size, attention, LoRA, recurrent cells."""
  c = ml_collections.ConfigDict()
  c.name = 'transformer'  # transformer | lstm | gru | rnn (Elman, tanh)
  c.num_layers = 4  # Transformer blocks, or recurrent layers
  c.d_model = 128  # residual stream width (Transformer); embedding width (recurrent)
  # dropout rate: Transformer embeddings, attention and residual branches; recurrent outputs
  c.dropout = 0.1
  c.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.param_dtype = 'float32'  # storage dtype of the parameters: float32 | bfloat16
  c.num_heads = 4  # Transformer: attention heads; must divide d_model
  c.d_ff = 0  # Transformer: MLP hidden width; 0 means 4 * d_model
  c.max_len = 256  # Transformer: size of the learned position table; >= train.seq_len
  c.causal = True  # False: a bidirectional encoder trained as a masked LM (BERT's)
  # Transformer: dot_product (the backend's kernel) | cudnn (flash; NVIDIA GPU, bfloat16) | einsum
  c.attention = 'dot_product'
  # Transformer, einsum path: causal attention in blocks of this many queries; 0: whole
  c.attention_block = 0
  c.remat = 'none'  # Transformer: recompute in the backward pass: none | full | save_dots
  c.scan_layers = False  # Transformer: one nn.scan over the blocks, weights under 'layers'
  c.lora_rank = 0  # rank of LoRA adapters; above 0 only they (and a classifier's head) train
  c.lora_alpha = 8.0  # LoRA adapters are scaled by lora_alpha / lora_rank
  # projections that get LoRA adapters: query key value out (attention), dense_in dense_out (MLP)
  c.lora_targets = ('query', 'key', 'value', 'out', 'dense_in', 'dense_out')
  c.hidden_size = 512  # recurrent: carry width of every layer; 0 means d_model
  c.tie_embeddings = False  # recurrent: output layer = embedding^T (projected if need be)
  c.embed_dropout = 0.0  # recurrent: dropout on the embeddings
  c.weight_dropout = 0.0  # recurrent: DropConnect on hidden-to-hidden weights (AWD-LSTM)
  c.locked_dropout = False  # recurrent: one dropout mask per sequence for all time steps
  c.scan_unroll = 1  # recurrent: time steps per iteration of the compiled loop (speed only)
  return c


def _data() -> ml_collections.ConfigDict:
  """Section `data`: the corpus and the tokenizer."""
  c = ml_collections.ConfigDict()
  # shakespeare | milton | countdown | authorship (lmjax's), 'tfds:NAME', or 'files:FOLDER'
  c.name = 'shakespeare'
  # text: documents, every token a target | completion: prompt -> completion, the completion scored
  c.format = 'text'
  c.data_dir = ''  # TFDS data directory; '' means TFDS's default (~/tensorflow_datasets)
  c.tokenizer = 'char'  # char | sentencepiece | gpt2_bpe (GPT-2's byte-level BPE)
  c.vocab_size = 0  # sentencepiece only: vocabulary size to train
  c.spm_model_type = 'bpe'  # sentencepiece only: bpe | unigram
  c.train_split = 'train'  # split trained on (tfds: datasets in TFDS syntax, 'train[:-1000]')
  c.eval_split = 'validation'  # split read whole at every evaluation
  c.text_feature = 'text'  # tfds: the feature holding a document's text; files: the JSONL key
  # tokenizer to start from when the workdir has none: an lmjax workdir, or GPT-2's files
  c.tokenizer_dir = ''
  c.cache_dir = ''  # tfds: and files: only: where splits are tokenized to; '' WORKDIR/tokens
  c.drop_unknown_chars = False  # char tokenizer: drop characters it has no id for
  # several corpora at once, 'DATASET:WEIGHT' each: ('shakespeare:0.7', 'milton:0.3'); () none
  c.mixture = ()
  c.pack = True  # completion: several examples to a row of train.seq_len; False: one, padded
  # completion: the prompt's feature (tfds:; or a template, '{context}\nQ: {question}') or key
  c.prompt_feature = 'prompt'
  c.completion_feature = 'completion'  # completion: the completion's feature or key
  # completion: JSONL file (or glob) of prompt/completion objects to train on, not data.name
  c.train_file = ''
  # completion, JSONL: the validation file (or glob); '' holds out data.holdout of train_file
  c.eval_file = ''
  c.holdout = 0.05  # JSONL without eval_file, files: without folders: share held out by hash
  return c


def _opt() -> ml_collections.ConfigDict:
  """Section `opt`: AdamW and its schedule."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-3  # peak learning rate, reached after warmup
  c.min_lr = 1e-4  # learning rate at the end of the cosine decay
  c.warmup_steps = 8  # linear warmup from 0
  c.b1 = 0.9  # AdamW first-moment decay
  c.b2 = 0.99  # AdamW second-moment decay
  c.eps = 1e-8  # AdamW epsilon
  c.weight_decay = 0.1  # decoupled weight decay, on embeddings and kernels (not biases, norms)
  c.grad_clip = 1.0  # clip gradients to this global norm; 0 disables
  return c


def _train() -> ml_collections.ConfigDict:
  """Section `train`: the run: steps, batches, evaluation, checkpoints, samples."""
  c = ml_collections.ConfigDict()
  c.recipe = ''  # set by a config file that chooses for the machine: its choice and why
  c.num_steps = 32  # optimizer steps in the whole run
  c.batch_size = 64  # global batch, in sequences; divides by the data-parallel devices
  c.microbatches = 1  # gradient accumulation: the batch in this many slices, one by one
  c.autotune = False  # before training, time the step's settings (autotune.py); use the fastest
  # autotune: fields that keep the config's value; by default the CPU device split (autotune.py)
  c.autotune_pinned = ('mesh.cpu_devices',)
  c.autotune_steps = 3  # autotune: steps timed per candidate (at least), after one untimed
  # train steps run by one call of the compiled program (a loop over this many batches):
  # less host work per step for small models; logs, evaluations and checkpoints unchanged
  c.steps_per_dispatch = 1
  c.seq_len = 128  # tokens per training sequence (a classifier: read of each passage)
  c.stateful = False  # recurrent: truncated BPTT, a row's carry passing to its next window
  c.eval_batch_size = 256  # global batch for evaluation (stateful: streams of the split)
  c.eval_every = 100  # steps between evaluations (and at the end)
  # evaluations in training read the split's first N batches; 0: all of it (evaluate.py: all)
  c.eval_batches = 0
  c.checkpoint_every = 8  # steps between checkpoints (and at the end)
  c.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.log_every = 1  # steps between progress lines and train scalars
  c.seed = 0  # seeds init, data order and dropout
  c.nonfinite = 'stop'  # a step with a NaN or Inf loss or gradient is dropped: stop | skip
  c.profile_steps = ()  # first and last step to trace with the JAX profiler, e.g. (10, 12)
  c.freeze = ()  # regexes over parameter names ('layer_0/attention/query/kernel') not trained
  c.mask_rate = 0.15  # masked LM only: share of tokens selected for prediction
  c.sample_prompt = 'ROMEO:\n'  # prompt of the samples logged at each evaluation
  c.sample_tokens = 240  # length of that sample (past model.max_len the window slides)
  c.balance_classes = False  # classifier: weigh a passage's loss by 1 / its class's share
  # completion: validation prompts completed greedily (sample_tokens at most) at each evaluation
  c.eval_completions = 8
  # completion: scores of those completions logged as eval/NAME: exact_match, token_f1, bleu...
  c.completion_metrics = ()
  return c


def _init_from() -> ml_collections.ConfigDict:
  """Section `init_from`: fine-tuning: where the parameters start."""
  c = ml_collections.ConfigDict()
  c.workdir = ''  # fine-tuning: the run whose parameters and tokenizer start this one
  c.step = 0  # its checkpoint to start from; 0 means its latest
  return c


def _mesh() -> ml_collections.ConfigDict:
  """Section `mesh`: devices and how arrays split over them."""
  c = ml_collections.ConfigDict()
  c.shape = (-1, 1, 1)  # devices along ('data', 'fsdp', 'tensor'); one -1 takes the rest
  c.dcn_shape = (1, 1, 1)  # slices or hosts along the same axes (the slow links between them)
  c.rules = sharding.RULES  # logical axis -> mesh axes (lmjax/sharding.py)
  c.cpu_devices = 0  # no accelerator: train on this many CPU devices; 0: all JAX has (one)
  return c


# What train.autotune chooses: settings of the step that leave the model and its updates
# as they are (lmjax/autotune.py).
AUTOTUNE_FIELDS = ('mesh.cpu_devices', 'train.microbatches', 'model.attention',
                   'model.attention_block', 'model.remat')

_SECTIONS = (_model, _data, _opt, _train, _init_from, _mesh)

def read_saved(workdir: str) -> ml_collections.ConfigDict | None:
  """The config saved in WORKDIR/config.json, a field it lacks at its default; None if the
  workdir has none."""
  path = os.path.join(workdir, 'config.json')
  if not storage.exists(path):
    return None
  return with_defaults(read_saved_dict(path))[0]


def read_saved_dict(path: str) -> dict:
  """A workdir's config.json as the dict training wrote; UserError if it is damaged (not
  UTF-8 JSON, or not a JSON object of config sections)."""
  try:
    saved = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problem = f'it is not valid JSON ({e})'
  else:
    if isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values()):
      return saved
    problem = 'it is not a JSON object of config sections'
  raise UserError(f'{path} is damaged: {problem}. Restore it from a copy of the workdir, or '
                  'delete it and rerun experiments/train.py on this --workdir with the '
                  '--config it was trained with, which writes it again.')


def with_defaults(saved: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A saved config (a config.json's dict) laid over `base_config()`, locked, and the dotted
  names of the fields that differ in presence: the schema's fields the saved one lacks (they
  take their default, the value an lmjax without them used) and the saved one's fields the
  schema lacks (kept as saved, for the version that wrote them)."""
  merged, differ = _lay_over(base_config().to_dict(), saved)
  config = ml_collections.ConfigDict(merged)
  config.lock()
  return config, differ


def _lay_over(default: dict, saved: dict, prefix: str = '') -> tuple[dict, list[str]]:
  merged, differ = {}, []
  for key in {**default, **saved}:
    name = prefix + key
    if key in default and key in saved:
      if isinstance(default[key], dict) and isinstance(saved[key], dict):
        merged[key], more = _lay_over(default[key], saved[key], name + '.')
        differ += more
      else:  # JSON has lists where the config has tuples
        merged[key] = _tuples(saved[key]) if isinstance(default[key], tuple) else saved[key]
    else:
      merged[key] = default[key] if key in default else saved[key]
      differ += _leaf_names(merged[key], name)
  return merged, differ


def _tuples(value):
  return tuple(map(_tuples, value)) if isinstance(value, list) else value


def _leaf_names(value, name: str) -> list[str]:
  if not isinstance(value, dict):
    return [name]
  return [leaf for k, v in value.items() for leaf in _leaf_names(v, f'{name}.{k}')]


def field_comments() -> dict[str, str]:
  """'section.field' -> the comment defining it in the source of its section's function
  (`_model`, `_data`, ...): on the field's line, or the comment line just above it."""
  out = {}
  for section in _SECTIONS:
    lines, _ = inspect.getsourcelines(section)
    comments = {}  # line index -> comment text
    for token in tokenize.generate_tokens(io.StringIO(''.join(lines)).readline):
      if token.type == tokenize.COMMENT:
        comments[token.start[0] - 1] = token.string.lstrip('#').strip()
    for i, line in enumerate(lines):
      field = line.strip().partition(' = ')[0]
      if field.startswith('c.') and field.count('.') == 1:
        above = i - 1 if lines[i - 1].strip().startswith('#') else None
        name = f"{section.__name__.removeprefix('_')}.{field[2:]}"
        out[name] = comments.get(i) or comments.get(above, '')
  return out


_REFERENCE_HEADER = """# Config fields

Every field of the config schema, `lmjax.config.base_config()`, with its default and what it
is. A file in `configs/` starts from these and sets what its experiment changes; a run saved
without a field resumes with its default. This page is generated from `lmjax/config.py`:

```
python -m lmjax.config > docs/reference/config.md
```
"""


def reference_markdown() -> str:
  """docs/reference/config.md: every field of the schema, its default and its comment, in
  `base_config`'s order."""
  config, out, section = base_config(), [_REFERENCE_HEADER.rstrip()], None
  for name, comment in field_comments().items():
    if name.split('.')[0] != section:
      section = name.split('.')[0]
      out += ['', f'## {section}', '', '| field | default | meaning |', '| --- | --- | --- |']
    default = repr(config[section][name.split('.')[1]]).replace('|', '\\|')
    comment = comment.replace('|', '\\|')
    out.append(f'| `{name}` | `{default}` | {comment} |')
  return '\n'.join(out) + '\n'


# ------------------------------------------------------------------------------ checks


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Rejects impossible configs with a message naming the field, before any compiling."""
  _check_model(config.model, config.train)
  _check_lora(config.model)
  if config.init_from.step < 0:
    raise UserError(f'init_from.step={config.init_from.step}; use 0 for the latest '
                    'checkpoint or a step the run saved.')
  _check_batches(config.train, mesh)
  _check_schedule(config.train, config.opt)
  _check_autotune(config.train)
  _check_data(config.data)
  tasks.task_class(config).check_config(config)


def _check_model(m, t) -> None:
  if m.name not in models.MODEL_NAMES:
    raise UserError(f'model.name={m.name!r}; known models: {", ".join(models.MODEL_NAMES)}.')
  for field in ('num_layers', 'd_model'):
    if m[field] < 1:
      raise UserError(f'model.{field}={m[field]}; it must be at least 1.')
  for field in ('dtype', 'param_dtype'):
    if m[field] not in models.DTYPES:
      raise UserError(f'model.{field}={m[field]!r}; use one of {", ".join(models.DTYPES)}.')
  if not 0.0 <= m.dropout < 1.0:
    raise UserError(f'model.dropout={m.dropout} must be in [0, 1).')
  if m.name == 'transformer':
    _check_transformer(m, t)
    return
  if m.hidden_size < 0:
    raise UserError(f'model.hidden_size={m.hidden_size}; use 0 (same as model.d_model) '
                    'or a positive width.')
  for field in ('embed_dropout', 'weight_dropout'):
    if not 0.0 <= m[field] < 1.0:
      raise UserError(f'model.{field}={m[field]} must be in [0, 1).')
  if m.scan_unroll < 1:
    raise UserError(f'model.scan_unroll={m.scan_unroll}; it must be at least 1.')


def _check_transformer(m, t) -> None:
  for field in ('num_heads', 'max_len'):
    if m[field] < 1:
      raise UserError(f'model.{field}={m[field]}; it must be at least 1.')
  if m.d_ff < 0:
    raise UserError(f'model.d_ff={m.d_ff}; use 0 (4 * model.d_model) or a positive width.')
  if m.d_model % m.num_heads:
    raise UserError(f'model.d_model={m.d_model} does not divide by model.num_heads='
                    f'{m.num_heads}; pick a width that is a multiple of the head count.')
  if t.seq_len > m.max_len:
    raise UserError(f'train.seq_len={t.seq_len} is longer than the position table '
                    f'(model.max_len={m.max_len}); raise model.max_len or lower '
                    'train.seq_len.')
  if m.attention not in transformer.ATTENTION_KINDS:
    raise UserError(f'model.attention={m.attention!r}; use one of '
                    f'{", ".join(transformer.ATTENTION_KINDS)}.')
  if m.attention == 'cudnn' and (jax.default_backend() != 'gpu' or m.dtype != 'bfloat16'
                                 or (m.d_model // m.num_heads) % 8):
    raise UserError(
        f"model.attention='cudnn' is cuDNN's flash attention: it needs an NVIDIA GPU "
        f'(this is {jax.default_backend()}), model.dtype=bfloat16 (it is {m.dtype}) and a '
        f'head width that is a multiple of 8 (it is {m.d_model // m.num_heads}); use '
        "model.attention='dot_product' otherwise.")
  block = m.attention_block
  if isinstance(block, bool) or not isinstance(block, int) or block < 0:
    raise UserError(f'model.attention_block={block!r}; use 0 (attention whole) or a '
                    'positive number of queries per block, e.g. 32.')
  if m.remat not in transformer.REMAT_POLICIES:
    raise UserError(f'model.remat={m.remat!r}; use one of '
                    f'{", ".join(transformer.REMAT_POLICIES)}.')


def _check_lora(m) -> None:
  if m.lora_rank < 0:
    raise UserError(f'model.lora_rank={m.lora_rank}; use 0 (no adapters) or a positive rank.')
  if not m.lora_rank:
    return
  if m.name != 'transformer':
    raise UserError(f'model.lora_rank={m.lora_rank}: LoRA adapters attach to the '
                    f"Transformer's projections, and model.name={m.name!r} has none; set "
                    'model.lora_rank=0 (freeze parts with train.freeze instead).')
  if m.lora_alpha <= 0:
    raise UserError(f'model.lora_alpha={m.lora_alpha}; it must be positive (the '
                    'adapters are scaled by lora_alpha / lora_rank).')
  unknown = [name for name in m.lora_targets if name not in transformer.LORA_TARGETS]
  if unknown or not m.lora_targets:
    raise UserError(f'model.lora_targets={tuple(m.lora_targets)}; name one or more of '
                    f'{", ".join(transformer.LORA_TARGETS)}.')


def _check_batches(t, mesh) -> None:
  """The batches split evenly over the mesh's data-parallel devices and the processes."""
  dp = sharding.data_parallel_size(mesh)
  for field in ('batch_size', 'eval_batch_size'):
    value = t[field]
    if value <= 0 or value % dp or value % jax.process_count():
      raise UserError(
          f'train.{field}={value} does not divide by the {dp} data-parallel devices '
          f"(mesh axes {sharding.BATCH_AXES} of mesh {dict(mesh.shape)}) and "
          f'{jax.process_count()} process(es); use a multiple of {dp}.')
  if t.microbatches < 1 or t.batch_size % (t.microbatches * dp):
    raise UserError(f'train.microbatches={t.microbatches}: the batch of {t.batch_size} must '
                    f'split into that many slices of whole rows on each of the {dp} '
                    f'data-parallel devices; use a divisor of {t.batch_size // dp} '
                    '(1: no accumulation).')


def _check_schedule(t, o) -> None:
  """The run's length, and what happens at which step."""
  if t.nonfinite not in NONFINITE_MODES:
    raise UserError(f'train.nonfinite={t.nonfinite!r}; use one of {", ".join(NONFINITE_MODES)}.')
  if t.num_steps < 1:
    raise UserError(f'train.num_steps={t.num_steps}; it must be at least 1.')
  if t.seq_len < 1:
    raise UserError(f'train.seq_len={t.seq_len}; it must be at least 1.')
  if not 0 <= o.warmup_steps < t.num_steps:
    raise UserError(f'opt.warmup_steps={o.warmup_steps} must be below train.num_steps='
                    f'{t.num_steps}.')
  for field in ('eval_every', 'checkpoint_every', 'log_every', 'steps_per_dispatch'):
    if t[field] < 1:
      raise UserError(f'train.{field}={t[field]}; it must be at least 1.')
  if t.eval_batches < 0:
    raise UserError(f'train.eval_batches={t.eval_batches}; give 0 to evaluate on the whole '
                    'split, or the number of batches to read.')
  if t.keep_checkpoints < 1:
    raise UserError(f'train.keep_checkpoints={t.keep_checkpoints}; keep at least 1, the '
                    'checkpoint a stopped run resumes from.')
  profile = tuple(t.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1] <= t.num_steps):
    raise UserError(f'train.profile_steps={profile}; give the first and last step to trace, '
                    f'1 <= first <= last <= train.num_steps={t.num_steps}, e.g. '
                    "--config.train.profile_steps='(10,12)', or () for no trace.")


def _check_autotune(t) -> None:
  unknown = [f for f in t.autotune_pinned if f not in AUTOTUNE_FIELDS]
  if unknown:
    raise UserError(f'train.autotune_pinned names {", ".join(map(repr, unknown))}; autotune '
                    f'chooses only {", ".join(AUTOTUNE_FIELDS)}.')
  if t.autotune_steps < 1:
    raise UserError(f'train.autotune_steps={t.autotune_steps}; time at least 1 step.')


def _check_data(d) -> None:
  if d.format not in completions.FORMATS:
    raise UserError(f'data.format={d.format!r}; use one of {", ".join(completions.FORMATS)}.')
  if d.tokenizer not in tokenizers.KINDS:
    raise UserError(f'data.tokenizer={d.tokenizer!r}; use one of {tokenizers.KINDS}.')
  if d.tokenizer == 'sentencepiece' and d.vocab_size <= 0:
    raise UserError('data.tokenizer=sentencepiece needs data.vocab_size > 0 '
                    '(e.g. --config.data.vocab_size=2000).')
  if d.tokenizer == 'sentencepiece' and d.spm_model_type not in tokenizers.SPM_MODEL_TYPES:
    raise UserError(f'data.spm_model_type={d.spm_model_type!r}; use one of '
                    f'{", ".join(tokenizers.SPM_MODEL_TYPES)}.')
  if d.train_file or d.eval_file:
    _check_jsonl(d)
  else:
    _check_name_and_splits(d)


def _check_name_and_splits(d) -> None:
  if external.is_external(d.name):  # its splits and feature are checked when it is opened
    external.check_name(d.name)
    if d.name.startswith('files:') and not 0 < d.holdout < 1:
      raise UserError(f'data.holdout={d.holdout}; the share of documents held out for '
                      'validation must be between 0 and 1.')
  elif d.name not in corpora.DATASETS:
    raise UserError(f'data.name={d.name!r}; known datasets: {", ".join(corpora.DATASETS)}, '
                    "any prepared TFDS text dataset as 'tfds:NAME' (e.g. 'tfds:lm1b'), or a folder "
                    "of your own .txt and .jsonl files as 'files:PATH'.")
  else:
    for field in ('train_split', 'eval_split'):
      if d[field] not in corpora.SPLITS:
        raise UserError(f'data.{field}={d[field]!r}; {d.name} has the splits '
                        f'{", ".join(corpora.SPLITS)}.')


def _check_jsonl(d) -> None:
  """JSONL files of prompts and completions: the format, the splits and the hold-out."""
  if not d.train_file:
    raise UserError(f'data.eval_file={d.eval_file!r} holds the validation examples of the '
                    "JSONL files data.train_file names, and data.train_file is ''; name the "
                    "training file, or set data.eval_file=''.")
  if d.format != 'completion':
    raise UserError(f'data.train_file={d.train_file!r} holds prompt -> completion examples; '
                    "set data.format='completion'.")
  for field in ('train_split', 'eval_split'):
    if d[field] not in completions.JSONL_SPLITS:
      raise UserError(f'data.{field}={d[field]!r}; JSONL examples have the splits '
                      f'{" and ".join(completions.JSONL_SPLITS)}.')
  if not d.eval_file and not 0 < d.holdout < 1:
    raise UserError(f'data.holdout={d.holdout}; the share of examples held out for '
                    'validation must be between 0 and 1, or give data.eval_file.')


if __name__ == '__main__':
  print(reference_markdown(), end='')
