"""A small byte-level BPE tokenizer trained on a run's own task texts.

Why: a model trained from scratch (``model.init = "random"``) does not need a pretrained
tokenizer, and SmolLM2's 49k-token vocabulary makes the embedding and the output head of a
2-layer, 128-wide model several times larger than all its layers together. A vocabulary of
a few thousand tokens learned from the prompts, titles and responses of the training
examples encodes the same texts in a similar number of tokens and makes every step and
every beam-search step cheaper. Item-code tokens are added afterwards, as for any
tokenizer (:meth:`LCRecTokenizer.add_code_tokens`).

Byte-level: every byte is in the initial alphabet, so any text (an unseen title, another
language) still encodes; nothing maps to an unknown token. Training is deterministic for
a given list of texts (one thread's order; the ``tokenizers`` BPE trainer breaks count ties
by the pair itself), and the train stage saves the result so a resumed run reuses it.
"""

from __future__ import annotations

from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lcrec_jax.llm.tokenizer import LCRecTokenizer

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
              ) -> LCRecTokenizer:
  """Trains a byte-level BPE on ``texts``; no BOS, ``<|endoftext|>`` EOS, ``<|pad|>`` pad.

  Args:
    texts: training texts (task instructions and responses, the prompt frame).
    vocab_size: total size including the 256 byte tokens and the 2 special tokens (code
      tokens come on top); must be >= 258.
    min_frequency: a merge needs at least this many occurrences.
  """
  if vocab_size < 258:
    raise ValueError(f"model.tokenizer_vocab must be >= 258 (256 bytes + 2 specials), "
                     f"got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=int(vocab_size), min_frequency=int(min_frequency),
      special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  return LCRecTokenizer(tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, add_bos_token=False,
                        add_eos_token=False)
