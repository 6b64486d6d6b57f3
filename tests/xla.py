"""The XLA flags of the test run, for pytest's processes and the ones the tests start.

The tests compile thousands of small programs, and on a CPU most of their time is compiling
programs that then run for milliseconds. They compile at LLVM's -O0 without its expensive
passes (`--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true`;
XLA's default is -O2), and emit fused loops with XLA:CPU's older element-by-element emitter
instead of its MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`): the same HLO
programs, compiled in less CPU time. On the 2-core AMD EPYC (2026-12-05) -O0 took
tests/test_sharding.py from 140.4 to 121.6 user CPU-seconds and the whole suite from 33.7 to
30.3 user CPU-minutes; the older emitter took the XLA compile of a tiny Shakespeare run from
3.3-4.0 to 2.0-2.2 seconds (three runs each), and the suite from 29.5 to 22.8 CPU-minutes
(user and system; one run each, one after the other). The golden runs' losses and metrics
stay within 3e-7 relative of XLA's default compile (float32 roundings), their texts the
same; tests/golden.json is recorded with these flags.
"""
COMPILE = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
           '--xla_cpu_use_fusion_emitters=false')


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process of `devices` fake CPU devices (None: XLA's one)."""
  if devices is None:
    return COMPILE
  return f'{COMPILE} --xla_force_host_platform_device_count={devices}'
