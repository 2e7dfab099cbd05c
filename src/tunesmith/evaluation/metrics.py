"""Task metrics from the field's libraries (rouge-score, sacrebleu, scikit-learn), never `evaluate.load`.

Scores are percentages (0-100) except where noted, so before/after tables read the same way.
"""

from __future__ import annotations

import re
from functools import lru_cache

VOWELS = set("aeiou")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure; with several references an example scores its best match."""
    scorer = _rouge_scorer()
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, refs in zip(predictions, references):
        scores = [scorer.score(ref, pred) for ref in refs]
        for key in totals:
            totals[key] += max(s[key].fmeasure for s in scores)
    n = max(len(predictions), 1)
    return {key: 100 * v / n for key, v in totals.items()}


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults) against every reference of each example."""
    import sacrebleu

    width = max(len(r) for r in references)
    # sacrebleu takes one stream per reference position; None marks "no reference here".
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def inflections(word: str) -> set[str]:
    """Forms that count as using `word`: regular English plural, 3rd person, past and -ing forms.

    The documented rule: a concept is covered when an output token equals the concept or one of
    these forms. Irregular forms (stand -> stood, run -> ran) are not recognised, so coverage is
    slightly underestimated rather than inflated by look-alike words (car -> card is not a form).
    """
    w = word.lower()
    forms = {w}
    sibilant = w.endswith(("s", "x", "z", "ch", "sh", "o"))
    cons_y = w.endswith("y") and len(w) > 2 and w[-2] not in VOWELS
    if cons_y:
        forms |= {w[:-1] + "ies", w[:-1] + "ied", w + "ing"}  # carry -> carries, carried, carrying
    elif w.endswith("ie"):
        forms |= {w + "s", w + "d", w[:-2] + "ying"}  # lie -> lies, lied, lying
    elif w.endswith("e"):
        forms |= {w + "s", w + "d", w[:-1] + "ing"}  # ride -> rides, rided, riding
    else:
        forms.add(w + ("es" if sibilant else "s"))
        cvc = len(w) >= 3 and w[-1] not in VOWELS | {"w", "x", "y"} and w[-2] in VOWELS and w[-3] not in VOWELS
        one_syllable = sum(ch in VOWELS for ch in w) == 1
        if cvc and one_syllable:
            forms |= {w + w[-1] + "ed", w + w[-1] + "ing"}  # stop -> stopped, run -> running
        else:
            forms |= {w + "ed", w + "ing"}  # walk -> walked; open -> opened
    return forms


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def concept_hits(prediction: str, concepts: list[str]) -> list[bool]:
    """For each concept, whether `prediction` uses it (the word or one of its inflections)."""
    words = set(tokens(prediction))
    return [bool(inflections(c) & words) for c in concepts]


def concept_coverage(predictions: list[str], concepts: list[list[str]]) -> dict[str, float]:
    """Share of concepts used (mean over examples) and share of outputs using all of them."""
    per_example, complete = [], 0
    for pred, cs in zip(predictions, concepts):
        hit = concept_hits(pred, cs)
        per_example.append(sum(hit) / max(len(hit), 1))
        complete += all(hit)
    n = max(len(predictions), 1)
    return {"coverage": 100 * sum(per_example) / n, "all_concepts": 100 * complete / n}


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": 100 * accuracy_score(y_true, y_pred),
        "macro_f1": 100 * f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "per_class": {
            lab: {
                "precision": 100 * float(p[i]),
                "recall": 100 * float(r[i]),
                "f1": 100 * float(f[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }


def length_stats(outputs: list[str], stopped: list[bool]) -> dict[str, float]:
    n = max(len(outputs), 1)
    return {"mean_output_words": sum(len(o.split()) for o in outputs) / n, "stopped_on_own": 100 * sum(stopped) / n}
