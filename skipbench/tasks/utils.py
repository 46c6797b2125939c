"""The offline lm-eval tasks shipped with skipbench: datasets built from the embedded suites (no download) and
their metrics. lm-eval loads this file by path (`!function utils.NAME` in the YAMLs beside it).

The arith and text tasks' items and 70/15/15 split are `evaluate`'s own (same item ids, `skipbench.data.load_items`),
so a policy calibrated or trained on a suite's train split is scored on its test split here too. The choice task's
paragraphs come from the same templates but none is a `text` item's (`synthetic.choice`), split the same way. ROUGE-L
is rouge-score's, as in `evaluate` (lm-eval registers no ROUGE-L metric, and its fallback fetches one from the
network).

Why `custom_dataset` and not `dataset_path: json` with `data_files`: lm-eval resolves `data_files` against the working
directory, so a shipped YAML naming files would work from one folder only.
"""

from __future__ import annotations

import datasets

from skipbench.data import DataSpec, load_items
from skipbench.data.items import make_item, split_items
from skipbench.data.synthetic import choice as choice_records
from skipbench.analysis.metrics import exact_match, rouge_l

SPLITS = ("train", "validation", "test")


def _suite(name: str, subtask: str | None = None) -> dict:
    out = {}
    for split in SPLITS:
        rows = [{"item_id": it.item_id, "prompt": it.prompt, "reference": it.reference, "subtask": it.subtask,
                 "answer": it.answer} for it in load_items(DataSpec(name=name, split=split))
                if subtask is None or it.subtask == subtask]
        out[split] = datasets.Dataset.from_list(rows)
    return out


def arith(**_) -> dict:
    return _suite("arith")


def text_copy(**_) -> dict:
    return _suite("text", "copy")


def text_summarize(**_) -> dict:
    return _suite("text", "summarize")


def text_continue(**_) -> dict:
    return _suite("text", "continue")


def text_qa(**_) -> dict:
    return _suite("text", "qa")


def choice(**_) -> dict:
    """The multiple-choice records, split as items are (by a hash of the paragraph)."""
    records = choice_records()
    items = {r["item_id"]: make_item(r["paragraph"], "") for r in records}
    out = {}
    for split in SPLITS:
        ids = {it.item_id for it in split_items(list(items.values()), split)}
        out[split] = datasets.Dataset.from_list([r for r in records if r["item_id"] in ids])
    return out


def process_generation(doc: dict, results: list[str]) -> dict:
    """ROUGE-L against the reference; exact match where the item defines an answer (`evaluate`'s definitions)."""
    output = results[0].strip()
    scores = {"rougeL": rouge_l(output, doc["reference"])}
    if doc.get("answer") is not None:
        scores["exact_match"] = exact_match(doc["subtask"], output, doc["answer"])
    return scores
