"""Corpora, tokenizers and the input pipeline.

Importing this package registers the TFDS builders, so `tfds.load('shakespeare')`
and `tfds.load('milton')` work afterwards.
"""
from lmjax.data import corpora  # noqa: F401  (registers the builders)
