"""A small character-level GPT that solves Countdown arithmetic puzzles (lmjax/data/puzzles.py).

  python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
  python experiments/tot.py --workdir=runs/countdown      # greedy vs beam vs tree search

Each training document is one puzzle line and a worked solution, e.g.
"4 7 8 9 -> 34\\n9-7=2\\n8*4=32\\n32+2=34"; documents are packed into windows with the
end-of-text id between them, as any corpus is. The model is the one tree-of-thought
search is studied with (README, "Tree-of-thought search").

Variants (the text after ':'):
  (none)  4 layers x 192 wide, context 64, batch 64, 2500 steps: about 25 minutes on 2 CPU
          cores.
  tiny    2 layers x 64 wide, 60 steps: seconds; what the tests train.
"""
import ml_collections

from lmjax import sharding


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer'  # transformer (the only family so far)
  c.model.num_layers = 4  # decoder blocks
  c.model.num_heads = 4  # attention heads; must divide d_model
  c.model.d_model = 192  # residual stream width
  c.model.d_ff = 0  # MLP hidden width; 0 means 4 * d_model
  c.model.max_len = 64  # size of the learned position table; >= train.seq_len
  c.model.dropout = 0.0  # 120,833 training examples, under 3 epochs: no need to regularise
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.model.param_dtype = 'float32'  # storage dtype of the parameters
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
  c.data.name = 'countdown'  # the puzzles' TFDS dataset (built from the rules, no download)
  c.data.data_dir = ''  # TFDS data directory; '' means TFDS's default (~/tensorflow_datasets)
  c.data.tokenizer = 'char'  # 18 characters (digits, + - * / = >, space, newline) and EOS
  c.data.vocab_size = 0  # sentencepiece only
  c.data.spm_model_type = 'bpe'  # sentencepiece only
  c.data.eval_split = 'validation'  # held-out puzzles (different numbers or target)
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
  c.opt.lr = 2e-3  # peak learning rate, reached after warmup
  c.opt.min_lr = 1e-4  # learning rate at the end of the cosine decay
  c.opt.warmup_steps = 100  # linear warmup from 0
  c.opt.b1 = 0.9  # AdamW first-moment decay
  c.opt.b2 = 0.99  # AdamW second-moment decay
  c.opt.eps = 1e-8  # AdamW epsilon
  c.opt.weight_decay = 0.1  # decoupled weight decay, on matrices only
  c.opt.grad_clip = 1.0  # clip gradients to this global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2500  # optimizer steps in the whole run
  c.train.batch_size = 64  # global batch, in sequences; divides by the data-parallel devices
  # Gradient accumulation: the batch runs as this many slices, one after another, their
  # gradients summed (the same step in less memory); 1: the whole batch at once.
  c.train.microbatches = 1
  c.train.seq_len = 64  # tokens per training sequence (a puzzle and solution is about 36)
  c.train.eval_batch_size = 256  # global batch for evaluation
  c.train.eval_every = 500  # steps between evaluations (and at the end)
  c.train.checkpoint_every = 500  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.log_every = 100  # steps between progress lines and train scalars
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
  c.train.sample_prompt = '4 7 8 9 -> 34\n'  # prompt of the samples logged at each evaluation
  c.train.sample_tokens = 24  # length of that sample (prompt + sample <= model.max_len)

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

  if variant == '':
    pass
  elif variant == 'tiny':
    c.model.update(num_layers=2, num_heads=4, d_model=64, max_len=64)
    c.opt.update(lr=3e-3, min_lr=3e-4, warmup_steps=10)
    c.train.update(num_steps=60, batch_size=16, eval_batch_size=64, eval_every=60,
                   checkpoint_every=60, log_every=20)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/countdown.py; use '' or 'tiny'")
  c.lock()
  return c
