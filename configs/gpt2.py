"""GPT-2 (OpenAI's 2019 models): fine-tuning checkpoints imported from Hugging Face, or
pretraining one from scratch.

Fine-tuning an imported checkpoint (the variants named as on the Hugging Face hub):

  python experiments/import_hf.py --hf_dir=path/to/gpt2 --workdir=runs/gpt2
  python experiments/decode.py --workdir=runs/gpt2 --prompt='ROMEO:' --strategy=greedy
  python experiments/train.py --config=configs/gpt2.py --workdir=runs/gpt2   # fine-tune

The importer starts from this file and takes the dimensions from the checkpoint's own
config.json; the train and opt sections are a short fine-tuning recipe on the embedded
corpus, and the tokenizer (data.tokenizer=gpt2_bpe) is the one the importer wrote.

  (none)  gpt2: 12 layers x 768 wide, 12 heads, context 1024 (124M parameters).
  medium  gpt2-medium: 24 x 1024, 16 heads (355M).
  large   gpt2-large: 36 x 1280, 20 heads (774M).
  xl      gpt2-xl: 48 x 1600, 25 heads (1.56B).

Pretraining from scratch (nanoGPT's recipe, GPT-3's hyperparameters for these sizes: AdamW,
peak lr 6e-4 after 2000 warmup steps, cosine to a tenth of it, b2 0.95, weight decay 0.1,
no dropout, batches of 480 x 1024 = 491,520 tokens, bfloat16 compute):

  small            12 x 768, 12 heads, context 1024: GPT-2's 124M with its 50,257-token
                   vocabulary.
  pretrain_medium  24 x 1024, 16 heads (350M); peak lr 3e-4.
  pretrain_large   36 x 1280, 20 heads (774M); peak lr 2.5e-4.

On one device a step runs as train.microbatches slices of 32, 16 and 8 sequences (an
estimate for a GPU of about 140 GB, not measured); the start-up memory check says when a
slice does not fit. small on 8 devices: --config.train.microbatches=2 (30 sequences a slice
on each).

Offline they read the embedded Shakespeare with a SentencePiece vocabulary of 4,096
pieces (a corpus of 1.5M tokens at that size: a check of the recipe, no more; a model this
large learns it by heart). The real run reads a web corpus through TFDS, e.g. OpenWebText,
which TFDS 4.9's catalog lacks but builds from the Hugging Face hub (needs
`pip install datasets`), with GPT-2's own tokenizer from the hub:

  python experiments/prepare_data.py --tfds=huggingface:skylion007__openwebtext --data_dir=DATA
  hf download openai-community/gpt2 vocab.json merges.txt --local-dir=hf/gpt2
  python experiments/train.py --config=configs/gpt2.py:small --workdir=runs/gpt2_small \
    --config.data.name=tfds:huggingface:skylion007__openwebtext --config.data.data_dir=DATA \
    --config.data.train_split='train[:-1000]' --config.data.eval_split='train[-1000:]' \
    --config.data.tokenizer=gpt2_bpe --config.data.tokenizer_dir=hf/gpt2

The first start tokenizes the training split once into WORKDIR/tokens (or
data.cache_dir), read as a memory map from then on; OpenWebText has one split, so its last
1,000 documents are held out for evaluation.
"""
import ml_collections

from lmjax import sharding


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer'  # GPT-2 is the pre-LayerNorm decoder lmjax's Transformer is
  c.model.num_layers = 12  # decoder blocks (n_layer)
  c.model.num_heads = 12  # attention heads (n_head); must divide d_model
  c.model.d_model = 768  # residual stream width (n_embd)
  c.model.d_ff = 0  # MLP hidden width (n_inner); 0 means 4 * d_model, as in all four sizes
  c.model.max_len = 1024  # learned position table (n_positions); >= train.seq_len
  c.model.dropout = 0.1  # GPT-2's resid/embd/attn dropout; only training applies it
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
  # shakespeare | milton (lmjax's own TFDS datasets), or 'tfds:NAME' for any prepared TFDS
  # text dataset, NAME as TFDS writes it: 'tfds:lm1b', 'tfds:c4/en:3.0.1' (lmjax/data/external.py)
  c.data.name = 'shakespeare'
  c.data.data_dir = ''  # TFDS data directory; '' means TFDS's default (~/tensorflow_datasets)
  # gpt2_bpe: GPT-2's byte-level BPE, written by the importer or taken from data.tokenizer_dir
  c.data.tokenizer = 'gpt2_bpe'
  c.data.vocab_size = 0  # sentencepiece only: vocabulary size to train (gpt2_bpe has 50257)
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
  c.opt.lr = 3e-5  # peak learning rate: small, so fine-tuning does not wreck what was learned
  c.opt.min_lr = 3e-6  # learning rate at the end of the cosine decay
  c.opt.warmup_steps = 10  # linear warmup from 0
  c.opt.b1 = 0.9  # AdamW first-moment decay
  c.opt.b2 = 0.95  # AdamW second-moment decay (GPT-2-sized models train with 0.95)
  c.opt.eps = 1e-8  # AdamW epsilon
  c.opt.weight_decay = 0.1  # decoupled weight decay, on matrices only
  c.opt.grad_clip = 1.0  # clip gradients to this global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200  # optimizer steps of fine-tuning (step 0 is the imported model)
  c.train.batch_size = 8  # global batch, in sequences; divides by the data-parallel devices
  # Gradient accumulation: the batch runs as this many slices, one after another, their
  # gradients summed (the same step in less memory); 1: the whole batch at once.
  c.train.microbatches = 1
  c.train.seq_len = 1024  # tokens per training sequence (the importer caps it at max_len)
  c.train.eval_batch_size = 8  # global batch for evaluation
  c.train.eval_every = 100  # steps between evaluations (and at the end)
  c.train.checkpoint_every = 100  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep (GPT-2 ones are large)
  c.train.log_every = 10  # steps between progress lines and train scalars
  c.train.seed = 0  # seeds data order and dropout (init is the imported checkpoint)
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
  c.train.sample_tokens = 100  # length of that sample (prompt + sample <= model.max_len)

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
  elif variant == 'medium':
    c.model.update(num_layers=24, num_heads=16, d_model=1024)
  elif variant == 'large':
    c.model.update(num_layers=36, num_heads=20, d_model=1280)
  elif variant == 'xl':
    c.model.update(num_layers=48, num_heads=25, d_model=1600)
  elif variant == 'small':
    _pretraining(c, lr=6e-4, microbatches=15)
  elif variant == 'pretrain_medium':
    c.model.update(num_layers=24, num_heads=16, d_model=1024)
    _pretraining(c, lr=3e-4, microbatches=30)
  elif variant == 'pretrain_large':
    c.model.update(num_layers=36, num_heads=20, d_model=1280)
    _pretraining(c, lr=2.5e-4, microbatches=60)
  else:
    raise ValueError(f'unknown variant {variant!r} of configs/gpt2.py; use one of '
                     "'', 'medium', 'large', 'xl' (fine-tuning an import) or 'small', "
                     "'pretrain_medium', 'pretrain_large' (pretraining)")
  c.lock()
  return c


def _pretraining(c: ml_collections.ConfigDict, *, lr: float, microbatches: int) -> None:
  """GPT-2's pretraining recipe (as nanoGPT reproduces it) on `c`'s model, from scratch."""
  # No dropout (nanoGPT's choice for pretraining: a corpus read about once does not
  # overfit); bfloat16 matmuls with float32 parameters, softmax and loss.
  c.model.update(dropout=0.0, dtype='bfloat16')
  # Offline: the embedded corpus with a vocabulary sized for its 5M characters; the web
  # corpus run switches to GPT-2's tokenizer (see the module docstring).
  c.data.update(tokenizer='sentencepiece', vocab_size=4096)
  c.opt.update(lr=lr, min_lr=lr / 10, warmup_steps=2000, b1=0.9, b2=0.95, weight_decay=0.1,
               grad_clip=1.0)
  # 600,000 steps of 491,520 tokens (295B) is nanoGPT's run, about 4 days on 8 A100s; a
  # shorter train.num_steps shortens the cosine with it.
  c.train.update(num_steps=600_000, batch_size=480, microbatches=microbatches, seq_len=1024,
                 eval_batch_size=32, eval_every=1000, checkpoint_every=1000,
                 keep_checkpoints=3, log_every=10, sample_tokens=100)
