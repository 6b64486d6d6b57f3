"""A small character-level GPT that solves Countdown arithmetic puzzles (lmjax/data/puzzles.py).

  python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
  python experiments/tot.py --workdir=runs/countdown      # greedy vs beam vs tree search

Each training document is one puzzle line and a worked solution, e.g.
"4 7 8 9 -> 34\\n9-7=2\\n8*4=32\\n32+2=34"; documents are packed into windows with the
end-of-text id between them, as any corpus is. The model is the one tree-of-thought
search is studied with (docs/guide/tree-of-thought.md).

Variants (the text after ':'):
  (none)  4 layers x 192 wide, context 64, batch 64, 2500 steps: about 25 minutes on 2 CPU
          cores.
  tiny    2 layers x 64 wide, 60 steps: seconds; what the tests train.
  completion       prompt -> completion: the puzzle line is the prompt, its solution the
                   completion, and only the solution (and its end) is scored; examples
                   packed in rows of 128, 32 rows a step (the default's tokens per step).
  completion_tiny  the same with tiny's model, 30 steps: what the tests train.
"""
import ml_collections

from lmjax import config
from lmjax.errors import UserError


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = config.base_config()
  # 120,833 training examples, under 3 epochs: no need to regularise.
  c.model.update(d_model=192, max_len=64, dropout=0.0)
  # The puzzles' TFDS dataset, built from the rules (no download); its validation split holds
  # puzzles with other numbers or targets.
  c.data.name = 'countdown'
  c.opt.update(lr=2e-3, warmup_steps=100)
  # A puzzle and its solution take about 36 characters.
  c.train.update(num_steps=2500, seq_len=64, eval_every=500, checkpoint_every=500,
                 log_every=100, sample_prompt='4 7 8 9 -> 34\n', sample_tokens=24)

  if variant == '':
    pass
  elif variant == 'tiny':
    c.model.update(num_layers=2, d_model=64)
    c.opt.update(lr=3e-3, min_lr=3e-4, warmup_steps=10)
    c.train.update(num_steps=60, batch_size=16, eval_batch_size=64, eval_every=60,
                   checkpoint_every=60, log_every=20)
    c.mesh.cpu_devices = 1  # one device, also in a process that presents more
  elif variant in ('completion', 'completion_tiny'):
    c.data.format = 'completion'
    # About three puzzles to a row; greedy completions of 16 validation puzzles at each
    # evaluation give eval/solve_rate.
    c.model.max_len = 128
    c.train.update(seq_len=128, batch_size=32, sample_tokens=32, eval_completions=16)
    if variant == 'completion_tiny':
      c.model.update(num_layers=2, d_model=64)
      c.opt.update(lr=3e-3, min_lr=3e-4, warmup_steps=5)
      c.train.update(num_steps=30, batch_size=16, eval_batch_size=64, eval_every=30,
                     checkpoint_every=30, log_every=10, eval_completions=4)
      c.mesh.cpu_devices = 1  # one device, also in a process that presents more
  else:
    raise UserError(f'unknown variant {variant!r} of configs/countdown.py; use one of '
                    "'', 'tiny', 'completion', 'completion_tiny'")
  return c
