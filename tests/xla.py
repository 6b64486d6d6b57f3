"""The XLA flags of the test run, for pytest's processes and the ones the tests start.

The tests compile thousands of small programs, and on a CPU most of their time is LLVM
optimising the machine code of programs that then run for milliseconds. They compile at
LLVM's -O0 without its expensive passes (`--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true`; XLA's default is -O2): the same HLO programs,
compiled in less CPU time. On the 2-core AMD EPYC (2026-12-05) tests/test_sharding.py took
121.6 user CPU-seconds against 140.4 at -O1, and the whole suite 30.3 user CPU-minutes
against 33.7. The golden runs' losses and metrics are within 3e-7 relative of the default level's
(two float32 roundings), their texts the same; tests/golden.json is recorded at this level.
"""
COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process of `devices` fake CPU devices (None: XLA's one)."""
  if devices is None:
    return COMPILE
  return f'{COMPILE} --xla_force_host_platform_device_count={devices}'
