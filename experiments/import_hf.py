"""Turns a Hugging Face GPT-2 directory into an lmjax workdir (config, tokenizer, step 0).

  python experiments/import_hf.py --hf_dir=path/to/gpt2 --workdir=runs/gpt2
  python experiments/decode.py --workdir=runs/gpt2 --prompt='Hello, my name is'

The directory is laid out as the hub serves a model: config.json, model.safetensors
(pickled pytorch_model.bin files are refused) and vocab.json + merges.txt or tokenizer.json.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import os

from absl import app, flags

from lmjax.errors import run_script

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face GPT-2 model directory to read.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'lmjax workdir to write; it must have no checkpoints yet.')
flags.mark_flags_as_required(['hf_dir', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from lmjax import hf  # after absl has parsed flags

  try:
    config = hf.import_gpt2(_HF_DIR.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  m, workdir = config.model, os.path.abspath(_WORKDIR.value)
  print(f'Imported {os.path.abspath(_HF_DIR.value)}: a GPT-2 of {m.num_layers} layers, '
        f'width {m.d_model}, {m.num_heads} heads, context {m.max_len}.\n'
        f'Wrote {workdir}: config.json, the gpt2_bpe tokenizer (vocab.json, merges.txt) '
        'and the checkpoint checkpoints/0.\n'
        f"Decode with: python experiments/decode.py --workdir={workdir} --prompt='Hello'")


if __name__ == '__main__':
  run_script(main)
