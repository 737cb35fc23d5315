"""
Scoring, as the paper scores: what answer a model's output names -- the option letter for
multiple choice (top-1 accuracy), the number for counting (exact match) -- and accuracy per task
with the mean over tasks (the paper's "mean of 9 tasks", not over samples). evaluate.py scores
its decoding with these; lmms.py writes them, as they are, into the lmms-eval task it makes.
"""
import re

import data

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
NUMBER = r"(\d+|" + "|".join(NUMBER_WORDS) + r")"


def parse_answer(text, record):
    """The answer `text` names, in the gold answers' form: an option letter ("A", "B", ...) for
    multiple choice, a number in digits for counting, else the normalised text. "" = none."""
    text = str(text).strip()
    if record.choices:
        return _parse_letter(text, record.choices)
    if _parse_number(str(record.answer or "")):        # counting: the gold answer is a number
        return _parse_number(text)
    return _norm(text)


def score(output, record):
    """Top-1 letter accuracy / exact number match: True when the output names the gold answer."""
    gold = parse_answer(data.normalize_answer(record.answer or ""), record)
    return bool(gold) and parse_answer(output, record) == gold


def _norm(s):
    return " ".join(re.sub(r"[^a-z0-9]+", " ", s.lower()).split())


def _parse_letter(text, choices):
    valid = data.answer_letters(len(choices))
    # 1. the whole output is a letter: "B", "(B)", "B.", "b)", "**B**"
    m = re.fullmatch(r"[\s*(\[]*([A-Za-z])[\s*)\].:,]*", text)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    # 2. named as the answer: "The answer is B", "Answer: (B)", "the correct option is C"
    for m in re.finditer(r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?[\s:]*"
                         r"(?i:option\s+|choice\s+)?[(\[]?([A-Z])(?![A-Za-z])", text):
        if m.group(1) in valid:
            return m.group(1)
    # 3. a letter in parentheses, as the prompt writes the options: "(C) the third image"
    for m in re.finditer(r"\(([A-Z])\)", text):
        if m.group(1) in valid:
            return m.group(1)
    # 4. a leading letter: "B. the left one", "C: ...", "D is correct" -- but not the article
    # in "A red box is ..."
    m = re.match(r"([A-Z])(?:[.:),\-]|\s|$)", text)
    if m and m.group(1) in valid and not re.match(r"A\s+[a-z]", text):
        return m.group(1)
    # 5. no letter: the option's own text, "the blue box" -> B. When several options appear, one
    # inside another ("car" in "red car"), the longer one is meant.
    said = f" {_norm(text)} "
    found = [i for i, c in enumerate(choices) if _norm(c) and f" {_norm(c)} " in said]
    found = [i for i in found if not any(i != j and _norm(choices[i]) in _norm(choices[j]) for j in found)]
    if len(found) == 1:
        return valid[found[0]]
    return ""


def _parse_number(text):
    # the number named as the answer ("the answer is 7"), else the first number at all
    m = (re.search(r"answer\W{0,3}(?:is\s+|would be\s+)?" + NUMBER + r"\b", text, re.I)
         or re.search(r"\b" + NUMBER + r"\b", text, re.I))
    if not m:
        return ""
    word = m.group(1).lower()
    return str(NUMBER_WORDS[word] if word in NUMBER_WORDS else int(word))


def accuracy(results):
    """Accuracy % per task and its mean over tasks (the paper's "mean of 9 tasks", not over
    samples), the same for chance, samples per task and the number of failed samples."""
    tasks = {}
    for r in results:
        tasks.setdefault(r["task"], []).append(r)
    acc = {t: 100 * sum(r["correct"] for r in rs) / len(rs) for t, rs in tasks.items()}
    chance = {t: 100 * sum(r["chance"] for r in rs) / len(rs) for t, rs in tasks.items()}
    mean = lambda d: sum(d.values()) / len(d) if d else 0.0
    return {"accuracy": acc, "mean": mean(acc), "chance": chance, "chance_mean": mean(chance),
            "n": {t: len(rs) for t, rs in tasks.items()},
            "errors": sum(r["error"] is not None for r in results)}
