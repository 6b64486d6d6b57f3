"""GPT-2 checkpoints in Hugging Face's layout, into and out of lmjax workdirs.

`import_gpt2(hf_dir, workdir)` reads a directory as the hub serves GPT-2 (config.json,
model.safetensors, vocab.json + merges.txt or tokenizer.json) and writes a workdir the
rest of lmjax reads: config.json, the tokenizer, and a checkpoint at step 0.
`export_gpt2(workdir, hf_dir)` writes a workdir's checkpoint back in that layout, for
`transformers.GPT2LMHeadModel.from_pretrained(hf_dir)`.

Weights travel as safetensors only. A pickled PyTorch file (pytorch_model.bin) can run
arbitrary code when it is loaded, so it is refused rather than read.

GPT-2 stores its linear layers as Conv1D, whose weight is laid out for x @ W (in, out),
as lmjax's kernels are; the attention's q, k and v are one fused (E, 3E) matrix,
[q | k | v], with head h in columns h*D:(h+1)*D of each third. lmjax keeps heads as
their own axis, so converting is slicing and reshaping only.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from lmjax import checkpoint as ckpt_lib
from lmjax import models, optim, state as state_lib, storage, workdir as workdir_lib
from lmjax.data import tokenizers
from lmjax.errors import UserError
from lmjax.models import transformer

HF_CONFIG_FILE = 'config.json'
HF_WEIGHTS_FILE = 'model.safetensors'
HF_WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'
HF_TOKENIZER_FILE = 'tokenizer.json'  # transformers' fast tokenizer (not lmjax's file)
HF_TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
PICKLED_WEIGHTS_FILE = 'pytorch_model.bin'

# Both are GELU's tanh approximation, the one lmjax's MLP computes.
SUPPORTED_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')
# Hugging Face GPT-2 config fields lmjax's Transformer has no counterpart for, with the
# value under which they change nothing.
_HF_FIXED_FIELDS = {
    'scale_attn_weights': True,  # scores divided by sqrt(head_dim)
    'scale_attn_by_inverse_layer_idx': False,  # scores also divided by layer index + 1
    'add_cross_attention': False,  # encoder-decoder attention in every block
    'tie_word_embeddings': True,  # the output projection is the token embedding
}
# Buffers GPT-2 checkpoints may carry: the causal mask and the value masked scores get.
_HF_BUFFERS = ('.attn.bias', '.attn.masked_bias')
# lmjax model config fields that export_gpt2 knows how to write in GPT-2's terms.
# LoRA fields are fine: workdir_lib.load_trained merges the adapters and sets lora_rank to 0.
# attention, attention_block, remat and scan_layers change how the same function is
# computed (scan_layers stacks the layers' parameters, which export unstacks). The last six
# are the recurrent models' and mean nothing to the Transformer.
_EXPORTABLE_MODEL_FIELDS = ('name', 'num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len',
                            'dropout', 'dtype', 'param_dtype', 'lora_rank', 'lora_alpha',
                            'lora_targets', 'causal', 'attention', 'attention_block', 'remat',
                            'scan_layers', 'hidden_size', 'tie_embeddings', 'embed_dropout',
                            'weight_dropout', 'locked_dropout', 'scan_unroll')


# ------------------------------------------------------------------------------ reading


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e}); the directory is damaged.') from None


def read_hf_config(hf_dir: str) -> dict:
  """The GPT-2 config.json of `hf_dir`, checked for what lmjax's Transformer can represent."""
  path = os.path.join(hf_dir, HF_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: {hf_dir} is not a Hugging Face model '
                            'directory (it needs config.json and model.safetensors).')
  config = _read_json(path)
  model_type = config.get('model_type')
  if model_type != 'gpt2':
    raise UserError(f'{path}: model_type={model_type!r}; only GPT-2 checkpoints '
                    "(model_type 'gpt2') can be imported.")
  problems = []
  activation = config.get('activation_function', 'gelu_new')
  if activation not in SUPPORTED_ACTIVATIONS:
    problems.append(f'activation_function={activation!r} (lmjax computes tanh-approximated '
                    f'GELU: one of {SUPPORTED_ACTIVATIONS})')
  epsilon = config.get('layer_norm_epsilon', 1e-5)
  if epsilon != transformer.LAYER_NORM_EPSILON:
    problems.append(f'layer_norm_epsilon={epsilon} (lmjax\'s LayerNorm uses '
                    f'{transformer.LAYER_NORM_EPSILON})')
  for field, value in _HF_FIXED_FIELDS.items():
    if config.get(field, value) != value:
      problems.append(f'{field}={config[field]} (lmjax supports only {value})')
  # reorder_and_upcast_attn is accepted: it changes the order of operations (scale
  # before the matmul, in float32), not the function; lmjax's scores are float32 anyway.
  n_embd, n_head = config.get('n_embd'), config.get('n_head')
  if not (isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0
          and n_embd % n_head == 0):
    problems.append(f'n_embd={n_embd} and n_head={n_head} (the width must divide by the '
                    'head count)')
  for field in ('n_layer', 'n_positions', 'vocab_size'):
    if not isinstance(config.get(field), int) or config[field] < 1:
      problems.append(f'{field}={config.get(field)!r} (must be a positive integer)')
  n_inner = config.get('n_inner')
  if n_inner is not None and (not isinstance(n_inner, int) or n_inner < 1):
    problems.append(f'n_inner={n_inner!r} (must be null or a positive integer)')
  if problems:
    raise UserError(f'{path} describes a GPT-2 that lmjax\'s Transformer cannot represent: '
                    + '; '.join(problems) + '.')
  return config


def read_hf_tokenizer(hf_dir: str) -> tokenizers.Gpt2BpeTokenizer:
  """`hf_dir`'s byte-level BPE: vocab.json + merges.txt, or else transformers' tokenizer.json."""
  tokenizer_config_path = os.path.join(hf_dir, HF_TOKENIZER_CONFIG_FILE)
  if os.path.exists(tokenizer_config_path):
    if _read_json(tokenizer_config_path).get('add_prefix_space'):
      raise UserError(f'{tokenizer_config_path} sets add_prefix_space, which GPT-2 does not '
                      'use and lmjax\'s GPT-2 tokenizer does not support.')
  vocab_path = os.path.join(hf_dir, tokenizers.GPT2_VOCAB_FILE)
  merges_path = os.path.join(hf_dir, tokenizers.GPT2_MERGES_FILE)
  if os.path.exists(vocab_path) and os.path.exists(merges_path):
    return tokenizers.Gpt2BpeTokenizer.from_files(vocab_path, merges_path)
  path = os.path.join(hf_dir, HF_TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{hf_dir} has no tokenizer: it needs {tokenizers.GPT2_VOCAB_FILE} and '
        f'{tokenizers.GPT2_MERGES_FILE}, or {HF_TOKENIZER_FILE}. Copy them from the model\'s '
        'hub page into the directory.')
  return _tokenizer_from_hf_json(_read_json(path), path)


def _tokenizer_from_hf_json(spec: dict, path: str) -> tokenizers.Gpt2BpeTokenizer:
  model = spec.get('model') or {}
  pre_tokenizer = spec.get('pre_tokenizer') or {}
  problems = []
  if model.get('type') != 'BPE':
    problems.append(f'model type {model.get("type")!r} (not BPE)')
  if (pre_tokenizer.get('type') != 'ByteLevel' or pre_tokenizer.get('add_prefix_space')
      or not pre_tokenizer.get('use_regex', True)):
    problems.append(f'pre_tokenizer {pre_tokenizer} (GPT-2 has a ByteLevel one with its '
                    'pattern and no prefix space)')
  if spec.get('normalizer'):
    problems.append(f'normalizer {spec["normalizer"].get("type")!r} (GPT-2 has none)')
  for field in ('continuing_subword_prefix', 'end_of_word_suffix'):
    if model.get(field):
      problems.append(f'{field}={model[field]!r}')
  for field in ('ignore_merges', 'byte_fallback', 'dropout'):
    if model.get(field):
      problems.append(f'{field}={model[field]!r}')
  if problems:
    raise UserError(f'{path} is not a GPT-2 byte-level BPE tokenizer: '
                    + '; '.join(problems) + '.')
  vocab = dict(model.get('vocab') or {})
  # Special tokens may be listed only among the added tokens.
  for added in spec.get('added_tokens') or []:
    vocab.setdefault(added['content'], added['id'])
  # Newer files write each merge as a pair, older ones as one 'a b' string.
  merges = [tuple(m) if isinstance(m, list) else tokenizers.read_gpt2_merges([m], path)[0]
            for m in model.get('merges') or []]
  return tokenizers.Gpt2BpeTokenizer(vocab, merges)


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of `hf_dir`'s model.safetensors (or its shards) as float32 NumPy arrays."""
  single = os.path.join(hf_dir, HF_WEIGHTS_FILE)
  index = os.path.join(hf_dir, HF_WEIGHTS_INDEX_FILE)
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    files = sorted({os.path.join(hf_dir, name)
                    for name in _read_json(index).get('weight_map', {}).values()})
  elif os.path.exists(os.path.join(hf_dir, PICKLED_WEIGHTS_FILE)):
    raise UserError(
        f'{hf_dir} has only {PICKLED_WEIGHTS_FILE}, a pickle, and loading a pickle can run '
        'arbitrary code; lmjax reads safetensors only. Convert it once, somewhere you trust '
        'the file: python -c "import transformers as t; t.GPT2LMHeadModel.from_pretrained('
        f"'{hf_dir}').save_pretrained('{hf_dir}', safe_serialization=True)\"")
  else:
    raise FileNotFoundError(f'{hf_dir} has no {HF_WEIGHTS_FILE}; download it with the model '
                            '(lmjax reads GPT-2 weights from safetensors only).')
  weights = {}
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f'{index} names the shard {path}, which is missing.')
    # NumPy has no bfloat16, so such a file cannot be read here: say so before trying.
    with safetensors.safe_open(path, framework='np') as f:
      dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    unreadable = dtypes - {'F32', 'F16', 'F64'}
    if unreadable:
      raise UserError(f'{path} holds tensors of type {sorted(unreadable)}; lmjax imports '
                      'float32 or float16 weights. Save the model in float32 first '
                      '(model.float().save_pretrained(...)).')
    for name, array in safetensors.numpy.load_file(path).items():
      weights[name] = array.astype(np.float32)
  return weights


# ------------------------------------------------------------------------------ mapping


def _gpt2_names(num_layers: int) -> list[str]:
  """The tensors of a GPT2LMHeadModel, named as its save_pretrained writes them."""
  names = ['transformer.wte.weight', 'transformer.wpe.weight']
  for i in range(num_layers):
    for part in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj'):
      names += [f'transformer.h.{i}.{part}.weight', f'transformer.h.{i}.{part}.bias']
  return names + ['transformer.ln_f.weight', 'transformer.ln_f.bias']


def _canonical_weights(weights: dict[str, np.ndarray], num_layers: int,
                       source: str) -> dict[str, np.ndarray]:
  """`weights` under save_pretrained's names, with buffers and a tied lm_head dropped.

  Checkpoints of the bare GPT2Model (as OpenAI's gpt2 on the hub) lack the
  'transformer.' prefix; those of GPT2LMHeadModel have it.
  """
  named = {}
  for name, array in weights.items():
    if name.endswith(_HF_BUFFERS):
      continue
    named[name if name.startswith(('transformer.', 'lm_head.')) else 'transformer.' + name] = array
  lm_head = named.pop('lm_head.weight', None)
  if lm_head is not None and not np.array_equal(lm_head, named.get('transformer.wte.weight')):
    raise UserError(f'{source}: lm_head.weight differs from the token embedding (wte); '
                    'lmjax ties the two, so untied GPT-2 variants cannot be imported.')
  expected = _gpt2_names(num_layers)
  missing = [n for n in expected if n not in named]
  unexpected = sorted(set(named) - set(expected))
  if missing or unexpected:
    raise UserError(
        f'{source} does not hold the tensors of a {num_layers}-layer GPT-2 (as config.json '
        f'says): missing {missing[:6]}{" ..." if len(missing) > 6 else ""}, unexpected '
        f'{unexpected[:6]}{" ..." if len(unexpected) > 6 else ""}.')
  return named


def _hf_to_params(w: dict[str, np.ndarray], num_layers: int, num_heads: int) -> dict:
  """lmjax Transformer params from GPT-2 tensors (save_pretrained names)."""
  d_model = w['transformer.wte.weight'].shape[1]
  head_dim = d_model // num_heads

  def norm(prefix):
    return {'scale': w[f'{prefix}.weight'], 'bias': w[f'{prefix}.bias']}

  params = {'token_embed': {'embedding': w['transformer.wte.weight']},
            'position_embed': w['transformer.wpe.weight'],
            'final_norm': norm('transformer.ln_f')}
  for i in range(num_layers):
    h = f'transformer.h.{i}'
    qkv_Ex3E, qkv_bias_3E = w[f'{h}.attn.c_attn.weight'], w[f'{h}.attn.c_attn.bias']
    attention = {}
    for j, name in enumerate(('query', 'key', 'value')):
      columns = slice(j * d_model, (j + 1) * d_model)
      attention[name] = {
          'kernel': qkv_Ex3E[:, columns].reshape(d_model, num_heads, head_dim),
          'bias': qkv_bias_3E[columns].reshape(num_heads, head_dim)}
    attention['out'] = {
        'kernel': w[f'{h}.attn.c_proj.weight'].reshape(num_heads, head_dim, d_model),
        'bias': w[f'{h}.attn.c_proj.bias']}
    params[f'layer_{i}'] = {
        'attention_norm': norm(f'{h}.ln_1'),
        'attention': attention,
        'mlp_norm': norm(f'{h}.ln_2'),
        'mlp': {'dense_in': {'kernel': w[f'{h}.mlp.c_fc.weight'],
                             'bias': w[f'{h}.mlp.c_fc.bias']},
                'dense_out': {'kernel': w[f'{h}.mlp.c_proj.weight'],
                              'bias': w[f'{h}.mlp.c_proj.bias']}}}
  return params


def _params_to_hf(params: dict, num_layers: int) -> dict[str, np.ndarray]:
  """GPT-2 tensors (save_pretrained names, Conv1D layout, fused c_attn) from lmjax params."""

  def array(x):
    return np.ascontiguousarray(np.asarray(x, np.float32))

  def norm(prefix, p):
    return {f'{prefix}.weight': array(p['scale']), f'{prefix}.bias': array(p['bias'])}

  d_model = params['token_embed']['embedding'].shape[1]
  w = {'transformer.wte.weight': array(params['token_embed']['embedding']),
       'transformer.wpe.weight': array(params['position_embed']),
       **norm('transformer.ln_f', params['final_norm'])}
  for i in range(num_layers):
    h, layer = f'transformer.h.{i}', params[f'layer_{i}']
    attention = layer['attention']
    qkv = [attention[name] for name in ('query', 'key', 'value')]
    w[f'{h}.attn.c_attn.weight'] = array(np.concatenate(
        [np.reshape(p['kernel'], (d_model, d_model)) for p in qkv], axis=1))
    w[f'{h}.attn.c_attn.bias'] = array(np.concatenate([np.reshape(p['bias'], -1) for p in qkv]))
    w[f'{h}.attn.c_proj.weight'] = array(np.reshape(attention['out']['kernel'],
                                                    (d_model, d_model)))
    w[f'{h}.attn.c_proj.bias'] = array(attention['out']['bias'])
    w.update(norm(f'{h}.ln_1', layer['attention_norm']))
    w.update(norm(f'{h}.ln_2', layer['mlp_norm']))
    mlp = layer['mlp']
    w[f'{h}.mlp.c_fc.weight'] = array(mlp['dense_in']['kernel'])
    w[f'{h}.mlp.c_fc.bias'] = array(mlp['dense_in']['bias'])
    w[f'{h}.mlp.c_proj.weight'] = array(mlp['dense_out']['kernel'])
    w[f'{h}.mlp.c_proj.bias'] = array(mlp['dense_out']['bias'])
  return w


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(params, abstract, source: str) -> None:
  """Every array of `params` has the shape the model built from the config expects."""
  expected, found = _shapes_by_path(abstract), _shapes_by_path(params)
  wrong = [f'{name} is {found.get(name)}, not {shape}' for name, shape in expected.items()
           if found.get(name) != shape]
  if wrong:
    raise UserError(f'{source}: tensor shapes do not match its config.json: '
                    + '; '.join(wrong[:6]) + '.')


# ------------------------------------------------------------------------------ configs


def _load_gpt2_config_file() -> ml_collections.ConfigDict:
  # configs/ sits beside the lmjax package in the repository (an editable install).
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'configs', 'gpt2.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; import_gpt2 needs configs/gpt2.py of the '
                            'lmjax repository, or a base_config argument.')
  spec = importlib.util.spec_from_file_location('lmjax_configs_gpt2', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def lmjax_config_from_hf(hf_config: dict,
                         base_config: ml_collections.ConfigDict | None = None
                         ) -> ml_collections.ConfigDict:
  """configs/gpt2.py (or `base_config`) with the model dimensions of a GPT-2 config.json."""
  config = ml_collections.ConfigDict(
      (base_config or _load_gpt2_config_file()).to_dict())  # an unlocked copy
  n_embd = hf_config['n_embd']
  n_inner = hf_config.get('n_inner')
  config.model.update(
      name='transformer', num_layers=hf_config['n_layer'], num_heads=hf_config['n_head'],
      d_model=n_embd, d_ff=0 if n_inner in (None, 4 * n_embd) else n_inner,
      max_len=hf_config['n_positions'],
      # The checkpoint's own dropout rather than 0: decoding never applies it, and
      # fine-tuning in the workdir then regularises as the model was trained. lmjax has
      # one rate where GPT-2 has three (all 0.1 in OpenAI's models); the residual one
      # acts on most activations, so it is the one kept.
      dropout=float(hf_config.get('resid_pdrop', 0.1)))
  config.data.tokenizer = 'gpt2_bpe'
  config.train.seq_len = min(config.train.seq_len, config.model.max_len)
  config.lock()
  return config


# ------------------------------------------------------------------------------ import


def _refuse_buckets(hf_dir: str, workdir: str) -> None:
  """Both directories must be local: the Hugging Face files are read and written with the
  OS's calls."""
  for flag, path in (('--hf_dir', hf_dir), ('--workdir', workdir)):
    if storage.is_remote(path):
      raise UserError(f'{flag}={path}: importing and exporting Hugging Face models works on '
                      'local directories; use one, and copy it to or from the bucket '
                      '(gcloud storage cp -r).')


def _has_checkpoints(workdir: str) -> bool:
  directory = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(directory) and bool(os.listdir(directory))


def import_gpt2(hf_dir: str, workdir: str,
                base_config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """Writes a Hugging Face GPT-2 directory into `workdir` as lmjax's step-0 checkpoint.

  `workdir` then holds config.json (configs/gpt2.py, or `base_config`, with the
  checkpoint's dimensions), the GPT-2 tokenizer and checkpoints/0, which
  `workdir_lib.load_trained(workdir)` restores. Returns the config. Refuses a workdir that
  already has checkpoints.
  """
  _refuse_buckets(hf_dir, workdir)
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'{hf_dir} is not a directory; give the Hugging Face model '
                            'directory (with config.json and model.safetensors).')
  if os.path.realpath(hf_dir) == os.path.realpath(workdir):
    raise UserError(f'{workdir} is the Hugging Face directory itself; both have a '
                    'config.json and a tokenizer.json, so use a separate workdir.')
  if _has_checkpoints(workdir):
    raise UserError(f'{workdir} already has checkpoints ({ckpt_lib.checkpoint_dir(workdir)}); '
                    'importing would mix two models. Use a new workdir, or delete that one.')
  workdir_lib.prepare(workdir)  # writable, before a large checkpoint is read

  hf_config = read_hf_config(hf_dir)
  tokenizer = read_hf_tokenizer(hf_dir)
  if tokenizer.vocab_size != hf_config['vocab_size']:
    raise UserError(
        f'{hf_dir}: config.json has vocab_size={hf_config["vocab_size"]}, but the tokenizer '
        f'has {tokenizer.vocab_size} pieces; lmjax sizes the embedding by the tokenizer, so '
        'the two must agree (a padded embedding cannot be imported).')
  config = lmjax_config_from_hf(hf_config, base_config)
  source = os.path.join(hf_dir, HF_WEIGHTS_FILE)
  if not os.path.exists(source):
    source = os.path.join(hf_dir, HF_WEIGHTS_INDEX_FILE)
  weights = _canonical_weights(read_hf_weights(hf_dir), hf_config['n_layer'], source)
  params = _hf_to_params(weights, hf_config['n_layer'], hf_config['n_head'])
  if config.model.scan_layers:
    params = transformer.stack_layers(params)

  model = models.build_model(config.model, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  abstract = jax.eval_shape(
      lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))['params']),
      jax.random.key(0))
  _check_shapes(params, abstract, source)
  param_dtype = jnp.dtype(config.model.param_dtype)
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
  # A fresh optimizer state, as training would start with: the checkpoint then has
  # exactly the structure workdir_lib.load_trained and a resumed run restore.
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))

  tokenizer.save(workdir)
  workdir_lib.save_config(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(0, state, {'next_example': 0})
  checkpointer.wait()
  checkpointer.close()
  return config


# ------------------------------------------------------------------------------ export


def _check_exportable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a model GPT-2 cannot represent, from its config alone."""
  m = config.model
  if m.name != 'transformer':
    raise UserError(f'{workdir}: model.name={m.name!r}; only the Transformer has a GPT-2 '
                    'counterpart.')
  if not m.causal:
    raise UserError(f'{workdir}: model.causal=False, a bidirectional encoder; GPT-2 is a '
                    'left-to-right decoder.')
  unknown = sorted(set(m.keys()) - set(_EXPORTABLE_MODEL_FIELDS))
  if unknown:
    raise UserError(
        f'{workdir}: model config fields {unknown} are unknown to the GPT-2 exporter, which '
        'cannot tell whether GPT-2 represents them; teach lmjax/hf.py about them first.')


def _exportable_weights(config: ml_collections.ConfigDict, params: Any,
                        workdir: str) -> dict[str, np.ndarray]:
  """GPT-2 tensors of `params`, after checking GPT-2 can represent the model."""
  _check_exportable(config, workdir)
  m = config.model
  if m.lora_rank:
    raise UserError(f'{workdir}: model.lora_rank={m.lora_rank}; merge the adapters first '
                    '(workdir_lib.load_trained does).')
  if m.scan_layers:
    params = transformer.unstack_layers(params)
  try:
    weights = _params_to_hf(params, m.num_layers)
  except KeyError as e:
    raise UserError(f'{workdir}: the checkpoint lacks the parameter {e}, which GPT-2 '
                    'needs.') from None
  # Converting back must give every parameter: one that GPT-2 has no place for would
  # otherwise be dropped without a word.
  extra = set(_shapes_by_path(params)) - set(
      _shapes_by_path(_hf_to_params(weights, m.num_layers, m.num_heads)))
  if extra:
    raise UserError(f'{workdir}: the checkpoint has parameters GPT-2 has no place for: '
                    f'{sorted(extra)[:6]}.')
  return weights


def _hf_config_for(config: ml_collections.ConfigDict, tokenizer) -> dict:
  m = config.model
  d_ff = m.d_ff or 4 * m.d_model
  return {
      'architectures': ['GPT2LMHeadModel'],
      'model_type': 'gpt2',
      'vocab_size': tokenizer.vocab_size,
      'n_positions': m.max_len,
      'n_embd': m.d_model,
      'n_layer': m.num_layers,
      'n_head': m.num_heads,
      'n_inner': None if d_ff == 4 * m.d_model else d_ff,
      'activation_function': 'gelu_new',
      'layer_norm_epsilon': transformer.LAYER_NORM_EPSILON,
      'resid_pdrop': m.dropout,
      'embd_pdrop': m.dropout,
      'attn_pdrop': m.dropout,
      'initializer_range': transformer.Transformer.init_stddev,
      'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False,
      'reorder_and_upcast_attn': False,
      'add_cross_attention': False,
      'tie_word_embeddings': True,
      'use_cache': True,
      # GPT-2 begins and ends documents with the same token; lmjax has only eos.
      'bos_token_id': tokenizer.eos_id,
      'eos_token_id': tokenizer.eos_id,
      'dtype': 'float32',
  }


def export_gpt2(workdir: str, hf_dir: str, step: int | None = None) -> int:
  """Writes a workdir's checkpoint (the latest, or `step`) to `hf_dir` as a Hugging Face GPT-2.

  `hf_dir` gets config.json, model.safetensors and, for a GPT-2 tokenizer, vocab.json,
  merges.txt and tokenizer_config.json; a character or SentencePiece tokenizer has no
  GPT-2 form and is left out (with a printed note). Returns the step exported.
  """
  _refuse_buckets(hf_dir, workdir)
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  if os.path.realpath(hf_dir) == os.path.realpath(workdir):
    raise UserError(f'{hf_dir} is the workdir itself; both have a config.json, so export '
                    'to a separate directory.')
  if os.path.exists(os.path.join(hf_dir, HF_WEIGHTS_FILE)):
    raise UserError(f'{hf_dir} already holds {HF_WEIGHTS_FILE}; export to a new directory '
                    'or delete that one.')
  # A model GPT-2 cannot represent, or a directory that cannot be written, is refused
  # before the weights are read.
  _check_exportable(workdir_lib.load_config(workdir), workdir)
  workdir_lib.prepare(hf_dir, flag='--hf_dir')
  config, tokenizer, params, step = workdir_lib.load_trained(workdir, step)
  weights = _exportable_weights(config, jax.device_get(params), workdir)
  # transformers refuses safetensors files whose metadata does not name a framework.
  safetensors.numpy.save_file(weights, os.path.join(hf_dir, HF_WEIGHTS_FILE),
                              metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, HF_CONFIG_FILE), 'w') as f:
    json.dump(_hf_config_for(config, tokenizer), f, indent=2)
  if tokenizer.kind == 'gpt2_bpe':
    tokenizer.save_vocab_and_merges(hf_dir)
    with open(os.path.join(hf_dir, HF_TOKENIZER_CONFIG_FILE), 'w') as f:
      json.dump({'tokenizer_class': 'GPT2Tokenizer', 'add_prefix_space': False,
                 'errors': 'replace', 'model_max_length': config.model.max_len,
                 'bos_token': tokenizer.eos_token, 'eos_token': tokenizer.eos_token,
                 'unk_token': tokenizer.eos_token}, f, indent=2)
  else:
    print(f'note: the workdir\'s tokenizer is a {tokenizer.kind!r} one, not GPT-2\'s '
          f'byte-level BPE, so no tokenizer was exported to {hf_dir}; the weights expect '
          f'the ids of the tokenizer in {workdir}.', flush=True)
  return step
