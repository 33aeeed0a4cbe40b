"""A language judge of another kind than the function-word count: character trigrams.

The first language judge (tasks/evaluation/judges.py, LanguageJudge) counts a closed list of function words, so an
answer of names, numbers and content words ("Paris, 2,1 millions d'habitants") gives it little to go on.
This one reads every letter: each language is a profile of character-trigram frequencies built from a
reference text written for the project (tasks/data/judge/language_<code>.txt), and an answer is in the
language whose smoothed trigram model gives it the higher likelihood (naive Bayes with add-one
smoothing). Building the profiles takes milliseconds, so they are built wherever the judge is.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from tasks import DATA

REFERENCE = DATA / "judge"
LANGUAGES = ("en", "fr")
_NOT_LETTER = re.compile(r"[^a-zàâäçéèêëîïôöûùüÿœæ']+")
# Fewer letters than this say nothing about a language: such an answer is judged "not in it".
MIN_LETTERS = 8


def trigrams(text: str) -> Counter:
    """Character trigrams of each word padded with spaces (" le", "le "), lower-cased, letters only."""
    words = _NOT_LETTER.sub(" ", text.lower().replace("’", "'")).split()
    return Counter(padded[i : i + 3] for w in words for padded in [f" {w} "] for i in range(len(padded) - 2))


class TrigramProfiles:
    """Add-one-smoothed trigram log-probabilities per language, from the reference texts."""

    def __init__(self, texts: dict[str, str]) -> None:
        counts = {lang: trigrams(text) for lang, text in texts.items()}
        vocabulary = set().union(*counts.values())
        self.unseen: dict[str, float] = {}
        self.logprob: dict[str, dict[str, float]] = {}
        for lang, c in counts.items():
            denominator = sum(c.values()) + len(vocabulary) + 1
            self.logprob[lang] = {g: math.log((n + 1) / denominator) for g, n in c.items()}
            self.unseen[lang] = math.log(1 / denominator)

    def scores(self, text: str) -> dict[str, float]:
        """Log-likelihood of the text's trigrams under each language's profile."""
        grams = trigrams(text)
        return {
            lang: sum(n * table.get(g, self.unseen[lang]) for g, n in grams.items())
            for lang, table in self.logprob.items()
        }

    def language(self, text: str) -> str | None:
        """The most likely language, or None for text with too few letters to tell."""
        if sum(ch.isalpha() for ch in text) < MIN_LETTERS:
            return None
        scores = self.scores(text)
        return max(scores, key=scores.__getitem__)


def reference_texts(root: Path = REFERENCE) -> dict[str, str]:
    return {lang: (root / f"language_{lang}.txt").read_text(encoding="utf-8") for lang in LANGUAGES}


class TrigramLanguageJudge:
    """True when the answer's trigrams are likelier under ``language``'s profile than any other's."""

    def __init__(self, language: str = "fr", profiles: TrigramProfiles | None = None) -> None:
        self.language = language
        self.name = f"trigram_{language}"
        self.profiles = profiles or TrigramProfiles(reference_texts())

    def judge(self, prompts: list[str], responses: list[str]) -> list[bool]:
        return [self.profiles.language(r) == self.language for r in responses]
