"""One writer at a time for files that several runs or hosts may want to write at once."""
import contextlib


@contextlib.contextmanager
def exclusive(path: str):
  """Holds an exclusive lock on `path` (yields True), or yields False where the file
  system has no locks: then concurrent writers each write their own temporary file and
  the last rename wins, the same bytes."""
  import fcntl  # POSIX only
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
