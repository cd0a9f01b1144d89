"""Tokenizers with one small interface: a built-in byte-level tokenizer and a `tokenizer.json` wrapper.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_token_id`, `pad_token_id` (= eos, as in the
reference code) and `vocab_size`. `ByteTokenizer` needs no files, so tests and from-scratch experiments run offline.
`load_tokenizer(folder)` wraps the GPT-NeoX-20B `tokenizer.json` that ships with `state-spaces/mamba-*` checkpoints
(through the `tokenizers` library, the `[hf]` extra), or builds a GPT-2 style byte-level BPE from `vocab.json` +
`merges.txt`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

EOS_TOKEN = "<|endoftext|>"
SEP_TOKEN = "<|sep|>"


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every ssmtune tokenizer provides."""

    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then `<|endoftext|>` (eos = pad) and optionally `<|sep|>`.

    `vocab_size` is padded up to a multiple of 8 (258 -> 264), as model embeddings usually are; the padding ids
    are never produced by `encode` and are dropped by `decode`. Special-token strings inside the text are encoded
    as plain bytes: specials are added by id (the data pipeline appends `eos_token_id` itself).
    """

    def __init__(self, *, add_sep_token: bool = False) -> None:
        self.eos_token_id = 256
        self.pad_token_id = self.eos_token_id
        self.sep_token_id: int | None = 257 if add_sep_token else None
        n_real = 258 if add_sep_token else 257
        self.vocab_size = (n_real + 7) // 8 * 8
        self._specials = {self.eos_token_id: EOS_TOKEN}
        if self.sep_token_id is not None:
            self._specials[self.sep_token_id] = SEP_TOKEN

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i in self._specials and not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(self._specials[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, sep={self.sep_token_id is not None})"


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the ssmtune interface.

    eos is `<|endoftext|>` unless `tokenizer_config.json` / `special_tokens_map.json` name another. pad is always
    eos, as in the reference protocol (docs/methods.md §9), even where the folder declares a pad token: padded positions
    are masked, so only the id's consistency with the reference matters.
    """

    def __init__(self, tokenizer, *, eos_token: str = EOS_TOKEN, name: str = "") -> None:
        self._tok = tokenizer
        self.name = name
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token {eos_token!r} in its vocabulary")
        self.eos_token_id: int = eos_id
        self.pad_token_id: int = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS post-processing: the data pipeline adds EOS by id where the protocol wants it.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"


def _eos_token_name(folder: Path) -> str:
    """The eos token string from the folder's HF config files, defaulting to `<|endoftext|>`."""
    eos = EOS_TOKEN
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / fname
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))

        def _tok(v):
            # Entries are either plain strings or AddedToken dicts {"content": ...}.
            return v.get("content") if isinstance(v, dict) else v

        eos = _tok(cfg.get("eos_token")) or eos
    return eos


def load_tokenizer(folder: str | Path) -> ByteTokenizer | HFTokenizer:
    """Load the tokenizer of a checkpoint folder, or the built-in byte tokenizer for `"byte"`.

    Args:
        folder: `"byte"`, a folder with `tokenizer.json` (GPT-NeoX-20B style, as in `state-spaces/mamba-*`),
            a folder with GPT-2 style `vocab.json` + `merges.txt`, or a path to a `tokenizer.json` file.

    Raises:
        FileNotFoundError: the folder does not exist or holds no tokenizer files.
        ImportError: the `tokenizers` package (the `[hf]` extra) is missing.
    """
    if str(folder) == "byte":
        return ByteTokenizer()
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    if path.is_file():
        tok_file, path = path, path.parent
    else:
        tok_file = path / "tokenizer.json"
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not tok_file.is_file() and not (vocab.is_file() and merges.is_file()):
        found = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r}: expected 'tokenizer.json' (or 'vocab.json' + 'merges.txt'); "
            f"found {found}. Use load_tokenizer('byte') for the built-in byte tokenizer."
        )
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("loading a tokenizer.json needs the 'tokenizers' package: pip install 'ssmtune[hf]'") from e
    if tok_file.is_file():
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    else:
        tok = tokenizers.ByteLevelBPETokenizer(str(vocab), str(merges))
    return HFTokenizer(tok, eos_token=_eos_token_name(path), name=str(path))
