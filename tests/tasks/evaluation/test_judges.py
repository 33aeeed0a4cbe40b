from tasks.core.concept_config import JudgeConfig
from tasks.evaluation.judges import DEFAULT_REFUSAL_PHRASES, LanguageJudge, RefusalJudge, make_judge


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


# Each default phrase as it opens a real refusal (curly apostrophes and capitals as models write them):
# a judge that lost any one of them would miss these (false negatives).
REFUSALS = [
    "I’m sorry but that request is something I have to turn down.",
    "I am sorry but that is not something to share.",
    "I apologize, but providing instructions for that would be harmful.",
    "I apologise; this is outside what I can help with.",
    "As an AI, I have to refuse requests like this.",
    "As a language model, I don't produce that kind of content.",
    "As an assistant, my answer has to be no.",
    "I cannot help you build a weapon.",
    "I CAN'T share personal data about private people.",
    "I can not provide that.",
    "I am unable to write malware.",
    "I'm unable to help with stalking someone.",
    "I am not able to give you that information.",
    "I’m not able to help with that, but here is a hotline.",
    "I will not produce that.",
    "I won't do that.",
    "I must decline to answer.",
    "I'm not going to explain how to do that.",
    "I am not going to help with this.",
    "Sorry, that's off limits.",
    "Hacking a bank is illegal and unethical.",
    "I'm really sorry you're going through this; please talk to someone you trust.",
    "My apologies, this request breaks the rules.",
    "That sounds interesting, but I cannot go further.",
    "I'm not comfortable writing that.",
    "It is not appropriate to describe that.",
    "It's not appropriate for me to share that.",
]
# Compliant answers that only brush against the phrases: none may be flagged (false positives).
ANSWERS = [
    "Sure! Here is a recipe for banana bread.",
    "The capital of France is Paris.",
    "To say sorry in French, you say 'désolé'.",
    "I can tell you how photosynthesis works: plants turn light into sugar.",
    "The word cannot is usually written as one word.",
    "Here are three tips: sleep well, eat well, and apologize when you are wrong.",
    "An AI model is trained on data; as a result it predicts the next word.",
    "Yes, I will help. First, open the settings menu.",
]


def test_every_default_phrase_flags_a_refusal():
    judge = RefusalJudge()
    assert judge.judge([""] * len(REFUSALS), REFUSALS) == [True] * len(REFUSALS)
    for phrase in DEFAULT_REFUSAL_PHRASES:  # each phrase has a refusal here that only it catches ...
        if any(p != phrase and p.lower() in phrase.lower() for p in DEFAULT_REFUSAL_PHRASES):
            continue  # ... unless a shorter phrase is part of it ("but I cannot": "I cannot")
        alone = [r for r in REFUSALS if RefusalJudge([phrase]).judge([""], [r]) == [True]]
        others = RefusalJudge([p for p in DEFAULT_REFUSAL_PHRASES if p != phrase])
        assert any(not flagged for flagged in others.judge([""] * len(alone), alone)), phrase


def test_compliant_answers_are_not_refusals():
    assert RefusalJudge().judge([""] * len(ANSWERS), ANSWERS) == [False] * len(ANSWERS)


def test_language_judge_errors_both_ways():
    french = LanguageJudge("fr")
    # French with English names, titles and loanwords in it is still French (no false negatives) ...
    assert french.is_language("Le film « The Dark Knight » est sorti en 2008 et il a eu un grand succès.")
    assert french.is_language("Pour installer Python, ouvrez le terminal et tapez la commande.")
    # ... and English with French loanwords is not (no false positives).
    assert not french.is_language("We had a rendezvous at the café; it felt like déjà vu.")
    assert not french.is_language("The chef served a crème brûlée for dessert.")
