"""Entity-level scores of a token classifier (CoNLL span matching with ``seqeval``)."""

from __future__ import annotations

from typing import Any


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL-style span matching: an entity counts only when
    its type and both boundaries match), micro-averaged, plus per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if not any(t != "O" for tags in true_tags for t in tags):
        return {"entity-f1": None, "entity-precision": None, "entity-recall": None, "per-label": {}}
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {name: {"precision": round(float(m["precision"]), 6), "recall": round(float(m["recall"]), 6),
                       "f1": round(float(m["f1-score"]), 6), "support": int(m["support"])}
                for name, m in report.items() if " avg" not in name}
    return {"entity-f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
            "entity-precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "entity-recall": float(recall_score(true_tags, pred_tags, zero_division=0)), "per-label": per_type}
