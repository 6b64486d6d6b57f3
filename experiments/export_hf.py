"""Writes a workdir's checkpoint as a Hugging Face GPT-2 directory (safetensors).

  python experiments/export_hf.py --workdir=runs/gpt2 --hf_dir=exports/gpt2 [--step=N]

transformers then loads it with GPT2LMHeadModel.from_pretrained('exports/gpt2') (and, for
a GPT-2 tokenizer, GPT2TokenizerFast.from_pretrained). Any lmjax Transformer exports;
a character or SentencePiece tokenizer has no GPT-2 form and stays behind.
"""
from lmjax import console

console.quiet_libraries()  # before TensorFlow or JAX is first imported

import os

from absl import app, flags

from lmjax.errors import run_script

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to export from.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Directory to write the Hugging Face model to.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
flags.mark_flags_as_required(['workdir', 'hf_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from lmjax import hf  # after absl has parsed flags

  try:
    step = hf.export_gpt2(_WORKDIR.value, _HF_DIR.value, _STEP.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  hf_dir = os.path.abspath(_HF_DIR.value)
  print(f'Exported step {step} of {os.path.abspath(_WORKDIR.value)} to {hf_dir}: '
        f'{", ".join(sorted(os.listdir(hf_dir)))}.\n'
        'Load it with: python -c "import transformers; '
        f"transformers.GPT2LMHeadModel.from_pretrained('{hf_dir}')\"")


if __name__ == '__main__':
  run_script(main)
