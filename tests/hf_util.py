"""A tiny Hugging Face GPT-2 directory, built offline, for tests that need one.

Needs transformers, torch and tokenizers (`pip install -e '.[hf]'`); import this module
only after skipping when they are missing.
"""
import os
import random

# What the tokenizer is trained on: generated sentences with what GPT-2's pre-tokenizer
# treats specially (contractions, numbers, punctuation, runs of spaces, newlines) and
# multi-byte UTF-8 (accents, CJK, emoji), so the merges include pieces of those too.
_WORDS = ('the', 'king', 'queen', 'night', 'sweet', 'prince', 'good', 'morrow', 'lord',
          'lady', 'sword', 'crown', 'speak', 'never', 'love', 'death', 'fair', 'heaven',
          'caf\u00e9', 'na\u00efve', 'r\u00e9sum\u00e9', '\u00fcber', 'stra\u00dfe',
          '\u6771\u4eac', '\u65e5\u672c\u8a9e', '\U0001F600', '\u00a1hola!')
_TAILS = ("'s", "'t", "'re", "'ve", "'ll", "'d", "'m", ',', '.', '!', '?', ';', ':', '')


def tiny_gpt2_text(num_lines: int = 400, seed: int = 0) -> list[str]:
  """`num_lines` generated lines of text, the same for the same seed."""
  rng = random.Random(seed)
  lines = []
  for _ in range(num_lines):
    words = []
    for _ in range(rng.randint(3, 12)):
      word = rng.choice(_WORDS) + rng.choice(_TAILS)
      if rng.random() < 0.3:
        word = word.capitalize()
      if rng.random() < 0.15:
        word = str(rng.randint(0, 10**rng.randint(1, 6)))
      words.append(word)
    separator = rng.choice([' ', ' ', ' ', '  ', '\t'])
    lines.append(rng.choice(['', '  ', '\t']) + separator.join(words))
  return lines


def make_tiny_gpt2_dir(path: str, seed: int = 0, vocab_size: int = 512, n_layer: int = 2,
                       n_head: int = 4, n_embd: int = 64, n_positions: int = 64) -> str:
  """Writes a small random GPT-2 to `path` as the Hugging Face hub lays one out; returns `path`.

  The directory holds `config.json` and `model.safetensors` (a GPT2LMHeadModel), and the
  tokenizer as `vocab.json` + `merges.txt` plus transformers' `tokenizer.json` and
  `tokenizer_config.json`. The tokenizer is a byte-level BPE of `vocab_size` pieces trained
  locally on `tiny_gpt2_text()`, with '<|endoftext|>' (id 0) as its one special token, bos
  and eos. No network access. Weights are GPT-2's initialisation seeded with `seed`, then
  every parameter (LayerNorm scales and biases too) gets a little noise, so that a
  conversion that mixed up biases or norms could not pass as correct.
  """
  import tokenizers  # optional dependencies, imported on use
  import torch
  import transformers

  os.makedirs(path, exist_ok=True)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(tiny_gpt2_text(seed=seed), vocab_size=vocab_size, min_frequency=2,
                          special_tokens=['<|endoftext|>'], show_progress=False)
  bpe.save_model(path)  # vocab.json, merges.txt
  hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(path)
  hf_tokenizer.save_pretrained(path)  # adds tokenizer.json and tokenizer_config.json
  eos_id = hf_tokenizer.eos_token_id

  config = transformers.GPT2Config(
      vocab_size=len(hf_tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
      n_head=n_head, bos_token_id=eos_id, eos_token_id=eos_id)
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(config)
  noise = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=noise))
  model.eval()
  model.save_pretrained(path, safe_serialization=True)
  return path
