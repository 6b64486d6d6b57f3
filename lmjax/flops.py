"""Model FLOPs per token and the chip's peak, for model FLOPs utilisation (MFU); the
throughput meter and the profiler trace of the training loop."""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per chip for the dtype a model of that kind trains in (bf16 on
# accelerators), from the vendors' data sheets (no sparsity). Matched against
# `device.device_kind` by prefix, longest first.
_PEAK_FLOPS = {
    'NVIDIA H200': 989e12,
    'NVIDIA H100 80GB HBM3': 989e12,  # SXM
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'NVIDIA A10G': 70e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def train_flops_per_token(num_params: int, num_position_params: int, num_layers: int,
                          d_model: int, seq_len: int) -> float:
  """6N for the matmuls (forward + backward) plus 12 L d T for attention, as PaLM's appendix B.

  A position table is a lookup, not a matmul, so its parameters are left out of N; the tied
  token embedding stays in, as it is the output projection.
  """
  return 6.0 * (num_params - num_position_params) + 12.0 * num_layers * d_model * seq_len


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 10) -> float:
  """Float32 matmul FLOP/s this host's CPU sustains: the ceiling a CPU run is held to."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops_per_device(device=None) -> float | None:
  """Peak FLOP/s of one device, or None for an accelerator this table does not know."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    # All fake CPU devices share the same cores: the host's peak is split among them.
    return measured_cpu_peak_flops() / len(jax.local_devices())
  kind = device.device_kind
  for prefix in sorted(_PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return _PEAK_FLOPS[prefix]
  return None


class Throughput:
  """Tokens per second and MFU, timed over train steps only: the compiling first step,
  evaluations and checkpoint writes restart the interval instead of counting in it."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, mesh, start_step: int):
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    peak = peak_flops_per_device(mesh.devices.flat[0])
    self.peak_flops = peak * mesh.size if peak else None
    self.measured = mesh.devices.flat[0].platform == 'cpu'  # not from the table of chips
    self.start, self.start_step, self.steps_per_sec = None, start_step, 0.0

  def after_step(self, step: int, metrics) -> None:
    if self.start is None:  # the first step compiled and ran: time from its end
      jax.block_until_ready(metrics)
      self.restart(step)

  def restart(self, step: int) -> None:
    self.start, self.start_step = time.perf_counter(), step

  def scalars(self, step: int) -> dict:
    if step > self.start_step:
      self.steps_per_sec = (step - self.start_step) / (time.perf_counter() - self.start)
      self.restart(step)
    out = {'tokens_per_sec': self.steps_per_sec * self.tokens_per_step}
    if self.peak_flops:
      achieved = out['tokens_per_sec'] * self.flops_per_token
      if self.measured and achieved > self.peak_flops:
        # A CPU's peak is measured at start-up, perhaps while the machine was busy: a run
        # that goes faster shows the true ceiling is higher, so the ceiling rises to it.
        self.peak_flops = achieved
      out['mfu'] = achieved / self.peak_flops
    return out

  def eta(self, steps_left: int) -> float:
    return steps_left / self.steps_per_sec if self.steps_per_sec else float('nan')


class Profile:
  """A trace of steps train.profile_steps = (first, last) into WORKDIR/plugins/profile,
  for TensorBoard's profile tab; () for none."""

  def __init__(self, steps_to_trace: tuple, workdir: str):
    self.steps, self.workdir = steps_to_trace, workdir

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.workdir)

  def after(self, step: int, state) -> None:
    if self.steps and step == self.steps[1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      print(f'Profiled steps {self.steps[0]}-{self.steps[1]} into {self.workdir}/plugins/'
            'profile; open the profile tab of TensorBoard on the workdir to read it.',
            flush=True)


def format_seconds(seconds: float) -> str:
  if seconds != seconds:  # nan
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
