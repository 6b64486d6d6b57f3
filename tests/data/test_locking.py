"""One writer at a time: a second holder of the lock waits for the first to let go."""
import threading
import time

from lmjax.data import locking


def test_a_second_holder_waits_for_the_first(tmp_path):
  path, events = str(tmp_path / 'file.lock'), []
  first_holds = threading.Event()

  def first():
    with locking.exclusive(path) as exclusive:
      events.append(('first in', exclusive))
      first_holds.set()
      time.sleep(0.3)
      events.append(('first out', exclusive))

  def second():
    first_holds.wait()
    with locking.exclusive(path) as exclusive:
      events.append(('second in', exclusive))

  threads = [threading.Thread(target=first), threading.Thread(target=second)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert events == [('first in', True), ('first out', True), ('second in', True)]
