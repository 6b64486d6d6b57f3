"""Multi-task training: a weighted mixture of corpora, drawn deterministically, resumable,
evaluated per task."""
import json
import os

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import evaluation, tasks, train, workdir as workdir_lib
from lmjax.data import pipeline
from lmjax.errors import UserError


def test_the_schedule_draws_by_weight_and_each_task_reads_its_own_windows_once_an_epoch():
  lengths, seq_len = [3000, 1000], 10
  starts, tasks = pipeline.mixture_schedule(lengths, [0.75, 0.25], seq_len=seq_len,
                                            num_examples=4000, seed=3)
  assert (tasks == 1).mean() == pytest.approx(0.25, abs=0.03)
  first = starts[tasks == 0]
  second = starts[tasks == 1]
  assert first.min() >= 0 and first.max() + seq_len + 1 <= 3000  # inside its own stream
  assert second.min() >= 3000 and second.max() + seq_len + 1 <= 4000
  n = pipeline.windows_per_epoch(1000, seq_len)
  for epoch in range(len(second) // n):  # whole epochs: every window once, one offset
    one_epoch = second[epoch * n:(epoch + 1) * n] - 3000
    assert len(set(one_epoch % seq_len)) == 1
    assert len(set(one_epoch)) == n
  again = pipeline.mixture_schedule(lengths, [0.75, 0.25], seq_len=seq_len,
                                    num_examples=4000, seed=3)
  np.testing.assert_array_equal(again[0], starts)
  longer = pipeline.mixture_schedule(lengths, [0.75, 0.25], seq_len=seq_len,
                                     num_examples=6000, seed=3)
  np.testing.assert_array_equal(longer[0][:4000], starts)  # a longer run extends it


def test_a_mixture_resumes_where_it_stopped():
  tokens = np.arange(4000, dtype=np.int32)
  starts, _ = pipeline.mixture_schedule([3000, 1000], [0.5, 0.5], seq_len=10,
                                        num_examples=80, seed=0)
  whole = list(pipeline.mixture_dataset(tokens, starts, seq_len=10, global_batch=8)
               .as_numpy_iterator())
  resumed = list(pipeline.mixture_dataset(tokens, starts, seq_len=10, global_batch=8,
                                          start_example=48).as_numpy_iterator())
  assert len(whole) == 10 and len(resumed) == 4
  for a, b in zip(whole[6:], resumed, strict=True):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  np.testing.assert_array_equal(whole[0]['targets'][:, :-1], whole[0]['inputs'][:, 1:])


def test_a_mixture_run_reports_each_task_and_evaluate_scores_each_by_name(tmp_path):
  workdir = str(tmp_path)
  config = shakespeare_char.get_config('tiny')
  config.data.update(mixture=('shakespeare:0.7', 'milton:0.3'), drop_unknown_chars=True)
  # The whole split, as evaluate_workdir scores it.
  config.train.update(num_steps=4, eval_every=4, checkpoint_every=4, sample_tokens=0,
                      eval_batches=0)
  config.opt.warmup_steps = 1
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, workdir_lib.RESULT_FILE)) as f:
    final = json.load(f)['eval']
  for task in ('shakespeare', 'milton'):
    assert {f'{task}/loss', f'{task}/accuracy', f'{task}/bits_per_char'} <= set(final)
  assert final['loss'] == pytest.approx(0.7 * final['shakespeare/loss'] +
                                        0.3 * final['milton/loss'])
  with pytest.raises(UserError, match='--dataset=shakespeare'):
    evaluation.evaluate_workdir(workdir)
  milton = evaluation.evaluate_workdir(workdir, dataset='milton', devices=jax.devices()[:1])
  assert milton['dataset'] == 'milton'
  assert milton['loss'] == pytest.approx(final['milton/loss'], rel=1e-5)


@pytest.mark.parametrize('mixture', [('shakespeare',), ('shakespeare:0',),
                                     ('authorship:1',), ('milton:1', 'milton:2')])
def test_a_bad_mixture_is_refused_naming_the_field(mixture):
  config = shakespeare_char.get_config('tiny')
  config.data.mixture = mixture
  with pytest.raises(UserError, match='data.mixture'):
    tasks.mixture_weights(config)
