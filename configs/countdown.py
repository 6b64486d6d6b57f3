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
  else:
    raise UserError(f"unknown variant {variant!r} of configs/countdown.py; use '' or 'tiny'")
  return c
