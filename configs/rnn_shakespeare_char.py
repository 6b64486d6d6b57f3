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
  tiny      1 layer x 64, 60 steps: seconds; what the tests train.
Any variant also takes an override, e.g. --config.train.stateful=False trains on
independent shuffled windows (the carry starts at zero in every window), as the
Transformer does.
"""
import ml_collections

from lmjax import sharding


def get_config(variant: str = 'lstm') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'lstm'  # lstm | gru | rnn (Elman, tanh)
  c.model.num_layers = 2  # recurrent layers
  c.model.d_model = 128  # embedding width
  c.model.hidden_size = 512  # carry width of every layer; 0 means d_model
  c.model.tie_embeddings = False  # output layer = embedding^T (after a projection if widths differ)
  c.model.dropout = 0.1  # dropout between layers and on the output
  c.model.embed_dropout = 0.0  # dropout on the embeddings
  c.model.weight_dropout = 0.0  # DropConnect on hidden-to-hidden weights (AWD-LSTM)
  c.model.locked_dropout = False  # one dropout mask per sequence for all time steps
  c.model.scan_unroll = 1  # time steps per iteration of the compiled loop (speed only)
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.model.param_dtype = 'float32'  # storage dtype of the parameters

  c.data = ml_collections.ConfigDict()
  # shakespeare | milton (lmjax's own TFDS datasets), or 'tfds:NAME' for any prepared TFDS
  # text dataset, NAME as TFDS writes it: 'tfds:lm1b', 'tfds:c4/en:3.0.1' (lmjax/data/external.py)
  c.data.name = 'shakespeare'
  c.data.data_dir = ''  # TFDS data directory; '' means TFDS's default
  c.data.tokenizer = 'char'  # char | sentencepiece
  c.data.vocab_size = 0  # sentencepiece only: vocabulary size to train
  c.data.spm_model_type = 'bpe'  # sentencepiece only: bpe | unigram
  c.data.eval_split = 'validation'  # split read whole at every evaluation
  c.data.train_split = 'train'  # split trained on (a tfds: dataset's: TFDS syntax, 'train[:-1000]')
  c.data.text_feature = 'text'  # tfds: datasets only: the feature holding a document's text
  # Tokenizer to start from when the workdir has none: an lmjax workdir, or a directory with
  # GPT-2's vocab.json + merges.txt (data.tokenizer=gpt2_bpe); '' trains one here.
  c.data.tokenizer_dir = ''
  # tfds: datasets only: where each split is tokenized to, once (a file per dataset, split
  # and tokenizer; runs pointed at one directory share them); '' means WORKDIR/tokens.
  c.data.cache_dir = ''
  c.data.drop_unknown_chars = False  # char tokenizer: drop characters it has no id for

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 2e-3  # peak learning rate (char-rnn's Adam default)
  c.opt.min_lr = 1e-4  # learning rate at the end of the cosine decay
  c.opt.warmup_steps = 50  # linear warmup from 0
  c.opt.b1 = 0.9  # Adam first-moment decay
  c.opt.b2 = 0.99  # Adam second-moment decay
  c.opt.eps = 1e-8  # Adam epsilon
  c.opt.weight_decay = 0.0  # decoupled weight decay on matrices; dropout regularises here
  c.opt.grad_clip = 1.0  # clip gradients to this global norm (exploding gradients); 0 off

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 500  # optimizer steps: 4.1M characters, 0.9 of an epoch
  c.train.batch_size = 64  # global batch: contiguous streams when stateful
  # Gradient accumulation: the batch runs as this many slices, one after another, their
  # gradients summed (the same step in less memory); 1: the whole batch at once.
  c.train.microbatches = 1
  c.train.seq_len = 128  # characters per window (the BPTT length)
  # Truncated BPTT: each row's carry passes to the next window of its stream (gradients
  # stop at the window), reset at document boundaries; evaluation reads the whole split.
  c.train.stateful = True
  c.train.eval_batch_size = 16  # streams the evaluation split is cut into
  c.train.eval_every = 250  # steps between evaluations (and at the end)
  c.train.checkpoint_every = 250  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3  # how many recent checkpoints to keep
  c.train.log_every = 25  # steps between progress lines and train scalars
  c.train.seed = 0  # seeds init, data order and dropout
  # A step whose loss or gradient is NaN or Inf never updates the model; then 'stop'
  # ends the run (resume from the last checkpoint), 'skip' goes on and counts such steps.
  c.train.nonfinite = 'stop'
  # First and last step to trace with the JAX profiler (TensorBoard's profile tab),
  # e.g. (10, 12); () traces nothing.
  c.train.profile_steps = ()
  # Regular expressions over parameter names ('layer_0/attention/query/kernel'); what
  # they match is not trained (fine-tuning). () trains everything.
  c.train.freeze = ()
  c.train.sample_prompt = 'ROMEO:\n'  # prompt of the samples logged at each evaluation
  c.train.sample_tokens = 240  # length of that sample

  # Fine-tuning: start from another run's parameters and tokenizer (a fresh optimizer).
  c.init_from = ml_collections.ConfigDict()
  c.init_from.workdir = ''  # that run's workdir; '' starts from a random init
  c.init_from.step = 0  # its checkpoint to start from; 0 means its latest

  c.mesh = ml_collections.ConfigDict()
  # Devices along ('data', 'fsdp', 'tensor') within a slice or host; one entry may be -1 to
  # take what is left: (-1, 1, 1) data parallel, (1, -1, 1) FSDP, (2, 2, 2) all three.
  c.mesh.shape = (-1, 1, 1)
  # Slices (or hosts) along the same axes, for the slow links between them: e.g. (4, 1, 1)
  # runs data parallel across 4 hosts, mesh.shape within each. (1, 1, 1): one mesh.
  c.mesh.dcn_shape = (1, 1, 1)
  # Logical axis -> mesh axes (lmjax/sharding.py): the mesh shape picks the strategy.
  c.mesh.rules = sharding.RULES
  # With no accelerator, present the CPU as this many devices and split each batch over
  # them (lmjax/runtime.py split_cpu); 0 keeps JAX's one. No effect on a GPU or TPU.
  c.mesh.cpu_devices = 0

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
  elif variant == 'tiny':
    c.model.update(num_layers=1, d_model=32, hidden_size=64, dropout=0.0)
    c.opt.update(lr=1e-2, warmup_steps=5)
    c.train.update(num_steps=60, batch_size=16, seq_len=32, eval_batch_size=8,
                   eval_every=30, checkpoint_every=30, log_every=10, sample_tokens=20)
  else:
    raise ValueError(f'unknown variant {variant!r} of configs/rnn_shakespeare_char.py; use '
                     "'lstm', 'gru', 'rnn', 'lstm_spm', 'awd' or 'tiny'")
  c.lock()
  return c
