"""Author attribution: is a passage Shakespeare's or Milton's? A sequence classifier on the
`authorship` TFDS dataset (passages of up to 256 characters; train, validation and test
passages come from different works, the same held-out works as the language-model
corpora's).

  python experiments/train.py --config=configs/authorship.py --workdir=runs/authorship/scratch
  python experiments/train.py --config=configs/authorship.py --workdir=runs/authorship/tuned \
      --config.init_from.workdir=runs/authorship/lm_base
  python experiments/evaluate.py --workdir=runs/authorship/tuned --split=test

The base of the second run is a character language model of the same shape trained on
Shakespeare (docs/guide/tasks.md#classification gives its command). The classifier
keeps all of its parameters and adds a head on the final state at the passage's last
character; its tokenizer is the base's, so the few symbols of Milton's text that
Shakespeare's lacks are dropped (data.drop_unknown_chars).

Variants (the text after ':'):
  (none)  the Transformer: 4 layers x 128 wide, reading a passage's first 128 characters,
          batch 32, 400 steps (the shape of shakespeare_char.py:cpu with a 128 context).
  lstm    a 2 x 512 LSTM with 128-wide embeddings (rnn_shakespeare_char.py:lstm's shape).
  tiny    2 layers x 64, 32 characters, 30 steps: seconds; what the tests train.
"""
import ml_collections

from lmjax import config
from lmjax.errors import UserError


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = config.base_config()
  # A base trained on one author's text lacks a few of the other's symbols.
  c.data.update(name='authorship', drop_unknown_chars=True)
  c.opt.warmup_steps = 40
  # 400 steps of 32 passages: 12,800, about half an epoch. Each passage's loss is weighed by
  # the inverse of its class's share, so that both authors count alike (Shakespeare has 5.3
  # times as many passages).
  c.train.update(num_steps=400, batch_size=32, checkpoint_every=200, log_every=50,
                 balance_classes=True)

  if variant == '':
    c.model.max_len = 128
  elif variant == 'lstm':
    c.model.update(name='lstm', num_layers=2)
  elif variant == 'tiny':
    c.model.update(num_layers=2, d_model=64, max_len=32, dropout=0.0)
    c.opt.update(lr=3e-3, warmup_steps=5)
    c.train.update(num_steps=30, batch_size=16, seq_len=32, eval_batch_size=64,
                   eval_every=15, checkpoint_every=15, log_every=15)
    c.mesh.cpu_devices = 1  # one device, also in a process that presents more
  else:
    raise UserError(f'unknown variant {variant!r} of configs/authorship.py; use '
                    "'', 'lstm' or 'tiny'")
  return c
