"""Tokenizer with item-code tokens, built with `tokenizers` only (no torch, no hub).

Sources:

* an HF model directory with ``tokenizer.json`` (and optionally ``tokenizer_config.json``);
* a GGUF file with a byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``, as in
  SmolLM2 and LLaMA-3): tokens, merges and token types are read from the metadata and the BPE is
  assembled the way ``transformers`` does for GGUF files, so the ids agree with
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (tested on real prompts).

Item-code tokens (``<a_12>``, ``<b_3>``, ...) are added as non-special added tokens with
``normalized=False, lstrip=False, rstrip=False``. Added tokens are matched in the raw text before
pre-tokenisation, so each code encodes to exactly one id in any context: at the start, after
another code, after a newline, after a space, inside a sentence.

Whitespace convention: a space in front of a code is NOT absorbed into the code; it stays a token
of its own (the byte-level lone space ``"Ġ"``, id 216 in SmolLM2). So ``"a <a_1>"`` is
``[a, Ġ, <a_1>]`` and decoding gives the text back exactly. Prompts and parsing follow from that:

* responses that are item codes are written with no leading space (``"<a_1><b_7><c_0><d_3>"``),
  so a response's ids are exactly the per-level code ids of :meth:`LCRecTokenizer.code_token_ids`
  and the decoding trie needs no space token;
* prompt and response are tokenised separately and concatenated (a prompt ending in a space keeps
  that space as its own last token, identically at training and inference time);
* codes inside prompts may be separated by ", " or " "; parsing a decoded string with
  :func:`lcrec_jax.index.item_index.parse_code_token` on ``re.findall(r"<[a-z]_\\d+>")`` works
  regardless of the spaces.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from lcrec_jax.index.item_index import ItemIndex, code_token

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokeniser regexes keyed by ``tokenizer.ggml.pre`` that differ from GPT-2's. The LLaMA-3 split
# (case-insensitive contractions, 1-3 digit numbers, newline runs) is the published tiktoken
# cl100k-style pattern; anything else uses GPT-2's byte-level regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to
  ``chr(256)``, ``chr(257)``, ... (so the space byte 32 becomes ``"Ġ"``, newline ``"Ċ"``).
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _gguf_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
  """Byte-level BPE ``tokenizers.Tokenizer`` and tokenizer_config-like fields from a GGUF file."""
  from lcrec_jax.llm.gguf_io import read_gguf_metadata  # pylint: disable=g-import-not-at-top

  meta = read_gguf_metadata(path)
  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    raise ValueError(f"{path}: no tokenizer.ggml.model metadata; the file has no tokenizer")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) "
                     "GGUF tokenizers are supported, load the tokenizer from the HF directory")
  tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
  if "tokenizer.ggml.merges" not in meta:
    raise ValueError(f"{path}: byte-level tokenizer without tokenizer.ggml.merges")
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]

  alphabet = bytes_to_unicode()
  spelled = set(alphabet.values())
  # Byte-level vocabularies spell every token in the byte alphabet; respell any that are not.
  vocab = {}
  for i, t in enumerate(tokens):
    if not set(t) <= spelled:
      t = "".join(alphabet[b] for b in t.encode("utf-8"))
    vocab.setdefault(t, i)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()

  # Control tokens (<|im_start|>, ...) are special; user-defined ones are plain added tokens.
  # A "control" token outside the byte alphabet is a mislabelled entry in some files: skipped.
  control = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= spelled]
  if control:
    tok.add_special_tokens(control)
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)

  def tok_str(key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  cfg = {
      "bos_token": tok_str("bos_token_id"),
      "eos_token": tok_str("eos_token_id"),
      "pad_token": tok_str("padding_token_id"),
      "unk_token": tok_str("unknown_token_id"),
      "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
      "chat_template": meta.get("tokenizer.chat_template"),
      "model_max_length": int(meta.get("llama.context_length", 0)) or None,
  }
  return tok, cfg


def _token_content(v: Any) -> str | None:
  """tokenizer_config values are either strings or ``{"content": ...}`` dicts."""
  if isinstance(v, dict):
    return v.get("content")
  return v


class LCRecTokenizer:
  """A ``tokenizers.Tokenizer`` plus special tokens and the item-code vocabulary.

  Attributes:
    tokenizer: the underlying ``tokenizers.Tokenizer`` (fast, thread-safe, no torch).
    bos_token, eos_token, pad_token, unk_token: special token strings (``None`` when absent).
    add_bos_token, add_eos_token: whether :meth:`encode` with ``add_special_tokens`` adds them.
    chat_template: the model's jinja chat template, kept for export.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None,
               unk_token: str | None = None, add_bos_token: bool | None = None,
               add_eos_token: bool | None = None, chat_template: str | None = None,
               model_max_length: int | None = None):
    self.tokenizer = tokenizer
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token = pad_token if pad_token is not None else eos_token
    self.unk_token = unk_token
    self.chat_template = chat_template
    self.model_max_length = model_max_length
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
      t = getattr(self, name)
      if t is not None and tokenizer.token_to_id(t) is None:
        raise ValueError(f"{name} {t!r} is not in the vocabulary")
    has_bos, has_eos = self._adds_specials()
    self.add_bos_token = has_bos if add_bos_token is None else bool(add_bos_token)
    self.add_eos_token = has_eos if add_eos_token is None else bool(add_eos_token)
    if (self.add_bos_token, self.add_eos_token) != (has_bos, has_eos):
      self._set_post_processor()

  # -- construction --------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, path: str) -> "LCRecTokenizer":
    """The tokenizer stored in a GGUF file's metadata (byte-level BPE only)."""
    tok, cfg = _gguf_tokenizer(os.fspath(path))
    return cls(tok, **cfg)

  @classmethod
  def from_dir(cls, path: str) -> "LCRecTokenizer":
    """From an HF model directory holding ``tokenizer.json`` (+ ``tokenizer_config.json``)."""
    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      raise FileNotFoundError(f"{tj} not found: need an HF fast tokenizer file (tokenizer.json)")
    tok = tokenizers.Tokenizer.from_file(tj)
    cfg: dict[str, Any] = {}
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc):
      with open(tc, encoding="utf-8") as f:
        cfg = json.load(f)
    stm = os.path.join(path, "special_tokens_map.json")
    if os.path.isfile(stm):
      with open(stm, encoding="utf-8") as f:
        for k, v in json.load(f).items():
          cfg.setdefault(k, v)
    # The post-processor in tokenizer.json decides BOS/EOS unless the config sets the flags.
    return cls(tok, bos_token=_token_content(cfg.get("bos_token")),
               eos_token=_token_content(cfg.get("eos_token")),
               pad_token=_token_content(cfg.get("pad_token")),
               unk_token=_token_content(cfg.get("unk_token")),
               add_bos_token=cfg.get("add_bos_token", None),
               add_eos_token=cfg.get("add_eos_token", None),
               chat_template=cfg.get("chat_template"),
               model_max_length=cfg.get("model_max_length"))

  @classmethod
  def load(cls, path: str) -> "LCRecTokenizer":
    """:meth:`from_gguf` for a ``.gguf`` file, :meth:`from_dir` for a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
      return cls.from_dir(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer source not found: {path}")
    if path.endswith(".gguf"):
      return cls.from_gguf(path)
    raise ValueError(f"{path}: expected an HF directory with tokenizer.json or a .gguf file")

  def _adds_specials(self) -> tuple[bool, bool]:
    """Whether the current post-processor adds BOS / EOS to a single sequence."""
    plain = self.tokenizer.encode("a", add_special_tokens=False).ids
    full = self.tokenizer.encode("a", add_special_tokens=True).ids
    extra = len(full) - len(plain)
    bos, eos = self.bos_id, self.eos_id
    has_bos = extra > 0 and bos is not None and full[0] == bos and plain[:1] != [bos]
    has_eos = extra > 0 and eos is not None and full[-1] == eos and plain[-1:] != [eos]
    return bool(has_bos), bool(has_eos)

  def _set_post_processor(self) -> None:
    """Make BOS/EOS insertion follow ``add_bos_token``/``add_eos_token``."""
    single, specials = "$A", []
    if self.add_bos_token and self.bos_token is not None:
      single = f"{self.bos_token} {single}"
      specials.append((self.bos_token, self.tokenizer.token_to_id(self.bos_token)))
    if self.add_eos_token and self.eos_token is not None:
      single = f"{single} {self.eos_token}"
      if self.eos_token != self.bos_token:
        specials.append((self.eos_token, self.tokenizer.token_to_id(self.eos_token)))
    pair = single.replace("$A", "$A $B:1")
    self.tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials)

  # -- ids -----------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids including added tokens (= embedding rows the model needs)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def __len__(self) -> int:
    """Same as :attr:`vocab_size`."""
    return self.vocab_size

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    """Id of the BOS token (``None`` if the model has none)."""
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    """Id of the EOS token."""
    return self._id(self.eos_token)

  @property
  def pad_id(self) -> int | None:
    """Id of the padding token (the EOS token when the model names none)."""
    return self._id(self.pad_token)

  def token_to_id(self, token: str) -> int | None:
    """Id of ``token`` (a vocabulary or added token), ``None`` if absent."""
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    """Token string of id ``i`` (byte-level spelling, e.g. ``"Ġthe"``)."""
    return self.tokenizer.id_to_token(int(i))

  # -- encode / decode -----------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (BOS/EOS per the flags when ``add_special_tokens``)."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """:meth:`encode` over many texts (parallel in Rust)."""
    return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                       add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``; code tokens are not special, so they survive ``skip_special_tokens``."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # -- item codes ----------------------------------------------------------------------

  def add_code_tokens(self, tokens: Sequence[str]) -> list[int]:
    """Add item-code tokens (e.g. ``ItemIndex.all_tokens()``); returns their ids, in order.

    Tokens already present keep their id, so calling this twice is harmless. New ids are
    appended after the current vocabulary: grow the model with
    :func:`lcrec_jax.llm.vocab.grow_embeddings` to :attr:`vocab_size` rows.
    """
    new = [t for t in dict.fromkeys(tokens) if self.tokenizer.token_to_id(t) is None]
    if new:
      self.tokenizer.add_tokens([AddedToken(t, normalized=False, special=False, lstrip=False,
                                            rstrip=False, single_word=False) for t in new])
    ids = [self.tokenizer.token_to_id(t) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None]
    if missing:
      raise RuntimeError(f"tokens not added to the vocabulary: {missing[:5]}")
    return ids

  def code_token_ids(self, item_index: ItemIndex) -> np.ndarray:
    """``[num_levels, max_level_size]`` int32: id of ``<level_code>``; -1 where a level is shorter.

    Raises ``KeyError`` naming the first code token that was never added.
    """
    width = max(item_index.level_sizes, default=0)
    out = np.full((item_index.num_levels, width), -1, np.int32)
    for l, k in enumerate(item_index.level_sizes):
      for c in range(k):
        t = code_token(l, c)
        i = self.tokenizer.token_to_id(t)
        if i is None:
          raise KeyError(f"code token {t!r} is not in the vocabulary; call add_code_tokens "
                         "(item_index.all_tokens()) first")
        out[l, c] = i
    return out

  def item_token_ids(self, item_index: ItemIndex) -> np.ndarray:
    """``[num_items, num_levels]`` int32: the token ids of every item's code (its response ids)."""
    table = self.code_token_ids(item_index)
    codes = np.asarray(item_index.codes)
    return table[np.arange(item_index.num_levels)[None, :], codes].astype(np.int32)

  # -- export --------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``transformers.AutoTokenizer.from_pretrained(path)`` (a ``PreTrainedTokenizerFast``) loads
    the result and encodes like this tokenizer, code tokens included.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    self.tokenizer.save(os.path.join(path, "tokenizer.json"))
    specials = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                if getattr(self, k) is not None}
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(self.add_bos_token),
        "add_eos_token": bool(self.add_eos_token),
        "clean_up_tokenization_spaces": False,
        "model_max_length": self.model_max_length or 1_000_000_000,
    }
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(specials, f, indent=2, ensure_ascii=False)
