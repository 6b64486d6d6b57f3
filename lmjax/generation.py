"""Text from a trained model's parameters: the decoder's functions for a config, and
prompts continued with any of `decode.generate`'s strategies."""
import functools

import jax
import numpy as np

from lmjax import decode, finetune, models, speculative
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


def _encode_prompts(tokenizer, prompts: list[str], stop_strings, after_eos: bool):
  """The prompts' and stop strings' token ids (see `generate_texts`)."""
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
  return encoded, stops


def _as_texts(tokenizer, results, stop_strings) -> list[list[dict]]:
  """`decode.Candidate`s as dicts of text, tokens, score and finish."""
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
  encoded, stops = _encode_prompts(tokenizer, prompts, stop_strings, after_eos)
  needed = max(len(e) for e in encoded) + max_new_tokens
  tokens_to_logits, state = decoder_fns(config, params, tokenizer.vocab_size)(
      batch_size=len(encoded), cache_len=decode.buffer_length(needed, context_length(config)))
  results = decode.generate(tokens_to_logits, state, encoded, max_new_tokens=max_new_tokens,
                            eos_id=tokenizer.eos_id, stop_sequences=stops,
                            max_len=context_length(config), **options)
  return _as_texts(tokenizer, results, stop_strings)


def load_draft(spec: str, tokenizer):
  """The draft `speculative_texts` takes for --draft=SPEC: 'ngram' (prompt lookup, no
  model), or the workdir of a trained language model with the same tokenizer as the
  target's, returned as (config, params)."""
  if spec == 'ngram':
    return 'ngram'
  from lmjax import workdir as workdir_lib
  check_decodable(workdir_lib.load_config(spec))
  config, draft_tokenizer, params, _ = workdir_lib.load_trained(spec)
  if not same_tokenizer(tokenizer, draft_tokenizer):
    raise UserError(f'the draft in {spec} has another tokenizer than the target '
                    f'({type(draft_tokenizer).__name__}, {draft_tokenizer.vocab_size} ids, '
                    f'against {type(tokenizer).__name__}, {tokenizer.vocab_size}); a draft '
                    "must read and write the target's token ids: train it with the same "
                    'data.tokenizer on the same corpus, or use --draft=ngram.')
  return config, params


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers give every id the same text."""
  if (type(a), a.vocab_size, a.eos_id) != (type(b), b.vocab_size, b.eos_id):
    return False
  return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size) if i != a.eos_id)


def speculative_texts(config, params, tokenizer, prompts: list[str], *, draft,
                      num_draft_tokens: int, max_new_tokens: int,
                      stop_strings: tuple[str, ...] = (), after_eos: bool = False,
                      **options) -> tuple[list[list[dict]], 'speculative.Stats']:
  """`generate_texts` (greedy or sample) with a draft proposing `num_draft_tokens` a
  round (`lmjax.speculative`): the same text, or for sampling the same distribution, in
  fewer calls of the target. `draft` is what `load_draft` returns. Also returns the
  call's `speculative.Stats`."""
  encoded, stops = _encode_prompts(tokenizer, prompts, stop_strings, after_eos)
  max_len = context_length(config)
  if max_len is None:
    raise UserError('speculative decoding needs a Transformer target; this run is a '
                    f'recurrent model ({config.model.name}): decode it without --draft.')
  if draft != 'ngram':
    draft_config, draft_params = draft
    max_len = min(max_len, context_length(draft_config) or max_len)
  cache_len = decode.buffer_length(
      max(len(e) for e in encoded) + max_new_tokens + num_draft_tokens, max_len)
  draft_model = speculative.NgramDraft() if draft == 'ngram' else speculative.ModelDraft(
      *decoder_fns(draft_config, draft_params, tokenizer.vocab_size)(
          batch_size=len(encoded), cache_len=cache_len))
  tokens_to_logits, state = decoder_fns(config, params, tokenizer.vocab_size)(
      batch_size=len(encoded), cache_len=cache_len)
  results, stats = speculative.generate(
      tokens_to_logits, state, encoded, draft=draft_model, num_draft_tokens=num_draft_tokens,
      max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, stop_sequences=stops,
      max_len=max_len, **options)
  return _as_texts(tokenizer, results, stop_strings), stats


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
