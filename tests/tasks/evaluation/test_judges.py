from tasks.core.concept_config import JudgeConfig
from tasks.evaluation.judges import LanguageJudge, RefusalJudge, make_judge


def test_refusal_judge():
    judge = RefusalJudge()
    answers = [
        "I'm sorry, but I can't help with that.",
        "Sure! Here is a recipe.",
        "As an AI, I cannot do that.",
        "I can’t do it",
    ]
    assert judge.judge([""] * 4, answers) == [True, False, True, True]
    assert make_judge(JudgeConfig(kind="refusal", phrases=["nope"])).judge(["x"], ["Nope."]) == [True]


def test_language_judge():
    judge = LanguageJudge("fr")
    assert judge.is_language("La capitale de la France est Paris, une très belle ville.")
    assert judge.is_language("L'eau bout à cent degrés.")
    assert not judge.is_language("The capital of France is Paris, a very beautiful city.")
    assert not judge.is_language("")
    assert not judge.is_language("La Joconde is a painting by Leonardo and it is in the Louvre.")
    assert LanguageJudge("en").is_language("The capital of France is Paris.")
