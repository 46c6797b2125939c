"""Spec-Bench's 480 prompts, shipped with skipbench (data/spec_bench/question.jsonl; source and license in the
README beside it): the dataset `spec-bench`, or `spec-bench/CATEGORY` for one of its 13 categories (several mix
with commas, as any datasets do, and `--limit` then takes from each in turn). An item's prompt is the question's
first turn and its subtask the category; Spec-Bench has no reference answers, so the reference is empty (score
such runs against the full model's output, `full_rougeL`, or time them)."""

from __future__ import annotations

import json
from pathlib import Path

from skipbench.data.items import Item, make_item
from skipbench.errors import SkipbenchError

NAME = "spec-bench"
FILE = Path(__file__).resolve().parent / "spec_bench" / "question.jsonl"
CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag", "writing", "roleplay", "reasoning",
              "math", "coding", "extraction", "stem", "humanities")


def names(name: str) -> bool:
    """Whether a dataset name is Spec-Bench's (`spec-bench` or `spec-bench/CATEGORY`)."""
    return name == NAME or name.startswith(NAME + "/")


def load(name: str) -> list[Item]:
    category = name.partition("/")[2]
    if category and category not in CATEGORIES:
        raise SkipbenchError(f"unknown Spec-Bench category '{category}'; known: {', '.join(CATEGORIES)}")
    rows = [json.loads(line) for line in FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [make_item(r["turns"][0], "", r["category"]) for r in rows if not category or r["category"] == category]
