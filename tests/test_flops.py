"""FLOP counts behind the MFU figure."""
import jax

from lmjax import flops


def test_gpt2_small_training_flops_per_token():
  # GPT-2 small: 124,439,808 parameters, of which 1024 x 768 are the position table.
  # 6 N + 12 L d T with N = 124,439,808 - 786,432 and T = 1024: about 0.855 GFLOP a token,
  # the figure nanoGPT's MFU estimate uses for this model.
  per_token = flops.train_flops_per_token(124_439_808, 1024 * 768, 12, 768, 1024)
  assert per_token == 6 * 123_653_376 + 12 * 12 * 768 * 1024
  assert 0.85e9 < per_token < 0.86e9


def test_cpu_peak_is_measured_and_shared_by_the_fake_devices():
  host_peak = flops.measured_cpu_peak_flops()
  assert 1e9 < host_peak < 1e13  # any real CPU
  per_device = flops.peak_flops_per_device(jax.devices()[0])
  assert per_device * len(jax.local_devices()) == host_peak


def test_mfu_on_a_cpu_never_exceeds_one_the_ceiling_rises_to_the_fastest_rate():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ('data',))
  throughput = flops.Throughput(tokens_per_step=100, flops_per_token=10.0, mesh=mesh,
                                start_step=0)
  throughput.peak_flops = 1.0  # as if measured while the machine was busy
  throughput.restart(0)
  first = throughput.scalars(1)
  assert first['mfu'] == 1.0 and throughput.peak_flops == first['tokens_per_sec'] * 10.0
  throughput.start -= 1000.0  # a slower interval after it reads below one
  assert 0 < throughput.scalars(2)['mfu'] < 1.0
