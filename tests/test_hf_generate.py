"""lmjax's decoder against Hugging Face `generate` on the same imported GPT-2.

A tiny random GPT2LMHeadModel is built offline, its end-of-text embedding is scaled up
so that EOS competes with other tokens (beam search's finishing rules then matter), and
the same weights run in both libraries. Greedy and beam search must give the same tokens
and beam scores; beam search uses lmjax's beam_compat='hf'.
"""
import jax
import numpy as np
import pytest

transformers = pytest.importorskip(
    'transformers', reason="needs the 'hf' extra: pip install -e '.[hf]'")
torch = pytest.importorskip('torch', reason="needs the 'hf' extra: pip install -e '.[hf]'")

from lmjax import decode, hf, workdir as workdir_lib  # noqa: E402
from lmjax.models import transformer  # noqa: E402
from tests import hf_util  # noqa: E402

MAX_NEW = 12


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf_generate')
  hf_dir = hf_util.make_tiny_gpt2_dir(str(root / 'hf'), seed=3, vocab_size=300)
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  eos = hf_model.config.eos_token_id
  with torch.no_grad():
    hf_model.transformer.wte.weight[eos] *= 12.0
  hf_model.save_pretrained(hf_dir, safe_serialization=True)
  workdir = str(root / 'lmjax')
  hf.import_gpt2(hf_dir, workdir)
  config, tokenizer, params, _ = workdir_lib.load_trained(workdir)
  assert tokenizer.eos_id == eos
  return hf_model, config, params, eos


def _prompts(seed, batch, length, vocab):
  rng = np.random.default_rng(seed)
  return rng.integers(1, vocab, (batch, length))


def _hf_generate(hf_model, prompts, **kwargs):
  with torch.inference_mode():
    out = hf_model.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape,
                                                                                 dtype=torch.long),
                            max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
                            output_scores=True, **kwargs)
  return out


def _strip(row, prompt_len, eos):
  """The new tokens of an HF sequence, up to (not including) the first EOS."""
  new = [int(t) for t in row[prompt_len:]]
  return new[:new.index(eos)] if eos in new else new


def _lmjax_generate(config, params, prompts, eos, **options):
  model = transformer.Transformer(
      vocab_size=params['token_embed']['embedding'].shape[0],
      num_layers=config.model.num_layers, num_heads=config.model.num_heads,
      d_model=config.model.d_model, d_ff=config.model.d_ff or 4 * config.model.d_model,
      max_len=config.model.max_len, decode=True)
  tokens_to_logits, state = transformer.decode_fns(model, jax.device_get(params),
                                                   batch_size=len(prompts))
  return decode.generate(tokens_to_logits, state, prompts.tolist(), max_new_tokens=MAX_NEW,
                         eos_id=eos, max_len=config.model.max_len, **options)


@pytest.mark.parametrize('penalty', [1.0, 1.3])
def test_greedy_equals_hf(models, penalty):
  hf_model, config, params, eos = models
  prompts = _prompts(0, 6, 5, hf_model.config.vocab_size)
  expected = _hf_generate(hf_model, prompts, num_beams=1, repetition_penalty=penalty)
  ours = _lmjax_generate(config, params, prompts, eos, repetition_penalty=penalty)
  hf_rows = [_strip(row, prompts.shape[1], eos) for row in expected.sequences]
  assert [c[0].tokens.tolist() for c in ours] == hf_rows
  # Some rows end at EOS and some run to the limit, or the test would not test both.
  assert {c[0].finish for c in ours} == {'eos', 'length'}


@pytest.mark.parametrize('beams, alpha, early', [
    (4, 1.0, False), (3, 0.0, False), (4, 0.5, False), (4, 1.0, True)])
def test_beam_search_equals_hf(models, beams, alpha, early):
  hf_model, config, params, eos = models
  prompts = _prompts(1, 4, 6, hf_model.config.vocab_size)
  expected = _hf_generate(hf_model, prompts, num_beams=beams, num_return_sequences=beams,
                          length_penalty=alpha, early_stopping=early)
  ours = _lmjax_generate(config, params, prompts, eos, strategy='beam', beam_size=beams,
                         num_samples=beams, length_penalty=alpha, early_stopping=early,
                         beam_compat='hf')
  hf_rows = [_strip(row, prompts.shape[1], eos) for row in expected.sequences]
  hf_scores = expected.sequences_scores.numpy()
  finishes = set()
  for b, candidates in enumerate(ours):
    assert len(candidates) == beams
    for j, c in enumerate(candidates):
      assert c.tokens.tolist() == hf_rows[b * beams + j], (b, j)
      assert c.score == pytest.approx(float(hf_scores[b * beams + j]), abs=1e-4)
      finishes.add(c.finish)
  assert finishes == {'eos', 'length'}


def test_lmjax_beam_rules_never_return_a_worse_best_beam_than_hf_rules(models):
  # With alpha = 0 both definitions rank by log-probability and keep the same live beams;
  # lmjax's lets more extensions finish and stops no earlier, so its best beam can only
  # be as likely or more. (With alpha > 0 the two scores differ and nothing is implied.)
  hf_model, config, params, eos = models
  prompts = _prompts(2, 4, 6, hf_model.config.vocab_size)
  hf_style = _lmjax_generate(config, params, prompts, eos, strategy='beam', beam_size=4,
                             length_penalty=0.0, beam_compat='hf')
  ours = _lmjax_generate(config, params, prompts, eos, strategy='beam', beam_size=4,
                         length_penalty=0.0)
  for mine, theirs in zip(ours, hf_style, strict=True):
    assert mine[0].score >= theirs[0].score - 1e-5
