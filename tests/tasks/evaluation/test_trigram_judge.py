"""The character-trigram language judge: it tells French from English on answers written for this test
(in no reference text), including ones the function-word judge cannot read."""

from __future__ import annotations

import pytest

from tasks.core.concept_config import JudgeConfig
from tasks.evaluation.judges import LanguageJudge, make_second_judge
from tasks.evaluation.trigram_judge import TrigramLanguageJudge, TrigramProfiles, reference_texts, trigrams

FRENCH = [
    "La capitale de la France est Paris, qui compte environ deux millions d'habitants.",
    "Pour faire une pâte brisée, mélangez la farine, le beurre froid et une pincée de sel.",
    "Bien sûr ! Voici trois idées de sorties : un musée, une balade en forêt, un marché.",
    "Tournesols, coquelicots, bleuets : fleurs estivales, champs dorés.",  # no function word
    "Désolé, je ne connais pas la réponse à cette question.",
    "Réchauffement climatique : hausse moyenne des températures, fonte glaciaire, sécheresses.",
]
ENGLISH = [
    "The capital of France is Paris, with about two million inhabitants.",
    "To make shortcrust pastry, rub cold butter into the flour with a pinch of salt.",
    "Sure! Here are three ideas for a day out: a museum, a walk in the woods, a market.",
    "Sunflowers, poppies, cornflowers: summer wildflowers growing everywhere.",  # no function word
    "Sorry, I don't know the answer to that question.",
    "Climate change: rising average temperatures, melting glaciers, longer droughts.",
]


def test_trigrams_pad_words_and_ignore_case_and_digits():
    assert (
        trigrams("Le 2 CHAT")
        == trigrams("le chat")
        == {" le": 1, "le ": 1, " ch": 1, "cha": 1, "hat": 1, "at ": 1}
    )


def test_tells_french_from_english_on_unseen_answers_where_function_words_cannot():
    judge = TrigramLanguageJudge("fr")
    assert judge.judge([], FRENCH) == [True] * len(FRENCH)
    assert judge.judge([], ENGLISH) == [False] * len(ENGLISH)
    english = TrigramLanguageJudge("en", judge.profiles)
    assert english.judge([], ENGLISH) == [True] * len(ENGLISH)
    # the function-word judge has nothing to count in the two lists of nouns: it calls both "not French"
    words = LanguageJudge("fr").judge([], [FRENCH[3], ENGLISH[3]])
    assert words == [False, False]


def test_too_little_text_is_no_language_and_the_profiles_come_from_the_reference_texts():
    judge = TrigramLanguageJudge("fr")
    assert judge.judge([], ["", "42", "ok !"]) == [False, False, False]
    texts = reference_texts()
    assert set(texts) == {"en", "fr"} and all(len(t.split()) > 800 for t in texts.values())
    # swapping the reference texts swaps the verdicts: the profiles, not a rule, decide
    swapped = TrigramProfiles({"fr": texts["en"], "en": texts["fr"]})
    assert TrigramLanguageJudge("fr", swapped).judge([], FRENCH[:2]) == [False, False]


def test_is_the_french_concepts_default_second_judge():
    second = make_second_judge(JudgeConfig(kind="language", language="fr"))
    assert second is not None and second.name == "trigram_fr"
    assert make_second_judge(JudgeConfig(kind="language", second="none")) is None


@pytest.mark.parametrize("text", ["C'est l'heure du goûter.", "Qu'est-ce que tu en penses ?"])
def test_elisions_are_read(text):
    assert TrigramLanguageJudge("fr").judge([], [text]) == [True]
