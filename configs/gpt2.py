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

  small            12 x 768, 12 heads, context 1024: GPT-2's 124M (50,257-token vocabulary).
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

from lmjax import config
from lmjax.errors import UserError


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = config.base_config()
  # GPT-2 is the pre-LayerNorm decoder lmjax's Transformer is; its dropout is 0.1, d_ff 4x.
  c.model.update(num_layers=12, num_heads=12, d_model=768, max_len=1024)
  c.data.tokenizer = 'gpt2_bpe'  # the importer writes it, or data.tokenizer_dir holds it
  # Fine-tuning: a small peak lr, so as not to wreck what was learned; b2 0.95, as GPT-2-sized
  # models train with.
  c.opt.update(lr=3e-5, min_lr=3e-6, warmup_steps=10, b2=0.95)
  c.train.update(num_steps=200, batch_size=8, seq_len=1024, eval_batch_size=8,
                 checkpoint_every=100, log_every=10, sample_tokens=100)

  if variant == 'medium':
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
  elif variant:
    raise UserError(f'unknown variant {variant!r} of configs/gpt2.py; use one of '
                    "'', 'medium', 'large', 'xl' (fine-tuning an import) or 'small', "
                    "'pretrain_medium', 'pretrain_large' (pretraining)")
  return c


def _pretraining(c: ml_collections.ConfigDict, *, lr: float, microbatches: int) -> None:
  """GPT-2's pretraining recipe (as nanoGPT reproduces it) on `c`'s model, from scratch."""
  # No dropout (nanoGPT's choice: a corpus read about once does not overfit); bfloat16
  # matmuls with float32 parameters, softmax and loss.
  c.model.update(dropout=0.0, dtype='bfloat16')
  # Offline, the embedded corpus with a vocabulary sized for its 5M characters.
  c.data.update(tokenizer='sentencepiece', vocab_size=4096)
  c.opt.update(lr=lr, min_lr=lr / 10, warmup_steps=2000)
  # 600,000 steps of 491,520 tokens (295B) is nanoGPT's run, about 4 days on 8 A100s; a
  # shorter train.num_steps shortens the cosine with it.
  c.train.update(num_steps=600_000, batch_size=480, microbatches=microbatches,
                 eval_batch_size=32, eval_every=1000, checkpoint_every=1000, keep_checkpoints=3)
