"""GPT-2 fine-tuned on public tasks as prompt -> completion (the loss on the completion
only), each starting from the checkpoint the importer writes (configs/gpt2.py):

  python experiments/import_hf.py --hf_dir=path/to/gpt2 --workdir=runs/gpt2
  python experiments/prepare_data.py --tfds=squad      # the data step, once, with network
  python experiments/train.py --config=configs/gpt2_tasks.py:squad --workdir=runs/gpt2_squad \
      --config.init_from.workdir=runs/gpt2
  python experiments/evaluate.py --workdir=runs/gpt2_squad --generate --num_examples=500

  variant        TFDS dataset (the data step's --tfds)  prompt -> completion; scores logged
  squad, (none)  squad (SQuAD 1.1)        context and question -> the first answer;
                                          exact_match, token_f1
  imdb           imdb_reviews             review -> ' pos' or ' neg'; label_accuracy
  sst2           glue/sst2                sentence -> ' positive' or ' negative'; label_accuracy
  cnn_dailymail  cnn_dailymail            article -> its highlights; rouge1, rouge2, rougeL
  wmt14_de_en    wmt14_translate/de-en    German -> English; bleu

A prompt is a template of the dataset's features (data.prompt_feature, see
docs/guide/tasks.md); long texts are cut by the template's precision ('{article:.2500}', the
first 2,500 characters) so that an example fits the context. The steps and learning rates
are a starting point, not tuned: nothing here has been measured on the real data.
"""
import ml_collections

from lmjax import config
from lmjax.errors import UserError

gpt2 = config.sibling(__file__, 'gpt2.py')

# variant: (dataset, train split, eval split, prompt, completion, scores)
TASKS = {
    'squad': ('tfds:squad', 'train', 'validation',
              '{context:.3000}\n\nQuestion: {question}\nAnswer:', ' {answers/text}',
              ('exact_match', 'token_f1')),
    'imdb': ('tfds:imdb_reviews', 'train', 'test', '{text:.3000}\n\nSentiment:', ' {label}',
             ('label_accuracy',)),
    'sst2': ('tfds:glue/sst2', 'train', 'validation', '{sentence}\nSentiment:', ' {label}',
             ('label_accuracy',)),
    'cnn_dailymail': ('tfds:cnn_dailymail', 'train', 'validation',
                      '{article:.2500}\n\nTL;DR:', ' {highlights}',
                      ('rouge1', 'rouge2', 'rougeL')),
    'wmt14_de_en': ('tfds:wmt14_translate/de-en', 'train', 'validation',
                    'German: {de}\nEnglish:', ' {en}', ('bleu',)),
}


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  variant = variant or 'squad'
  if variant not in TASKS:
    raise UserError(f'unknown variant {variant!r} of configs/gpt2_tasks.py; use one of '
                    f'{", ".join(TASKS)}.')
  name, train_split, eval_split, prompt, completion, metrics = TASKS[variant]
  c = gpt2.get_config()
  c.data.update(name=name, format='completion', train_split=train_split, eval_split=eval_split,
                prompt_feature=prompt, completion_feature=completion)
  c.train.update(num_steps=2000, eval_every=500, checkpoint_every=500, log_every=50,
                 eval_completions=32, sample_tokens=64 if variant != 'cnn_dailymail' else 128,
                 completion_metrics=metrics)
  return c
