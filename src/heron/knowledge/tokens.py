"""The tokenizer of the local embedding model, for counting tokens where chunks are cut.

Chunk sizes are set in tokens of the embedding model, so the chunker and the embedder share one
vocabulary: the WordPiece tokenizer of all-MiniLM-L6-v2, bundled as
`assets/all-minilm-l6-v2-tokenizer.json` (see `assets/README.md` for where it comes from).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_ASSET = "all-minilm-l6-v2-tokenizer.json"


class TokenCounter(Protocol):
    """Counts tokens the way an embedding model will see them (special tokens excluded)."""

    def count(self, text: str) -> int: ...

    def spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """For each text, the (start, end) character offsets of its tokens, in order."""
        ...


def load_minilm_tokenizer() -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` for all-MiniLM-L6-v2, with no truncation and no padding."""
    from tokenizers import Tokenizer

    data = resources.files("heron.knowledge").joinpath("assets", TOKENIZER_ASSET).read_text("utf-8")
    tokenizer = Tokenizer.from_str(data)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class MiniLMTokenCounter:
    """`TokenCounter` backed by the all-MiniLM-L6-v2 tokenizer (Rust; batches run in parallel)."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self._tokenizer = tokenizer or load_minilm_tokenizer()

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.offsets for encoding in encodings]


_counter: MiniLMTokenCounter | None = None
_counter_lock = threading.Lock()


def minilm_token_counter() -> MiniLMTokenCounter:
    """The process-wide counter (the tokenizer is loaded once, on first use)."""
    global _counter
    with _counter_lock:
        if _counter is None:
            _counter = MiniLMTokenCounter()
        return _counter
