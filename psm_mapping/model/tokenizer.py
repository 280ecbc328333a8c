"""The RoBERTa tokenizer of the CLAP text tower, with the ``tokenizers`` library (no transformers).

A folder with ``tokenizer.json`` (what ``save_pretrained`` writes), or ``vocab.json`` +
``merges.txt`` (byte-level BPE, built as ``transformers.RobertaTokenizer`` builds it), or
``roberta-base`` from the Hugging Face cache. Ids, padding and truncation equal
``RobertaTokenizerFast(texts, padding="max_length", truncation=True, max_length=128)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError, TokenizerError

TEXT_MAX_LENGTH = 128
#: RoBERTa's special tokens, in id order
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
#: the largest tokenizer file read (roberta-base's tokenizer.json is 1.4 MB)
MAX_TOKENIZER_BYTES = 64 << 20


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with RoBERTa's padding; callable like a transformers tokenizer
    (``tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")``).

    ``identity``: a hash of the files it was built from (part of the text-query cache key)."""

    def __init__(self, tokenizer, identity: str, source: str):
        self.tokenizer = tokenizer
        self.identity = identity
        self.source = source
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = 1 if pad is None else pad
        self._by_length = {}  # max_length -> a configured copy (set once: calls may come from threads)
        self._configured(TEXT_MAX_LENGTH)

    def _configured(self, max_length: int):
        tok = self._by_length.get(max_length)
        if tok is None:
            tok = self.tokenizer if not self._by_length else type(self.tokenizer).from_str(self.tokenizer.to_str())
            tok.enable_truncation(max_length=max_length)
            tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="<pad>")
            self._by_length[max_length] = tok
        return tok

    def encode(self, texts: Sequence[str], max_length: int = TEXT_MAX_LENGTH) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[B, max_length]`` (int64), truncated and padded."""
        enc = self._configured(int(max_length)).encode_batch(list(texts))
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long)}

    def __call__(self, texts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                 return_tensors="pt"):
        if padding != "max_length" or truncation is not True or return_tensors != "pt":
            raise ValueError("TextTokenizer pads to max_length, truncates and returns torch tensors only")
        return self.encode([texts] if isinstance(texts, str) else texts, max_length)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source!r}, identity={self.identity[:12]})"


def _read(path: Path) -> bytes:
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{path} is over {MAX_TOKENIZER_BYTES >> 20} MB, too large for a RoBERTa "
                             "tokenizer file: pass the tokenizer folder of roberta-base")
    return path.read_bytes()


def _from_folder(p: Path) -> TextTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    config = {}
    if (p / "tokenizer_config.json").is_file():
        try:
            config = json.loads(_read(p / "tokenizer_config.json"))
        except ValueError:
            config = {}
    if (p / "tokenizer.json").is_file():
        data = _read(p / "tokenizer.json")
        tok = Tokenizer.from_str(data.decode("utf-8"))
        return TextTokenizer(tok, _identity(p, data), str(p))
    vocab, merges = p / "vocab.json", p / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError("tokenizer.json or vocab.json + merges.txt")
    prefix = bool(config.get("add_prefix_space", False))
    tok = Tokenizer(BPE.from_file(str(vocab), str(merges), dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, lstrip=_lstrip(config, s), normalized=False, special=True)
                            for s in SPECIALS])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")),
                                                      trim_offsets=True, add_prefix_space=prefix)
    return TextTokenizer(tok, _identity(p), str(p))


def _lstrip(config: dict, token: str) -> bool:
    """Whether ``token`` eats the space before it: as tokenizer_config.json says (roberta-base's
    ``<mask>`` does), else not (as transformers builds a RobertaTokenizer from a plain string)."""
    for entry in [*(config.get("added_tokens_decoder") or {}).values(),
                  *(v for v in config.values() if isinstance(v, dict))]:
        if isinstance(entry, dict) and entry.get("content") == token:
            return bool(entry.get("lstrip", False))
    return False


def _identity(p: Path, tokenizer_json: bytes | None = None) -> str:
    """sha256 of the files a tokenizer is built from (what decides its ids)."""
    if tokenizer_json is not None or (p / "tokenizer.json").is_file():
        return hashlib.sha256(tokenizer_json if tokenizer_json is not None else _read(p / "tokenizer.json")).hexdigest()
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if (p / name).is_file():
            h.update(name.encode() + b"\0" + _read(p / name) + b"\0")
    return h.hexdigest()


def tokenizer_identity(tokenizer=None) -> str:
    """The identity of a tokenizer (a :class:`TextTokenizer`, a folder, or None: roberta-base in
    the Hugging Face cache) without building it: a hash of its files."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.identity
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"no identity for a {type(tokenizer).__name__}: pass a folder or a TextTokenizer")
    p = _roberta_base_folder() if tokenizer is None else Path(tokenizer)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer folder {p} not found: pass --tokenizer DIR with a RoBERTa "
                             "tokenizer (e.g. `hf download roberta-base --local-dir DIR`)")
    return _identity(p)


def _roberta_base_folder() -> Path:
    """The folder of roberta-base in the Hugging Face cache (downloaded when online)."""
    from huggingface_hub import hf_hub_download

    from ..offline import is_offline, reachable

    def fetch(local_only: bool) -> Path:
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            try:
                f = hf_hub_download("roberta-base", name, local_files_only=local_only)
            except Exception:  # noqa: BLE001 - the hub client raises many kinds
                continue
            if name == "tokenizer.json" or Path(f).with_name("merges.txt").is_file():
                return Path(f).parent
        raise LookupError

    try:
        return fetch(True)
    except LookupError:
        pass
    if is_offline():
        raise TokenizerError("roberta-base is not in the Hugging Face cache and offline mode is on: "
                             "pass --tokenizer DIR, or fill the cache once online "
                             "(`hf download roberta-base`)", option="tokenizer")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):  # at once, not after the hub client's retries
        raise TokenizerError(f"roberta-base is not in the Hugging Face cache and {endpoint} cannot be reached: "
                             "pass --tokenizer DIR, or fill the cache once online (`hf download roberta-base`)",
                             option="tokenizer")
    try:
        return fetch(False)
    except LookupError:
        raise TokenizerError("cannot get the roberta-base tokenizer from the Hugging Face hub: pass "
                             "--tokenizer DIR with a local copy, or fill the cache online "
                             "(`hf download roberta-base`)") from None


def load_tokenizer(path: str | os.PathLike | None = None) -> TextTokenizer:
    """A RoBERTa tokenizer from a local folder, or ``roberta-base`` from the Hugging Face cache.

    Offline mode (``HF_HUB_OFFLINE=1``) is honoured: then only the cache is looked at."""
    if path is None:
        folder = _roberta_base_folder()
        try:
            return _from_folder(folder)
        except Exception as exc:  # noqa: BLE001
            raise TokenizerError(f"the cached roberta-base tokenizer in {folder} is unreadable "
                                 f"({type(exc).__name__}): download it again (`hf download roberta-base`)") from None
    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer folder {p} not found: pass --tokenizer DIR with a RoBERTa "
                             "tokenizer (e.g. `hf download roberta-base --local-dir DIR`)")
    try:
        return _from_folder(p)
    except TokenizerError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions on bad files
        raise TokenizerError(f"cannot load a tokenizer from {p} ({type(exc).__name__}): the folder "
                             "needs tokenizer.json or vocab.json + merges.txt of roberta-base") from None


def tokenize(texts: Sequence[str], tokenizer) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` as the reference: max_length 128, padded, truncated."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("a text query is empty: give words, e.g. --query 'birds chirping'")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


__all__ = ["TextTokenizer", "load_tokenizer", "tokenize", "tokenizer_identity", "TEXT_MAX_LENGTH"]
