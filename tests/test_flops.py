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
