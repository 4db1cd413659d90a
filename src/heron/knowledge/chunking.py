"""Parsed documents cut into chunks of at most `size` tokens of the embedding model.

Each page (a PDF page, a slide, or the whole text of other formats) is cut on its own, so a chunk
never spans two pages. Within a page the Markdown headings divide the text into sections, and
each chunk keeps the path of headings above it (`["Guide", "Install"]`). A section that is too
long is cut at the coarsest boundary that works: paragraphs first, then lines, sentences, words,
and single tokens only for a run of text with no space in it. Pieces are then packed greedily up
to the budget, and each chunk after the first of a section repeats up to `overlap` tokens of the
text before it, starting at a word.

The page is tokenized once, with character offsets (the `tokenizers` library encodes blocks of it
in parallel), and every length is measured by looking those offsets up, so cutting costs no
further tokenization. Chunks are contiguous slices of the page text: together they cover every
character but the whitespace at their edges, and `start`/`end` say where each one lies.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heron.knowledge.parsing import ParsedDocument
from heron.knowledge.tokens import TokenCounter, minilm_token_counter

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Boundaries tried in order when a section is too long: paragraphs, lines, sentences, words.
_SEPARATORS = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"(?<=[.!?;:])\s+|(?<=[\u3002\uff01\uff1f])"),
    re.compile(r"\s+"),
)
_SENTENCE_ENDS = frozenset(".!?\u3002\uff01\uff1f")  # and the CJK full stop, ! and ?
_HEADING_OR_FENCE = re.compile(r"^ {0,3}(?:(```|~~~)|(#{1,6})[ \t]+(.*?))[ \t]*$", re.MULTILINE)
_MAX_CHARS_PER_TOKEN = 16  # a chunk longer than this many characters per token is cut anyway
_TOKENIZE_BLOCK = 32_768  # characters tokenized as one item of a batch


@dataclass
class Chunk:
    text: str
    position: int  # 0-based order in the document
    heading_path: list[str]  # the Markdown headings above the chunk, outermost first
    page: int | None  # the ParsedPage's page number
    token_count: int  # tokens of `text`, without the model's special tokens
    start: int = 0  # where `text` lies in its page's text: page.text[start:end] == text
    end: int = 0

    def embedding_text(self) -> str:
        """The text to embed: the heading path, then the chunk (`Guide > Install\\n\\ntext`)."""
        if not self.heading_path:
            return self.text
        return f"{' > '.join(self.heading_path)}\n\n{self.text}"


def chunk(
    doc: ParsedDocument,
    *,
    size: int = 512,
    overlap: int = 64,
    tokenizer: TokenCounter | None = None,
) -> list[Chunk]:
    """Cut a parsed document into chunks of at most `size` tokens, overlapping by `overlap`."""
    if size < 8:
        raise ValueError("size must be at least 8 tokens")
    if not 0 <= overlap <= size // 2:
        raise ValueError("overlap must be between 0 and half the size")
    counter = tokenizer or minilm_token_counter()
    chunks: list[Chunk] = []
    headings: list[tuple[int, str]] = []  # (level, title), carried from page to page
    for page in doc.pages:
        if not page.text.strip():
            continue
        cutter = _PageCutter(page.text, counter, size, overlap)
        for path, start, end in _sections(page.text, headings):
            for s, e in cutter.cut(start, end):
                chunks.append(
                    Chunk(
                        text=page.text[s:e],
                        position=len(chunks),
                        heading_path=path,
                        page=page.page,
                        token_count=max(1, cutter.tokens(s, e)),
                        start=s,
                        end=e,
                    )
                )
    return chunks


def _sections(text: str, headings: list[tuple[int, str]]) -> list[tuple[list[str], int, int]]:
    """(heading path, start, end) of each heading's section of `text`; updates `headings`."""
    sections: list[tuple[list[str], int, int]] = []
    start = 0
    path = [title for _, title in headings]
    fence: str | None = None
    body = 0  # where the current section's text after its heading line begins
    for match in _HEADING_OR_FENCE.finditer(text):
        marker, hashes, title = match.groups()
        if marker:
            fence = None if fence == marker else (fence or marker)
            continue
        if fence or not title.rstrip("#").strip():
            continue
        level = len(hashes)
        # A heading directly followed by a subheading stays with it rather than stand alone.
        bare = not text[body : match.start()].strip()
        if match.start() > start and not (bare and headings and level > headings[-1][0]):
            sections.append((path, start, match.start()))
            start = match.start()
        body = match.end()
        while headings and headings[-1][0] >= level:
            headings.pop()
        headings.append((level, title.rstrip("#").strip()))
        path = [t for _, t in headings]
    sections.append((path, start, len(text)))
    return sections


class _PageCutter:
    """Cuts spans of one page's text, measuring them with the page's token offsets."""

    def __init__(self, text: str, counter: TokenCounter, size: int, overlap: int) -> None:
        self.text = text
        self.size = size
        self.overlap = overlap
        self.starts, self.ends = _token_offsets(text, counter)

    def _index(self, offset: int) -> int:
        return int(self.starts.searchsorted(offset))

    def tokens(self, start: int, end: int) -> int:
        return self._index(end) - self._index(start)

    def fits(self, start: int, end: int, budget: int) -> bool:
        """Within `budget` tokens, and not absurdly long in characters (the tokenizer counts a
        word of more than 100 characters, such as a base64 blob, as one unknown token)."""
        return end - start <= budget * _MAX_CHARS_PER_TOKEN and self.tokens(start, end) <= budget

    def cut(self, start: int, end: int) -> list[tuple[int, int]]:
        """Chunks of text[start:end] as (start, end) spans, whitespace trimmed."""
        if self.fits(start, end, self.size):
            spans = [(start, end)]
        else:
            spans = self._split(start, end, 0, self.size - self.overlap)
            spans = [spans[0]] + [(self._overlap_start(s, e, start), e) for s, e in spans[1:]]
        return [trimmed for s, e in spans if (trimmed := self._trim(s, e)) is not None]

    def _trim(self, start: int, end: int) -> tuple[int, int] | None:
        piece = self.text[start:end]
        stripped = piece.lstrip()
        if not stripped:
            return None
        start += len(piece) - len(stripped)
        return start, start + len(stripped.rstrip())

    def _split(self, start: int, end: int, level: int, budget: int) -> list[tuple[int, int]]:
        if self.fits(start, end, budget):
            return [(start, end)]
        if level == len(_SEPARATORS):
            return self._windows(start, end, budget)
        cuts = [
            m.end() for m in _SEPARATORS[level].finditer(self.text, start, end) if m.end() < end
        ]
        cuts = [c for c in cuts if c > start]
        if not cuts:
            return self._split(start, end, level + 1, budget)
        bounds = [start, *cuts, end]
        spans: list[tuple[int, int]] = []
        current: tuple[int, int] | None = None
        for s, e in itertools.pairwise(bounds):
            if not self.fits(s, e, budget):
                # A short lead-in (a heading, a label) is cut together with the long piece
                # after it, so it doesn't end up a chunk of its own.
                if current and self.tokens(*current) <= budget // 4:
                    s, current = current[0], None
                # Cut the long piece finer; its first and last parts may still join neighbours.
                subs = self._split(s, e, level + 1, budget)
                if current and self.fits(current[0], subs[0][1], budget):
                    subs[0] = (current[0], subs[0][1])
                elif current:
                    spans.append(current)
                spans += subs[:-1]
                current = subs[-1]
            elif current is None:
                current = (s, e)
            elif self.fits(current[0], e, budget):
                current = (current[0], e)
            else:
                spans.append(current)
                current = (s, e)
        if current:
            spans.append(current)
        return spans

    def _windows(self, start: int, end: int, budget: int) -> list[tuple[int, int]]:
        """Text with no space to cut at, in windows of `budget` tokens; cuts fall between tokens
        where the text allows (punctuation), so the pieces tokenize as they did in place."""
        first, last = self._index(start), self._index(end)
        spans: list[tuple[int, int]] = []
        at = first
        while at < last:
            stop = min(at + budget, last)
            if stop < last:
                # Back off to a token that starts a word or follows punctuation, if one is near.
                for candidate in range(stop, max(at + budget // 2, at + 1), -1):
                    if self._clean_boundary(candidate):
                        stop = candidate
                        break
            spans.append(
                (
                    start if at == first else int(self.starts[at]),
                    end if stop >= last else int(self.starts[stop]),
                )
            )
            at = stop
        if not spans:
            spans = [(start, end)]
        # A window can still be too long in characters: cut those by characters.
        width = budget * _MAX_CHARS_PER_TOKEN
        return [(cut, min(cut + width, e)) for s, e in spans for cut in range(s, e, width)]

    def _clean_boundary(self, index: int) -> bool:
        """A cut before token `index` doesn't split a word in two."""
        previous_end, next_start = int(self.ends[index - 1]), int(self.starts[index])
        if previous_end != next_start:
            return True
        before, after = self.text[previous_end - 1], self.text[next_start]
        return not (before.isalnum() and after.isalnum())

    def _overlap_start(self, start: int, end: int, floor: int) -> int:
        """Where the chunk text[start:end] begins once it repeats up to `overlap` tokens of the
        text before it (never before `floor`), at the start of a word."""
        if not self.overlap:
            return start
        first = self._index(start)
        lowest = max(first - self.overlap, self._index(floor))
        words = [
            offset
            for offset in (int(o) for o in self.starts[lowest:first])
            if (offset == floor or self.text[offset - 1].isspace())
            and self.fits(offset, end, self.size)
        ]
        # Prefer to begin at a sentence, else at the earliest word within reach.
        for offset in words:
            if offset == floor or self._after_sentence(offset):
                return offset
        return words[0] if words else start

    def _after_sentence(self, offset: int) -> bool:
        at = offset - 1
        while at > 0 and self.text[at].isspace():
            at -= 1
        return self.text[at] in _SENTENCE_ENDS


def _token_offsets(text: str, counter: TokenCounter) -> tuple[npt.NDArray[np.int64], ...]:
    """Start and end character offsets of every token of `text`, in order.

    The text is tokenized in blocks that end at whitespace (a boundary no token crosses), so a
    long page uses every core and the offsets are those of the whole."""
    import numpy as np

    blocks: list[int] = [0]
    while len(text) - blocks[-1] > _TOKENIZE_BLOCK:
        limit = blocks[-1] + _TOKENIZE_BLOCK
        cut = text.rfind("\n", blocks[-1] + 1, limit)
        if cut < 0:
            cut = max(
                text.rfind(" ", blocks[-1] + 1, limit), text.rfind("\t", blocks[-1] + 1, limit)
            )
        blocks.append(cut if cut > 0 else limit)
    blocks.append(len(text))
    pieces = [text[a:b] for a, b in itertools.pairwise(blocks)]
    spans = counter.spans(pieces)
    count = sum(len(s) for s in spans)
    starts = np.empty(count, dtype=np.int64)
    ends = np.empty(count, dtype=np.int64)
    at = 0
    for offset, piece_spans in zip(blocks, spans, strict=False):
        if not piece_spans:
            continue
        array = np.asarray(piece_spans, dtype=np.int64) + offset
        starts[at : at + len(array)] = array[:, 0]
        ends[at : at + len(array)] = array[:, 1]
        at += len(array)
    return starts, ends
