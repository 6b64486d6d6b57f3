"""experiments/quickstart.ipynb runs top to bottom, shrunk to a few steps of a one-layer model."""
import os
import re

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from lmjax import events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'experiments', 'quickstart.ipynb')
STRATEGIES = ('greedy', 'sample', 'beam')


def _stdout(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.outputs
                 if o.output_type == 'stream' and o.name == 'stdout')


def _cell_calling(cells, text):
  found = [c for c in cells if c.cell_type == 'code' and text in c.source]
  assert len(found) == 1, (text, [c.source for c in found])
  return found[0]


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """(notebook after the run, its workdir)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      # Outputs would carry machine paths and timings into the repository.
      assert not cell.outputs and cell.execution_count is None, 'commit it without outputs'
      assert 'execution' not in cell.metadata, 'commit it without execution timings'
  workdir = str(tmp_path_factory.mktemp('quickstart') / 'run')
  # As papermill does: a cell after the one tagged `parameters` sets the test's values.
  params = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1, 'the notebook needs one cell tagged "parameters"'
  nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(
      f"num_steps = 4\neval_every = 4\nlog_every = 1\nmodel_overrides = {{'num_layers': 1}}\n"
      f'workdir = {workdir!r}\n'))
  # ipykernel's own spec runs this interpreter (the project's .venv); a `python3` spec
  # installed elsewhere in Jupyter's paths must not take its place. The kernel inherits
  # this process's environment: conftest's fake devices and shared compilation cache, and
  # TFDS's data directory, where the corpus is built on first use as for the other
  # training tests.
  kernel = KernelManager(kernel_name='python3',
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  # Started in experiments/, as Jupyter starts a notebook's kernel.
  NotebookClient(nb, km=kernel, timeout=300,
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  return nb, workdir


def test_every_cell_ran_without_error(executed):
  nb, _ = executed
  code = [c for c in nb.cells if c.cell_type == 'code']
  # execute() raises on an error; check that it did not stop early either.
  assert all(c.execution_count is not None for c in code)
  for cell in code:
    assert not [o for o in cell.outputs if o.output_type == 'error'], cell.source


def test_learning_curve_is_plotted_and_shows_the_logged_losses(executed):
  nb, workdir = executed
  logged = events.read_scalars(workdir, ['train/loss', 'eval/loss'])
  assert sorted(logged['train/loss']) == [1, 2, 3, 4] and sorted(logged['eval/loss']) == [4]

  plot = _cell_calling(nb.cells, 'read_scalars(')
  assert any('image/png' in o.get('data', {}) for o in plot.outputs), plot.outputs
  table = re.findall(r'step +(\d+) +train/loss ([\d.]+) +eval/loss ([\d.]+)', _stdout(plot))
  assert len(table) == 1
  for step, train_loss, eval_loss in table:
    assert float(train_loss) == pytest.approx(logged['train/loss'][int(step)], abs=6e-5)
    assert float(eval_loss) == pytest.approx(logged['eval/loss'][int(step)], abs=6e-5)

  # The training cell's own progress lines say the same.
  out = _stdout(_cell_calling(nb.cells, 'train_and_evaluate('))
  progress = re.findall(r'step +(\d+)/4 +loss ([\d.]+)', out)
  assert [int(s) for s, _ in progress] == [1, 2, 3, 4], out
  for step, loss in progress:
    assert float(loss) == pytest.approx(logged['train/loss'][int(step)], abs=6e-5)
  evaluated, = re.findall(r'eval at step 4: loss ([\d.]+)', out)
  assert float(evaluated) == pytest.approx(logged['eval/loss'][4], abs=6e-5)


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_each_strategy_prints_a_continuation_of_the_prompt(executed, strategy):
  nb, _ = executed
  out = _stdout(_cell_calling(nb.cells, f"show('{strategy}'"))
  # Each continuation: a header line, then the prompt and the new text.
  parts = re.split(rf'^--- {strategy} \d+/(\d+): (\d+) new tokens, ended by (\w+), score '
                   r'[-\d.]+\n', out, flags=re.M)
  assert parts[0] == '', out
  found = [parts[i:i + 4] for i in range(1, len(parts), 4)]
  assert len(found) == int(found[0][0]) == (1 if strategy == 'greedy' else 2), out
  for _, num_tokens, finish, text in found:
    assert finish in ('eos', 'stop', 'length')
    assert text.startswith('ROMEO:\n') and text.endswith('\n'), out
    new_text = text[len('ROMEO:\n'):-1]
    # One character per token: what is printed is the whole continuation.
    assert len(new_text) == int(num_tokens) > 0, out
