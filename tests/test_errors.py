"""How a script's process ends (lmjax.errors.run_script): a script that finished well skips
Python's teardown of the modules, after everything else a normal exit does."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = '''
import atexit, os, sys, threading, time
from lmjax import errors

def main(argv):
  out = os.environ['OUT']
  def late():
    time.sleep(0.5)
    with open(os.path.join(out, 'thread'), 'w') as f:
      f.write('finished')
  threading.Thread(target=late).start()
  atexit.register(lambda: open(os.path.join(out, 'atexit'), 'w').close())
  sys.stdout.write('x' * 200_000)  # more than a pipe holds: flushed at the end
  sys.stderr.write('to stderr')
  return int(os.environ.get('STATUS', '0'))

errors.run_script(main)
'''


def _run(tmp_path, status=0):
  return subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, OUT=str(tmp_path),
                                                        STATUS=str(status)))


def test_a_finished_script_ends_its_threads_runs_atexit_and_flushes(tmp_path):
  done = _run(tmp_path)
  assert done.returncode == 0, done.stderr
  assert done.stdout == 'x' * 200_000 and done.stderr == 'to stderr'
  assert (tmp_path / 'thread').read_text() == 'finished'
  assert (tmp_path / 'atexit').exists()


def test_a_script_returning_a_status_exits_with_it(tmp_path):
  done = _run(tmp_path, status=3)
  assert done.returncode == 3 and (tmp_path / 'thread').exists()
