"""What an accelerator gives lmjax, measured in one run of a few minutes.

  python experiments/accelerator_check.py --output=runs/accelerator_check.json
  python experiments/accelerator_check.py --tiny --output=/tmp/check.json  # CPU, tiny models

On the GPU or TPU that JAX finds (its devices all, as training uses them), with
experiments/benchmark.py's measurements:

  1. GPT-2 124M's train step (configs/gpt2.py:small: batches of 480 x 1024 tokens in 15
     microbatches, bfloat16, GPT-2's 50,257-token vocabulary): tokens/s and MFU, with
     model.attention=cudnn (cuDNN's flash attention; NVIDIA GPUs only) and with
     dot_product (XLA's attention).
  2. configs/shakespeare_char.py:full's train step, --shakespeare_steps timed steps, and the
     wall time its whole run of 5000 steps would take: compiling, the steps, and the
     blocking part of each checkpoint save (measured too). Its evaluations and samples are
     not counted.
  3. Decoding with lmjax's decoder (GPT-2 124M's shape, greedy, prompts of 64 tokens, 128
     new ones, batches of 1 and 8): tokens/s. Beside it, Hugging Face transformers'
     `generate` on the same GPU in bfloat16, where transformers is installed and torch sees
     the GPU (a CPU-only torch, or one built for a newer driver, is skipped with the reason).

Weights and tokens are random: speed does not depend on them, and nothing is downloaded.
Prints one table (progress and each measurement's JSON go to stderr; its `ms` column is a
train step's, a decoded token's, or what a checkpoint save blocks training for) and writes
every figure to --output as JSON. A measurement that fails (out of memory, a kernel the
device lacks) is recorded with its message and the others still run; the exit status is
then 1.

--tiny shrinks every model and batch and lets the CPU stand in for the accelerator: the
script's plumbing checked in well under a minute (tests/test_accelerator_check.py), no
figure worth reading.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time

from absl import flags

from lmjax.errors import UserError, one_line, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUTPUT = flags.DEFINE_string('output', '', 'Write every figure here as JSON; empty: do not.')
_TINY = flags.DEFINE_bool('tiny', False, 'Tiny models and batches, the CPU allowed: checks '
                          'the script itself.')
_GPT2_STEPS = flags.DEFINE_integer('gpt2_steps', 5, 'GPT-2 train steps timed, for each '
                                   'attention.', lower_bound=1)
_SHAKESPEARE_STEPS = flags.DEFINE_integer('shakespeare_steps', 100, 'Shakespeare train steps '
                                          'timed.', lower_bound=1)
_HF = flags.DEFINE_bool('hf', True, "Time Hugging Face transformers' generate beside lmjax's "
                        'decoder, where torch sees a GPU.')

GPT2_VOCAB = 50257
# The characters of the embedded Shakespeare, the vocabulary its training builds (reading
# the corpus would need it prepared: make data).
SHAKESPEARE_VOCAB = 85


def _benchmark():
  """experiments/benchmark.py as a module. Its flags are defined now, after this script's
  were parsed: they keep their defaults until `_set_flags` changes them, and its required
  --config is never asked for, as the measurements take their config as an argument."""
  spec = importlib.util.spec_from_file_location(
      'lmjax_benchmark', os.path.join(ROOT, 'experiments', 'benchmark.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _set_flags(**values) -> None:
  """Sets benchmark.py's flags (--steps, --batch_sizes, ...) for the next measurement."""
  for name, value in values.items():
    setattr(flags.FLAGS, name, value)


def _config(path: str, variant: str = ''):
  """`get_config(variant)` of configs/PATH, as --config=configs/PATH:VARIANT loads it."""
  spec = importlib.util.spec_from_file_location(
      'lmjax_config_' + path.removesuffix('.py'), os.path.join(ROOT, 'configs', path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _gpt2(attention: str, tiny: bool):
  """configs/gpt2.py:small with `attention`; with `tiny`, one layer 32 wide, batches of 4."""
  config = _config('gpt2.py', 'small')
  config.model.attention = attention
  if tiny:
    config.model.update(num_layers=1, num_heads=2, d_model=32, max_len=32)
    config.train.update(batch_size=4, microbatches=1, seq_len=32, eval_batch_size=4)
  return config


def _shakespeare(tiny: bool):
  """configs/shakespeare_char.py:full; with `tiny`, one layer 32 wide, batches of 4."""
  config = _config('shakespeare_char.py', 'full')
  if tiny:
    config.model.update(num_layers=1, num_heads=2, d_model=32, max_len=32)
    config.train.update(batch_size=4, seq_len=32, eval_batch_size=4)
  return config


def _projected_run(config, train: dict, checkpoint: dict) -> dict:
  """The wall time of the config's whole run from one timed train benchmark and one
  checkpoint benchmark: compiling, every step, and what each save blocks the loop for."""
  t = config.train
  saves = math.ceil(t.num_steps / t.checkpoint_every)
  seconds = (train['compile_s'] + t.num_steps * train['step_ms'] / 1e3
             + saves * checkpoint['save_blocking_s'])
  return {'num_steps': t.num_steps, 'checkpoint_saves': saves,
          'evaluations_not_counted': t.num_steps // t.eval_every,
          'projected_s': round(seconds, 1), 'projected_min': round(seconds / 60, 2)}


def _hf_decode(config, vocab_size: int, tiny: bool) -> list[dict]:
  """Hugging Face transformers' GPT-2 of the config's shape (random weights) generating on
  torch's GPU, bfloat16, greedy, at each batch size: tokens/s. With `tiny` and no GPU, on
  torch's CPU in float32, to check this code. Raises `_Skipped` where it cannot run."""
  try:
    import torch
    import transformers
  except ImportError:
    raise _Skipped("transformers or torch is not installed (pip install -e '.[hf]')") from None
  if torch.cuda.is_available():
    device, dtype = 'cuda', torch.bfloat16
  elif tiny:
    device, dtype = 'cpu', torch.float32
  else:
    raise _Skipped(f'torch {torch.__version__} sees no GPU')
  m, flag = config.model, flags.FLAGS
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
      n_head=m.num_heads, activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)).to(device, dtype).eval()
  model.generation_config.update(eos_token_id=None, pad_token_id=0)
  generator = torch.Generator(device='cpu').manual_seed(0)
  results = []
  for batch in map(int, flag.batch_sizes):
    prompts = torch.randint(0, vocab_size, (batch, flag.prompt_len), generator=generator)
    prompts = prompts.to(device)

    def run():
      with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                       max_new_tokens=flag.new_tokens, min_new_tokens=flag.new_tokens)
      if device == 'cuda':
        torch.cuda.synchronize()

    start = time.perf_counter()
    run()  # the first call sets up kernels and the allocator
    first_s = time.perf_counter() - start
    times = []
    for _ in range(flag.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    generate_s = statistics.median(times)
    results.append({'bench': 'decode', 'impl': f'hf-transformers {transformers.__version__}',
                    'device': f'torch {torch.__version__} {device}', 'dtype': str(dtype),
                    'batch': batch, 'strategy': 'greedy', 'prompt_len': flag.prompt_len,
                    'new_tokens': flag.new_tokens, 'first_call_s': round(first_s, 2),
                    'generate_s': round(generate_s, 3),
                    'tokens_per_s': round(batch * flag.new_tokens / generate_s, 1)})
    print(json.dumps(results[-1]), flush=True)
  return results


class _Skipped(Exception):
  """A measurement this machine cannot make; its message says why."""


def _measurements(bench, platform: str, tiny: bool) -> list[tuple[str, str, object]]:
  """(key, what it measures, a function making it) for each measurement, in order."""
  steps, warmup = (2, 1) if tiny else (_GPT2_STEPS.value, 2)
  decode_flags = (dict(batch_sizes=['2'], prompt_len=8, new_tokens=8, repeats=1) if tiny else
                  dict(batch_sizes=['1', '8'], prompt_len=64, new_tokens=128, repeats=3))
  gpt2_vocab = 256 if tiny else GPT2_VOCAB
  shakespeare = _shakespeare(tiny)

  def train(attention):
    def measure():
      if attention == 'cudnn' and platform != 'gpu':
        raise _Skipped(f'cuDNN attention needs an NVIDIA GPU; this is a {platform}')
      _set_flags(steps=steps, warmup=warmup)
      return bench.bench_train(_gpt2(attention, tiny), gpt2_vocab)
    return measure

  def shakespeare_train():
    _set_flags(steps=3 if tiny else _SHAKESPEARE_STEPS.value, warmup=1 if tiny else 5)
    return bench.bench_train(shakespeare, SHAKESPEARE_VOCAB)

  def decode():
    _set_flags(strategies=['greedy'], **decode_flags)
    return bench.bench_decode_lmjax(_gpt2('dot_product', tiny), gpt2_vocab)

  def hf_decode():
    if not _HF.value:
      raise _Skipped('--nohf')
    _set_flags(**decode_flags)
    return _hf_decode(_gpt2('dot_product', tiny), gpt2_vocab, tiny)

  return [
      ('gpt2_train_cudnn', 'GPT-2 124M train step, cuDNN attention', train('cudnn')),
      ('gpt2_train_xla', 'GPT-2 124M train step, XLA attention', train('dot_product')),
      ('shakespeare_train', 'shakespeare_char:full train step', shakespeare_train),
      ('shakespeare_checkpoint', 'shakespeare_char:full checkpoint save',
       lambda: bench.bench_checkpoint(shakespeare, SHAKESPEARE_VOCAB)),
      ('decode_lmjax', "GPT-2 124M decoding, lmjax's decoder", decode),
      ('decode_hf', 'GPT-2 124M decoding, Hugging Face transformers', hf_decode),
  ]


def _rows(results: dict) -> list[dict]:
  """The table: one row per figure (a decode measurement has one per batch size), or the
  reason a measurement was skipped or failed."""
  titles = {'gpt2_train_cudnn': 'GPT-2 124M train, cuDNN attention',
            'gpt2_train_xla': 'GPT-2 124M train, XLA attention',
            'shakespeare_train': 'shakespeare_char:full train',
            'shakespeare_checkpoint': 'shakespeare_char:full checkpoint save',
            'decode_lmjax': 'GPT-2 124M decode, lmjax', 'decode_hf': 'GPT-2 124M decode, HF'}
  rows = []
  for key, title in titles.items():
    result = results[key]
    if 'skipped' in result or 'error' in result:
      note = (f'skipped: {result["skipped"]}' if 'skipped' in result
              else f'error: {result["error"][:100]}')
      rows.append({'measurement': title, 'note': note})
    elif key.startswith('decode'):
      for r in result['runs']:
        rows.append({'measurement': f'{title}, batch {r["batch"]}',
                     'tokens_per_s': r['tokens_per_s'],
                     'ms': r.get('per_token_ms'), 'compile_s': r.get('compile_s'),
                     'note': f'{r["prompt_len"]}-token prompts, {r["new_tokens"]} new; '
                             f'{r["device"]}'})
    elif key == 'shakespeare_checkpoint':
      rows.append({'measurement': title, 'ms': round(1e3 * result['save_blocking_s'], 1),
                   'note': f'what a save blocks training for; {result["bytes"] / 1e6:.1f} MB '
                           f'written in {result["save_total_s"]} s'})
    else:
      note = f'{result["batch"]} x {result["seq_len"]} tokens a step'
      if key == 'shakespeare_train':
        p = result.get('projection')
        note += (f'; whole run ({p["num_steps"]} steps) projected {p["projected_min"]} min, '
                 f'{p["evaluations_not_counted"]} evaluations not counted' if p else
                 '; no projection without the checkpoint save')
      rows.append({'measurement': title, 'tokens_per_s': result['tokens_per_s'],
                   'mfu': result['mfu'], 'ms': result['step_ms'],
                   'compile_s': result['compile_s'], 'note': note})
  return rows


def _table(rows: list[dict]) -> str:
  """The rows as a Markdown table."""
  columns = ('measurement', 'tokens_per_s', 'mfu', 'ms', 'compile_s', 'note')
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join('' if row.get(c) is None else str(row[c])
                                   for c in columns) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]}')
  import jax
  device = jax.devices()[0]
  tiny = _TINY.value
  if device.platform == 'cpu' and not tiny:
    raise UserError('JAX finds no GPU or TPU here, only the CPU. Install the accelerator\'s '
                    "extra (pip install -e '.[cuda]' or '.[tpu]'); on a CPU, --tiny checks "
                    'this script with tiny models.')
  bench = _benchmark()
  platform = device.platform
  measurements = _measurements(bench, platform, tiny)
  results, started = {}, time.perf_counter()
  for i, (key, what, measure) in enumerate(measurements, 1):
    print(f'[{i}/{len(measurements)}] {what} ...', file=sys.stderr, flush=True)
    try:
      with contextlib.redirect_stdout(sys.stderr):  # benchmark.py's JSON lines
        value = measure()
    except _Skipped as e:
      results[key] = {'skipped': str(e)}
    except Exception as e:  # noqa: BLE001 - one failure must not lose the other figures
      results[key] = {'error': f'{type(e).__name__}: {one_line(e)}'}
    else:
      results[key] = {'runs': value} if isinstance(value, list) else value
    for outcome in ('skipped', 'error'):
      if outcome in results[key]:
        print(f'  {outcome}: {results[key][outcome]}', file=sys.stderr, flush=True)
  train, checkpoint = results['shakespeare_train'], results['shakespeare_checkpoint']
  if 'step_ms' in train and 'save_blocking_s' in checkpoint:
    train['projection'] = _projected_run(_shakespeare(tiny), train, checkpoint)
  rows = _rows(results)
  report = {'device': device.device_kind, 'platform': platform,
            'device_count': jax.device_count(), 'jax': jax.__version__, 'tiny': tiny,
            'total_s': round(time.perf_counter() - started, 1), 'table': rows,
            'measurements': results}
  print(f'{device.device_kind} x {jax.device_count()}, jax {jax.__version__}'
        f'{" (--tiny)" if tiny else ""}, {report["total_s"]} s')
  print(_table(rows), flush=True)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(report, f, indent=1)
  failed = [key for key, r in results.items() if 'error' in r]
  if failed:
    raise UserError(f'{len(failed)} measurement(s) failed: {", ".join(failed)}; their '
                    'messages are in the table' + (f' and in {_OUTPUT.value}'
                                                   if _OUTPUT.value else '') + '.')


if __name__ == '__main__':
  run_script(main)
