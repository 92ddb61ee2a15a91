"""Corpora, splitting, tokenisation and mixed-task batching."""

from .batching import IGNORE_INDEX, Batch, Split
from .corpus import Corpus, CorpusConfig, load_corpus

__all__ = ["IGNORE_INDEX", "Batch", "Corpus", "CorpusConfig", "Split", "load_corpus"]
