"""Character-level models of the embedded Shakespeare corpus: a GPT, or a GRU for a CPU.

  python experiments/train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char
  python experiments/train.py --config=configs/shakespeare_char.py:cpu --workdir=runs/cpu

Variants (the text after ':'):
  (none)    `full` where JAX has an NVIDIA GPU or a TPU (device node and plugin installed),
            `laptop` otherwise; the run's first line says which, and why.
  full      6 layers x 384 wide, context 256, batch 64 (the nanoGPT shakespeare_char size)
            for 5000 steps (warmup 100): a GPU's job.
  laptop    configs/rnn_shakespeare_char.py:laptop, a GRU: validation loss about 1.48 in
            about 5 minutes on 2 CPU cores, the best of the `laptop` sweep below.
  full_cpu  the `full` model for 32 steps, the batch in 16 slices over 2 CPU devices, attention
            in blocks of 64 queries (about 5.3 s a step on 2 cores): the training benchmarks'.
  cpu       4 layers x 128 wide, context 64, batch 12, 2000 steps (nanoGPT's CPU example).
  mlm       the `cpu` model as a bidirectional encoder (model.causal=False) trained as a
            masked LM (15% of characters selected: 80% masked, 10% random, 10% kept) over
            windows of 128: the base of configs/authorship.py's encoder.
  tiny      2 layers x 64 wide, 80 steps: seconds; what the tests train.

Sweeps (experiments/sweep.py --config=configs/shakespeare_char.py:ARG --workdir=ROOT):
  cpu     learning rate x width on the `cpu` recipe: 6 points, about 2 minutes each.
  laptop  GRU width x batch x learning rate, steps sized for about 5 minutes each: 5 points.
  tiny    two learning rates on the `tiny` recipe (the tests run it).
A point's overrides apply to `get_config(ARG)`, the same ARG.
"""
import ml_collections

from lmjax import config, runtime, sweep
from lmjax.errors import UserError

rnn_shakespeare_char = config.sibling(__file__, 'rnn_shakespeare_char.py')


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant == '':
    kind, why = runtime.find_accelerator()
    c = get_config('full' if kind else 'laptop')
    c.train.recipe = (f'Recipe :full, for {kind}: {why}.' if kind else
                      f'Recipe :laptop, for a CPU ({why}); :full is the GPU-sized one.')
    return c
  if variant == 'laptop':  # a GRU, which learns faster per CPU-second here than a GPT
    return rnn_shakespeare_char.get_config('laptop')
  c = config.base_config()
  c.model.update(num_layers=6, num_heads=6, d_model=384, dropout=0.2)
  c.train.update(seq_len=256, eval_batch_size=64, eval_every=32, keep_checkpoints=3)
  # On 2 cores: the full-size step 14% faster on 2 devices, `:cpu`'s loop 1.3x faster on 1.
  c.mesh.cpu_devices = 1 if variant == 'cpu' else 2

  if variant == 'full_cpu':
    # On a CPU the step runs faster in slices than whole (16 slices of 4: 1.6x on 2 cores,
    # each slice's activations staying in cache), in a fraction of the memory; an accelerator
    # wants the whole batch at once (:full). With one all-reduce a step, 16 slices with
    # attention blocks of 64 beat 8 with blocks of 32: 5.19 against 5.41 s a step, interleaved
    # in one process; 32 slices 6.07 s, 4 slices 5.49 s.
    c.train.microbatches = 16
    # Causal attention in 4 blocks of 64 queries, skipping the masked blocks above the
    # diagonal (blocks of 32 5.51 s, 64 5.69 s, whole 5.83 s with an all-reduce a slice; with
    # one a step, 128 was level with 64); untried on accelerators, so not in :full.
    c.model.attention_block = 64
  elif variant == 'full':
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=5000, eval_every=250, checkpoint_every=500, log_every=10)
  elif variant == 'cpu':
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=64, dropout=0.0)
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=2000, batch_size=12, seq_len=64, eval_batch_size=64, eval_every=1000,
                   checkpoint_every=500, log_every=100, sample_tokens=56, steps_per_dispatch=10)
  elif variant == 'mlm':
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=128, dropout=0.0,
                   causal=False)
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=2000, batch_size=12, seq_len=128, eval_batch_size=256,
                   eval_every=500, checkpoint_every=500, log_every=100)
  elif variant == 'tiny':
    c.model.update(num_layers=2, num_heads=4, d_model=64, max_len=32, dropout=0.0)
    c.opt.update(lr=3e-3, min_lr=3e-4, warmup_steps=10)
    c.train.update(num_steps=80, batch_size=16, seq_len=32, eval_batch_size=64, eval_batches=8,
                   eval_every=40, checkpoint_every=40, log_every=20, sample_tokens=20)
    # Seconds long: one device where a process has more (the tests' 8); 16k of 245k eval tokens.
    c.mesh.cpu_devices = 1
  else:
    raise UserError(f'unknown variant {variant!r} of configs/shakespeare_char.py; '
                    "use '', 'full', 'laptop', 'full_cpu', 'cpu', 'mlm' or 'tiny'")
  return c


def get_sweep(variant: str = '') -> list[dict]:
  """Points of a sweep over `get_config(variant)`: override dicts, field -> value."""
  if variant == 'cpu':
    return sweep.grid({'opt.lr': [3e-4, 1e-3, 3e-3], 'model.d_model': [64, 128],
                       'train.eval_every': [500]})
  if variant == 'laptop':  # each point about 5 minutes of training on 2 cores
    return [{'model.hidden_size': h, 'train.batch_size': b, 'opt.lr': lr, 'train.num_steps': n}
            for h, b, lr, n in [(512, 32, 2e-3, 375), (384, 32, 2e-3, 650), (384, 32, 3e-3, 650),
                                (256, 32, 3e-3, 1000), (384, 64, 3e-3, 360)]]
  if variant == 'tiny':
    return sweep.grid({'opt.lr': [3e-3, 1e-2]})
  raise UserError(f'no sweep for variant {variant!r} of configs/shakespeare_char.py; '
                  "use 'cpu', 'laptop' or 'tiny'")
