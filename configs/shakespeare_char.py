"""Character-level GPT on the embedded Shakespeare corpus.

  python experiments/train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char
  python experiments/train.py --config=configs/shakespeare_char.py:cpu --workdir=runs/cpu

Variants (the text after ':'):
  (none)  6 layers x 384 wide, context 256, batch 64 (the nanoGPT shakespeare_char size),
          for 32 steps: what `make train` runs on 2 CPU cores in minutes (about 5.3 s a
          step there: the batch in 16 slices over 2 CPU devices, attention in blocks of
          64 queries), so its sample is still rough.
  full    the same model for the full 5000 steps (warmup 100): a GPU's job.
  cpu     4 layers x 128 wide, context 64, batch 12, 2000 steps: a good model in minutes on a
          laptop CPU.
  mlm     the `cpu` model as a bidirectional encoder (model.causal=False) trained as a
          masked LM (15% of characters selected: 80% masked, 10% random, 10% kept) over
          windows of 128: the base of configs/authorship.py's encoder.
  tiny    2 layers x 64 wide, 80 steps: seconds; what the tests train.

Sweeps (experiments/sweep.py --config=configs/shakespeare_char.py:ARG --workdir=ROOT):
  cpu   learning rate x width on the `cpu` recipe: 6 points, about 2 minutes each.
  tiny  two learning rates on the `tiny` recipe (the tests run it).
A point's overrides apply to `get_config(ARG)`, the same ARG.
"""
import ml_collections

from lmjax import sharding, sweep


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer'  # transformer (the only family so far)
  c.model.num_layers = 6  # decoder blocks
  c.model.num_heads = 6  # attention heads; must divide d_model
  c.model.d_model = 384  # residual stream width
  c.model.d_ff = 0  # MLP hidden width; 0 means 4 * d_model
  c.model.max_len = 256  # size of the learned position table; >= train.seq_len
  c.model.dropout = 0.2  # dropout on embeddings, attention and residual branches
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.model.param_dtype = 'float32'  # storage dtype of the parameters
  # False: a bidirectional encoder trained as a masked LM (BERT's objective), not a decoder
  c.model.causal = True
  # LoRA adapters (fine-tuning): rank 0 means none; above 0, only the adapters train.
  c.model.lora_rank = 0
  c.model.lora_alpha = 8.0  # adapters are scaled by lora_alpha / lora_rank
  # projections that get adapters: query key value out (attention), dense_in dense_out (MLP)
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

  c.data = ml_collections.ConfigDict()
  # shakespeare | milton (lmjax's own TFDS datasets), or 'tfds:NAME' for any prepared TFDS
  # text dataset, NAME as TFDS writes it: 'tfds:lm1b', 'tfds:c4/en:3.0.1' (lmjax/data/external.py)
  c.data.name = 'shakespeare'
  c.data.data_dir = ''  # TFDS data directory; '' means TFDS's default (~/tensorflow_datasets)
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
  # Several corpora at once, 'DATASET:WEIGHT' each, e.g. ('shakespeare:0.7', 'milton:0.3'):
  # each training window comes from one, drawn by weight; each is evaluated on its own.
  # () reads data.name alone.
  c.data.mixture = ()

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 1e-3  # peak learning rate, reached after warmup
  c.opt.min_lr = 1e-4  # learning rate at the end of the cosine decay
  c.opt.warmup_steps = 8  # linear warmup from 0 (100 in the 5000-step :full run)
  c.opt.b1 = 0.9  # AdamW first-moment decay
  c.opt.b2 = 0.99  # AdamW second-moment decay
  c.opt.eps = 1e-8  # AdamW epsilon
  c.opt.weight_decay = 0.1  # decoupled weight decay, on matrices only
  c.opt.grad_clip = 1.0  # clip gradients to this global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 32  # optimizer steps in the whole run
  c.train.batch_size = 64  # global batch, in sequences; divides by the data-parallel devices
  # Gradient accumulation: the batch runs as this many slices, one after another, their
  # gradients summed (the same step in less memory); 1: the whole batch at once.
  c.train.microbatches = 1
  c.train.seq_len = 256  # tokens per training sequence
  c.train.eval_batch_size = 64  # global batch for evaluation
  c.train.eval_every = 32  # steps between evaluations (and at the end)
  c.train.checkpoint_every = 8  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3  # how many recent checkpoints to keep
  c.train.log_every = 1  # steps between progress lines and train scalars
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
  c.train.mask_rate = 0.15  # masked LM only: share of tokens selected for prediction
  c.train.sample_prompt = 'ROMEO:\n'  # prompt of the samples logged at each evaluation
  c.train.sample_tokens = 240  # length of that sample (prompt + sample <= model.max_len)

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
  # them (lmjax/runtime.py split_cpu); 0 keeps JAX's one. On 2 cores 2 devices make the
  # step 14% faster here (the `:cpu` recipe's loop: no change). No effect on a GPU or TPU.
  c.mesh.cpu_devices = 2

  if variant == '':
    # On a CPU the step runs faster in slices than whole (16 slices of 4: 1.6x on 2 cores,
    # each slice's activations staying in cache), in a fraction of the memory; an
    # accelerator wants the whole batch at once (:full). Since the step all-reduces once
    # rather than after every slice (lmjax/train.py), 16 slices with attention blocks of 64
    # beat 8 slices with blocks of 32: 5.19 against 5.41 s a step, interleaved in one
    # process (2026-12-01); 32 slices 6.07 s, 4 slices 5.49 s.
    c.train.microbatches = 16
    # Causal attention in 4 blocks of 64 queries, skipping the masked blocks above the
    # diagonal (16 slices, before the single all-reduce: blocks of 32 5.51 s, 64 5.69 s,
    # whole 5.83 s; with it, 128 was level with 64); untried on accelerators, so not in :full.
    c.model.attention_block = 64
  elif variant == 'full':
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=5000, eval_every=250, checkpoint_every=500, log_every=10)
  elif variant == 'cpu':
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=64, dropout=0.0)
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=2000, batch_size=12, seq_len=64, eval_batch_size=256,
                   eval_every=1000, checkpoint_every=500, log_every=100, sample_tokens=56)
  elif variant == 'mlm':
    c.model.update(num_layers=4, num_heads=4, d_model=128, max_len=128, dropout=0.0,
                   causal=False)
    c.opt.update(warmup_steps=100)
    c.train.update(num_steps=2000, batch_size=12, seq_len=128, eval_batch_size=256,
                   eval_every=500, checkpoint_every=500, log_every=100)
  elif variant == 'tiny':
    c.model.update(num_layers=2, num_heads=4, d_model=64, max_len=32, dropout=0.0)
    c.opt.update(lr=3e-3, min_lr=3e-4, warmup_steps=10)
    c.train.update(num_steps=80, batch_size=16, seq_len=32, eval_batch_size=64,
                   eval_every=40, checkpoint_every=40, log_every=20, sample_tokens=20)
    # Seconds-long runs on one device: the tests start several at once (sweeps, hosts).
    c.mesh.cpu_devices = 0
  else:
    raise ValueError(f'unknown variant {variant!r} of configs/shakespeare_char.py; '
                     "use '', 'full', 'cpu', 'mlm' or 'tiny'")
  c.lock()
  return c


def get_sweep(variant: str = '') -> list[dict]:
  """Points of a sweep over `get_config(variant)`: override dicts, field -> value."""
  if variant == 'cpu':
    return sweep.grid({'opt.lr': [3e-4, 1e-3, 3e-3], 'model.d_model': [64, 128],
                       'train.eval_every': [500]})
  if variant == 'tiny':
    return sweep.grid({'opt.lr': [3e-3, 1e-2]})
  raise ValueError(f'no sweep for variant {variant!r} of configs/shakespeare_char.py; '
                   "use 'cpu' or 'tiny'")
