"""lmjax/checkpoint.py, called directly on real orbax checkpoints of a tiny train state in
tmp_path: round trips, which step is restored, and what is refused or set aside.
(tests/test_faults.py damages the checkpoints of whole training runs.)"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import optim, state as state_lib
from lmjax.errors import UserError

VOCAB = 12
SEQ_LEN = 8
DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _config(d_model=16):
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=d_model, d_ff=32, max_len=SEQ_LEN)
  return config


def _init_fn(d_model=16, trainable=None, tx=None):
  config = _config(d_model)
  model = state_lib.build_model(config, VOCAB)
  tx = tx or optim.make_optimizer(config.opt, config.train.num_steps)
  return functools.partial(state_lib.init_state, model=model, tx=tx, seq_len=SEQ_LEN,
                           trainable=trainable)


def _abstract(init):
  """What restoring asks for: shapes and dtypes, each array on the first device."""
  abstract = jax.eval_shape(init, jax.random.key(0, impl='rbg'))
  return ckpt_lib.abstract_with_shardings(abstract, jax.tree.map(lambda _: DEVICE, abstract))


def _state_of_step(init, step):
  """A state of the model's shapes that differs from step to step: random numbers of seed
  `step` (drawn by NumPy: compiling the initialisers would dominate these tests)."""
  rng = np.random.default_rng(step)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)),
                       jax.eval_shape(init, jax.random.key(0, impl='rbg')))
  return state.replace(step=jnp.asarray(step, jnp.int32))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def init():
  return _init_fn()


@pytest.fixture(scope='module')
def saved(init, tmp_path_factory):
  """A workdir with checkpoints 1, 2 and 3 (each copied before a test changes it), and the
  states saved."""
  workdir = str(tmp_path_factory.mktemp('saved'))
  states = {step: _state_of_step(init, step) for step in (1, 2, 3)}
  checkpointer = ckpt_lib.Checkpointer(workdir)
  for step, state in states.items():
    checkpointer.save(step, state, {'next_example': 16 * step})
  checkpointer.wait()
  checkpointer.close()
  return workdir, states


@pytest.fixture
def workdir(saved, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(saved[0], copy)
  return copy


def test_a_saved_state_and_its_data_position_come_back_exactly(init, saved):
  workdir, states = saved
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert checkpointer.all_steps() == checkpointer.complete_steps() == [1, 2, 3]
  state, data = checkpointer.restore(2, _abstract(init))
  _assert_same(state, states[2])
  assert data == {'next_example': 32} == checkpointer.data_state(2)
  assert all(x.sharding == DEVICE for x in jax.tree.leaves(state))
  assert checkpointer.param_shapes(2)["['final_norm']['bias']"] == (16,)
  checkpointer.close()


def test_restore_checkpoint_takes_the_latest_or_the_step_asked_for(init, saved):
  workdir, states = saved
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  step, state, data = ckpt_lib.restore_checkpoint(checkpointer, _abstract(init))
  assert step == 3 and data == {'next_example': 48}
  _assert_same(state, states[3])
  step, state, _ = ckpt_lib.restore_checkpoint(checkpointer, _abstract(init), 1)
  assert step == 1 and int(state.step) == 1
  _assert_same(state.params, states[1].params)
  checkpointer.close()


def test_a_step_with_no_checkpoint_is_refused_naming_the_steps_there(init, saved):
  checkpointer = ckpt_lib.Checkpointer(saved[0], read_only=True)
  with pytest.raises(UserError, match=r'no checkpoint of step 7 in .*checkpoints; it has '
                                      r'steps 1, 2, 3\.'):
    ckpt_lib.restore_checkpoint(checkpointer, _abstract(init), 7)
  checkpointer.close()


def test_only_the_newest_checkpoints_are_kept(init, workdir):
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=3)
  checkpointer.save(4, _state_of_step(init, 4), {'next_example': 64})
  checkpointer.wait()
  assert checkpointer.all_steps() == ckpt_lib.complete_steps(workdir) == [2, 3, 4]
  with pytest.raises(UserError, match=r'it has steps 2, 3, 4\.'):
    ckpt_lib.restore_checkpoint(checkpointer, _abstract(init), 1)
  checkpointer.close()


def test_a_workdir_without_checkpoints_restores_nothing(init, tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt_lib.restore_checkpoint(checkpointer, _abstract(init)) is None
  assert ckpt_lib.complete_steps(str(tmp_path)) == []
  checkpointer.close()


def test_steps_are_listed_in_words():
  assert ckpt_lib.steps_text([]) == 'none'
  assert ckpt_lib.steps_text([40]) == 'step 40'
  assert ckpt_lib.steps_text([10, 20]) == 'steps 10, 20'


@pytest.mark.parametrize('set_aside', [False, True])
def test_a_checkpoint_of_other_shapes_is_refused_naming_the_parameter(workdir, set_aside):
  """Wrong shapes mean the wrong config, not a damaged file: never set aside."""
  checkpointer = ckpt_lib.Checkpointer(workdir)
  wider = _abstract(_init_fn(d_model=32))
  with pytest.raises(UserError, match=r"checkpoint 3 in .* does not fit the model of this "
                                      r"config: parameter \['final_norm'\]\['bias'\] is "
                                      r'\(16,\) there and \(32,\) here'):
    ckpt_lib.restore_checkpoint(checkpointer, wider, set_aside_unreadable=set_aside)
  assert ckpt_lib.complete_steps(workdir) == [1, 2, 3]
  assert not os.path.exists(os.path.join(workdir, 'unreadable_checkpoints'))
  checkpointer.close()


def _delete_the_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def _truncate_the_array_data(step_dir):
  """The metadata (shapes) still reads; the arrays do not."""
  truncated = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(3)
        truncated += 1
  assert truncated


def _garble_every_file(step_dir):
  """Bytes that are neither UTF-8 nor JSON in place of every file."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x98 not a checkpoint')


DAMAGES = [_delete_the_state_metadata, _truncate_the_array_data, _garble_every_file]


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_checkpoint_is_named_with_the_others(init, workdir, damage):
  damage(os.path.join(workdir, 'checkpoints', '3'))
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  with pytest.raises(UserError, match=r'checkpoint 3 in .* cannot be read \(.*\)\. Other '
                                      r'checkpoints: steps 1, 2 \(--step=N\)'):
    ckpt_lib.restore_checkpoint(checkpointer, _abstract(init))
  # Asked for by step, the one before it still restores.
  step, _, _ = ckpt_lib.restore_checkpoint(checkpointer, _abstract(init), 2)
  assert step == 2
  checkpointer.close()


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_restored(init, saved, workdir,
                                                                        damage, capsys):
  damage(os.path.join(workdir, 'checkpoints', '3'))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  step, state, data = ckpt_lib.restore_checkpoint(checkpointer, _abstract(init),
                                                  set_aside_unreadable=True)
  assert step == 2 and data == {'next_example': 32}
  _assert_same(state, saved[1][2])
  out = capsys.readouterr().out
  assert 'checkpoint 3 in' in out and 'cannot be read' in out and 'moved it to' in out
  assert checkpointer.all_steps() == ckpt_lib.complete_steps(workdir) == [1, 2]
  aside, = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert aside.startswith('3-')
  with open(os.path.join(workdir, 'unreadable_checkpoints', aside, 'WHY.txt')) as f:
    assert 'checkpoint 3' in f.read()
  # Training goes on and writes step 3 again.
  checkpointer.save(3, state.replace(step=jnp.asarray(3, jnp.int32)), {'next_example': 48})
  checkpointer.wait()
  assert ckpt_lib.complete_steps(workdir) == [1, 2, 3]
  checkpointer.close()


def test_another_train_state_structure_stops_and_moves_nothing(workdir):
  """An optimizer of another structure (a config change accepted with
  --allow_config_change) is not damage: every checkpoint stays, and the message says why."""
  other = _abstract(_init_fn(tx=optax.sgd(0.1)))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(UserError, match=r'checkpoint 3 in .* cannot be read .* another structure '
                                      r'.*config.json.*Every checkpoint was left where it is'):
    ckpt_lib.restore_checkpoint(checkpointer, other, set_aside_unreadable=True)
  assert ckpt_lib.complete_steps(workdir) == [1, 2, 3]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR))
  checkpointer.close()


def test_a_workdir_whose_checkpoints_are_all_damaged_never_starts_again_at_step_0(init,
                                                                                  workdir):
  for step in (1, 2, 3):
    _truncate_the_array_data(os.path.join(workdir, 'checkpoints', str(step)))
  for _ in range(2):  # the first call sets them aside; the next finds none and still refuses
    checkpointer = ckpt_lib.Checkpointer(workdir)
    with pytest.raises(UserError, match=r'holds no readable checkpoint: every one was damaged '
                                        r'.*unreadable_checkpoints.*--restart_if_all_damaged'):
      ckpt_lib.restore_checkpoint(checkpointer, _abstract(init), set_aside_unreadable=True)
    checkpointer.close()
  assert len(os.listdir(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR))) == 3
  # The user asks for a new start: nothing to restore, and the damaged ones stay aside.
  assert ckpt_lib.restore_checkpoint(ckpt_lib.Checkpointer(workdir), _abstract(init),
                                     set_aside_unreadable=True,
                                     restart_if_all_damaged=True) is None
  assert len(os.listdir(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR))) == 3


def test_frozen_parameters_are_stored_once_beside_the_checkpoints(tmp_path):
  init = _init_fn(trainable=lambda name: not name.startswith('token_embed'))
  state = _state_of_step(init, 5)
  assert set(state.frozen) == {'token_embed'} and 'token_embed' not in state.params
  workdir = str(tmp_path)
  ckpt_lib.save_frozen(workdir, state.frozen)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(5, state, {'next_example': 0})
  checkpointer.wait()
  assert 'token_embed' not in checkpointer.param_metadata(5)  # not stored per step
  _, restored, _ = ckpt_lib.restore_checkpoint(checkpointer, _abstract(init))
  _assert_same(restored, state)
  shutil.rmtree(os.path.join(workdir, ckpt_lib.FROZEN_DIR))
  with pytest.raises(UserError, match=r'frozen_params is missing: .*train it again in a new '
                                      r'--workdir'):
    checkpointer.restore(5, _abstract(init))
  checkpointer.close()


def test_restore_params_reads_only_the_parameters_of_a_step(init, saved):
  workdir, states = saved
  params = ckpt_lib.restore_params(workdir, 2, _abstract(init).params)
  _assert_same(params, states[2].params)


def test_one_process_saves_replicated_arrays_without_cutting_them(tmp_path):
  """Replicated arrays on 8 devices are written whole from one replica: a save dispatches no
  slicing program per array and device (orbax's replica-parallel writing, which shares the
  work between hosts, compiles one for each new shape), and restores what was saved."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Shapes no other test uses: a program cutting them would be compiled here.
  tree = {f'w{i}': jax.device_put(np.arange(24 * (37 + i), dtype=np.float32).reshape(
      24, 37 + i), replicated) for i in range(4)}
  compiles = []
  def listener(event, seconds, **kwargs):
    del seconds, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), asynchronous=False)
    checkpointer._manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    checkpointer.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored = checkpointer._manager.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree))))
  for name, array in tree.items():
    np.testing.assert_array_equal(restored['state'][name], array)
  checkpointer.close()
