"""Tokenizers on the real corpus: exact round trips, clear errors, save/load."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.data import corpora, tokenizers
from lmjax.errors import UserError

# Small enough to train in about a second, large enough for byte fallback (256
# pieces) plus the corpus's characters plus merges.
SPM_VOCAB = 512


@pytest.fixture(scope='module')
def train_texts():
  return [text for _, text in corpora.load_split_texts('shakespeare', 'train')]


@pytest.fixture(scope='module')
def validation():
  return dict(corpora.load_split_texts('shakespeare', 'validation'))


@pytest.fixture(scope='module')
def char_tokenizer(train_texts):
  return tokenizers.CharTokenizer.train(train_texts)


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def spm_tokenizer(request, train_texts):
  # A subset of the training split keeps training quick.
  return tokenizers.SentencePieceTokenizer.train(train_texts[:6], SPM_VOCAB, request.param)


# Whitespace SentencePiece loses unless told not to: newlines, runs of spaces,
# leading spaces, trailing spaces, blank lines; and characters never seen in
# training, which byte fallback must carry.
TRICKY = ['  two leading spaces', 'a  b   c', '\n\nstarts with newlines', 'ends with space ',
          'x\n\n\n   indented\n', ' ', '\n', 'caf\u00e9 \u2603 \U0001F600 \t tab']


def test_char_vocabulary(char_tokenizer, train_texts):
  chars = set(''.join(train_texts))
  assert char_tokenizer.vocab_size == len(chars) + 1
  assert char_tokenizer.eos_id == 0
  assert char_tokenizer.kind == 'char'


def test_char_round_trip_on_a_validation_work(char_tokenizer, validation):
  text = validation['julius_caesar']
  ids = char_tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert ids.min() >= 1  # 0 is eos, never a character
  assert char_tokenizer.decode(ids) == text


def test_char_decode_accepts_lists_and_arrays_and_skips_eos(char_tokenizer):
  ids = char_tokenizer.encode('To be, or not to be')
  eos = char_tokenizer.eos_id
  with_eos = np.concatenate([ids[:5], [eos], ids[5:], [eos]])
  for form in (with_eos, with_eos.tolist(), jnp.asarray(with_eos)):
    assert char_tokenizer.decode(form) == 'To be, or not to be'
  assert char_tokenizer.decode([]) == ''
  with pytest.raises(ValueError, match='outside the vocabulary'):
    char_tokenizer.decode([char_tokenizer.vocab_size])


def test_char_unknown_characters_are_named(char_tokenizer):
  with pytest.raises(UserError) as error:
    char_tokenizer.encode('O Romeo, \u2603 Romeo! caf\u00e9')
  message = str(error.value)
  assert "'\u2603'" in message and "'\u00e9'" in message
  assert "'R'" not in message
  assert 'training split' in message


def test_char_byte_lengths_add_up_to_the_texts_bytes(char_tokenizer, validation):
  lengths = char_tokenizer.byte_lengths()
  assert lengths.shape == (char_tokenizer.vocab_size,) and lengths[char_tokenizer.eos_id] == 0
  for title, text in validation.items():
    assert lengths[char_tokenizer.encode(text)].sum() == len(text.encode('utf-8')), title
  wide = tokenizers.CharTokenizer(['a', '\u00e9', '\u2603', '\U0001F600'])
  assert wide.byte_lengths().tolist() == [0, 1, 2, 3, 4]
  text = 'a\u2603\u00e9\U0001F600a'
  assert wide.byte_lengths()[wide.encode(text)].sum() == len(text.encode('utf-8')) == 11


def test_char_save_load(char_tokenizer, validation, tmp_path):
  char_tokenizer.save(tmp_path)
  assert json.loads((tmp_path / 'tokenizer.json').read_text())['kind'] == 'char'
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, tokenizers.CharTokenizer)
  text = validation['twelfth_night']
  np.testing.assert_array_equal(loaded.encode(text), char_tokenizer.encode(text))
  assert loaded.vocab_size == char_tokenizer.vocab_size


def test_char_training_on_no_text_is_refused():
  with pytest.raises(UserError, match='no text'):
    tokenizers.CharTokenizer.train(['', ''])


@pytest.mark.parametrize('content, message', [
    (b'{"kind": "char", ', 'is damaged: it is not valid JSON'),
    (b'{"kind": "\xff"}', 'is damaged: it is not valid JSON'),
    (b'[1, 2]', 'is damaged: it is not the JSON object lmjax writes'),
    (b'{"kind": "words", "vocab_size": 3}', "unknown tokenizer kind 'words'"),
    (b'{"kind": "char", "vocab_size": 3}', r"is damaged \(KeyError: 'chars'\)"),
    (b'{"kind": "char", "vocab_size": 2, "chars": ["ab"]}', r'is damaged \(ValueError: '),
    (b'{"kind": "char", "vocab_size": 9, "chars": ["a", "b"]}', 'says vocab_size=9'),
])
def test_a_damaged_tokenizer_file_is_named(tmp_path, content, message):
  (tmp_path / 'tokenizer.json').write_bytes(content)
  with pytest.raises(UserError, match=message):
    tokenizers.load_tokenizer(str(tmp_path))


def test_load_without_tokenizer_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='No tokenizer in .*train first'):
    tokenizers.load_tokenizer(tmp_path)


def test_spm_round_trips_real_text_exactly(spm_tokenizer, validation):
  assert spm_tokenizer.vocab_size == SPM_VOCAB
  for title, text in validation.items():
    ids = spm_tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) < len(text) * 0.8, f'{title}: pieces barely longer than characters'
    assert spm_tokenizer.decode(ids) == text, title
  # The real text has what the round trip must keep.
  twelfth_night = validation['twelfth_night']
  assert '  ' in twelfth_night and '\n ' in twelfth_night and '\n\n' in twelfth_night


@pytest.mark.parametrize('text', TRICKY)
def test_spm_round_trips_whitespace_and_unseen_characters(spm_tokenizer, text):
  assert spm_tokenizer.decode(spm_tokenizer.encode(text)) == text


def test_spm_byte_lengths_add_up_to_the_texts_bytes(spm_tokenizer, validation):
  """Exactly, leading spaces included: these models add no dummy prefix."""
  lengths = spm_tokenizer.byte_lengths()
  assert lengths.shape == (spm_tokenizer.vocab_size,) and lengths[spm_tokenizer.eos_id] == 0
  for title, text in [*validation.items(), *enumerate(TRICKY)]:
    ids = spm_tokenizer.encode(text)
    assert lengths[ids].sum() == len(text.encode('utf-8')), title
  # Characters the model never saw arrive as byte-fallback pieces, one byte each.
  ids = spm_tokenizer.encode('\U0001F600')
  assert len(ids) == 4 and lengths[ids].tolist() == [1, 1, 1, 1]


def test_spm_eos_decodes_to_nothing(spm_tokenizer):
  ids = spm_tokenizer.encode('Good night, sweet prince')
  eos = spm_tokenizer.eos_id
  with_eos = np.concatenate([ids, [eos], ids])
  assert spm_tokenizer.decode(jnp.asarray(with_eos)) == 'Good night, sweet prince' * 2
  assert eos not in ids


def test_spm_save_load(spm_tokenizer, validation, tmp_path):
  spm_tokenizer.save(tmp_path)
  assert (tmp_path / 'tokenizer.model').exists()
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, tokenizers.SentencePieceTokenizer)
  assert (loaded.vocab_size, loaded.eos_id) == (spm_tokenizer.vocab_size, spm_tokenizer.eos_id)
  text = validation['julius_caesar']
  np.testing.assert_array_equal(loaded.encode(text), spm_tokenizer.encode(text))


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_spm_training_is_deterministic(train_texts, model_type):
  first, second = (tokenizers.SentencePieceTokenizer.train(train_texts[6:9], SPM_VOCAB, model_type)
                   for _ in range(2))
  assert first.model_proto == second.model_proto


def test_spm_unknown_model_type_names_the_config_field():
  with pytest.raises(UserError, match="data.spm_model_type='word'; use one of bpe, unigram"):
    tokenizers.SentencePieceTokenizer.train(['some text'], 300, 'word')


def test_spm_vocab_too_large_names_the_config_field(validation):
  with pytest.raises(UserError, match=r'data\.vocab_size=50000 is too large.*at most \d+'):
    tokenizers.SentencePieceTokenizer.train([validation['lovers_complaint']], 50000)
  with pytest.raises(UserError, match=r'data\.vocab_size=100 is too small'):
    tokenizers.SentencePieceTokenizer.train([validation['lovers_complaint']], 100)


def test_build_tokenizer_trains_once_then_reuses(validation, tmp_path, capsys):
  calls = []

  def texts():
    calls.append(1)
    return [validation['julius_caesar']]

  first = tokenizers.build_tokenizer('sentencepiece', str(tmp_path), texts, vocab_size=400)
  assert len(calls) == 1 and (tmp_path / 'tokenizer.json').exists()
  # Training takes a while on a large corpus: the run says so (once).
  assert capsys.readouterr().out == ('Training a SentencePiece tokenizer (bpe, 400 pieces) on '
                                     'the training texts, once ...\n')

  def must_not_train():
    raise AssertionError('build_tokenizer trained again instead of reusing the directory')

  again = tokenizers.build_tokenizer('sentencepiece', str(tmp_path), must_not_train,
                                     vocab_size=400)
  assert again.model_proto == first.model_proto and capsys.readouterr().out == ''

  with pytest.raises(UserError, match=r"data\.tokenizer='char'.*" + str(tmp_path)):
    tokenizers.build_tokenizer('char', str(tmp_path), must_not_train)
  with pytest.raises(UserError, match=r'data\.vocab_size=800'):
    tokenizers.build_tokenizer('sentencepiece', str(tmp_path), must_not_train, vocab_size=800)


def test_build_tokenizer_char_and_unknown_kind(validation, tmp_path):
  tokenizer = tokenizers.build_tokenizer('char', str(tmp_path),
                                         lambda: [validation['julius_caesar']])
  assert tokenizers.load_tokenizer(tmp_path).vocab_size == tokenizer.vocab_size
  with pytest.raises(UserError, match=r"data\.tokenizer='bytes'.*'char', 'sentencepiece'"):
    tokenizers.build_tokenizer('bytes', str(tmp_path / 'other'), lambda: [])


# A hand-made GPT-2 byte-level BPE: the 256 byte pieces, these merges (best first) and eos.
# In ' lower', ('l', 'o') outranks ('Ġ', 'l'), so 'Ġl' must never form there.
GPT2_MERGES = [('l', 'o'), ('lo', 'w'), ('\u0120', 'l'), ('\u0120l', 'o'), ('e', 'r'),
               ('\u0120', 'n'), ('\u0120n', 'e'), ('\u0120ne', 'w'), ('e', 's'), ('es', 't'),
               ('a', 'a')]


def _write_gpt2_files(directory):
  pieces = tokenizers._gpt2_byte_chars() + [a + b for a, b in GPT2_MERGES] + ['<|endoftext|>']
  vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
  (directory / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (directory / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in GPT2_MERGES), encoding='utf-8')
  return vocab


@pytest.fixture
def gpt2_tokenizer(tmp_path):
  _write_gpt2_files(tmp_path)
  return tokenizers.Gpt2BpeTokenizer.from_files(str(tmp_path / 'vocab.json'),
                                                str(tmp_path / 'merges.txt'))


def test_gpt2_byte_table_is_gpt2s():
  chars = tokenizers._gpt2_byte_chars()
  assert len(set(chars)) == 256
  assert (chars[ord('A')], chars[ord(' ')], chars[ord('\n')], chars[0xad]) == (
      'A', '\u0120', '\u010a', '\u0143')


def test_gpt2_bpe_merges_best_rank_first(gpt2_tokenizer):
  piece_by_id = {i: p for p, i in gpt2_tokenizer.vocab.items()}
  ids = gpt2_tokenizer.encode('low lower newest aaa<|endoftext|>low')
  assert ids.dtype == np.int32
  assert [piece_by_id[i] for i in ids.tolist()] == [
      'low', '\u0120', 'low', 'er', '\u0120new', 'est', '\u0120', 'aa', 'a', '<|endoftext|>',
      'low']
  assert gpt2_tokenizer.eos_id == gpt2_tokenizer.vocab_size - 1


@pytest.mark.parametrize('text', TRICKY + ["it's 1999, isn't it?", '\u6771\u4eac\U0001F600'])
def test_gpt2_bpe_round_trips_any_text(gpt2_tokenizer, text):
  assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text)) == text


@pytest.mark.parametrize('text', TRICKY + ["it's 1999, isn't it?", 'low lower newest'])
def test_gpt2_bpe_byte_lengths_add_up_to_the_texts_bytes(gpt2_tokenizer, text):
  lengths = gpt2_tokenizer.byte_lengths()
  assert lengths.shape == (gpt2_tokenizer.vocab_size,)
  assert lengths[gpt2_tokenizer.encode(text)].sum() == len(text.encode('utf-8'))
  # The separator between documents stands for no text, though its name has 13 characters.
  assert lengths[gpt2_tokenizer.encode(text + '<|endoftext|>')].sum() == len(
      text.encode('utf-8'))


def test_gpt2_bpe_decode_drops_eos_and_marks_cut_characters(gpt2_tokenizer):
  eos = gpt2_tokenizer.eos_id
  ids = gpt2_tokenizer.encode('low')
  assert gpt2_tokenizer.decode(jnp.asarray([eos, *ids, eos, *ids])) == 'lowlow'
  snowman = gpt2_tokenizer.encode('\u2603').tolist()  # three bytes, three pieces
  assert len(snowman) == 3
  assert gpt2_tokenizer.decode(snowman[:2]) == '\ufffd'
  with pytest.raises(ValueError, match='outside the vocabulary'):
    gpt2_tokenizer.decode([gpt2_tokenizer.vocab_size])


def test_gpt2_bpe_bad_text_is_named(gpt2_tokenizer):
  with pytest.raises(ValueError, match='takes a str; got bytes'):
    gpt2_tokenizer.encode(b'low')
  with pytest.raises(UserError, match='lone surrogate'):
    gpt2_tokenizer.encode('low \ud800')


# GPT-2's pattern on awkward text: merges over the bytes of spaces, newlines, contractions,
# digits, accents, emoji and eos, and merges that would cross the pattern's pieces (the last
# five), which must never apply. The ids are those of lmjax's earlier pure-Python BPE.
AWKWARD_MERGES = [
    (b"'", b's'), (b' ', b' '), (b'  ', b' '), (b'\n', b'\n'), (b' ', b'\n'), (b'\n', b' '),
    (b'\t', b' '), (b'\r', b'\n'), (b' ', b't'), (b' t', b'o'), (b'1', b'9'), (b'19', b'9'),
    (b' ', b'1'), (b'<', b'|'), (b'|', b'>'), (b'\xc3', b'\xa9'), (b'f', b'\xc3\xa9'),
    (b'\xc2', b'\xa0'), (b' ', b'\xc2\xa0'), (b'\xf0', b'\x9f'), (b'\xf0\x9f', b'\x98'),
    (b'\xf0\x9f\x98', b'\x80'), (b' ', b'\xf0\x9f\x98\x80'),
    (b's', b' '), (b'n', b"'"), (b'.', b' '), (b'e', b'\n'), (b'9', b','), (b'>', b's'),
]
# Ids below 256 are the bytes themselves; 256 + i is the piece AWKWARD_MERGES[i] makes.
AWKWARD = {
    "it's 1999, isn't it? I'll, we've, they're, she'd, I'm, DON'T, ''s": [
        105, 116, 256, 32, 267, 57, 44, 32, 105, 115, 110, 39, 116, 32, 105, 116, 63, 32, 73,
        39, 108, 108, 44, 32, 119, 101, 39, 118, 101, 44, 264, 104, 101, 121, 39, 114, 101,
        44, 32, 115, 104, 101, 39, 100, 44, 32, 73, 39, 109, 44, 32, 68, 79, 78, 39, 84, 44,
        32, 39, 39, 115],
    'runs  of   spaces    and trailing   ': [
        114, 117, 110, 115, 32, 32, 111, 102, 257, 32, 115, 112, 97, 99, 101, 115, 258, 32,
        97, 110, 100, 264, 114, 97, 105, 108, 105, 110, 103, 258],
    '\n\n  indented\n\tand tabbed\t \n\r\nwindows\r\n': [
        259, 32, 32, 105, 110, 100, 101, 110, 116, 101, 100, 10, 9, 97, 110, 100, 264, 97, 98,
        98, 101, 100, 9, 260, 13, 10, 119, 105, 110, 100, 111, 119, 115, 263],
    'caf\u00e9 na\u00efve e\u0301 \u00a0no-break\u00a0 \u3000wide \u2028': [
        99, 97, 272, 32, 110, 97, 195, 175, 118, 101, 32, 101, 204, 129, 32, 273, 110, 111,
        45, 98, 114, 101, 97, 107, 273, 32, 227, 128, 128, 119, 105, 100, 101, 32, 226, 128,
        168],
    'emoji \U0001F600\U0001F600 \U0001F600 \U0001F468\u200d\U0001F469\u200d\U0001F467 \u2603': [
        101, 109, 111, 106, 105, 278, 277, 278, 32, 275, 145, 168, 226, 128, 141, 275, 145,
        169, 226, 128, 141, 275, 145, 167, 32, 226, 152, 131],
    'end<|endoftext|>start <|endoftext|> <|endoftext|><|endoftext|>\n<|endoftext|s': [
        101, 110, 100, 285, 115, 116, 97, 114, 116, 32, 285, 32, 285, 285, 10, 269, 101, 110,
        100, 111, 102, 116, 101, 120, 116, 124, 115],
    'numbers 1999 19999, \u0663\u0664 \u00bd \u00b2 3.14 to': [
        110, 117, 109, 98, 101, 114, 115, 32, 267, 57, 32, 267, 57, 57, 44, 32, 217, 163, 217,
        164, 32, 194, 189, 32, 194, 178, 32, 51, 46, 49, 52, 265],
    '\u6771\u4eac\u306e\u6587\u7ae0 \ud55c\uad6d\uc5b4': [
        230, 157, 177, 228, 186, 172, 227, 129, 174, 230, 150, 135, 231, 171, 160, 32, 237,
        149, 156, 234, 181, 173, 236, 150, 180],
    'control \x00\x1f\x0b\x0c\x85 and \u200b zero width \ufeff': [
        99, 111, 110, 116, 114, 111, 108, 32, 0, 31, 11, 12, 194, 133, 32, 97, 110, 100, 32,
        226, 128, 139, 32, 122, 101, 114, 111, 32, 119, 105, 100, 116, 104, 32, 239, 187, 191],
    'end. Next\nline e\nx\n\n': [
        101, 110, 100, 46, 32, 78, 101, 120, 116, 10, 108, 105, 110, 101, 32, 101, 10, 120,
        259],
    '': [], ' ': [32], '\n': [10], "'s": [256],
}


@pytest.fixture(scope='module')
def awkward_gpt2():
  chars = tokenizers._gpt2_byte_chars()
  merges = [(''.join(chars[b] for b in first), ''.join(chars[b] for b in second))
            for first, second in AWKWARD_MERGES]
  pieces = [*chars, *(a + b for a, b in merges), '<|endoftext|>']
  return tokenizers.Gpt2BpeTokenizer({p: i for i, p in enumerate(pieces)}, merges)


# 1: cut every long text wherever a cut is allowed; cuts must not change the ids.
@pytest.mark.parametrize('chunk_chars', [1 << 15, 1])
def test_gpt2_bpe_awkward_text_keeps_its_ids(awkward_gpt2, monkeypatch, chunk_chars):
  monkeypatch.setattr(tokenizers, '_CHUNK_CHARS', chunk_chars)
  assert [ids.tolist() for ids in awkward_gpt2.encode_batch(list(AWKWARD))] == list(
      AWKWARD.values())
  for text, ids in AWKWARD.items():
    assert awkward_gpt2.encode(text).tolist() == ids
    assert awkward_gpt2.decode(ids) == text.replace('<|endoftext|>', '')


def test_gpt2_bpe_awkward_text_as_transformers(awkward_gpt2, tmp_path):
  transformers = pytest.importorskip('transformers', reason="pip install -e '.[hf]'")
  awkward_gpt2.save_vocab_and_merges(str(tmp_path))
  theirs = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
  assert [theirs.encode(text) for text in AWKWARD] == list(AWKWARD.values())


@pytest.fixture(scope='module')
def trained_gpt2(train_texts):
  """A byte-level BPE of 2,000 pieces trained on the corpus with Hugging Face's trainer: many
  merges, as GPT-2's own files have."""
  hf = pytest.importorskip('tokenizers')
  trainer = hf.trainers.BpeTrainer(vocab_size=2000, special_tokens=['<|endoftext|>'],
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=False)
  bpe = hf.Tokenizer(hf.models.BPE())
  bpe.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(train_texts, trainer)
  model = json.loads(bpe.to_str())['model']
  return tokenizers.Gpt2BpeTokenizer(model['vocab'], [tuple(m) for m in model['merges']])


def _awkward_texts(n: int, seed: int) -> list[str]:
  """Texts of characters of every kind GPT-2's pattern tells apart: letters of several
  scripts, digits, marks, punctuation, spaces, tabs, newlines, other whitespace, emoji,
  apostrophes next to letters, unassigned code points and the eos token."""
  rng = np.random.default_rng(seed)
  parts = list("abcXYZ019 .,;:!?'\"-_()[]\n\t\r  ") + [
      "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", '\u00e9', 'e\u0301', '\u00a0',
      '\u3000', '\u2028', '\u200b', '\u0663', '\u00bd', '\u6771', '\uc5b4', '\U0001F600',
      '\u200d', '\u0378', '\U000e0001', '\U0010fffd', '<|endoftext|>', '<|endoftext|',
      ' ' * 5, '\n\n', ' \n ', '\t ']
  return [''.join(rng.choice(parts, size=size)) for size in rng.integers(0, 120, n)]


def test_gpt2_bpe_encodes_as_hugging_face_tokenizers(trained_gpt2, awkward_gpt2, validation):
  """The encoder (fastokens) gives the ids of the definition's own (tokenizers): on the
  corpus, on the awkward texts and on 2,000 random ones made of every kind of character."""
  texts = list(validation.values())[:10] + list(AWKWARD) + _awkward_texts(2000, seed=0)
  for gpt2 in (trained_gpt2, awkward_gpt2):
    theirs = [e.ids for e in gpt2._hf.encode_batch(texts, add_special_tokens=False)]
    assert [ids.tolist() for ids in gpt2.encode_batch(texts)] == theirs


def test_gpt2_bpe_without_merges_encodes_bytes(tmp_path):
  pieces = tokenizers._gpt2_byte_chars() + ['<|endoftext|>']
  tokenizer = tokenizers.Gpt2BpeTokenizer({p: i for i, p in enumerate(pieces)}, [])
  text = "caf\u00e9 it's\n<|endoftext|>\U0001F600"
  ids = [*"caf\u00e9 it's\n".encode(), 256, *'\U0001F600'.encode()]
  assert tokenizer.encode(text).tolist() == ids
  assert tokenizer.decode(ids) == text.replace('<|endoftext|>', '')
  tokenizer.save(str(tmp_path))
  assert tokenizers.load_tokenizer(str(tmp_path)).encode(text).tolist() == ids


def test_encode_batch_is_encode_of_each_text(char_tokenizer, spm_tokenizer, gpt2_tokenizer,
                                             train_texts, monkeypatch):
  # Long works (cut into chunks of about 100 characters), short texts, empty ones.
  texts = [train_texts[0], '', 'To be, or not to be', '\n', train_texts[1][:20000]]
  monkeypatch.setattr(tokenizers, '_CHUNK_CHARS', 1 << 40)
  for tokenizer in (char_tokenizer, spm_tokenizer, gpt2_tokenizer):
    uncut = [tokenizer.encode(text) for text in texts]
    monkeypatch.setattr(tokenizers, '_CHUNK_CHARS', 100)
    batch = tokenizer.encode_batch(texts)
    monkeypatch.setattr(tokenizers, '_CHUNK_CHARS', 1 << 40)
    assert len(batch) == len(texts) and tokenizer.encode_batch([]) == []
    for expected, ids in zip(uncut, batch):
      assert ids.dtype == np.int32
      np.testing.assert_array_equal(ids, expected)


def test_gpt2_bpe_save_load(gpt2_tokenizer, tmp_path):
  directory = tmp_path / 'saved'
  gpt2_tokenizer.save(str(directory))
  assert json.loads((directory / 'tokenizer.json').read_text())['kind'] == 'gpt2_bpe'
  assert (directory / 'vocab.json').exists() and (directory / 'merges.txt').exists()
  loaded = tokenizers.load_tokenizer(str(directory))
  assert isinstance(loaded, tokenizers.Gpt2BpeTokenizer)
  assert (loaded.vocab, loaded.merges, loaded.eos_id) == (
      gpt2_tokenizer.vocab, gpt2_tokenizer.merges, gpt2_tokenizer.eos_id)
  text = 'low lower newest\n\tcaf\u00e9'
  np.testing.assert_array_equal(loaded.encode(text), gpt2_tokenizer.encode(text))


def test_gpt2_bpe_files_that_do_not_belong_together_are_refused(tmp_path):
  vocab = _write_gpt2_files(tmp_path)
  del vocab['\u0120new']
  vocab = {piece: i for i, piece in enumerate(vocab)}
  with pytest.raises(UserError, match='do not belong together'):
    tokenizers.Gpt2BpeTokenizer(vocab, GPT2_MERGES)
  (tmp_path / 'merges.txt').write_text('#version: 0.2\nl o\nlo w x\n', encoding='utf-8')
  with pytest.raises(UserError, match='merges.txt, line 3'):
    tokenizers.Gpt2BpeTokenizer.from_files(str(tmp_path / 'vocab.json'),
                                           str(tmp_path / 'merges.txt'))


def test_gpt2_bpe_damaged_vocabulary_or_merges_are_refused(tmp_path):
  vocab = _write_gpt2_files(tmp_path)
  with pytest.raises(UserError, match='gaps or repeats'):
    tokenizers.Gpt2BpeTokenizer({**vocab, 'extra': len(vocab) + 5}, GPT2_MERGES)
  without_eos = {p: i for i, p in enumerate(p for p in vocab if p != '<|endoftext|>')}
  with pytest.raises(UserError, match=re.escape("has no '<|endoftext|>' token")):
    tokenizers.Gpt2BpeTokenizer(without_eos, GPT2_MERGES)
  paths = str(tmp_path / 'vocab.json'), str(tmp_path / 'merges.txt')
  (tmp_path / 'merges.txt').write_bytes(b'#version: 0.2\nl \xff\n')
  with pytest.raises(UserError, match='merges.txt is damaged: it is not UTF-8'):
    tokenizers.Gpt2BpeTokenizer.from_files(*paths)
  (tmp_path / 'vocab.json').write_text('[1]')
  with pytest.raises(UserError, match='vocab.json is damaged: it is not a JSON object'):
    tokenizers.Gpt2BpeTokenizer.from_files(*paths)
  (tmp_path / 'vocab.json').write_text('{"a": ')
  with pytest.raises(UserError, match='vocab.json is damaged: it is not valid JSON'):
    tokenizers.Gpt2BpeTokenizer.from_files(*paths)


def test_build_tokenizer_reuses_a_gpt2_bpe_but_cannot_train_one(gpt2_tokenizer, tmp_path):
  def must_not_train():
    raise AssertionError('build_tokenizer tried to train a GPT-2 tokenizer')

  with pytest.raises(UserError, match=r'data\.tokenizer=gpt2_bpe.*experiments/import_hf\.py'):
    tokenizers.build_tokenizer('gpt2_bpe', str(tmp_path / 'empty'), must_not_train)
  gpt2_tokenizer.save(str(tmp_path / 'imported'))
  reused = tokenizers.build_tokenizer('gpt2_bpe', str(tmp_path / 'imported'), must_not_train)
  assert reused.vocab == gpt2_tokenizer.vocab
  assert 'gpt2_bpe' in tokenizers.KINDS
