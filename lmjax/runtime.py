"""Process-level settings: faster training on a CPU host (its memory, its device count); the
accelerator a run will have, found before JAX starts; compiled programs kept on disk;
trainers that stop with their sweep; joining a multi-process run."""
import ctypes
import glob
import hashlib
import importlib.util
import os
import platform
import re
import signal
import socket
import sys
import threading
import time

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_host_memory() -> bool:
  """Keeps memory that XLA:CPU frees in the process for reuse, instead of unmapping it.

  XLA:CPU allocates and frees its activation buffers on every step. With glibc's defaults
  each large one is a fresh mmap whose pages the kernel must fault in and zero again, which
  on 2 cores showed up as half the CPU time spent in the kernel. Serving them from a heap
  that is never trimmed took a step of the `:cpu` recipe from 56 to 39 ms. The price is
  that the process keeps its peak memory. Returns whether the setting took (glibc only).
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # not glibc (e.g. musl)
    return False
  ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # below 1 GiB: from the heap, not mmap
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never hand the heap's top back
  ok &= libc.mallopt(_M_TOP_PAD, 1 << 28)  # grow the heap 256 MiB at a time
  return bool(ok)


_CPU_COUNT_FLAG = '--xla_force_host_platform_device_count'


def split_cpu(num_devices: int) -> str | None:
  """Has XLA:CPU present the host as `num_devices` devices (`mesh.cpu_devices`), which the
  data-parallel mesh then splits each batch over. Only takes effect before JAX starts its
  CPU backend; where XLA_FLAGS already sets a count, or JAX has started, with at least
  `num_devices` devices, the run's mesh takes the first of them (`run_devices`). It adds CPU
  devices only, so a run on a GPU or TPU is not affected. Returns a note when the setting
  cannot apply, else None.

  Why: on 2 cores XLA:CPU keeps both busy only part of the time on one device (many of the
  step's ops are too small to split over threads); two devices, each running its half of
  the batch, took the :full_cpu recipe's step from 6.8 to 5.9 s (the small `:cpu` recipe's
  from 44 to 33 ms timed alone, though not its training loop, which its host work paces).
  The sum of the devices' gradients is rounded differently from one device's.
  """
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 0:
    from lmjax.errors import UserError
    raise UserError(f'mesh.cpu_devices={num_devices!r}: give a whole number of CPU devices, '
                    'or 0 for JAX\'s one.')
  if num_devices == 0:
    return None
  flags = os.environ.get('XLA_FLAGS', '')
  if _CPU_COUNT_FLAG in flags:
    present = re.search(fr'{_CPU_COUNT_FLAG}=(\d+)', flags)
    if present and int(present.group(1)) >= num_devices:
      return None  # run_devices takes the first num_devices of them
    return (f'mesh.cpu_devices={num_devices} not applied: XLA_FLAGS already sets '
            f'{present.group(0) if present else _CPU_COUNT_FLAG}.')
  if 'jax' in sys.modules:
    try:  # JAX's own check; it has no public one
      from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
      backends_are_initialized = lambda: False
    if backends_are_initialized():
      import jax
      if jax.devices()[0].platform == 'cpu' and jax.device_count() < num_devices:
        return (f'mesh.cpu_devices={num_devices} not applied: JAX had already started '
                f'with {jax.device_count()}; set it before the first JAX call.')
      return None
  os.environ['XLA_FLAGS'] = f'{flags} {_CPU_COUNT_FLAG}={num_devices}'.strip()
  return None


def run_devices(num_cpu_devices: int) -> list:
  """The devices a run's mesh spans: all of JAX's, or, where one process presents more CPU
  devices than `mesh.cpu_devices` asks for (a count set in XLA_FLAGS, as the tests' 8, or
  a notebook's JAX already started), the first `num_cpu_devices` of them, as autotune's
  trials of fewer devices do."""
  import jax
  devices = jax.devices()
  if (num_cpu_devices and jax.process_count() == 1 and devices[0].platform == 'cpu' and
      len(devices) > num_cpu_devices):
    return devices[:num_cpu_devices]
  return devices


# The accelerators setup.cfg has an extra for: what to call it, its device nodes under /dev,
# the JAX plugin modules that drive it, and the names JAX_PLATFORMS gives it (the first is
# the extra's).
_ACCELERATORS = (
    ('an NVIDIA GPU', ('nvidia[0-9]*',), ('jax_cuda12_plugin', 'jax_cuda13_plugin'),
     ('cuda', 'gpu')),
    ('a TPU', ('accel[0-9]*', 'vfio/[0-9]*'), ('libtpu',), ('tpu',)),
)


def find_accelerator(dev: str = '/dev') -> tuple[str | None, str]:
  """(kind, why): the accelerator JAX will train on ('an NVIDIA GPU' or 'a TPU'), or
  None and why there is none, as one phrase.

  Found without starting JAX, which would fix the device count before `mesh.cpu_devices`
  and `jax.distributed` act: an accelerator is a device node under `dev` with the JAX
  plugin that drives it installed, and allowed by JAX_PLATFORMS where that is set.
  """
  allowed = set(filter(None, os.environ.get('JAX_PLATFORMS', '').split(',')))
  why_not = []
  for kind, nodes, plugins, platforms in _ACCELERATORS:
    found = sorted(p for pattern in nodes for p in glob.glob(os.path.join(dev, pattern)))
    if not found:
      continue
    plugin = next((name for name in plugins if importlib.util.find_spec(name)), None)
    if plugin is None:
      why_not.append(f'{found[0]} is there but not its JAX plugin {plugins[0]} '
                     f'(`make venv EXTRAS={platforms[0]}` installs it)')
    elif allowed and not allowed & set(platforms):
      why_not.append(f'{kind} is there but JAX_PLATFORMS={",".join(sorted(allowed))} '
                     'leaves it out')
    else:
      return kind, f'{kind} ({found[0]}, {plugin})'
  return None, '; '.join(why_not) or 'no GPU or TPU device node'


CACHE_ENV = 'LMJAX_COMPILATION_CACHE'  # a directory, or 'off'
CACHE_MAX_BYTES = 2 << 30  # the least recently used programs go beyond this


def user_cache_dir(environ=os.environ) -> str:
  """lmjax's directory in the user's cache: $XDG_CACHE_HOME/lmjax, ~/.cache/lmjax by default."""
  root = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'lmjax')


def compilation_cache_dir(environ=os.environ) -> str | None:
  """Where the scripts keep the programs XLA compiles: $LMJAX_COMPILATION_CACHE if set
  ('off': nowhere), else xla/HOST_CPU in `user_cache_dir()`. On a CPU the program is
  machine code for this processor and JAX's cache key does not name it, so each processor
  model (and instruction set) has its own directory: a home directory shared by different
  machines never hands one the other's code."""
  setting = environ.get(CACHE_ENV, '').strip()
  if setting.lower() == 'off':
    return None
  if setting:
    return os.path.expanduser(setting)
  return os.path.join(user_cache_dir(environ), 'xla', _host_cpu())


def _host_cpu() -> str:
  """The machine's architecture and a digest of its processor's name and features."""
  described = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      lines = [line for line in f if line.startswith(('model name', 'flags', 'Features'))]
    described = ''.join(dict.fromkeys(lines))  # each kind of line once (one per core)
  except OSError:
    pass
  return f'{platform.machine() or "cpu"}-{hashlib.sha256(described.encode()).hexdigest()[:12]}'


def use_compilation_cache() -> str | None:
  """Has JAX keep compiled programs on disk (`compilation_cache_dir()`), so that a resumed
  or repeated run, a decode or an evaluation loads the programs compiled before instead of
  compiling them again (a 20-step run of the `:cpu` recipe on 2 cores: 17-18 s the second
  time, 24-31 s the first). JAX writes from process 0 only, the programs that took at least
  a second to compile (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS), and forgets the least
  recently used beyond CACHE_MAX_BYTES. A directory set for JAX itself
  (JAX_COMPILATION_CACHE_DIR) is kept as it is. A local directory that cannot be written is
  said in one line on stderr, and the cache stays off. Call before the first compile.
  Returns the directory, or None when off."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = compilation_cache_dir()
  if directory is None:
    return None
  if '://' not in directory:  # a local one must be writable
    try:
      os.makedirs(directory, exist_ok=True)
      if not os.access(directory, os.W_OK):
        raise PermissionError('not writable')
    except OSError as e:
      print(f'note: compiled programs are not kept ({directory}: {e}); set {CACHE_ENV} to a '
            'writable directory, or to off.', file=sys.stderr, flush=True)
      return None
  jax.config.update('jax_compilation_cache_dir', directory)
  if jax.config.jax_compilation_cache_max_size == -1:  # not set by the user
    jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  return directory


PARENT_ENV = 'LMJAX_STOP_WITH_PARENT'  # set by a sweep for its trainers: the sweep's pid
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
  """Asks Linux for SIGTERM when the process named by $LMJAX_STOP_WITH_PARENT dies.

  A sweep sets it for the trainers it starts: if the sweep is killed (even by SIGKILL),
  each trainer checkpoints and exits instead of training on, orphaned, in a workdir that
  the next sweep resumes. Done here, after exec, because a forked child of a process with
  JAX's threads must not run Python before exec.
  """
  parent = os.environ.pop(PARENT_ENV, '')
  if not parent or not sys.platform.startswith('linux'):
    return
  try:
    ctypes.CDLL('libc.so.6').prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except OSError:
    return
  if os.getppid() != int(parent):  # the parent died before the request took effect
    os.kill(os.getpid(), signal.SIGTERM)


def start_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, timeout: int = 300) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`), before JAX
  touches a device.

  With no arguments JAX finds the cluster itself: TPU pod slices, SLURM (srun), Open MPI
  and Kubernetes set what it reads. Otherwise name the coordinator (process 0's
  host:port), the process count and this process's index; every process runs the same
  command. On CPU the collectives go through gloo, so several processes on one machine
  (the tests) or on several make one run. A process stops with a message when the others
  have not all joined within `timeout` seconds.
  """
  import jax  # callers set flags and the environment first

  from lmjax.errors import UserError

  if coordinator_address and (num_processes is None or process_id is None):
    raise UserError('--coordinator_address needs --num_processes and --process_id as well '
                    '(the same address and count on every process, its own id on each).')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id} must be in [0, --num_processes='
                    f'{num_processes}).')
  if coordinator_address:
    _meet(coordinator_address, num_processes, process_id, timeout)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices only
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout)
  except (ValueError, RuntimeError) as e:
    raise UserError(f'joining the multi-process run failed ({type(e).__name__}: '
                    f'{str(e).strip().splitlines()[0][:300]}). Check that every process was '
                    'given the same --coordinator_address and --num_processes, and that '
                    'process 0 is reachable there.') from None


def _meet(address: str, num_processes: int, process_id: int, timeout: float) -> None:
  """Checks that every process of the run is there before JAX joins them.

  JAX's own wait for a missing process ends by terminating the process from C++, with a
  fatal log and a stack, so the processes first meet here, on the coordinator's port:
  process 0 listens until each other process has connected and said its id; every other
  process connects until process 0 answers. The port is then free for JAX's service.
  """
  from lmjax.errors import UserError

  host, port = address.rsplit(':', 1)
  host, port = host.strip('[]'), int(port)
  deadline = time.monotonic() + timeout
  flag = f'--coordinator_address={address}'
  if process_id == 0:
    try:
      server = socket.create_server(('', port))
    except OSError as e:
      raise UserError(f'process 0 cannot listen on port {port} of {flag} ({e.strerror}): '
                      'choose a free port.') from None
    waiting = set(range(1, num_processes))
    with server:
      while waiting and (left := deadline - time.monotonic()) > 0:
        server.settimeout(left)
        try:
          connection, _ = server.accept()
        except TimeoutError:
          break
        with connection:
          connection.settimeout(max(deadline - time.monotonic(), 1.0))
          try:
            words = connection.makefile().readline().split()
            if len(words) == 2 and words[1] == str(num_processes):
              waiting.discard(int(words[0]))
            connection.sendall(f'{num_processes}\n'.encode())
            connection.recv(1)  # the other side closes first (no TIME_WAIT on this port)
          except (OSError, ValueError):
            pass  # not one of ours, or gone: its process reports for itself
    if waiting:
      raise UserError(
          f'process(es) {", ".join(map(str, sorted(waiting)))} of --num_processes='
          f'{num_processes} did not reach process 0 at {flag} within --distributed_timeout='
          f'{timeout:g} s. Start every process with the same --coordinator_address and '
          '--num_processes and its own --process_id, and check that they can reach this host.')
    return
  while True:
    try:
      wait = max(deadline - time.monotonic(), 1.0)
      with socket.create_connection((host, port), timeout=wait) as s:
        s.sendall(f'{process_id} {num_processes}\n'.encode())
        answer = s.makefile().readline().strip()
      if answer != str(num_processes):
        raise UserError(f'process 0 at {flag} was started with --num_processes={answer or "?"}, '
                        f'this process with {num_processes}: give every process the same count.')
      return
    except OSError:
      if time.monotonic() > deadline:
        raise UserError(
            f'process 0 could not be reached at {flag} within --distributed_timeout={timeout:g} '
            's. Start process 0 there (the same command with --process_id=0), and check the '
            'host and port.') from None
      time.sleep(0.2)


class StopSignals:
  """While active, SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the
  current step and write its checkpoint; a second Ctrl-C aborts at once. On several
  processes JAX's preemption sync point picks the step, the same on every host."""

  def __init__(self):
    self.received = None  # the signal's name once one came
    self._previous = {}
    import jax  # here: this module is read before JAX starts
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.received == signal.Signals(signum).name:
      return  # the same notice again (a sweep's death and its own SIGTERM): said already
    self.received = signal.Signals(signum).name
    # os.write, not print: a handler may run in the middle of another print.
    os.write(1, f'\n{self.received} received: stopping after this step, once its '
                'checkpoint is written (press Ctrl-C again to abort without it).\n'.encode())

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'preemption notice'
        return True
      return False
    return self.received is not None
