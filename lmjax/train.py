"""Training: `train_and_evaluate` runs the phases of a run, and `Loop` the steps with their
periodic work (log, evaluate, checkpoint, profile, stop on a signal).

What differs between kinds of training (language model, masked LM, recurrent stream,
mixture, classification) is the task's (`lmjax.tasks`); the steps are `lmjax.steps`, the
state `lmjax.state`, the workdir's files `lmjax.workdir`.
"""
import dataclasses
import functools
import itertools
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import autotune, config as config_lib
from lmjax import events, finetune, flops, models, optim, runtime, sharding, state as state_lib
from lmjax import steps, storage, tasks, workdir as workdir_lib
from lmjax.data import pipeline
from lmjax.errors import UserError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None, *,
                       allow_config_change: bool = False,
                       restart_if_all_damaged: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final
  evaluation (empty if a signal stopped the run first).

  `devices` defaults to all of them; a subset is for comparisons (tests, benchmarks).
  `allow_config_change` resumes checkpoints that were written under another config.
  `restart_if_all_damaged` trains from step 0 a workdir whose checkpoints were all set
  aside as damaged (without it, such a workdir is refused).
  """
  started = time.perf_counter()  # start-up counts in the run's train_seconds
  workdir = storage.absolute(workdir)
  config, tuning = autotune.from_workdir(config, workdir)  # before the config is checked
  mesh, base = _set_up(config, workdir, devices, allow_config_change)
  task = tasks.task_class(config)(config)
  task.read()
  tokenizer = workdir_lib.prepare_tokenizer(config, workdir, base, task.tokenizer_texts)
  task.check_sample_prompt(tokenizer)
  task.load(tokenizer, workdir)
  if config.train.autotune:  # the fastest settings of the step, timed or cached
    config, mesh, tuning = autotune.settle(config, mesh, task, tokenizer.vocab_size, tuning)
  model = state_lib.build_model(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  state, shardings = _create_state(config, workdir, model, tx, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  state, progress = _restore_or_start(config, workdir, checkpointer, state, shardings,
                                      restart_if_all_damaged)
  if progress.step == 0:
    num_params, num_trained = state_lib.param_counts(state)
    trained = f' ({num_trained:,} trained)' if num_trained != num_params else ''
    print(f'Starting a new run in {workdir}: {num_params:,} parameters{trained}, '
          f'vocabulary {tokenizer.vocab_size}, {task.describe()}.', flush=True)
    if base:
      state = finetune.start_from_base(config, base, state, shardings,
                                       finetune.trainable_filter(config), mesh)
  rules = sharding.rules_as_tuples(config.mesh.rules)
  step_fn, eval_fn = steps.jit_steps(model, tx, mesh, rules, shardings,
                                     task.stateful, config.train.microbatches)
  several_fn = config.train.steps_per_dispatch > 1 and steps.jit_train_step(
      model, tx, mesh, rules, shardings, config.train.microbatches, several=True)
  writer = _open_writer(config, workdir, checkpointer, state, progress.step, tuning)
  loop = Loop(config, workdir, task, mesh, checkpointer, writer, state, progress, started,
              tuning)
  loop.compile(step_fn, eval_fn, model, several_fn)
  return loop.run()


def _set_up(config, workdir: str, devices, allow_config_change: bool):
  """(mesh, base run's workdir or None): the config checked against the mesh, the workdir
  writable and its saved config compatible."""
  runtime.keep_freed_host_memory()
  note = runtime.split_cpu(config.mesh.cpu_devices)
  if jax.process_index() == 0 and config.train.recipe:
    print(config.train.recipe, flush=True)
  if jax.process_index() == 0 and note:
    print(f'note: {note}', flush=True)
  if devices is None:
    devices = runtime.run_devices(config.mesh.cpu_devices)
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.validate_config(config, mesh)
  base = finetune.base_workdir(config, workdir)  # the run fine-tuned from, if any
  workdir_lib.prepare(workdir)
  workdir_lib.check_config_change(config, workdir, allow_config_change)
  return mesh, base


def _create_state(config, workdir: str, model, tx, mesh):
  """(state, shardings): a fresh state initialised in place, its trainable parameters
  checked first on the shapes alone (nothing compiled), and refused before anything is
  allocated if the disk cannot hold its checkpoints."""
  trainable = finetune.trainable_filter(config)
  if trainable is not None:
    shapes = jax.eval_shape(lambda rng: state_lib.init_state(
        rng, model=model, tx=tx, seq_len=config.train.seq_len), jax.random.key(0))
    finetune.check_trainable(config, finetune.param_names(shapes.params))
  state, shardings = state_lib.create_train_state(
      model, tx, mesh, sharding.rules_as_tuples(config.mesh.rules), config.train.seed,
      config.train.seq_len,
      carry_rows=state_lib.carry_rows(config), trainable=trainable,
      check_shapes=functools.partial(workdir_lib.check_disk_space, workdir))
  return state, shardings


@dataclasses.dataclass
class Progress:
  """What a checkpoint holds beside the state: the last step, the metrics since the last log
  line (a resumed run logs the same means), skipped steps, seconds before this process."""
  step: int = 0
  next_example: int = 0  # where the training stream resumes
  history: list = dataclasses.field(default_factory=list)
  skipped: int = 0
  seconds_before: float = 0.0


def _restore_or_start(config, workdir: str, checkpointer, state, shardings,
                      restart_if_all_damaged: bool = False):
  """(state, progress) of the latest readable checkpoint, or the fresh ones at step 0. The
  config is saved only now: one whose model does not fit is not kept."""
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  restored = ckpt_lib.restore_checkpoint(checkpointer, abstract, set_aside_unreadable=True,
                                         restart_if_all_damaged=restart_if_all_damaged)
  workdir_lib.save_config(config, workdir)
  if restored is None:
    return state, Progress()
  step, state, data_state = restored
  print(f'Resuming from step {step} of {config.train.num_steps} '
        f'(checkpoint {checkpointer.directory}/{step}).', flush=True)
  return state, Progress(step, int(data_state['next_example']),
                         [(s, m) for s, m in data_state.get('pending_metrics', [])],
                         int(data_state.get('skipped_steps', 0)),
                         float(data_state.get('train_seconds', 0.0)))


def _open_writer(config, workdir: str, checkpointer, state, start_step: int, tuning=None):
  """The TensorBoard writer (process 0's; the others only log). A new run first writes
  its frozen parameters, its hyperparameters, its config and its autotune table."""
  if start_step == 0 and state.frozen is not None:  # written before any checkpoint
    frozen_dir = f'{workdir}/{ckpt_lib.FROZEN_DIR}'
    with workdir_lib.writing(f'the frozen parameters to {frozen_dir}', checkpointer):
      ckpt_lib.save_frozen(workdir, state.frozen)
  with workdir_lib.writing(f'TensorBoard events to {workdir}', checkpointer):
    writer = events.open_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
      num_params, num_trained = state_lib.param_counts(state)
      writer.write_hparams({'num_params': num_params, 'num_trained_params': num_trained,
                            **workdir_lib.flatten(config.to_dict())})
      # Indented four spaces: TensorBoard's text tab shows it as a code block.
      writer.write_texts(0, {'config': '\n'.join(
          '    ' + line for line in config.to_json(indent=2).splitlines()),
          **({'autotune': tuning.table} if tuning and tuning.table else {})})
  return writer


class Loop:
  """The train steps from `progress.step` on, and the periodic work between them: log
  (train.log_every), evaluate (train.eval_every), checkpoint (train.checkpoint_every, and
  when a signal stops the run), profile (train.profile_steps). Each is a method the loop
  calls when it is due; every one is due at the last step.

  The steps are dispatched train.steps_per_dispatch at a time, and a dispatch ends early
  where periodic work is due: every run, whatever its resumes, runs the same steps in the
  same dispatches."""

  def __init__(self, config, workdir: str, task, mesh, checkpointer, writer, state,
               progress: Progress, started: float, tuning=None):
    self.config, self.t, self.workdir, self.task, self.mesh = (
        config, config.train, workdir, task, mesh)
    self.checkpointer, self.writer, self.state, self.progress = (
        checkpointer, writer, state, progress)
    # perf_counter() when the process began the run; train.autotune's choice, for result.json
    self.started, self.tuning = started, tuning
    self.rules = sharding.rules_as_tuples(config.mesh.rules)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.stacked_sharding = sharding.stacked_batch_sharding(mesh)
    self.rng = jax.random.key(self.t.seed + 1)  # dropout's, folded with the step
    self.schedule = optim.learning_rate_schedule(config.opt, self.t.num_steps)
    self.pending = []  # (first step, device metrics) of dispatches not yet checked
    self.eval_metrics, self.texts = {}, {}  # the latest evaluation's
    self.stop = runtime.StopSignals()
    # Counted on the whole model: frozen parts still run forwards and pass gradients back.
    flops_per_token = models.train_flops_per_token(
        config.model, finetune.join(state.params, state.frozen), self.t.seq_len)
    self.meter = flops.Throughput(self.t.batch_size * self.t.seq_len, flops_per_token, mesh,
                                  progress.step)
    self.profile = flops.Profile(tuple(self.t.profile_steps), workdir)

  def compile(self, step_fn, eval_fn, model, several_fn=None) -> None:
    """Opens the training stream where the run resumes and compiles the train step for
    its batches now, to know its memory before step one; with `several_fn` (the steps of
    one dispatch), that one instead, and `step_fn` only if a shorter dispatch needs it."""
    self.eval_fn, self.step_fn, self.several_fn = eval_fn, step_fn, several_fn
    # Every stateful evaluation starts from this zero carry (the eval step does not donate).
    self.eval_start = (state_lib.eval_carry(model, self.mesh, self.t.eval_batch_size)
                       if self.task.stateful else None)
    self.batches = iter(self.task.train_dataset(self.progress.next_example)
                        .as_numpy_iterator())
    if self.progress.step < self.t.num_steps:
      first = next(self.batches)
      # The global batch's shapes (each process holds its rows): nothing is transferred.
      k = self.t.steps_per_dispatch
      lead, batch_sharding = (((k,), self.stacked_sharding) if several_fn else
                              ((), self.batch_sharding))
      batch = {key: jax.ShapeDtypeStruct(
                   lead + (len(v) * jax.process_count(),) + v.shape[1:], v.dtype,
                   sharding=batch_sharding)
               for key, v in first.items()}
      compiled = steps.compile_train_step(several_fn or step_fn, self.state, batch, self.rng,
                                          self.mesh, self.rules)
      self.several_fn, self.step_fn = (compiled, step_fn) if several_fn else (None, compiled)
      self.batches = itertools.chain([first], self.batches)

  def run(self) -> dict:
    """Trains to train.num_steps; returns the final evaluation ({} when stopped)."""
    t = self.t
    step = self.progress.step
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), self.stop:
      for dispatch in itertools.count(1):
        if step == t.num_steps:
          break
        step = self.train_steps(step)
        if self._due(step, t.log_every):
          self.log(step)
        if self._due(step, t.eval_every):
          self.evaluate(step)
        stopping = self.stop.should_stop(dispatch)
        if stopping or self._due(step, t.checkpoint_every):
          self.save(step)
        if stopping:
          return self.stopped(step)
        if step % t.eval_every == 0 or step % t.checkpoint_every == 0:
          self.meter.restart(step)  # evaluating and saving is not training time
      self.wait_for_writes(t.num_steps)
    return self.finish()

  def _due(self, step: int, every: int) -> bool:
    return step % every == 0 or step == self.t.num_steps

  def dispatch_end(self, step: int) -> int:
    """The last step of the dispatch that follows `step`: train.steps_per_dispatch on, or
    sooner where periodic work or the profile's start or end falls."""
    t = self.t
    end = min(step + t.steps_per_dispatch, t.num_steps)
    for every in (t.log_every, t.eval_every, t.checkpoint_every):
      end = min(end, (step // every + 1) * every)
    if self.profile.steps:  # the trace starts and stops between dispatches
      first, last = self.profile.steps
      end = min([end] + [edge for edge in (first - 1, last) if edge > step])
    return end

  def train_steps(self, step: int) -> int:
    """The steps of one dispatch after `step`; returns its last."""
    end = self.dispatch_end(step)
    self.profile.before(step + 1)
    if self.several_fn and end - step == self.t.steps_per_dispatch:
      local = [next(self.batches) for _ in range(end - step)]
      batches = {k: np.stack([b[k] for b in local]) for k in local[0]}
      self.state, metrics = self.several_fn(
          self.state, pipeline.to_global(batches, self.stacked_sharding), self.rng)
      self.pending.append((step + 1, metrics))
    else:  # one step a dispatch, or a shorter dispatch than the compiled one
      for s in range(step + 1, end + 1):
        self.state, metrics = self.step_fn(
            self.state, pipeline.to_global(next(self.batches), self.batch_sharding), self.rng)
        self.pending.append((s, metrics))
    self.profile.after(end, self.state)
    self.meter.after_step(end, metrics)
    return end

  def check_finite(self) -> None:
    """Brings the pending metrics to the host and acts on non-finite steps among them
    (train.nonfinite): stop with a message, or count the skipped update and go on."""
    p, checked = self.progress, []
    for first, metrics in jax.device_get(self.pending):
      per_step = {k: np.atleast_1d(v) for k, v in metrics.items()}  # several steps' or one's
      checked += [(first + i, {k: float(v[i]) for k, v in per_step.items()})
                  for i in range(len(per_step['loss']))]
    self.pending = []
    p.history += checked
    for s, m in checked:
      if not m['nonfinite']:
        continue
      if self.t.nonfinite == 'stop':
        self.checkpointer.wait()
        last = self.checkpointer.complete_steps()[-1:]
        saved = (f'checkpoint {last[0]} in {self.checkpointer.directory} is the last good '
                 'one' if last else 'no checkpoint had been written yet')
        raise UserError(
            f'the loss or gradient is not finite at step {s} (loss {m["loss"]}, gradient '
            f'norm {m["grad_norm"]}); training stopped, and {saved}. Lower opt.lr, lengthen '
            'opt.warmup_steps or set opt.grad_clip, then rerun (it resumes from the last '
            'checkpoint); or set train.nonfinite=skip to drop such updates and go on.')
      p.skipped += 1
      print(f'step {s}: loss {m["loss"]}, gradient norm {m["grad_norm"]}: not finite; the '
            f'update is skipped ({p.skipped} skipped so far).', flush=True)

  def log(self, step: int) -> None:
    """The means of the steps since the last log line, to TensorBoard and the console."""
    self.check_finite()  # waits for the step to finish
    scalars = _mean_metrics(self.progress.history)
    self.progress.history = []
    del scalars['nonfinite']
    scalars['skipped_steps'] = self.progress.skipped
    scalars.update(self.meter.scalars(step))
    scalars['learning_rate'] = float(self.schedule(step - 1))
    with workdir_lib.writing(f'TensorBoard events to {self.workdir}', self.checkpointer):
      self.writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
    print(f'step {step:>6}/{self.t.num_steps}  loss {scalars["loss"]:.4f}  '
          f'lr {scalars["learning_rate"]:.2e}  {scalars["tokens_per_sec"]:,.0f} tokens/s  '
          f'MFU {scalars.get("mfu", float("nan")):.1%}  '
          f'ETA {flops.format_seconds(self.meter.eta(self.t.num_steps - step))}', flush=True)

  def _params(self):
    return finetune.join(self.state.params, self.state.frozen)

  def evaluate(self, step: int) -> None:
    """The task's evaluation, to TensorBoard and the console, with its texts."""
    self.eval_metrics = self.task.evaluate(self.eval_fn, self._params(), self.batch_sharding,
                                           self.eval_start)
    scalars = {k: v for k, v in self.eval_metrics.items() if isinstance(v, float)}
    with workdir_lib.writing(f'TensorBoard events to {self.workdir}', self.checkpointer):
      self.writer.write_scalars(step, {f'eval/{k}': v for k, v in scalars.items()})
    print(f'eval at step {step}: ' + '  '.join(f'{k} {v:.4f}' for k, v in scalars.items()),
          flush=True)
    self.texts = self.task.texts(self._params(), self.eval_metrics)
    if self.texts:
      with workdir_lib.writing(f'TensorBoard events to {self.workdir}', self.checkpointer):
        self.writer.write_texts(step, self.texts)

  def save(self, step: int) -> None:
    """A checkpoint of the state and the progress, written in the background; a write
    that failed earlier surfaces here, at the next save."""
    self.check_finite()
    p = self.progress
    # A copy of the history: orbax writes it in the background while the loop appends.
    data_state = {'next_example': step * self.t.batch_size, 'skipped_steps': p.skipped,
                  'pending_metrics': list(p.history),
                  'train_seconds': p.seconds_before + time.perf_counter() - self.started}
    with workdir_lib.writing(f'a checkpoint (noticed when saving step {step})', self.checkpointer):
      self.checkpointer.save(step, self.state, data_state)

  def wait_for_writes(self, step: int) -> None:
    what = f'a checkpoint (noticed when finishing step {step})'
    with workdir_lib.writing(what, self.checkpointer):
      self.checkpointer.wait()

  def stopped(self, step: int) -> dict:
    self.wait_for_writes(step)
    self.checkpointer.close()
    self.writer.flush()
    self.writer.close()
    print(f'Stopped by {self.stop.received} at step {step} of {self.t.num_steps}; checkpoint '
          f'{self.checkpointer.directory}/{step} is complete. Run the same command to '
          'resume.', flush=True)
    return {}

  def finish(self) -> dict:
    """Writes result.json (the final evaluation, the best over the whole run) and says
    where things are."""
    t = self.t
    self.checkpointer.close()
    if not self.eval_metrics:  # resumed a finished run: report where it stands
      self.eval_metrics = self.task.evaluate(self.eval_fn, self._params(),
                                             self.batch_sharding, self.eval_start)
      self.texts = self.task.texts(self._params(), self.eval_metrics)
    self.writer.flush()
    self.writer.close()
    # The best evaluation over the whole run, resumed segments included: the event files
    # hold them all.
    eval_losses = {t.num_steps: self.eval_metrics['loss']}
    if jax.process_index() == 0:  # the one that writes events
      eval_losses = events.read_scalars(self.workdir).get('eval/loss') or eval_losses
    best_step = min(eval_losses, key=lambda s: (eval_losses[s], s))
    metrics = self.task.final_metrics(self.eval_metrics)
    num_params, num_trained = state_lib.param_counts(self.state)
    workdir_lib.write_result(self.workdir, {
        'step': t.num_steps, 'eval': metrics, 'best_eval_loss': eval_losses[best_step],
        'best_eval_step': best_step, 'num_params': num_params,
        'num_trained_params': num_trained, 'skipped_steps': self.progress.skipped,
        **({'autotune': self.tuning.as_result()} if self.tuning else {}),
        'train_seconds': self.progress.seconds_before + time.perf_counter() - self.started})
    print(f'\nDone: eval loss {metrics["loss"]:.4f} at step {t.num_steps} (best '
          f'{eval_losses[best_step]:.4f}, at step {best_step}); checkpoints in '
          f'{self.checkpointer.directory}, results in {self.workdir}/{workdir_lib.RESULT_FILE}.'
          f'\n{self.task.closing(self.workdir, metrics, self.texts)}', flush=True)
    return metrics


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  """Means of (step, host metrics) pairs, in float64: a resumed run, which reads part of
  the list back from its checkpoint, logs the very same numbers."""
  return {k: float(np.mean(np.asarray([m[k] for _, m in history], np.float64)))
          for k in history[0][1]}
