"""Keyword analysis: the terms BM25 indexes and searches, the same on SQLite and PostgreSQL.

A text's terms are its words (runs of letters and digits; `_` and punctuation separate them),
lower-cased, with diacritics removed, English stop words dropped and the Snowball English
stemmer (Porter 2, as PostgreSQL's `english` configuration uses) applied. Words longer than
`MAX_WORD` characters are not terms (hashes, base64, glued garbage). Documents and queries go
through the same function, so a query finds the forms its words were indexed under. Removing
a chunk analyses its text again to lower document frequencies: a change to this analysis needs
a migration that re-indexes (as 0007 does).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache

import snowballstemmer

MAX_WORD = 64

# PostgreSQL's english.stop list (the Snowball project's), so both backends drop the same words.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves
    """.split()  # noqa: SIM905
)

_WORD = re.compile(r"[^\W_]+")
_stemmer = snowballstemmer.stemmer("english")


@lru_cache(maxsize=262_144)
def _term(word: str) -> str | None:
    """The term of one lower-cased word, or None when it is not indexed."""
    if not word.isascii():
        word = "".join(
            c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)
        )
    if word in STOP_WORDS or len(word) > MAX_WORD:
        return None
    stem: str = _stemmer.stemWord(word)
    return stem


def terms(text: str) -> Counter[str]:
    """Each term of `text` with its frequency (BM25's tf); their sum is the text's length."""
    counts: Counter[str] = Counter()
    for word in _WORD.findall(text.lower()):
        term = _term(word)
        if term is not None:
            counts[term] += 1
    return counts


def query_terms(query: str) -> list[str]:
    """A query's distinct terms, in the order they first appear."""
    return list(dict.fromkeys(t for w in _WORD.findall(query.lower()) if (t := _term(w))))
