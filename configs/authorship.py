"""Author attribution: is a passage Shakespeare's or Milton's? A sequence classifier on the
`authorship` TFDS dataset (passages of up to 256 characters; train, validation and test
passages come from different works, the same held-out works as the language-model
corpora's).

  python experiments/train.py --config=configs/authorship.py --workdir=runs/authorship/scratch
  python experiments/train.py --config=configs/authorship.py --workdir=runs/authorship/tuned \
      --config.init_from.workdir=runs/authorship/lm_base
  python experiments/evaluate.py --workdir=runs/authorship/tuned --split=test

The base of the second run is a character language model of the same shape trained on
Shakespeare (the README's "Classification" section gives its command). The classifier
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

from lmjax import sharding


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  if variant == 'lstm':
    c.model.name = 'lstm'  # lstm | gru | rnn (Elman, tanh)
    c.model.num_layers = 2  # recurrent layers
    c.model.d_model = 128  # embedding width
    c.model.hidden_size = 512  # carry width of every layer; 0 means d_model
    # output layer = embedding^T: unused by a classifier, kept to match a base LM's shapes
    c.model.tie_embeddings = False
    c.model.dropout = 0.1  # dropout between layers and on the pooled state
    c.model.embed_dropout = 0.0  # dropout on the embeddings
    c.model.weight_dropout = 0.0  # DropConnect on hidden-to-hidden weights (AWD-LSTM)
    c.model.locked_dropout = False  # one dropout mask per sequence for all time steps
    c.model.scan_unroll = 1  # time steps per iteration of the compiled loop (speed only)
  else:
    c.model.name = 'transformer'  # decoder-only; the head reads the last real position
    c.model.num_layers = 4  # decoder blocks
    c.model.num_heads = 4  # attention heads; must divide d_model
    c.model.d_model = 128  # residual stream width
    c.model.d_ff = 0  # MLP hidden width; 0 means 4 * d_model
    c.model.max_len = 128  # size of the learned position table; >= train.seq_len
    c.model.dropout = 0.1  # dropout on embeddings, attention and residual branches
    # False: a bidirectional encoder (a masked-LM base); its head reads the mean state over
    # the passage
    c.model.causal = True
    # LoRA adapters (fine-tuning): rank 0 means none; above 0, only the adapters and the
    # classifier's head train.
    c.model.lora_rank = 0
    c.model.lora_alpha = 8.0  # adapters are scaled by lora_alpha / lora_rank
    # projections that get adapters: query key value out (attention), dense_in dense_out
    c.model.lora_targets = ('query', 'key', 'value', 'out', 'dense_in', 'dense_out')
    # dot_product: jax.nn.dot_product_attention (the backend's kernel) | cudnn: cuDNN's flash
    # attention (NVIDIA GPU, bfloat16) | einsum: the formula written out. A training step
    # with dropout > 0 takes einsum: only it drops probabilities.
    c.model.attention = 'dot_product'
    # Above 0, the einsum path (training with dropout) computes causal attention in blocks of
    # this many queries, skipping the masked blocks above the diagonal; 0: whole.
    c.model.attention_block = 0
    # recompute in the backward pass to save memory: none | full | save_dots (keeps the
    # weight matmuls, recomputes attention scores)
    c.model.remat = 'none'
    # True: one nn.scan over the blocks (compiles one), weights stacked under 'layers'
    c.model.scan_layers = False
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.model.param_dtype = 'float32'  # storage dtype of the parameters

  c.data = ml_collections.ConfigDict()
  c.data.name = 'authorship'  # TFDS classification dataset registered by lmjax.data
  c.data.data_dir = ''  # TFDS data directory; '' means TFDS's default
  c.data.tokenizer = 'char'  # char | sentencepiece (a fine-tuned run takes its base's)
  c.data.vocab_size = 0  # sentencepiece only: vocabulary size to train
  c.data.spm_model_type = 'bpe'  # sentencepiece only: bpe | unigram
  c.data.eval_split = 'validation'  # split scored at every evaluation
  c.data.train_split = 'train'  # split trained on: train | validation | test
  c.data.text_feature = 'text'  # unused: tfds: datasets are text to model, not classes
  # Tokenizer to start from when the workdir has none: an lmjax workdir, or a directory with
  # GPT-2's vocab.json + merges.txt (data.tokenizer=gpt2_bpe); '' trains one here.
  c.data.tokenizer_dir = ''
  c.data.cache_dir = ''  # unused: where tfds: datasets are tokenized to
  # char tokenizer: drop characters it has no id for (a base trained on one author lacks a
  # few of the other's symbols)
  c.data.drop_unknown_chars = True

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 1e-3  # peak learning rate, reached after warmup
  c.opt.min_lr = 1e-4  # learning rate at the end of the cosine decay
  c.opt.warmup_steps = 40  # linear warmup from 0
  c.opt.b1 = 0.9  # AdamW first-moment decay
  c.opt.b2 = 0.99  # AdamW second-moment decay
  c.opt.eps = 1e-8  # AdamW epsilon
  c.opt.weight_decay = 0.1  # decoupled weight decay, on matrices only
  c.opt.grad_clip = 1.0  # clip gradients to this global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 400  # optimizer steps (12,800 passages, about half an epoch)
  c.train.batch_size = 32  # global batch, in passages; divides by the data-parallel devices
  # Gradient accumulation: the batch runs as this many slices, one after another, their
  # gradients summed (the same step in less memory); 1: the whole batch at once.
  c.train.microbatches = 1
  c.train.seq_len = 128  # tokens read of each passage (the rest is cut)
  c.train.eval_batch_size = 256  # global batch for evaluation
  c.train.eval_every = 100  # steps between evaluations (and at the end)
  c.train.checkpoint_every = 200  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.log_every = 50  # steps between progress lines and train scalars
  c.train.seed = 0  # seeds init, data order and dropout
  # Weigh each passage's loss by the inverse of its class's share of the training split,
  # so that both authors count alike (Shakespeare has 5.3 times as many passages).
  c.train.balance_classes = True
  # A step whose loss or gradient is NaN or Inf never updates the model; then 'stop'
  # ends the run (resume from the last checkpoint), 'skip' goes on and counts such steps.
  c.train.nonfinite = 'stop'
  # First and last step to trace with the JAX profiler (TensorBoard's profile tab),
  # e.g. (10, 12); () traces nothing.
  c.train.profile_steps = ()
  # Regular expressions over parameter names ('layer_0/attention/query/kernel'); what
  # they match is not trained. () trains everything.
  c.train.freeze = ()

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

  if variant in ('', 'lstm'):
    pass
  elif variant == 'tiny':
    c.model.update(num_layers=2, num_heads=4, d_model=64, max_len=32, dropout=0.0)
    c.opt.update(lr=3e-3, warmup_steps=5)
    c.train.update(num_steps=30, batch_size=16, seq_len=32, eval_batch_size=64,
                   eval_every=15, checkpoint_every=15, log_every=15)
  else:
    raise ValueError(f'unknown variant {variant!r} of configs/authorship.py; use '
                     "'', 'lstm' or 'tiny'")
  c.lock()
  return c
