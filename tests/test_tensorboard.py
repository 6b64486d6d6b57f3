"""TensorBoard itself serves a real run: scalars, text and hparams through its HTTP API,
read as its dashboards read them."""
import contextlib
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import pytest

from configs import shakespeare_char
from lmjax import events, train, workdir as workdir_lib

RUN = 'tiny'  # the run's directory under the logdir, and so its name in TensorBoard
NUM_STEPS = 20


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, errors='replace') as f:
    return f.read()[-chars:]


def _wait_for(check, what: str, proc, stderr_path: str, timeout: float = 90.0):
  """Polls `check()` until it returns something truthy; fails with the server's stderr if
  the server dies or `timeout` seconds pass."""
  deadline = time.monotonic() + timeout
  while True:
    if proc.poll() is not None:
      pytest.fail(f'TensorBoard exited with status {proc.returncode} while waiting for '
                  f'{what}; its stderr:\n{_tail(stderr_path)}')
    result = check()
    if result:
      return result
    if time.monotonic() > deadline:
      pytest.fail(f'TensorBoard did not show {what} within {timeout:.0f} s; its stderr:\n'
                  f'{_tail(stderr_path)}')
    time.sleep(0.25)


class Server:
  """A TensorBoard process on loopback and the requests its dashboards make."""

  def __init__(self, logdir: str, log_path: str):
    self.stderr_path = log_path
    with open(log_path, 'wb') as stderr:
      # Port 0: the OS picks a free port at bind time, so nothing can take it between
      # choosing and binding; TensorBoard then names it on stderr. start_new_session puts
      # TensorBoard and its data server child in one process group, killed together.
      self.proc = subprocess.Popen(
          [sys.executable, '-m', 'tensorboard.main', f'--logdir={logdir}',
           '--host=127.0.0.1', '--port=0', '--reload_interval=1'],
          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
          start_new_session=True)
    self.url = None

  def wait_until_serving(self):
    def announced_url():
      found = re.search(r'TensorBoard \S+ at (http://127\.0\.0\.1:\d+/)',
                        _tail(self.stderr_path, 100_000))
      return found and found.group(1)
    self.url = _wait_for(announced_url, 'its serving address', self.proc, self.stderr_path)
    self.wait_for(lambda: self.try_get('data/runs') is not None, 'an answer to /data/runs')

  def wait_for(self, check, what):
    return _wait_for(check, what, self.proc, self.stderr_path)

  def get(self, route: str, **params):
    """JSON of a GET."""
    url = self.url + route + ('?' + urllib.parse.urlencode(params) if params else '')
    with urllib.request.urlopen(url, timeout=30) as response:
      return json.load(response)

  def try_get(self, route: str, **params):
    """JSON of a GET; None while the server does not answer it (yet)."""
    try:
      return self.get(route, **params)
    except OSError:  # refused, reset, timed out, or an HTTP error status (URLError)
      return None

  def post(self, route: str, body: dict):
    """JSON of a POST with a JSON body, sent as the HParams dashboard sends it."""
    request = urllib.request.Request(
        self.url + route, data=json.dumps(body).encode(), method='POST',
        headers={'Content-Type': 'text/plain', 'X-XSRF-Protected': '1'})
    with urllib.request.urlopen(request, timeout=30) as response:
      return json.load(response)

  def stop(self):
    # The whole group, even when TensorBoard itself is gone: its data server may not be.
    try:
      os.killpg(self.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
      return
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()


@pytest.fixture(scope='module')
def served(tmp_path_factory, request):
  """A tiny run in LOGDIR/tiny, served by TensorBoard on LOGDIR, as `--logdir runs` in
  docs/guide/tensorboard.md (the HParams tab shows no metrics for a logdir that is the run
  itself; see below). Returns (server, workdir, config, the sample the run printed)."""
  logdir = tmp_path_factory.mktemp('tensorboard')
  (logdir / 'runs').mkdir()
  # The server starts before training: its start-up (it imports TensorFlow) then overlaps
  # with compilation, which keeps only one of the cores busy.
  server = Server(str(logdir / 'runs'), str(logdir / 'tensorboard.stderr'))
  request.addfinalizer(server.stop)

  config = shakespeare_char.get_config('tiny')
  config.train.update(num_steps=NUM_STEPS, eval_every=10, log_every=5,
                      checkpoint_every=NUM_STEPS)
  workdir = str(logdir / 'runs' / RUN)
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      # One device: this test is about what TensorBoard shows, and one compiles fastest.
      train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  finally:
    print(printed.getvalue())  # pytest shows it when something fails
  out = printed.getvalue()
  assert '\n--- sample ---\n' in out, out
  sample = out.rpartition('\n--- sample ---\n')[2].rpartition('\n--------------')[0]

  server.wait_until_serving()
  # TensorBoard loads the event files in the background; wait until it has the run's end
  # (the last sample is the last event the run writes).
  def loaded():
    losses = server.try_get('data/plugin/scalars/scalars', run=RUN, tag='eval/loss') or []
    samples = server.try_get('data/plugin/text/text', run=RUN, tag='sample') or []
    return (NUM_STEPS in {step for _, step, _ in losses} and
            NUM_STEPS in {s['step'] for s in samples})
  server.wait_for(loaded, f'eval/loss and the sample of step {NUM_STEPS}')
  return server, workdir, config, sample


def test_scalars_are_the_values_the_run_wrote(served):
  server, workdir, _, _ = served
  assert server.get('data/runs') == [RUN]
  written = events.read_scalars(workdir)
  tags = server.get('data/plugin/scalars/tags')
  assert set(tags) == {RUN}
  assert set(tags[RUN]) == set(written)
  for tag in ('train/loss', 'train/learning_rate', 'eval/loss', 'eval/perplexity',
              'eval/accuracy', 'eval/bits_per_char'):
    assert tag in written, (tag, sorted(written))
  assert sorted(written['train/loss']) == [5, 10, 15, 20]
  assert sorted(written['eval/loss']) == [10, 20]
  for tag, values in written.items():
    # [[wall time, step, value], ...]; float32 values arrive as their exact float64.
    shown = {step: value for _, step, value in
             server.get('data/plugin/scalars/scalars', run=RUN, tag=tag)}
    assert shown == values, tag


def test_text_tab_shows_the_samples_and_the_config_as_code(served):
  server, _, config, sample = served
  assert set(server.get('data/plugin/text/tags')[RUN]) == {'sample', 'config'}

  samples = server.get('data/plugin/text/text', run=RUN, tag='sample', markdown='false')
  assert [s['step'] for s in samples] == [10, 20]
  # Without markdown TensorBoard only escapes HTML; the last sample is the one printed.
  assert html.unescape(samples[-1]['text']) == sample
  assert sample.startswith(config.train.sample_prompt) and len(sample) > len(
      config.train.sample_prompt)

  # As the dashboard renders it (markdown): one code block holding the resolved config.
  [shown] = server.get('data/plugin/text/text', run=RUN, tag='config')
  assert shown['step'] == 0
  block = re.fullmatch(r'<pre><code>(.*)</code></pre>', shown['text'].strip(), re.DOTALL)
  assert block, shown['text'][:500]
  assert json.loads(html.unescape(block.group(1))) == json.loads(config.to_json())


def test_hparams_tab_shows_the_config_and_final_metrics(served):
  server, workdir, config, _ = served
  experiment = server.post('data/plugin/hparams/experiment', {'experimentName': ''})
  names = {info['name'] for info in experiment['hparamInfos']}
  assert {'opt.lr', 'model.d_model', 'model.name', 'train.batch_size', 'num_params'} <= names
  metrics = {(m['name'].get('group', ''), m['name']['tag']) for m in experiment['metricInfos']}
  assert {('', 'eval/loss'), ('', 'train/loss')} <= metrics

  groups = server.post('data/plugin/hparams/session_groups', {
      'experimentName': '', 'startIndex': 0, 'sliceSize': 100,
      'allowedStatuses': ['STATUS_UNKNOWN', 'STATUS_SUCCESS', 'STATUS_FAILURE',
                          'STATUS_RUNNING']})
  [group] = groups['sessionGroups']
  assert [s['name'] for s in group['sessions']] == [RUN]
  hparams = group['hparams']
  # Numbers travel as float64, strings as strings.
  assert hparams['opt.lr'] == config.opt.lr
  assert hparams['model.d_model'] == config.model.d_model
  assert hparams['train.batch_size'] == config.train.batch_size
  assert hparams['model.name'] == config.model.name
  assert hparams['data.tokenizer'] == config.data.tokenizer
  with open(os.path.join(workdir, workdir_lib.RESULT_FILE)) as f:
    assert hparams['num_params'] == json.load(f)['num_params']
  # The metric columns hold each scalar's last value. They stay empty when --logdir is the
  # workdir itself: the run is then named '.', and TensorBoard 2.21 looks for the HParams group's
  # metrics in run './.', which does not exist.
  last = {m['name']['tag']: (m['trainingStep'], m['value']) for m in group['metricValues']}
  written = events.read_scalars(workdir, ['eval/loss', 'train/loss'])
  for tag, values in written.items():
    assert last[tag] == (NUM_STEPS, values[NUM_STEPS]), tag
