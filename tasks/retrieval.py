"""Passage retrieval over the small corpus in ``tasks/corpus``: the research agents' real work.

Written by hand, on purpose: the example must run on a bare Python with no model
and no index service. Passages (paragraphs) are ranked with BM25 against the
question's terms; confidence is how much of the question (weighted by term
rarity) the best passages cover, so a question the corpus says little about
gets a low confidence and is stopped at the analysis contract.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
BM25_K1 = 1.2
BM25_B = 0.75

STOPWORDS = frozenset("""
a about after again all also an and any are as at be because been before being between both
but by can could did do does doing done during each few for from further had has have having
he her here hers him his how i if in into is it its itself just me more most my no nor not now
of off on once only or other our out over own same she should so some such than that the their
them then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your one two every many much may must way
""".split())

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    """Every word of ``text``, lower case (what token counts are made of)."""
    return _WORD.findall(text.lower())


def stem(word: str) -> str:
    """A light stemmer: enough to match breaker/breakers, failures/failure, retried/retry."""
    for suffix, keep in (("ies", "y"), ("ied", "y"), ("ing", ""), ("es", ""), ("ed", ""),
                         ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)] + keep
    return word


def terms(text: str) -> list[str]:
    """The searchable terms of ``text``: words without stopwords, stemmed."""
    return [stem(w) for w in words(text) if w not in STOPWORDS and len(w) > 1]


@dataclass(frozen=True, slots=True)
class Passage:
    source: str  # "<document>#<paragraph>"
    text: str
    terms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Index:
    passages: tuple[Passage, ...]
    document_frequency: dict[str, int]
    average_length: float
    total_words: int

    def idf(self, term: str) -> float:
        n, df = len(self.passages), self.document_frequency.get(term, 0)
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))


@cache
def index(corpus: Path = CORPUS) -> Index:
    """The corpus split into paragraphs (headings dropped), indexed once per process."""
    passages: list[Passage] = []
    for path in sorted(corpus.glob("*.md")):
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        body = [p for p in paragraphs if p and not p.startswith("#")]
        for i, text in enumerate(body, 1):
            passages.append(Passage(f"{path.stem}#{i}", " ".join(text.split()),
                                    tuple(terms(text))))
    if not passages:
        raise FileNotFoundError(f"no passages in {corpus}: the corpus ships with the example")
    df: Counter[str] = Counter()
    for p in passages:
        df.update(set(p.terms))
    return Index(tuple(passages), dict(df), sum(len(p.terms) for p in passages) / len(passages),
                 sum(len(words(p.text)) for p in passages))


@dataclass(frozen=True, slots=True)
class Hit:
    passage: Passage
    score: float


def search(question: str, limit: int, idx: Index | None = None) -> tuple[list[Hit], float]:
    """The ``limit`` best passages for ``question`` (BM25), and the confidence in them:
    the share of the question's term weight (idf) that the hits contain."""
    idx = idx or index()
    wanted = set(terms(question))
    scored = []
    for p in idx.passages:
        counts = Counter(p.terms)
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(p.terms) / idx.average_length)
        score = sum(idx.idf(t) * counts[t] * (BM25_K1 + 1) / (counts[t] + norm)
                    for t in wanted if counts[t])
        if score > 0:
            scored.append(Hit(p, round(score, 4)))
    hits = sorted(scored, key=lambda h: (-h.score, h.passage.source))[:limit]
    weight = sum(idx.idf(t) for t in wanted)
    covered = {t for h in hits for t in h.passage.terms} & wanted
    confidence = sum(idx.idf(t) for t in covered) / weight if weight else 0.0
    return hits, round(confidence, 3)


def key_sentences(question: str, passages: list[tuple[str, str]],
                  limit: int) -> list[tuple[str, list[str]]]:
    """The sentences that share most terms with the question, each with every source
    whose passage contains it (a sentence two sources say counts once)."""
    wanted = set(terms(question))
    found: dict[str, tuple[float, list[str]]] = {}
    for source, text in passages:
        for sentence in _SENTENCE.split(text):
            overlap = len(set(terms(sentence)) & wanted)
            if overlap == 0:
                continue
            score, sources = found.get(sentence, (overlap / (1 + len(words(sentence)) / 40), []))
            found[sentence] = (score, sources + [source])
    best = sorted(found.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    return [(sentence, sources) for sentence, (_, sources) in best]
