"""The XLA flags of the test run, for pytest's processes and the ones the tests start.

The tests compile thousands of small programs, and on a CPU most of their time is LLVM
optimising the machine code of programs that then run for milliseconds. They compile at
LLVM's -O1 (`--xla_backend_optimization_level=1`, XLA's default is 2): the same HLO
programs, compiled in about a quarter less CPU time. The golden runs give the numbers of
the default level to 1e-8 relative; tests/golden.json is recorded at this level.
"""
COMPILE = '--xla_backend_optimization_level=1'


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process of `devices` fake CPU devices (None: XLA's one)."""
  if devices is None:
    return COMPILE
  return f'{COMPILE} --xla_force_host_platform_device_count={devices}'
