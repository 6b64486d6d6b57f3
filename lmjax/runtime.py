"""Process-level settings that make training on a CPU host faster."""
import ctypes
import sys

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
