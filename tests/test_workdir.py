"""lmjax/workdir.py: config.json and result.json written whole, a changed config refused
over checkpoints, an unusable workdir named, and a workdir read back as a trained model."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import optim, state as state_lib, workdir as workdir_lib
from lmjax.data import tokenizers
from lmjax.errors import UserError


def tiny_config():
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=8)
  config.train.update(seq_len=8)
  return config


def _files(directory):
  return sorted(os.listdir(directory))


def test_a_saved_config_loads_back_equal(tmp_path):
  config = tiny_config()
  workdir_lib.save_config(config, str(tmp_path))
  assert _files(tmp_path) == ['config.json']  # no temporary file left behind
  loaded = workdir_lib.load_config(str(tmp_path))
  assert json.loads(loaded.to_json()) == json.loads(config.to_json())
  assert loaded.model.d_model == 16 and loaded.opt.lr == 3e-3


def test_a_directory_without_a_config_is_named_as_no_training_workdir(tmp_path):
  with pytest.raises(UserError, match=r'no config.json in .*: is it a training workdir'):
    workdir_lib.load_config(str(tmp_path))


def test_the_result_file_is_replaced_whole_or_not_at_all(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.write_result(workdir, {'eval/loss': 1.5, 'step': 80})
  path = os.path.join(workdir, workdir_lib.RESULT_FILE)
  with open(path) as f:
    assert json.load(f) == {'eval/loss': 1.5, 'step': 80}
  assert _files(workdir) == ['result.json']
  # A write that fails halfway (a value JSON cannot hold) leaves the previous file whole.
  with pytest.raises(TypeError):
    workdir_lib.write_result(workdir, {'eval/loss': 1.25, 'bad': object()})
  with open(path) as f:
    assert json.load(f) == {'eval/loss': 1.5, 'step': 80}


@pytest.fixture
def checkpointed(tmp_path):
  """A workdir holding the tiny config and a real checkpoint."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  workdir_lib.save_config(tiny_config(), workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  state = state_lib.TrainState(step=np.int32(10), params={'w': np.zeros(3, np.float32)},
                               opt_state={})
  checkpointer.save(10, state, {'next_example': 0})
  checkpointer.wait()
  checkpointer.close()
  return workdir


def test_a_changed_config_is_refused_over_checkpoints_naming_the_field(checkpointed):
  config = tiny_config()
  config.opt.lr = 0.5
  config.mesh.shape = (2, 1, 1)
  with pytest.raises(UserError, match=r'holds checkpoints of a run with another config; this '
                                      r'one differs in: opt.lr: 0.003 -> 0.5\. Use a new '
                                      r'--workdir .*--allow_config_change') as raised:
    workdir_lib.check_config_change(config, checkpointed)
  assert 'mesh' not in str(raised.value)  # where arrays live is no change of the run


def test_a_changed_config_is_allowed_when_asked_or_without_checkpoints(checkpointed, tmp_path,
                                                                       capsys):
  config = tiny_config()
  config.opt.lr = 0.5
  workdir_lib.check_config_change(config, checkpointed, allow_change=True)
  assert 'the config differs from' in capsys.readouterr().out
  fresh = str(tmp_path / 'fresh')  # a config.json but no checkpoint yet
  os.makedirs(fresh)
  workdir_lib.save_config(tiny_config(), fresh)
  workdir_lib.check_config_change(config, fresh)
  assert 'opt.lr' in capsys.readouterr().out


def test_another_mesh_resumes_with_a_note(checkpointed, capsys):
  config = tiny_config()
  config.mesh.shape = (1, 2, 1)
  config.mesh.cpu_devices += 3
  workdir_lib.check_config_change(config, checkpointed)
  out = capsys.readouterr().out
  assert 'note: resuming on another mesh (' in out and 'mesh.shape' in out
  assert f'-> {config.mesh.cpu_devices}' in out


def test_the_same_config_resumes_silently(checkpointed, capsys):
  workdir_lib.check_config_change(tiny_config(), checkpointed)
  assert capsys.readouterr().out == ''


@pytest.mark.parametrize('text, problem', [
    ('{"model": ', 'it is not valid JSON'),
    ('[1, 2]', 'it is not a JSON object of config sections'),
    ('{"model": 3}', 'it is not a JSON object of config sections'),
])
def test_a_damaged_config_json_is_named_with_the_way_back(tmp_path, text, problem):
  (tmp_path / 'config.json').write_text(text)
  message = f'config.json is damaged: {problem}.*delete it and rerun experiments/train.py'
  with pytest.raises(UserError, match=message):
    workdir_lib.load_config(str(tmp_path))
  with pytest.raises(UserError, match=message):
    workdir_lib.check_config_change(tiny_config(), str(tmp_path))


def test_prepare_creates_the_workdir_and_leaves_nothing_in_it(tmp_path):
  workdir = str(tmp_path / 'a' / 'b')
  workdir_lib.prepare(workdir)
  assert os.path.isdir(workdir) and _files(workdir) == []


def test_prepare_refuses_a_workdir_that_cannot_be_written_naming_the_flag(tmp_path):
  # The tests run as root, whom permissions do not stop: a file where a directory must be.
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match=r'--workdir=.*a_file/run cannot be written \(.*\); '
                                      'choose a directory you can write to'):
    workdir_lib.prepare(str(blocker / 'run'))


def test_a_disk_that_cannot_hold_two_checkpoints_is_refused(tmp_path):
  # 4 TiB of float32 zeros that take no memory: broadcast from one element.
  huge = {'params': np.broadcast_to(np.float32(0), (2**40,))}
  with pytest.raises(UserError, match=r'MiB free; a checkpoint of this model takes '
                                      r'4,194,304.0 MiB and two must fit'):
    workdir_lib.check_disk_space(str(tmp_path), huge)
  workdir_lib.check_disk_space(str(tmp_path), {'params': np.zeros(1000, np.float32)})


def _random_like(abstract, seed):
  """Random numbers of the shapes and dtypes of `abstract`, different for each seed."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract)


def test_a_workdir_written_piece_by_piece_loads_back_as_the_trained_model(tmp_path):
  """What a finished run leaves (config, tokenizer, checkpoints) read back by step."""
  workdir = str(tmp_path)
  config = tiny_config()
  tokenizer = tokenizers.CharTokenizer(list('abcdefghij '))
  tokenizer.save(workdir)
  workdir_lib.save_config(config, workdir)
  model = state_lib.build_model(config, tokenizer.vocab_size)
  abstract = jax.eval_shape(functools.partial(
      state_lib.init_state, model=model,
      tx=optim.make_optimizer(config.opt, config.train.num_steps), seq_len=8),
      jax.random.key(0))
  states = {step: _random_like(abstract, seed=step) for step in (4, 8)}
  checkpointer = ckpt_lib.Checkpointer(workdir)
  for step, state in states.items():
    checkpointer.save(step, state, {'next_example': step})
  checkpointer.wait()
  checkpointer.close()

  loaded_config, loaded_tokenizer, state, step = workdir_lib.restore_state(workdir)
  assert step == 8 and loaded_config.model.d_model == 16
  assert loaded_tokenizer.decode(loaded_tokenizer.encode('bad cafe')) == 'bad cafe'
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[8]), strict=True):
    np.testing.assert_array_equal(a, b)
  _, _, params, step = workdir_lib.load_trained(workdir, step=4)
  assert step == 4
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(states[4].params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_workdir_without_checkpoints_is_refused(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.save_config(tiny_config(), workdir)
  tokenizers.CharTokenizer(list('ab')).save(workdir)
  with pytest.raises(UserError, match=r'no checkpoint in .*checkpoints; train first'):
    workdir_lib.restore_state(workdir)
