"""Measures speed: one JSON object per line, one per measurement (--table adds Markdown).

  python experiments/benchmark.py --config=configs/gpt2.py --bench=decode --compare_hf
  python experiments/benchmark.py --config=configs/shakespeare_char.py --bench=decode

Benchmarks (--bench, repeatable):
  decode  prefill time, the KV-cached step, the same step recomputed over the whole prefix
          (what decoding without a cache pays), and whole `generate` calls: tokens/s and
          per-token latency, for each --batch_sizes x --strategies. --compare_hf runs the
          same model shape in Hugging Face transformers (PyTorch) beside it (pip install
          -e '.[hf]'). Weights are random: speed does not depend on them, and no download
          is needed.

Times are medians over --repeats timed runs after one untimed run (compiling, for JAX;
the compile time is reported on its own).
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('NO_GCE_CHECK', 'true')

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.',
                                          lock_config=True)
_BENCH = flags.DEFINE_multi_enum('bench', ['decode'], ['decode'], 'What to measure.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Prompts per generate call.')
_STRATEGIES = flags.DEFINE_list('strategies', ['greedy', 'beam4'],
                                'greedy, sample, or beamK (beam search with K beams).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median).')
_VOCAB_SIZE = flags.DEFINE_integer(
    'vocab_size', 0, 'Vocabulary; 0: GPT-2\'s 50257 for gpt2_bpe configs, 65 (Shakespeare\'s '
    'characters) for char ones, data.vocab_size for sentencepiece.')
_COMPARE_HF = flags.DEFINE_bool('compare_hf', False, 'Also time Hugging Face generate.')
_TABLE = flags.DEFINE_bool('table', False, 'Print a Markdown table after the JSON lines.')
flags.mark_flags_as_required(['config'])


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _vocab_size(config) -> int:
  if _VOCAB_SIZE.value:
    return _VOCAB_SIZE.value
  return {'gpt2_bpe': 50257, 'char': 65}.get(config.data.tokenizer, config.data.vocab_size)


def _strategy(name: str) -> dict:
  if name in ('greedy', 'sample'):
    return {'strategy': name}
  if name.startswith('beam') and name[4:].isdigit():
    return {'strategy': 'beam', 'beam_size': int(name[4:])}
  raise app.UsageError(f'--strategies: {name!r}; use greedy, sample or beamK (e.g. beam4).')


def _common(config, vocab_size: int, num_params: int) -> dict:
  import jax  # noqa: PLC0415
  m = config.model
  return {'model': f'{m.num_layers}x{m.d_model}', 'heads': m.num_heads, 'vocab': vocab_size,
          'context': m.max_len, 'params': num_params, 'dtype': m.dtype,
          'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'prompt_len': _PROMPT_LEN.value, 'new_tokens': _NEW_TOKENS.value}


def bench_decode_lmjax(config, vocab_size: int) -> list[dict]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lmjax import decode, models  # noqa: PLC0415
  from lmjax.models import transformer  # noqa: PLC0415

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
      cache_len = decode.buffer_length(prompt_len + new_tokens, config.model.max_len)
      tokens_to_logits, state = transformer.decode_fns(decode_model, params, batch_size=rows,
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
      _, prompt_state = transformer.decode_fns(decode_model, params, batch_size=batch,
                                               cache_len=cache_len)

      def run():
        return decode.generate(tokens_to_logits, prompt_state, prompts,
                               max_new_tokens=new_tokens,
                               max_len=config.model.max_len, **options)
      start = time.perf_counter()
      run()
      first_s = time.perf_counter() - start
      generate_s = _median_seconds(run, _REPEATS.value)
      results.append({
          'bench': 'decode', 'impl': 'lmjax', **common, 'batch': batch, 'strategy': name,
          'compile_s': round(first_s - generate_s, 2),
          'prefill_ms': round(1e3 * prefill_s, 2),
          'cached_step_ms': round(1e3 * step_s, 2),
          'recompute_step_ms': round(1e3 * recompute_s, 2),
          'generate_s': round(generate_s, 3),
          'per_token_ms': round(1e3 * (generate_s - prefill_s) / new_tokens, 2),
          'tokens_per_s': round(batch * new_tokens / generate_s, 1),
      })
      print(json.dumps(results[-1]), flush=True)
  return results


def bench_decode_hf(config, vocab_size: int) -> list[dict]:
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError:
    raise app.UsageError("--compare_hf needs the 'hf' extra: pip install -e '.[hf]'") from None
  import numpy as np  # noqa: PLC0415

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
      results.append({
          'bench': 'decode', 'impl': f'hf-transformers {transformers.__version__}', **common,
          'batch': batch, 'strategy': name, 'compile_s': 0.0,
          'prefill_ms': round(1e3 * prefill_s, 2),
          'cached_step_ms': round(1e3 * step_s, 2),
          'recompute_step_ms': round(1e3 * recompute_s, 2),
          'generate_s': round(generate_s, 3),
          'per_token_ms': round(1e3 * (generate_s - prefill_s) / new_tokens, 2),
          'tokens_per_s': round(batch * new_tokens / generate_s, 1),
      })
      print(json.dumps(results[-1]), flush=True)
  return results


_TABLE_COLUMNS = ('impl', 'model', 'batch', 'strategy', 'prefill_ms', 'cached_step_ms',
                  'recompute_step_ms', 'per_token_ms', 'tokens_per_s')


def _markdown(results: list[dict]) -> str:
  lines = ['| ' + ' | '.join(_TABLE_COLUMNS) + ' |',
           '|' + '---|' * len(_TABLE_COLUMNS)]
  for r in results:
    lines.append('| ' + ' | '.join(str(r.get(c, '')) for c in _TABLE_COLUMNS) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.model.name != 'transformer':
    raise app.UsageError(f'model.name={config.model.name!r}: only the transformer is '
                         'benchmarked so far.')
  if _PROMPT_LEN.value + _NEW_TOKENS.value > config.model.max_len:
    raise app.UsageError(
        f'--prompt_len={_PROMPT_LEN.value} + --new_tokens={_NEW_TOKENS.value} exceeds the '
        f"model's context (model.max_len={config.model.max_len}); lower one of them.")
  for name in _STRATEGIES.value:
    _strategy(name)
  vocab_size = _vocab_size(config)
  results = []
  if 'decode' in _BENCH.value:
    results += bench_decode_lmjax(config, vocab_size)
    if _COMPARE_HF.value:
      results += bench_decode_hf(config, vocab_size)
  if _TABLE.value:
    print(_markdown(results))


if __name__ == '__main__':
  app.run(main)
