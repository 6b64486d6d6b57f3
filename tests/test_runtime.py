"""Process settings: the CPU presented as several devices (mesh.cpu_devices)."""
import os
import subprocess
import sys

import pytest

from lmjax import runtime
from lmjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without_device_count(env):
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return {**env, 'XLA_FLAGS': ' '.join(flags)}


def test_a_fresh_process_gets_the_devices_it_asks_for():
  code = ('import jax\nfrom lmjax import runtime\n'
          'assert runtime.split_cpu(3) is None\n'
          'print(len(jax.devices()), jax.devices()[0].platform)')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env=_without_device_count(os.environ), timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['3', 'cpu']


def test_an_existing_device_count_or_a_started_jax_is_left_alone(monkeypatch):
  # conftest's XLA_FLAGS sets 8 devices: that count stands, with a note saying so.
  assert 'already sets' in runtime.split_cpu(2)
  monkeypatch.setenv('XLA_FLAGS', '')
  import jax
  jax.devices()  # JAX has started in this process
  assert 'had already started' in runtime.split_cpu(2)
  assert os.environ['XLA_FLAGS'] == ''
  assert runtime.split_cpu(0) is None


@pytest.mark.parametrize('bad', [-1, 1.5, True, '2'])
def test_a_bad_count_is_refused_naming_the_field(bad):
  with pytest.raises(UserError, match='mesh.cpu_devices'):
    runtime.split_cpu(bad)
