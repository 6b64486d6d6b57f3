"""Process settings: the CPU presented as several devices (mesh.cpu_devices); an accelerator
found without starting JAX; the processes of a multi-process run meeting before JAX joins
them."""
import os
import socket
import subprocess
import sys
import threading

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
  # conftest's XLA_FLAGS sets 8 devices: that count stands; fewer are taken from it
  # (run_devices), more are not there, with a note saying so.
  assert runtime.split_cpu(2) is None
  assert 'already sets --xla_force_host_platform_device_count=8' in runtime.split_cpu(9)
  import jax
  jax.devices()  # JAX has started in this process (with conftest's 8, should this be first)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count')  # no count read
  assert runtime.split_cpu(2).endswith('already sets --xla_force_host_platform_device_count.')
  monkeypatch.setenv('XLA_FLAGS', '')
  assert runtime.split_cpu(2) is None
  assert 'had already started with 8' in runtime.split_cpu(16)
  assert os.environ['XLA_FLAGS'] == ''
  assert runtime.split_cpu(0) is None


def test_a_run_takes_the_first_devices_it_asks_for_of_a_process_that_has_more():
  import jax
  assert runtime.run_devices(1) == jax.devices()[:1]
  assert runtime.run_devices(2) == jax.devices()[:2]
  assert runtime.run_devices(0) == runtime.run_devices(8) == runtime.run_devices(9) == (
      jax.devices())


@pytest.mark.parametrize('bad', [-1, 1.5, True, '2'])
def test_a_bad_count_is_refused_naming_the_field(bad):
  with pytest.raises(UserError, match='mesh.cpu_devices'):
    runtime.split_cpu(bad)


def test_an_accelerator_is_a_device_node_with_its_plugin_that_jax_platforms_allows(
    tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  dev = tmp_path / 'dev'
  dev.mkdir()
  assert runtime.find_accelerator(str(dev)) == (None, 'no GPU or TPU device node')
  (dev / 'nvidia0').touch()
  kind, why = runtime.find_accelerator(str(dev))
  assert kind is None
  assert why == (f'{dev}/nvidia0 is there but not its JAX plugin jax_cuda12_plugin '
                 '(`make venv EXTRAS=cuda` installs it)')
  # The plugin as pip leaves it: a package of that name on the path.
  (tmp_path / 'site' / 'jax_cuda12_plugin').mkdir(parents=True)
  (tmp_path / 'site' / 'jax_cuda12_plugin' / '__init__.py').touch()
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  found = ('an NVIDIA GPU', f'an NVIDIA GPU ({dev}/nvidia0, jax_cuda12_plugin)')
  assert runtime.find_accelerator(str(dev)) == found
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert runtime.find_accelerator(str(dev)) == found
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert runtime.find_accelerator(str(dev)) == (
      None, 'an NVIDIA GPU is there but JAX_PLATFORMS=cpu leaves it out')
  # A TPU VM's nodes, without libtpu: named, as the GPU's was.
  monkeypatch.delenv('JAX_PLATFORMS')
  (dev / 'nvidia0').unlink()
  (dev / 'accel0').touch()
  assert runtime.find_accelerator(str(dev))[1].endswith('not its JAX plugin libtpu '
                                                         '(`make venv EXTRAS=tpu` installs it)')


def test_processes_meet_on_the_coordinator_port_and_a_count_that_differs_is_named():
  """Process 0 and process 1 meet (threads here, processes in test_multihost and
  test_bad_inputs); then a process started with another --num_processes is told so."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  errors = []

  def process_0(count, timeout):
    try:
      runtime._meet(address, count, 0, timeout=timeout)
    except UserError as e:
      errors.append(str(e))

  host = threading.Thread(target=process_0, args=(2, 5))
  host.start()
  runtime._meet(address, 2, 1, timeout=5)
  host.join()
  assert errors == []

  host = threading.Thread(target=process_0, args=(2, 1.5))
  host.start()
  with pytest.raises(UserError) as raised:
    # Answered as soon as it connects; the long timeout only covers a late-starting thread
    # on a loaded machine.
    runtime._meet(address, 3, 1, timeout=10)
  host.join()
  assert type(raised.value) is UserError
  assert 'was started with --num_processes=2, this process with 3' in str(raised.value)
  assert errors and 'process(es) 1 of --num_processes=2 did not reach process 0' in errors[0]


def test_compiled_programs_go_to_the_users_cache_one_directory_per_processor(tmp_path):
  home = os.path.expanduser('~')
  default = runtime.compilation_cache_dir({})
  assert os.path.dirname(default) == os.path.join(home, '.cache', 'lmjax', 'xla')
  # The processor's architecture and a digest of its name and features: the same each time.
  machine, digest = os.path.basename(default).rsplit('-', 1)
  assert machine and len(digest) == 12 and runtime.compilation_cache_dir({}) == default
  assert runtime.compilation_cache_dir({'XDG_CACHE_HOME': str(tmp_path)}) == os.path.join(
      str(tmp_path), 'lmjax', 'xla', os.path.basename(default))
  env = {runtime.CACHE_ENV: '~/programs', 'XDG_CACHE_HOME': str(tmp_path)}
  assert runtime.compilation_cache_dir(env) == os.path.join(home, 'programs')
  assert runtime.compilation_cache_dir({runtime.CACHE_ENV: 'off'}) is None
  assert runtime.compilation_cache_dir({runtime.CACHE_ENV: ' OFF '}) is None


def test_a_cache_directory_set_for_jax_is_kept():
  # conftest gives the test run one, through JAX_COMPILATION_CACHE_DIR.
  import jax
  assert runtime.use_compilation_cache() == os.environ['JAX_COMPILATION_CACHE_DIR']
  assert jax.config.jax_compilation_cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR']
  assert jax.config.jax_compilation_cache_max_size == -1


def test_a_fresh_process_writes_its_programs_there_within_a_size_bound(tmp_path):
  """A directory that cannot be made is said in one line and left off; then the default
  takes, bounded in size, and a compiled program lands in it."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  code = ('import os\nimport jax, jax.numpy as jnp\nfrom lmjax import runtime\n'
          f'os.environ[runtime.CACHE_ENV] = {str(blocker / "xla")!r}\n'
          'print(runtime.use_compilation_cache(), jax.config.jax_compilation_cache_dir)\n'
          'del os.environ[runtime.CACHE_ENV]\n'
          'print(runtime.use_compilation_cache(), jax.config.jax_compilation_cache_max_size)\n'
          'jax.jit(lambda x: x * 3 + 1)(jnp.ones(4)).block_until_ready()\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', runtime.CACHE_ENV)}
  env.update(XDG_CACHE_HOME=str(tmp_path / 'cache'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stderr == (f'note: compiled programs are not kept ({blocker}/xla: [Errno 20] Not '
                         f"a directory: '{blocker}/xla'); set LMJAX_COMPILATION_CACHE to a "
                         'writable directory, or to off.\n')
  refused, used = done.stdout.splitlines()
  assert refused == 'None None'
  directory, max_size = used.split()
  assert directory == runtime.compilation_cache_dir({'XDG_CACHE_HOME': str(tmp_path / 'cache')})
  assert int(max_size) == runtime.CACHE_MAX_BYTES
  assert [n for n in os.listdir(directory) if n.startswith('jit__lambda-')], os.listdir(directory)
