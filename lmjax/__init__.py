"""lmjax: language models in JAX and Flax.

The public entry points, imported on first use (so that `import lmjax.errors` stays light
and flags can be set before JAX starts):

  lmjax.train_and_evaluate(config, workdir)   train, resuming from the latest checkpoint
  lmjax.load_trained(workdir)                 (config, tokenizer, params, step) of a run
  lmjax.restore_state(workdir)                (config, tokenizer, TrainState, step)
  lmjax.load_config(workdir)                  a run's config.json
  lmjax.generate_texts(config, params, tokenizer, prompts, max_new_tokens=...)
  lmjax.evaluate_workdir(workdir, split)      metrics of a checkpoint on a split
"""
import importlib

_EXPORTS = {
    'train_and_evaluate': 'lmjax.train',
    'load_trained': 'lmjax.workdir',
    'restore_state': 'lmjax.workdir',
    'load_config': 'lmjax.workdir',
    'generate_texts': 'lmjax.generation',
    'evaluate_workdir': 'lmjax.evaluation',
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module lmjax has no attribute {name!r}')
