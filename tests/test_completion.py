"""Prompt -> completion training (data.format='completion'): packed and padded rows compute
what their examples compute alone, a token never reads another example, only completions
are scored; tiny runs on Countdown from scratch and on a JSONL file fine-tuned with LoRA;
and the inputs and settings it refuses."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import countdown
from lmjax import config as config_lib, evaluation, events, losses, scores, sharding, steps, tasks
from lmjax import train
from lmjax.data import completions, corpora, puzzles, tokenizers
from lmjax.errors import UserError
from lmjax.models import rnn, transformer
from tests import script_cases

CHARS = tokenizers.CharTokenizer(sorted('abcdefghij?'))
SEQ_LEN = 26
# Spans (prompt + completion) of 7 and 5 tokens, two shapes to run alone; packed, 7 + 5 +
# 7 + 5 to a row, with 2 positions of padding. One completion is empty: its eos is scored.
PAIRS = [('abcd?', 'ef'), ('ab?', 'cd'), ('a?', 'bcdef'), ('j?', 'abc'), ('ghi?', 'abc'),
         ('ccc?', 'c'), ('hhhhhh?', ''), ('e?', 'fff')]


def _examples() -> completions.Examples:
  return completions.tokenize(PAIRS, CHARS, seq_len=SEQ_LEN, what='test')


def _loss_sum_and_grads(model, params, batch):
  """Summed completion loss of a batch and its gradient."""
  def loss(params):
    logits = model.apply({'params': params}, batch['inputs'],
                         **steps.packed_kwargs(model, batch))
    return losses.token_cross_entropy(logits, batch['targets'], batch['weights'])['loss_sum']
  return jax.jit(jax.value_and_grad(loss))(params)


def _forward(model):
  """(params, batch) -> logits, jitted: one compile for any batch of the same shapes."""
  return jax.jit(lambda params, batch: model.apply(
      {'params': params}, batch['inputs'], **steps.packed_kwargs(model, batch)))


def _loss_sum(logits, batch) -> float:
  """The batch's summed completion loss, in float64 on the host."""
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                              keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, np.asarray(batch['targets'])[..., None], -1)[..., 0]
  return float((nll * np.asarray(batch['weights'])).sum())


def _alone_batches(examples) -> list[dict]:
  """The examples as rows of their own length (no padding, no segments), a batch for each
  length: what each computes alone."""
  by_length = {}
  for i in range(len(examples)):
    ids = examples.tokens[examples.starts[i]:examples.starts[i + 1]]
    weights = (np.arange(len(ids) - 1) >= examples.prompt_lengths[i] - 1).astype(np.float32)
    by_length.setdefault(len(ids), []).append((ids[:-1], ids[1:], weights))
  return [{k: np.stack([row[j] for row in rows]) for j, k in
           enumerate(('inputs', 'targets', 'weights'))} for rows in by_length.values()]


def _rows(packed: bool) -> dict:
  evals = completions.eval_set(_examples(), seq_len=SEQ_LEN, batch_size=1, packed=packed)
  return {k: jnp.asarray(v) for k, v in evals.arrays.items()}


def _transformer(**fields):
  return transformer.Transformer(vocab_size=CHARS.vocab_size, num_layers=2, num_heads=2,
                                 d_model=16, d_ff=32, max_len=SEQ_LEN, **fields)


def _init(model):
  return nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])


@pytest.fixture(scope='module')
def reference():
  """A tiny Transformer's parameters, and the loss sum and gradients of its examples run
  alone, added up."""
  model = _transformer()
  params = _init(model)
  total, grads = 0.0, None
  for batch in _alone_batches(_examples()):
    loss, g = _loss_sum_and_grads(model, params, batch)
    total += float(loss)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return params, total, grads


@pytest.mark.parametrize('packed', [True, False])
def test_packed_and_padded_rows_train_as_their_examples_alone(reference, packed):
  """The loss sum and gradients of the rows are those of the examples run one at a time."""
  params, want_loss, want_grads = reference
  rows = _rows(packed)
  assert len(rows['inputs']) == (2 if packed else len(PAIRS))
  loss, grads = _loss_sum_and_grads(_transformer(), params, rows)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               grads, want_grads)


@pytest.mark.parametrize('fields', [
    {},  # XLA's kernel, masked by segment
    {'attention': 'einsum'},
    {'attention': 'einsum', 'attention_block': 8},  # the blocked path
    {'scan_layers': True},
])
def test_every_attention_path_keeps_packed_examples_apart(reference, fields):
  params, want_loss, _ = reference
  if fields.get('scan_layers'):
    params = transformer.stack_layers(params)
  rows = _rows(packed=True)
  forward = _forward(_transformer(**fields))
  logits = forward(params, rows)
  assert _loss_sum(logits, rows) == pytest.approx(want_loss, rel=1e-5)
  # Another first example in each row: the examples after it in the row read the same.
  first = rows['segment_ids'] == 1
  changed = forward(params, {**rows, 'inputs': jnp.where(
      first, (rows['inputs'] + 3) % CHARS.vocab_size, rows['inputs'])})
  others = np.asarray(~first & (rows['segment_ids'] > 0))
  assert np.abs(np.asarray(changed - logits)[np.asarray(first)]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(changed)[others], np.asarray(logits)[others])
  # The checks can fail: read at positions 0..T-1, or as one segment, the rows score otherwise.
  unrestarted = {**rows, 'positions': jnp.broadcast_to(jnp.arange(SEQ_LEN), (2, SEQ_LEN))}
  one_segment = {**rows, 'segment_ids': jnp.ones_like(rows['segment_ids'])}
  for wrong in (unrestarted, one_segment):
    assert abs(_loss_sum(forward(params, wrong), rows) - want_loss) > 1e-3


def test_a_recurrent_model_starts_each_packed_example_from_a_zero_carry():
  model = rnn.RecurrentLM(vocab_size=CHARS.vocab_size, cell='lstm', num_layers=2, d_model=8,
                          hidden_size=16, tie_embeddings=False)
  params = _init(model)
  forward = _forward(model)
  want = sum(_loss_sum(forward(params, batch), batch) for batch in _alone_batches(_examples()))
  rows = _rows(packed=True)
  assert _loss_sum(forward(params, rows), rows) == pytest.approx(want, rel=1e-5)


def test_segments_are_refused_where_they_cannot_be_honoured(reference):
  params, _, _ = reference
  rows = _rows(packed=True)
  with pytest.raises(UserError, match="model.attention='cudnn' masks causally only"):
    _transformer(attention='cudnn').apply({'params': params}, rows['inputs'],
                                          segment_ids_BxT=rows['segment_ids'])
  with pytest.raises(ValueError, match='a decode call'):
    _transformer(decode=True).init(jax.random.key(0), rows['inputs'],
                                   segment_ids_BxT=rows['segment_ids'])


# ------------------------------------------------------------------------ whole runs


def _texts(workdir: str) -> dict:
  """{tag: {step: text}} of a run's TensorBoard text summaries."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  return {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
          for tag in acc.Tags()['tensors']
          if acc.SummaryMetadata(tag).plugin_data.plugin_name == 'text'}


def _tiny(**data) -> ml_collections.ConfigDict:
  """configs/countdown.py:completion_tiny, 4 steps, trained on the small test split."""
  config = countdown.get_config('completion_tiny')
  config.data.update({'train_split': 'test', **data})
  config.opt.warmup_steps = 1
  config.train.update(num_steps=4, eval_every=4, checkpoint_every=4, log_every=2,
                      eval_completions=2, sample_tokens=12,
                      completion_metrics=('exact_match', 'token_f1', 'bleu'))
  return config


@pytest.fixture(scope='module')
def countdown_run(tmp_path_factory):
  """A tiny Countdown run from scratch on one device."""
  workdir = str(tmp_path_factory.mktemp('countdown'))
  metrics = train.train_and_evaluate(_tiny(), workdir, devices=jax.devices()[:1])
  return workdir, metrics


def test_a_countdown_run_scores_completions_and_solves_with_the_checker(countdown_run):
  workdir, metrics = countdown_run
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  for key in ('loss', 'perplexity', 'accuracy', 'solve_rate'):
    assert result['eval'][key] == pytest.approx(metrics[key]), key
  assert metrics['solve_rate'] in (0.0, 0.5, 1.0)  # of two validation puzzles
  scalars = events.read_scalars(workdir)
  assert {'train/loss', 'eval/loss', 'eval/accuracy', 'eval/solve_rate', 'eval/exact_match',
          'eval/token_f1', 'eval/bleu'} <= set(scalars)
  text = _texts(workdir)['completions'][4]
  validation = corpora.load_split_texts('countdown', 'validation')
  prompt, reference = puzzles.prompt_and_solution(validation[0][1])
  assert f'prompt:     {prompt!r}' in text and f'reference:  {reference!r}' in text
  # The validation split scored again: the run's own numbers.
  again = evaluation.evaluate_workdir(workdir, 'validation', devices=jax.devices()[:1])
  assert again['loss'] == pytest.approx(metrics['loss'], rel=1e-5)
  # Its weighted targets are the solutions' characters and their ends, nothing else.
  solutions = [puzzles.prompt_and_solution(text)[1] for _, text in validation]
  assert again['num_tokens'] == sum(len(s) + 1 for s in solutions)


def test_evaluate_generate_scores_each_completion_and_writes_them(countdown_run, tmp_path):
  """experiments/evaluate.py --generate, as a user runs it: one JSON object on stdout whose
  scores are the means of the per-example lines it wrote, completions of the split's
  prompts in order; beam search gives the same JSON keys."""
  workdir, _ = countdown_run
  out = tmp_path / 'completions.jsonl'
  flags = [f'--workdir={workdir}', '--generate', '--num_examples=5', '--batch_size=2',
           '--max_new_tokens=16', '--metrics=exact_match,token_f1,rougeL,bleu']
  results = script_cases.run({'greedy': ('evaluate.py', [*flags, f'--output={out}']),
                              'beam': ('evaluate.py', [*flags, '--strategy=beam',
                                                       '--beam_size=2'])},
                             env=dict(os.environ, JAX_PLATFORMS='cpu'))
  for key, result in results.items():
    assert result.returncode == 0, (key, result.stderr[-3000:])
  summary = json.loads(results['greedy'].stdout)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  validation = corpora.load_split_texts('countdown', 'validation')[:5]
  assert [(r['prompt'], r['reference']) for r in rows] == [
      puzzles.prompt_and_solution(text) for _, text in validation]
  assert summary['num_examples'] == 5 and summary['strategy'] == 'greedy'
  for name in ('exact_match', 'token_f1', 'rougeL'):
    assert summary[name] == pytest.approx(np.mean([r[name] for r in rows])), name
  assert summary['solve_rate'] == np.mean([puzzles.solves(r['prompt'], r['generation'])
                                           for r in rows])
  assert summary['bleu'] == pytest.approx(scores.bleu([r['generation'] for r in rows],
                                                      [[r['reference']] for r in rows]))
  assert 'rouge1' not in summary and 'label_accuracy' not in rows[0]
  assert set(json.loads(results['beam'].stdout)) == set(summary)


def test_a_jsonl_file_fine_tunes_a_run_with_lora_one_example_a_row(countdown_run, tmp_path):
  base, _ = countdown_run
  pairs = [puzzles.prompt_and_solution(text)
           for _, text in corpora.load_split_texts('countdown', 'test')[:48]]
  path = tmp_path / 'puzzles.jsonl'
  path.write_text(''.join(json.dumps({'prompt': p, 'completion': c}) + '\n' for p, c in pairs))
  config = _tiny(train_file=str(path), pack=False, holdout=0.25, train_split='train')
  config.model.update(lora_rank=2, lora_alpha=4.0)
  config.init_from.workdir = base
  config.train.eval_completions = 0  # the Countdown run writes completions
  workdir = str(tmp_path / 'lora')
  metrics = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  assert 0 < result['num_trained_params'] < result['num_params'] / 10  # the adapters only
  assert np.isfinite(metrics['loss']) and 'solve_rate' not in metrics
  held_out = completions.read_examples(config.data, 'validation')
  assert 0 < len(held_out) < len(pairs) and 'completions' not in _texts(workdir)


def _jsonl_config(tmp_path, content: str | None, **data):
  path = tmp_path / 'sft.jsonl'
  if content is not None:
    path.write_text(content)
  return _tiny(**{'train_file': str(path), 'train_split': 'train', 'eval_file': str(path),
                  **data})


@pytest.mark.parametrize('content, seq_len, words', [
    (None, 128, 'no file matches'),
    ('', 128, 'has no examples'),
    ('{"prompt": "1 2 -> 3\\n", "completion": "2+1=3"}\n{oops\n', 128, 'sft.jsonl:2 is not JSON'),
    ('{"prompt": "1 2 -> 3\\n"}\n', 128, "sft.jsonl:1 has no text field 'completion'"),
    ('{"prompt": "1 2 -> 3\\n", "completion": "2+1=3"}\n', 8,
     'more than a row of train.seq_len=8'),
])
def test_bad_jsonl_inputs_stop_the_run_with_one_line(tmp_path, content, seq_len, words):
  config = _jsonl_config(tmp_path, content)
  config.train.seq_len = seq_len
  with pytest.raises(Exception) as info:
    train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert type(info.value) is UserError, repr(info.value)
  assert words in str(info.value) and '\n' not in str(info.value), str(info.value)


def _refusal(config) -> str:
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with pytest.raises(Exception) as info:
    config_lib.validate_config(config, mesh)
  assert type(info.value) is UserError, repr(info.value)
  return str(info.value)


def test_settings_a_completion_run_cannot_honour_are_refused(tmp_path):
  cases = [({'train': {'stateful': True}}, 'train.stateful=True'),
           ({'model': {'causal': False}}, 'model.causal=False'),
           ({'data': {'mixture': ('shakespeare:1',)}}, 'data.mixture'),
           ({'data': {'name': 'shakespeare'}}, None),
           ({'data': {'format': 'chat'}}, "data.format='chat'"),
           ({'data': {'eval_file': 'x.jsonl'}}, "data.eval_file='x.jsonl'"),
           ({'train': {'eval_completions': -1}}, 'train.eval_completions=-1')]
  for change, words in cases:
    config = _tiny()
    for section, fields in change.items():
      config[section].update(fields)
    if words is None:  # refused when its examples are read
      with pytest.raises(UserError, match="data.name='shakespeare' has none"):
        completions.read_examples(config.data, 'train')
    else:
      assert words in _refusal(config), change
  jsonl = _jsonl_config(tmp_path, '', format='text')
  assert "holds prompt -> completion examples; set data.format='completion'" in _refusal(jsonl)
  jsonl = _jsonl_config(tmp_path, '', eval_file='', holdout=1.0)
  assert 'data.holdout=1.0' in _refusal(jsonl)
  jsonl = _jsonl_config(tmp_path, '', eval_split='test')
  assert "data.eval_split='test'" in _refusal(jsonl)
  cudnn = _tiny()
  cudnn.model.attention = 'cudnn'  # on a GPU, the model checks pass and this one refuses
  with pytest.raises(UserError, match='data.pack=True keeps packed examples apart'):
    tasks.Completion.check_config(cudnn)
  with pytest.raises(UserError, match='it scores those completions only'):
    tasks.scoring_task(_tiny(), 'shakespeare')


def test_the_countdown_variants_set_schema_fields_only():
  schema = config_lib.base_config()
  for variant in ('completion', 'completion_tiny'):
    config = countdown.get_config(variant)
    assert tasks.task_class(config) is tasks.Completion
    flat = json.loads(config.to_json())
    for section, fields in flat.items():
      for field, value in fields.items():
        assert type(value) is type(json.loads(schema.to_json())[section][field]), field
