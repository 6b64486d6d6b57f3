"""Text from a trained model's parameters: the decoder's functions for a config, and
prompts continued with any of `decode.generate`'s strategies."""
import functools

import jax
import numpy as np

from lmjax import decode, finetune, models
from lmjax.data import corpora
from lmjax.errors import UserError
from lmjax.state import build_model, is_encoder

def decoder_fns(config, params, vocab_size: int):
  """`decoder_fns(batch_size=, cache_len=) -> (tokens_to_logits, state)` for the decoder and
  the tree search: the KV-cached Transformer or the recurrent model (its carry is the
  state) of `config`, with `params` on the host's device."""
  check_decodable(config)
  decode_model = build_model(config, vocab_size, decode=True)
  return functools.partial(models.decode_fns, decode_model, host_copy(params))


def check_decodable(config) -> None:
  """Refuses a run that generates no text (a classifier, a bidirectional encoder), naming
  what to use instead; the scripts call it before reading any checkpoint."""
  if corpora.class_names(config.data.name):
    raise UserError(f'this run is a classifier (data.name={config.data.name!r}): it scores '
                    'passages and generates no text; evaluate it with '
                    'experiments/evaluate.py instead.')
  if is_encoder(config):
    raise UserError('this run is a bidirectional encoder (model.causal=False), trained to '
                    'fill in masked tokens: it cannot continue a prompt. Evaluate it with '
                    'experiments/evaluate.py, or fine-tune it into a classifier.')


def host_copy(tree):
  """A NumPy copy of a tree of (possibly sharded) arrays, whole on every process: each
  process holds only its own shards of parameters that FSDP or tensor parallelism split
  over several hosts."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def generate_texts(config, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
                   stop_strings: tuple[str, ...] = (), after_eos: bool = False,
                   **options) -> list[list[dict]]:
  """Continues each prompt with the KV-cached model; `options` go to `decode.generate`
  (strategy, num_samples, temperature, top_k, top_p, repetition_penalty, beam_size,
  length_penalty, beam_compat, early_stopping, seed, window_stride). A Transformer writes
  past its context through a sliding window, and reads only the last model.max_len tokens
  of a longer prompt (see `lmjax.decode`).

  Returns, per prompt, one dict per continuation: 'text' (the new text only), 'tokens',
  'score' and 'finish' ('eos', 'stop' or 'length'). A continuation ends at the
  tokenizer's EOS and at any of `stop_strings`; its text is cut before the stop string.
  `after_eos` puts the tokenizer's end-of-text id before each prompt: a language model of
  documents then reads the prompt as the start of a document, as in training.
  Raises UserError with a readable message for bad prompts or options.
  """
  encoded = []
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise UserError(f'prompt {i + 1} is empty; give some text to continue.')
    ids = tokenizer.encode(prompt)
    encoded.append(np.concatenate([[tokenizer.eos_id], ids]).astype(ids.dtype) if after_eos
                   else ids)
  stops = []
  for stop in stop_strings:
    if not stop:
      raise UserError('a stop string is empty; drop it or give some text.')
    stops.append(tokenizer.encode(stop))
  needed = max(len(e) for e in encoded) + max_new_tokens
  tokens_to_logits, state = decoder_fns(config, params, tokenizer.vocab_size)(
      batch_size=len(encoded), cache_len=decode.buffer_length(needed, context_length(config)))
  results = decode.generate(tokens_to_logits, state, encoded, max_new_tokens=max_new_tokens,
                            eos_id=tokenizer.eos_id, stop_sequences=stops,
                            max_len=context_length(config), **options)
  out = []
  for candidates in results:
    rows = []
    for c in candidates:
      text, finish = tokenizer.decode(c.tokens), c.finish
      # A stop string may come out as tokens other than its own encoding; the text
      # decides.
      cuts = [text.find(stop) for stop in stop_strings if stop in text]
      if cuts:
        text, finish = text[:min(cuts)], 'stop'
      rows.append({'text': text, 'tokens': c.tokens.tolist(), 'score': c.score,
                   'finish': finish})
    out.append(rows)
  return out


def context_length(config) -> int | None:
  """The most tokens the model reads at once: the Transformer's position table; None (no
  bound) for a recurrent model. Longer text is decoded through a sliding window."""
  return None if models.is_recurrent(config.model) else config.model.max_len


def continue_prompt(config, params, tokenizer, prompt: str, num_tokens: int, *,
                    seed: int = 0, temperature: float = 0.8) -> str:
  """One sampled continuation of `prompt`, prompt included (the end-of-training sample)."""
  result, = generate_texts(config, params, tokenizer, [prompt], max_new_tokens=num_tokens,
                           strategy='sample', temperature=temperature, seed=seed)
  return prompt + result[0]['text']


def sample_text(config, params, tokenizer) -> str:
  """A sampled continuation of train.sample_prompt, train.sample_tokens long (fewer if it
  samples EOS) whatever the model's context, prompt included (what an evaluation writes);
  the same seed at every call, so samples of successive evaluations differ only by what
  the model learned. `params` is the whole tree (frozen parts joined)."""
  t = config.train
  if t.sample_tokens <= 0:
    return t.sample_prompt
  decode_config, params = finetune.for_decoding(config, params)
  return continue_prompt(decode_config, params, tokenizer, t.sample_prompt, t.sample_tokens,
                         seed=t.seed)
