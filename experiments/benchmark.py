"""Measures speed: one JSON object per line, one per measurement (--table adds Markdown).

  python experiments/benchmark.py --config=configs/gpt2.py --bench=decode --compare_hf
  python experiments/benchmark.py --config=configs/shakespeare_char.py:full_cpu --bench=decode
  python experiments/benchmark.py --config=configs/rnn_shakespeare_char.py:lstm --bench=train \
      --compare_torch

Benchmarks (--bench, repeatable):
  train       the config's train step on synthetic tokens over the config's mesh: compile
              time, median step time over --steps timed steps (after --warmup), tokens/s,
              model FLOPs per token (6N + 12LdT, PaLM's appendix B), MFU against the chip's
              peak (on CPU, a float32 matmul peak measured at start-up), peak memory.
              Recurrent configs count 6 FLOPs per matmul weight; --compare_torch times the
              same LSTM / GRU / RNN, batch and Adam in PyTorch beside it (pip install -e
              '.[hf]'), stateful as lmjax trains.
  matmul      recurrent configs: each matmul of the train step (the input-side product,
              the per-step recurrent ones each way, the weight gradients) timed alone,
              GFLOP/s, and their sum over one step: the step's time in matmuls if it did
              nothing else. --compare_torch times the same products with torch.matmul.
  pipeline    the tf.data input pipeline alone on the config's real dataset (prepare it
              first: make data): tokens/s it delivers; beside a train benchmark, how many
              times what training consumes.
  checkpoint  an orbax save of the full train state: how long save() blocks the caller
              (asynchronous), until the write is complete, and a restore; bytes and GB/s.
  tokenize    the config's tokenizer on --tokenize_mb MB of its training text, 1,024
              pieces of 4 KB a call (as a tfds: or files: corpus is tokenized): tokens/s,
              tokens per CPU-second (all threads), the process's peak resident memory.
              GPT-2's BPE reads data.tokenizer_dir (vocab.json + merges.txt);
              --compare_hf times Hugging Face tokenizers' encoder after each call, on the
              same pieces, and says whether the ids agree.
  decode  prefill time, the KV-cached step, the same step recomputed over the whole prefix
          (what decoding without a cache pays), and whole `generate` calls: tokens/s and
          per-token latency, for each --batch_sizes x --strategies. --compare_hf runs the
          same model shape in Hugging Face transformers (PyTorch) beside it (pip install
          -e '.[hf]'). Weights are random: speed does not depend on them, and no download
          is needed.
          With --draft_workdir=DIR or --draft=ngram, speculative decoding instead, on the
          trained run of --workdir (no --config): plain and speculative `generate` calls of
          the same prompts (--prompt, repeatable), alternating, for each --batch_sizes x
          greedy/sample: tokens/s of each, the speed-up, the share of draft tokens
          accepted and the tokens written per call of the model. Greedy texts must agree.

Times are medians over --repeats timed runs after one untimed run (compiling, for JAX;
the compile time is reported on its own).
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import json
import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

from lmjax.errors import run_script

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.',
                                          lock_config=True)
_BENCH = flags.DEFINE_multi_enum('bench', ['decode'],
                                 ['train', 'matmul', 'pipeline', 'checkpoint', 'decode',
                                  'tokenize'],
                                 'What to measure.')
_STEPS = flags.DEFINE_integer('steps', 10, 'train: timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'train: untimed steps after the compiling one.')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 200, 'pipeline: batches read.')
_TOKENIZE_MB = flags.DEFINE_integer(
    'tokenize_mb', 100, 'tokenize: megabytes of the training text encoded (its documents cut '
    'into pieces of about 4 KB, repeated as needed).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Prompts per generate call.')
_STRATEGIES = flags.DEFINE_list('strategies', ['greedy', 'beam4'],
                                'greedy, sample, or beamK (beam search with K beams).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median).')
_VOCAB_SIZE = flags.DEFINE_integer(
    'vocab_size', 0, "Vocabulary; 0: GPT-2's 50257 for gpt2_bpe configs, the characters of the "
    'training text (85 for Shakespeare) for char ones, data.vocab_size for sentencepiece.')
_COMPARE_HF = flags.DEFINE_bool('compare_hf', False, 'decode: also time Hugging Face generate; '
                                  "tokenize: also Hugging Face tokenizers' encoder.")
_COMPARE_TORCH = flags.DEFINE_bool(
    'compare_torch', False, 'train, matmul (recurrent configs): also time the same model, or '
    'the same products, in PyTorch.')
_AUTOTUNE = flags.DEFINE_bool(
    'autotune', False, 'First choose the train step\'s settings as train.autotune does '
    '(its table and a JSON line), then run the benchmarks with them.')
_TABLE = flags.DEFINE_bool('table', False, 'Print a Markdown table after the JSON lines.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'decode with a draft: the trained run to '
                               'decode from.')
_DRAFT_WORKDIR = flags.DEFINE_string('draft_workdir', None, 'decode: speculative decoding '
                                     'with this trained run as the draft.')
_DRAFT = flags.DEFINE_enum('draft', None, ['ngram'], 'decode: speculative decoding with the '
                           'n-gram (prompt lookup) draft.')
_NUM_DRAFT_TOKENS = flags.DEFINE_integer('num_draft_tokens', 4, 'Tokens a draft proposes.')
_PROMPTS = flags.DEFINE_multi_string(
    'prompt', ['ROMEO:\n', 'JULIET:\n', 'First Citizen:\n', 'KING RICHARD III:\n'],
    'decode with a draft: prompts, cycled to fill each batch.')


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _vocab_size(config) -> int:
  """The vocabulary the config trains with: GPT-2's, data.vocab_size for SentencePiece, or
  the characters of the config's own training text (as training builds it)."""
  if _VOCAB_SIZE.value:
    return _VOCAB_SIZE.value
  if config.data.tokenizer == 'gpt2_bpe':
    return 50257
  if config.data.tokenizer != 'char':
    return config.data.vocab_size
  from lmjax import tasks
  from lmjax.data import tokenizers
  task = tasks.task_class(config)(config)
  task.read()
  return tokenizers.CharTokenizer.train(task.tokenizer_texts()).vocab_size


def _strategy(name: str) -> dict:
  if name in ('greedy', 'sample'):
    return {'strategy': name}
  if name.startswith('beam') and name[4:].isdigit():
    return {'strategy': 'beam', 'beam_size': int(name[4:])}
  raise app.UsageError(f'--strategies: {name!r}; use greedy, sample or beamK (e.g. beam4).')


def _common(config, vocab_size: int, num_params: int) -> dict:
  import jax
  m = config.model
  transformer = m.name == 'transformer'  # a recurrent model has no heads and no context limit
  shape = (f'{m.num_layers}x{m.d_model}' if transformer else
           f'{m.name} {m.num_layers}x{m.hidden_size or m.d_model}')
  return {'model': shape, 'heads': m.num_heads if transformer else None, 'vocab': vocab_size,
          'context': m.max_len if transformer else None, 'params': num_params, 'dtype': m.dtype,
          'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'prompt_len': _PROMPT_LEN.value, 'new_tokens': _NEW_TOKENS.value}


def _decode_result(impl: str, common: dict, batch: int, strategy: str, compile_s: float,
                   prefill_s: float, step_s: float, recompute_s: float,
                   generate_s: float) -> dict:
  """One decode measurement as a JSON object (printed as it is made)."""
  new_tokens = common['new_tokens']
  result = {
      'bench': 'decode', 'impl': impl, **common, 'batch': batch, 'strategy': strategy,
      'compile_s': round(compile_s, 2),
      'prefill_ms': round(1e3 * prefill_s, 2),
      'cached_step_ms': round(1e3 * step_s, 2),
      'recompute_step_ms': round(1e3 * recompute_s, 2),
      'generate_s': round(generate_s, 3),
      'per_token_ms': round(1e3 * (generate_s - prefill_s) / new_tokens, 2),
      'tokens_per_s': round(batch * new_tokens / generate_s, 1),
  }
  print(json.dumps(result), flush=True)
  return result


def bench_decode_lmjax(config, vocab_size: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lmjax import decode, generation, models

  model = models.build_model(config.model, vocab_size)
  decode_model = models.build_model(config.model, vocab_size, decode=True)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params['params'],
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  common = _common(config, vocab_size, models.count_params(params))
  prompt_len, new_tokens = _PROMPT_LEN.value, _NEW_TOKENS.value
  rng = np.random.default_rng(0)
  results = []
  for batch in map(int, _BATCH_SIZES.value):
    prompts = rng.integers(0, vocab_size, (batch, prompt_len)).tolist()
    for name in _STRATEGIES.value:
      options = _strategy(name)
      rows = batch * options.get('beam_size', 1)
      # The cache the decoder would ask for: the positions needed, not the whole context.
      context = generation.context_length(config)
      cache_len = decode.buffer_length(prompt_len + new_tokens, context)
      tokens_to_logits, state = models.decode_fns(decode_model, params, batch_size=rows,
                                                  cache_len=cache_len)

      # Timed alone, a step must not return the params (a copy of every weight per call,
      # which the decode loop never makes): this one returns the logits and cache only.
      @jax.jit
      def step(ids, state):
        logits, new_state = tokens_to_logits(ids, state)
        return logits, new_state['cache']

      # The pieces, each timed on its own: prefill, one cached step, one recomputed step.
      prompt_ids = jnp.asarray(rng.integers(0, vocab_size, (rows, prompt_len)), jnp.int32)
      _, filled_cache = jax.block_until_ready(step(prompt_ids, state))
      filled = {**state, 'cache': filled_cache}
      prefill_s = _median_seconds(
          lambda: jax.block_until_ready(step(prompt_ids, state)), _REPEATS.value)
      one_ids = prompt_ids[:, :1]
      jax.block_until_ready(step(one_ids, filled))
      step_s = _median_seconds(lambda: jax.block_until_ready(step(one_ids, filled)),
                               5 * _REPEATS.value)
      full_ids = jnp.asarray(rng.integers(0, vocab_size, (rows, prompt_len + new_tokens)),
                             jnp.int32)
      forward = jax.jit(model.apply)
      jax.block_until_ready(forward({'params': params}, full_ids))
      recompute_s = _median_seconds(
          lambda: jax.block_until_ready(forward({'params': params}, full_ids)), _REPEATS.value)

      # generate takes one cache row per prompt and repeats it for beams itself.
      _, prompt_state = models.decode_fns(decode_model, params, batch_size=batch,
                                          cache_len=cache_len)

      def run():
        return decode.generate(tokens_to_logits, prompt_state, prompts,
                               max_new_tokens=new_tokens, max_len=context, **options)
      start = time.perf_counter()
      run()
      first_s = time.perf_counter() - start
      generate_s = _median_seconds(run, _REPEATS.value)
      results.append(_decode_result('lmjax', common, batch, name, first_s - generate_s,
                                    prefill_s, step_s, recompute_s, generate_s))
  return results


def bench_speculative(draft_spec: str) -> list[dict]:
  """Plain and speculative decoding of a trained run, timed in turn (see the docstring)."""
  from lmjax import generation, models, workdir as workdir_lib
  config, tokenizer, params, step = workdir_lib.load_trained(_WORKDIR.value)
  draft = generation.load_draft(draft_spec, tokenizer)
  results = []
  for batch in map(int, _BATCH_SIZES.value):
    prompts = [_PROMPTS.value[i % len(_PROMPTS.value)].replace('\\n', '\n')
               for i in range(batch)]
    for strategy in ('greedy', 'sample'):
      options = dict(strategy=strategy, max_new_tokens=_NEW_TOKENS.value, seed=0)
      if strategy == 'sample':
        options['temperature'] = 0.8
      outputs = {}

      def plain():
        outputs['plain'] = generation.generate_texts(config, params, tokenizer, prompts,
                                                     **options)

      def speculative():
        outputs['draft'] = generation.speculative_texts(
            config, params, tokenizer, prompts, draft=draft,
            num_draft_tokens=_NUM_DRAFT_TOKENS.value, **options)

      plain(), speculative()  # compiles
      times = {'plain': [], 'draft': []}
      for _ in range(_REPEATS.value):  # in turn, so that both see the same machine
        for name, fn in (('plain', plain), ('draft', speculative)):
          start = time.perf_counter()
          fn()
          times[name].append(time.perf_counter() - start)
      texts, stats = outputs['draft']
      if strategy == 'greedy' and [[c['text'] for c in r] for r in texts] != [
          [c['text'] for c in r] for r in outputs['plain']]:
        raise RuntimeError('speculative greedy decoding wrote other text than plain greedy')
      plain_s, draft_s = (statistics.median(times[n]) for n in ('plain', 'draft'))
      new, draft_new = (sum(len(c['tokens']) for r in rows for c in r)
                        for rows in (outputs['plain'], texts))
      result = {'bench': 'speculative', 'workdir': _WORKDIR.value, 'step': step,
                'params': models.count_params(params), 'draft': draft_spec,
                'k': _NUM_DRAFT_TOKENS.value,
                'batch': batch, 'strategy': strategy, 'new_tokens': _NEW_TOKENS.value,
                'plain_tokens_per_s': round(new / plain_s, 1),
                'draft_tokens_per_s': round(draft_new / draft_s, 1),
                'speedup': round(plain_s / draft_s * draft_new / new, 2),
                'acceptance': round(stats.acceptance, 3),
                'tokens_per_call': round(stats.tokens_per_round, 2)}
      print(json.dumps(result), flush=True)
      results.append(result)
  return results


def bench_decode_hf(config, vocab_size: int) -> list[dict]:
  try:
    import torch
    import transformers
  except ImportError:
    raise app.UsageError("--compare_hf needs the 'hf' extra: pip install -e '.[hf]'") from None
  import numpy as np

  m = config.model
  hf_config = transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
      n_head=m.num_heads, n_inner=m.d_ff or None, activation_function='gelu_new',
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(hf_config).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  common = _common(config, vocab_size, sum(p.numel() for p in model.parameters()))
  common['device'] = f'torch {torch.__version__} cpu, {torch.get_num_threads()} threads'
  prompt_len, new_tokens = _PROMPT_LEN.value, _NEW_TOKENS.value
  rng = np.random.default_rng(0)
  results = []
  for batch in map(int, _BATCH_SIZES.value):
    prompts = torch.as_tensor(rng.integers(0, vocab_size, (batch, prompt_len)))
    for name in _STRATEGIES.value:
      options = _strategy(name)
      beams = options.get('beam_size', 1)
      rows = batch * beams
      ids = torch.as_tensor(rng.integers(0, vocab_size, (rows, prompt_len)))
      full_ids = torch.as_tensor(rng.integers(0, vocab_size, (rows, prompt_len + new_tokens)))
      with torch.inference_mode():
        past = model(ids, use_cache=True).past_key_values
        model(ids, use_cache=True)
        prefill_s = _median_seconds(lambda: model(ids, use_cache=True), _REPEATS.value)
        # One cached step; the step appends to the cache, so cut it back after each.
        def one_step():
          model(ids[:, :1], past_key_values=past, use_cache=True)
          past.crop(-1)
        one_step()
        step_s = _median_seconds(one_step, 5 * _REPEATS.value)
        recompute_s = _median_seconds(lambda: model(full_ids, use_cache=False), _REPEATS.value)

        def run():
          return model.generate(
              prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=options['strategy'] == 'sample',
              num_beams=beams)
        run()  # PyTorch's first calls are slow too (allocator, kernels): two untimed runs
        run()
        generate_s = _median_seconds(run, _REPEATS.value)
      results.append(_decode_result(f'hf-transformers {transformers.__version__}', common,
                                    batch, name, 0.0, prefill_s, step_s, recompute_s,
                                    generate_s))
  return results


def _train_parts(config, vocab_size: int, mesh=None):
  """Model, optimizer, mesh (the config's over every device, unless given) and freshly
  initialised sharded state, as training makes them."""
  from lmjax import config as config_lib
  from lmjax import models, optim, runtime, sharding, state as state_lib
  runtime.keep_freed_host_memory()
  mesh = mesh or sharding.make_mesh(config.mesh)
  try:
    config_lib.validate_config(config, mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  rules = sharding.rules_as_tuples(config.mesh.rules)
  model = models.build_model(config.model, vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  state, shardings = state_lib.create_train_state(model, tx, mesh, rules, config.train.seed,
                                                  config.train.seq_len,
                                                  carry_rows=state_lib.carry_rows(config))
  return model, tx, mesh, rules, state, shardings


def _peak_memory_bytes(device) -> tuple[int, str]:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  return _peak_rss_bytes(), 'host max RSS'


def _random_batch(config, vocab_size: int) -> dict:
  """A training batch of random tokens (stateful: no separator in them, so no resets)."""
  import numpy as np
  t = config.train
  tokens = np.random.default_rng(0).integers(0, vocab_size, (t.batch_size, t.seq_len + 1),
                                             dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  if t.stateful:
    batch['resets'] = np.zeros(batch['inputs'].shape, bool)
  return batch


def bench_autotune(config, vocab_size: int):
  """(config, mesh) with the settings train.autotune chooses for `config`, timed here on
  random tokens; prints a JSON line and the table of trials."""
  from lmjax import autotune, sharding
  mesh = sharding.make_mesh(config.mesh)
  began = time.perf_counter()
  settings, trials = autotune.search(config, mesh, _random_batch(config, vocab_size),
                                     vocab_size)
  print(json.dumps({'bench': 'autotune', 'settings': settings,
                    'seconds': round(time.perf_counter() - began, 1),
                    'trials': [{**t.settings, 'rows': t.rows,
                                'compile_s': round(t.compile_s, 2),
                                'step_ms': t.step_s and round(1e3 * t.step_s, 2),
                                'peak_bytes': t.peak_bytes, 'verdict': t.verdict}
                               for t in trials]}), flush=True)
  print(autotune.markdown(trials), flush=True)
  return autotune.with_settings(config, settings), autotune.submesh(config, mesh, settings)


def bench_train(config, vocab_size: int, mesh=None) -> dict:
  import flax.linen as nn
  import jax

  from lmjax import flops, models, sharding, steps
  model, tx, mesh, rules, state, shardings = _train_parts(config, vocab_size, mesh)
  t = config.train
  step_fn, _ = steps.jit_steps(model, tx, mesh, rules, shardings,
                               microbatches=t.microbatches)
  batch = jax.device_put(_random_batch(config, vocab_size), sharding.batch_sharding(mesh))
  dropout_rng = jax.random.key(0)
  num_params = models.count_params(state.params)
  times = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    start = time.perf_counter()
    step_fn = step_fn.lower(state, batch, dropout_rng).compile()
    compile_s = time.perf_counter() - start
    memory_use = steps.memory_use(step_fn, state, mesh)
    for i in range(_WARMUP.value + _STEPS.value):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch, dropout_rng)
      jax.block_until_ready(metrics)
      if i >= _WARMUP.value:
        times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_s = t.batch_size * t.seq_len / step_s
  flops_per_token = models.train_flops_per_token(config.model, state.params, t.seq_len)
  device = mesh.devices.flat[0]
  if device.platform == 'cpu':
    # However many (fake) CPU devices the mesh has, they share the host's cores.
    peak, peak_source = flops.measured_cpu_peak_flops(), 'measured float32 matmul'
  else:
    peak, peak_source = flops.peak_flops_per_device(device), 'data sheet'
    peak = peak * mesh.size if peak else None
  memory, memory_source = _peak_memory_bytes(device)
  result = {
      'bench': 'train', 'impl': 'lmjax', **_common(config, vocab_size, num_params),
      'batch': t.batch_size, 'seq_len': t.seq_len, 'mesh': dict(mesh.shape),
      'microbatches': t.microbatches,
      'compile_s': round(compile_s, 2), 'step_ms': round(1e3 * step_s, 2),
      'tokens_per_s': round(tokens_per_s, 1), 'flops_per_token': round(flops_per_token),
      'mfu': round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
      'peak_flops': peak, 'peak_source': peak_source,
      'peak_memory_gb': round(memory / 1e9, 3), 'memory_source': memory_source,
      # XLA's memory analysis of the compiled step, per device (None where it has none).
      **{f'xla_{k[:-len("_bytes")]}_mib': None if v is None else round(v / 2**20, 1)
         for k, v in memory_use.items() if k != 'limit_bytes'},
  }
  for field in ('prompt_len', 'new_tokens'):
    result.pop(field)
  print(json.dumps(result), flush=True)
  return result


def _import_torch():
  try:
    import torch
  except ImportError:
    raise app.UsageError("--compare_torch needs PyTorch: pip install -e '.[hf]'") from None
  return torch


def bench_train_torch(config, vocab_size: int, lmjax_result: dict) -> dict:
  """The same recurrent LM, batch and optimizer in PyTorch (nn.LSTM / nn.GRU / nn.RNN,
  whose CPU kernels are oneDNN's and whose GPU kernels are cuDNN's), stateful as lmjax
  trains it: each step starts from the last step's carry, detached."""
  torch = _import_torch()
  import numpy as np

  m, t = config.model, config.train
  hidden = m.hidden_size or m.d_model
  if m.tie_embeddings or m.weight_dropout:
    raise app.UsageError('--compare_torch times plain untied nn.LSTM / GRU / RNN: set '
                         '--config.model.tie_embeddings=False --config.model.weight_dropout=0.')
  recurrent = {'lstm': torch.nn.LSTM, 'gru': torch.nn.GRU, 'rnn': torch.nn.RNN}[m.name]
  torch.manual_seed(0)
  embed = torch.nn.Embedding(vocab_size, m.d_model)
  stack = recurrent(m.d_model, hidden, num_layers=m.num_layers, batch_first=True,
                    dropout=m.dropout if m.num_layers > 1 else 0.0)
  head = torch.nn.Sequential(torch.nn.Dropout(m.dropout), torch.nn.Linear(hidden, vocab_size))
  modules = torch.nn.ModuleList([embed, stack, head]).train()
  optimizer = torch.optim.Adam(modules.parameters(), lr=config.opt.lr,
                               betas=(config.opt.b1, config.opt.b2), eps=config.opt.eps)
  rng = np.random.default_rng(0)
  tokens = torch.as_tensor(rng.integers(0, vocab_size, (t.batch_size, t.seq_len + 1)))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  carry = None

  def step():
    nonlocal carry
    optimizer.zero_grad(set_to_none=True)
    outputs, carry = stack(embed(inputs), carry)
    loss = torch.nn.functional.cross_entropy(head(outputs).reshape(-1, vocab_size),
                                             targets.reshape(-1))
    loss.backward()
    if config.opt.grad_clip:
      torch.nn.utils.clip_grad_norm_(modules.parameters(), config.opt.grad_clip)
    optimizer.step()
    carry = tuple(c.detach() for c in carry) if isinstance(carry, tuple) else carry.detach()
    return float(loss)

  for _ in range(1 + _WARMUP.value):
    step()
  step_s = _median_seconds(step, _STEPS.value)
  tokens_per_s = t.batch_size * t.seq_len / step_s
  num_params = sum(p.numel() for p in modules.parameters())
  result = {
      **{k: lmjax_result[k] for k in ('bench', 'model', 'vocab', 'batch', 'seq_len', 'dtype',
                                      'flops_per_token', 'peak_flops', 'peak_source')},
      'impl': f'torch {torch.__version__} nn.{recurrent.__name__}',
      'params': num_params, 'device': f'cpu, {torch.get_num_threads()} threads',
      'step_ms': round(1e3 * step_s, 2), 'tokens_per_s': round(tokens_per_s, 1),
      'mfu': (round(tokens_per_s * lmjax_result['flops_per_token'] / lmjax_result['peak_flops'],
                    4) if lmjax_result['peak_flops'] else None),
      'lmjax_speedup': round(lmjax_result['tokens_per_s'] / tokens_per_s, 2),
  }
  print(json.dumps(result), flush=True)
  return result


def _recurrent_matmuls(config, vocab_size: int) -> list[tuple[str, int, int, int, int]]:
  """(product, M, K, N, times per train step) for the matmuls of a recurrent LM's step as
  lmjax/models/rnn.py arranges them: per layer one input-side product over all B*T rows,
  T thin recurrent products each way, and the weight gradients as single large products."""
  m, t = config.model, config.train
  rows, hidden = t.batch_size * t.seq_len, m.hidden_size or m.d_model
  from lmjax.models import rnn
  gates = rnn.NUM_GATES[m.name] * hidden
  out = []
  for i in range(m.num_layers):
    width = m.d_model if i == 0 else hidden
    out += [(f'layer {i}: x W_x', rows, width, gates, 1),
            (f'layer {i}: h W_h, one step', t.batch_size, hidden, gates, t.seq_len),
            (f'layer {i}: dL/dh through W_h, one step', t.batch_size, gates, hidden, t.seq_len),
            (f'layer {i}: dL/dx', rows, gates, width, 1),
            (f'layer {i}: dL/dW_x', width, rows, gates, 1),
            (f'layer {i}: dL/dW_h', hidden, rows, gates, 1)]
  head = [('output layer', rows, hidden, vocab_size)]
  if m.tie_embeddings and hidden != m.d_model:
    head = [('output projection', rows, hidden, m.d_model), ('output layer', rows, m.d_model,
                                                             vocab_size)]
  for name, rows_, k, n in head:
    out += [(name, rows_, k, n, 1), (f'{name}: dL/dx', rows_, n, k, 1),
            (f'{name}: dL/dW', k, rows_, n, 1)]
  return out


def _significant(value: float, digits: int = 3) -> float:
  """`value` to `digits` significant figures: a fast product's time (or a slow one's rate)
  is never rounded to 0."""
  return float(f'{value:.{digits}g}')


def _time_products(run, seconds: float = 0.1) -> float:
  """Seconds per call of `run(calls)` (which makes that many products and waits for the
  last): the median of --repeats rounds, each long enough to time."""
  start = time.perf_counter()
  run(1)
  calls = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))
  rounds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run(calls)
    rounds.append((time.perf_counter() - start) / calls)
  return statistics.median(rounds)


def bench_matmul(config, vocab_size: int) -> list[dict]:
  """Each matmul of a recurrent LM's train step timed alone on the config's device, in
  XLA (and with --compare_torch in PyTorch): the time the step spends in matmuls if it
  did nothing else, a floor under its step time set by the matmul kernels."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  products = _recurrent_matmuls(config, vocab_size)
  dtype = jnp.dtype(config.model.dtype)
  rng = np.random.default_rng(0)
  impls = [('xla', f'{jax.devices()[0].device_kind}, jax {jax.__version__}')]
  if _COMPARE_TORCH.value:
    torch = _import_torch()
    impls.append((f'torch {torch.__version__}', f'cpu, {torch.get_num_threads()} threads'))
  results = []
  for impl, device in impls:
    step_s, step_flops = 0.0, 0
    for name, m, k, n, per_step in products:
      a = rng.standard_normal((m, k), np.float32)
      b = rng.standard_normal((k, n), np.float32)
      if impl == 'xla':
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        product = jax.jit(jnp.matmul)

        def run(calls, a=a, b=b, product=product):
          for _ in range(calls):
            out = product(a, b)  # dispatched asynchronously; they run in order
          out.block_until_ready()
      else:
        torch_dtype = getattr(torch, dtype.name)
        a, b = torch.as_tensor(a).to(torch_dtype), torch.as_tensor(b).to(torch_dtype)
        out = torch.empty((m, n), dtype=torch_dtype)

        def run(calls, a=a, b=b, out=out):
          for _ in range(calls):
            torch.matmul(a, b, out=out)
      seconds = _time_products(run)
      step_s += per_step * seconds
      step_flops += per_step * 2 * m * k * n
      results.append({'bench': 'matmul', 'impl': impl, 'device': device, 'product': name,
                      'shape': f'{m}x{k}x{n}', 'dtype': dtype.name, 'per_step': per_step,
                      'ms': _significant(1e3 * seconds),
                      'gflop_per_s': _significant(2 * m * k * n / seconds / 1e9),
                      'step_ms': round(1e3 * per_step * seconds, 1)})
      print(json.dumps(results[-1]), flush=True)
    results.append({'bench': 'matmul', 'impl': impl, 'device': device,
                    'product': 'all, one train step', 'dtype': dtype.name,
                    'model': _common(config, vocab_size, 0)['model'],
                    'batch': config.train.batch_size, 'seq_len': config.train.seq_len,
                    'gflop_per_s': round(step_flops / step_s / 1e9, 1),
                    'step_ms': round(1e3 * step_s, 1)})
    print(json.dumps(results[-1]), flush=True)
  return results


def bench_pipeline(config, consumed_tokens_per_s: float | None) -> dict:
  import tempfile

  from lmjax.data import corpora, pipeline, tokenizers
  t, data = config.train, config.data
  with tempfile.TemporaryDirectory() as directory:
    try:
      tokenizer = tokenizers.build_tokenizer(
          data.tokenizer, directory,
          lambda: [text for _, text in corpora.load_split_texts(data.name, 'train',
                                                              data.data_dir or None)],
          vocab_size=data.vocab_size or None, model_type=data.spm_model_type)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(f'{e} (prepare the data first: make data)') from None
    tokens = pipeline.load_tokens(data, 'train', tokenizer)
  if t.stateful:
    dataset = pipeline.stream_dataset(tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                      seed=t.seed, eos_id=tokenizer.eos_id)
  else:
    dataset = pipeline.train_dataset(tokens, seq_len=t.seq_len, global_batch=t.batch_size,
                                     seed=t.seed)
  batches = dataset.as_numpy_iterator()
  next(batches)  # builds the pipeline and fills its prefetch buffer
  count = _PIPELINE_BATCHES.value
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  elapsed = time.perf_counter() - start
  delivered = count * t.batch_size * t.seq_len / elapsed
  result = {'bench': 'pipeline', 'impl': 'lmjax', 'dataset': data.name,
            'tokenizer': data.tokenizer, 'batch': t.batch_size, 'seq_len': t.seq_len,
            'batches': count, 'tokens_per_s': round(delivered, 1),
            'times_training': (round(delivered / consumed_tokens_per_s, 1)
                               if consumed_tokens_per_s else None)}
  print(json.dumps(result), flush=True)
  return result


def bench_tokenize(config) -> list[dict]:
  """Encodes --tokenize_mb MB of the config's training text with its tokenizer (trained as
  a run trains it, or data.tokenizer_dir's), 1,024 pieces of about 4 KB a call, as the
  token cache of a tfds: or files: corpus is written: tokens a second, per CPU-second of all
  threads, and the process's peak resident memory. With --compare_hf (GPT-2's BPE), each
  call is followed by Hugging Face `tokenizers`' own encoder on the same pieces, timed the
  same way, and the ids compared."""
  import itertools
  import tempfile

  import numpy as np

  from lmjax.data import corpora, tokenizers
  data = config.data
  texts = [text for _, text in corpora.load_split_texts(data.name, 'train',
                                                      data.data_dir or None)]
  with tempfile.TemporaryDirectory() as directory:
    tokenizer = (tokenizers.read_tokenizer_dir(data.tokenizer_dir) if data.tokenizer_dir else
                 tokenizers.build_tokenizer(data.tokenizer, directory, lambda: texts,
                                            vocab_size=data.vocab_size or None,
                                            model_type=data.spm_model_type))
  encoders = {'lmjax': tokenizer.encode_batch}
  if _COMPARE_HF.value and tokenizer.kind == 'gpt2_bpe':
    hf = tokenizer.hf_tokenizer
    encoders['tokenizers'] = lambda batch: [np.asarray(e.ids, np.int32) for e in
                                            hf.encode_batch_fast(batch, add_special_tokens=False)]
  pieces = itertools.cycle([text[i:i + 4096] for text in texts
                            for i in range(0, len(text), 4096)])
  totals = {name: [0, 0.0, 0.0] for name in encoders}  # tokens, seconds, CPU-seconds
  done, same = 0, True
  while done < _TOKENIZE_MB.value * 10**6:
    batch = list(itertools.islice(pieces, 1024))
    done += sum(len(piece.encode('utf-8')) for piece in batch)
    outputs = []
    for name, encode in encoders.items():
      cpu, start = _cpu_seconds(), time.perf_counter()
      outputs.append(encode(batch))
      totals[name][1] += time.perf_counter() - start
      totals[name][2] += _cpu_seconds() - cpu
      totals[name][0] += sum(len(ids) for ids in outputs[-1])
    if len(outputs) > 1:
      same = same and all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True))
  results = []
  for name, (tokens, seconds, cpu_s) in totals.items():
    results.append({
        'bench': 'tokenize', 'impl': name, 'dataset': data.name, 'tokenizer': tokenizer.kind,
        'vocab': tokenizer.vocab_size, 'megabytes': round(done / 1e6, 1), 'tokens': tokens,
        'tokens_per_s': round(tokens / seconds), 'tokens_per_cpu_s': round(tokens / cpu_s),
        'peak_rss_mb': round(_peak_rss_bytes() / 1e6),
        **({'same_ids': same} if len(encoders) > 1 else {})})
    print(json.dumps(results[-1]), flush=True)
  return results


def _cpu_seconds() -> float:
  """CPU time of every thread of this process."""
  import resource
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _peak_rss_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_checkpoint(config, vocab_size: int) -> dict:
  import shutil
  import tempfile

  import jax

  from lmjax import checkpoint as ckpt_lib
  from lmjax import models
  _, _, _, _, state, shardings = _train_parts(config, vocab_size)
  directory = tempfile.mkdtemp(prefix='lmjax-bench-ckpt-')
  try:
    checkpointer = ckpt_lib.Checkpointer(directory, keep=1)
    # A run's first save also sets orbax up (its threads, the directory); the later ones
    # are what training waits for at every `train.checkpoint_every`.
    start = time.perf_counter()
    checkpointer.save(1, state, {'next_example': 0})
    first_blocking_s = time.perf_counter() - start
    checkpointer.wait()
    start = time.perf_counter()
    checkpointer.save(2, state, {'next_example': 0})
    blocking_s = time.perf_counter() - start
    checkpointer.wait()
    save_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(checkpointer.directory) for f in files)
    abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    start = time.perf_counter()
    restored, _ = checkpointer.restore(2, abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    checkpointer.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  result = {'bench': 'checkpoint', 'impl': 'lmjax',
            'model': f'{config.model.num_layers}x{config.model.d_model}',
            'params': models.count_params(state.params), 'bytes': size,
            'first_save_blocking_s': round(first_blocking_s, 3),
            'save_blocking_s': round(blocking_s, 3), 'save_total_s': round(save_s, 3),
            'restore_s': round(restore_s, 3),
            'save_gb_per_s': round(size / save_s / 1e9, 3),
            'restore_gb_per_s': round(size / restore_s / 1e9, 3)}
  print(json.dumps(result), flush=True)
  return result


_TABLE_COLUMNS = ('impl', 'model', 'batch', 'strategy', 'prefill_ms', 'cached_step_ms',
                  'recompute_step_ms', 'per_token_ms', 'tokens_per_s')


_OTHER_COLUMNS = {
    'train': ('impl', 'model', 'params', 'batch', 'seq_len', 'microbatches', 'step_ms',
              'tokens_per_s', 'mfu', 'peak_memory_gb', 'xla_step_peak_mib', 'compile_s'),
    'matmul': ('impl', 'product', 'shape', 'per_step', 'ms', 'gflop_per_s', 'step_ms'),
    'pipeline': ('dataset', 'batch', 'seq_len', 'tokens_per_s', 'times_training'),
    'tokenize': ('impl', 'tokenizer', 'vocab', 'megabytes', 'tokens', 'tokens_per_s',
                 'tokens_per_cpu_s', 'peak_rss_mb'),
    'speculative': ('draft', 'k', 'batch', 'strategy', 'plain_tokens_per_s',
                    'draft_tokens_per_s', 'speedup', 'acceptance', 'tokens_per_call'),
    'checkpoint': ('model', 'bytes', 'first_save_blocking_s', 'save_blocking_s', 'save_total_s',
                   'restore_s', 'save_gb_per_s', 'restore_gb_per_s'),
}


def _markdown(results: list[dict]) -> str:
  """One table per kind of benchmark, in the order they ran."""
  tables = []
  for kind in dict.fromkeys(r['bench'] for r in results):
    columns = _TABLE_COLUMNS if kind == 'decode' else _OTHER_COLUMNS[kind]
    lines = [f'{kind}:', '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for r in results:
      if r['bench'] == kind:
        lines.append('| ' + ' | '.join(str(r.get(c, '')) for c in columns) + ' |')
    tables.append('\n'.join(lines))
  return '\n\n'.join(tables)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  draft_spec = _DRAFT.value or _DRAFT_WORKDIR.value
  if draft_spec:
    if not _WORKDIR.value:
      raise app.UsageError('--draft/--draft_workdir time a trained run: give --workdir.')
    results = bench_speculative(draft_spec)
    if _TABLE.value:
      print(_markdown(results))
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('give --config (or --workdir with a draft).')
  if _STEPS.value < 1 or _WARMUP.value < 0 or _PIPELINE_BATCHES.value < 1:
    raise app.UsageError('--steps and --pipeline_batches must be at least 1, --warmup at '
                         'least 0.')
  recurrent = config.model.name != 'transformer'
  if _COMPARE_TORCH.value and not (recurrent and {'train', 'matmul'} & set(_BENCH.value)):
    raise app.UsageError('--compare_torch compares the recurrent models\' train step: use it '
                         'with --bench=train or --bench=matmul and an LSTM, GRU or RNN config.')
  if 'matmul' in _BENCH.value and not recurrent:
    raise app.UsageError('--bench=matmul lists the matmuls of a recurrent model\'s train step '
                         '(an LSTM, GRU or RNN config); for the Transformer use --bench=train.')
  if ('decode' in _BENCH.value and not recurrent and
      _PROMPT_LEN.value + _NEW_TOKENS.value > config.model.max_len):
    raise app.UsageError(
        f'--prompt_len={_PROMPT_LEN.value} + --new_tokens={_NEW_TOKENS.value} exceeds the '
        f"model's context (model.max_len={config.model.max_len}); lower one of them.")
  for name in _STRATEGIES.value:
    _strategy(name)
  from lmjax import runtime
  note = runtime.split_cpu(config.mesh.cpu_devices)  # as training would
  if note:
    print(f'note: {note}', flush=True)
  vocab_size = _vocab_size(config)
  results = []
  consumed = None
  mesh = None  # the config's over every device
  if _AUTOTUNE.value:
    config, mesh = bench_autotune(config, vocab_size)
  if 'train' in _BENCH.value:
    results.append(bench_train(config, vocab_size, mesh))
    consumed = results[-1]['tokens_per_s']
    if _COMPARE_TORCH.value:
      results.append(bench_train_torch(config, vocab_size, results[-1]))
  if 'matmul' in _BENCH.value:
    results += bench_matmul(config, vocab_size)
  if 'pipeline' in _BENCH.value:
    results.append(bench_pipeline(config, consumed))
  if 'tokenize' in _BENCH.value:
    results += bench_tokenize(config)
  if 'checkpoint' in _BENCH.value:
    results.append(bench_checkpoint(config, vocab_size))
  if 'decode' in _BENCH.value:
    results += bench_decode_lmjax(config, vocab_size)
    if _COMPARE_HF.value:
      results += bench_decode_hf(config, vocab_size)
  if _TABLE.value:
    print(_markdown(results))


if __name__ == '__main__':
  run_script(main)
