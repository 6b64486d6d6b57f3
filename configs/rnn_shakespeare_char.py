"""Recurrent character-level language models (LSTM, GRU, Elman RNN) on Shakespeare.

  python experiments/train.py --config=configs/rnn_shakespeare_char.py:lstm --workdir=runs/lstm
  python experiments/decode.py --workdir=runs/lstm --prompt='ROMEO:' --strategy=beam

Variants (the text after ':'):
  lstm      2 layers x 512 (char-rnn's classic size, 3.4M parameters), stateful truncated
            BPTT over windows of 128 characters, batch 64, 500 steps (about 0.9 of an epoch
            of the 4.5M-character training split; about 9.5 minutes on 2 CPU cores at the
            benchmark's 1.0 s a step), dropout 0.1
            between layers and on the output.
  gru, rnn  the same with GRU or Elman (tanh) cells.
  lstm_spm  the LSTM on a 1000-piece SentencePiece (BPE) vocabulary instead of characters,
            over windows of 48 pieces.
  awd       the LSTM with the AWD-LSTM regularisers: locked dropout, embedding dropout and
            DropConnect on the hidden-to-hidden weights.
  laptop    the GRU 2 x 256, batch 32, learning rate 3e-3, 1000 steps (0.9 of an epoch), no
            dropout: the best of configs/shakespeare_char.py's `laptop` sweep, and what
            `make train` trains on a CPU.
  tiny      1 layer x 64, 60 steps: seconds; what the tests train.
Any variant also takes an override, e.g. --config.train.stateful=False trains on
independent shuffled windows (the carry starts at zero in every window), as the
Transformer does.
"""
import ml_collections

from lmjax import config
from lmjax.errors import UserError


def get_config(variant: str = 'lstm') -> ml_collections.ConfigDict:
  c = config.base_config()
  # char-rnn's classic size: 2 layers of 512 (model.hidden_size) over 128-wide embeddings.
  c.model.update(name='lstm', num_layers=2)
  # char-rnn's Adam learning rate; dropout regularises here, not weight decay.
  c.opt.update(lr=2e-3, warmup_steps=50, weight_decay=0.0)
  # 500 steps of 64 x 128 characters: 4.1M, 0.9 of an epoch. Stateful: truncated BPTT, each
  # row's carry passing to the next window of its stream; evaluation reads the whole split.
  c.train.update(num_steps=500, stateful=True, eval_batch_size=16, eval_every=250,
                 checkpoint_every=250, keep_checkpoints=3, log_every=25)

  if variant in ('lstm', ''):
    pass
  elif variant in ('gru', 'rnn'):
    c.model.name = variant
  elif variant == 'lstm_spm':
    c.data.update(tokenizer='sentencepiece', vocab_size=1000)
    # A piece is about 2.3 characters of this corpus (2.0M pieces for 4.5M characters):
    # 48 pieces cover about 110 characters, and 500 steps read 3.5M characters' worth.
    c.train.update(seq_len=48, sample_tokens=80)
  elif variant == 'awd':
    c.model.update(locked_dropout=True, embed_dropout=0.1, weight_dropout=0.3, dropout=0.3)
  elif variant == 'laptop':  # docs/results.md#recipes
    c.model.update(name='gru', hidden_size=256, dropout=0.0)  # under an epoch: no dropout
    c.opt.update(lr=3e-3)
    c.train.update(num_steps=1000, batch_size=32, eval_every=1000, log_every=50)
  elif variant == 'tiny':
    c.model.update(num_layers=1, d_model=32, hidden_size=64, dropout=0.0)
    c.opt.update(lr=1e-2, warmup_steps=5)
    c.train.update(num_steps=60, batch_size=16, seq_len=32, eval_batch_size=8,
                   eval_every=30, checkpoint_every=30, log_every=10, sample_tokens=20)
    c.mesh.cpu_devices = 1  # one device, also in a process that presents more
  else:
    raise UserError(f'unknown variant {variant!r} of configs/rnn_shakespeare_char.py; use '
                    "'lstm', 'gru', 'rnn', 'lstm_spm', 'awd', 'laptop' or 'tiny'")
  return c
