"""Datasets: deterministic generators with correct references, file loaders, split; metrics against rouge-score."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from conftest import SHARED
from skipbench.data import DataSpec, load_items
from skipbench.data.synthetic import arith, text
from skipbench.errors import SkipbenchError
from skipbench.analysis.metrics import exact_match, rouge_l


def test_generators_are_deterministic():
    assert arith(seed=3) == arith(seed=3) and text(seed=3) == text(seed=3)
    assert arith(seed=3) != arith(seed=4)
    assert len(arith()) == 300 and len(text()) == 400
    assert len({it.item_id for it in arith() + text()}) == 700


def test_arith_references_recomputed_independently():
    for it in arith():
        nums = [int(x) for x in re.findall(r"\d+", it.prompt.split(":")[-1] if it.subtask == "repeat" else it.prompt)]
        if it.subtask == "repeat":
            nums = nums[1:] if nums[0] == 5 else nums  # "Repeat ... 5 times"
        assert 5 <= len(nums) <= 10 and all(10 <= x <= 99 for x in nums), it
        if it.subtask == "sum":
            assert it.answer == str(sum(nums)) and it.reference == f"The sum is {sum(nums)}."
        elif it.subtask == "product":
            assert int(it.answer) == math.prod(nums)
        else:
            assert [int(x) for x in it.answer.split(", ")] == nums * 5
        assert exact_match(it.subtask, it.reference, it.answer) == 1.0


def test_text_references_come_from_the_paragraph():
    for it in text():
        para = it.prompt.split("\n\n")[1]
        if it.subtask == "copy":
            assert it.reference == para
        elif it.subtask == "qa":
            assert it.answer in para and exact_match("qa", it.reference, it.answer) == 1.0
        elif it.subtask == "summarize":
            name = para.split(", ")[1].split(" ")[0]
            assert it.reference.startswith(name)
    assert {it.subtask for it in text()} == {"copy", "summarize", "continue", "qa"}


def test_exact_match_rules():
    assert exact_match("sum", "So the answer is 1,234.", "1234") == 1.0
    assert exact_match("sum", "1234 is wrong, it is 1235", "1234") == 0.0
    assert exact_match("repeat", "11, 12, 11, 12", "11, 12, 11, 12") == 1.0
    assert exact_match("repeat", "11, 12, 11", "11, 12, 11, 12") == 0.0
    assert math.isnan(exact_match("copy", "x", None))


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("the cats were running home", "a cat runs home"), ("", "something"), ("same text", "same text")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == scorer.score(ref, pred)["rougeL"].fmeasure
    assert rouge_l("same text", "same text") == 1.0


@pytest.mark.skipif(not (SHARED / "data" / "alpaca_sample.json").exists(), reason="../shared/data absent")
def test_alpaca_loader_on_shared_sample():
    path = SHARED / "data" / "alpaca_sample.json"
    records = json.loads(path.read_text())
    items = load_items(DataSpec(name=str(path)))
    assert len(items) == len(records)
    for rec, it in zip(records, items):
        assert it.reference == rec["output"]
        assert it.prompt.startswith(rec["instruction"].strip())
        if rec.get("input"):
            assert it.prompt.endswith(rec["input"].strip())
    with_input = [r for r in records if r.get("input")]
    assert with_input, "the sample should exercise the input field"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_named_fields_in_any_format(tmp_path, suffix):
    df = pd.DataFrame({"q": ["What is 2+2?", "Name a colour."], "a": ["4", "Blue"]})
    path = tmp_path / f"d{suffix}"
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True), ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    items = load_items(DataSpec(name=str(path), prompt_field="q", reference_field="a"))
    assert [(i.prompt, i.reference) for i in items] == [("What is 2+2?", "4"), ("Name a colour.", "Blue")]


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(SkipbenchError, match="not found"):
        load_items(DataSpec(name=str(tmp_path / "missing.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SkipbenchError, match="empty"):
        load_items(DataSpec(name=str(empty)))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "x", "answer": "y"}\n')
    with pytest.raises(SkipbenchError, match="missing field.*fields found: question, answer"):
        load_items(DataSpec(name=str(odd)))
    with pytest.raises(SkipbenchError, match="unknown dataset 'nope'"):
        load_items(DataSpec(name="nope"))


def test_hub_dataset_offline_is_one_clear_error():
    with pytest.raises(SkipbenchError, match="alpaca|datasets"):
        load_items(DataSpec(name="alpaca"))


def test_split_is_seeded_disjoint_and_complete():
    parts = {s: load_items(DataSpec(name="arith", split=s)) for s in ("train", "validation", "test")}
    ids = [{i.item_id for i in v} for v in parts.values()]
    assert sum(map(len, ids)) == 300 and len(set.union(*ids)) == 300
    assert [len(v) for v in parts.values()] == [210, 45, 45]
    assert load_items(DataSpec(name="arith", split="test")) == parts["test"]
    assert load_items(DataSpec(name="arith", split="test", seed=1)) != parts["test"]


def test_spec_bench_ships_its_480_prompts_by_category():
    from collections import Counter

    from skipbench.data import spec_bench

    items = load_items(DataSpec(name="spec-bench"))
    counts = Counter(it.subtask for it in items)
    assert len(items) == 480 and set(counts) == set(spec_bench.CATEGORIES)
    assert all(counts[c] == 80 for c in ("translation", "summarization", "qa", "math_reasoning", "rag"))
    assert all(n == 10 for c, n in counts.items() if c not in ("translation", "summarization", "qa", "math_reasoning", "rag"))
    rows = [json.loads(line) for line in spec_bench.FILE.read_text().splitlines()]
    assert [it.prompt for it in items] == [r["turns"][0] for r in rows] and {it.reference for it in items} == {""}
    one = load_items(DataSpec(name="spec-bench/coding"))
    assert len(one) == 10 and {it.subtask for it in one} == {"coding"}
    mixed = load_items(DataSpec(name="spec-bench/writing,spec-bench/rag", limit=6))  # --limit takes from each in turn
    assert [it.subtask for it in mixed] == ["writing", "rag"] * 3
    with pytest.raises(SkipbenchError, match="unknown Spec-Bench category 'poetry'; known: translation"):
        load_items(DataSpec(name="spec-bench/poetry"))


@pytest.mark.skipif(not (SHARED / "data" / "spec_bench_question.jsonl").exists(), reason="no ../shared/data beside the project")
def test_the_shipped_spec_bench_file_is_the_published_one():
    from skipbench.data import spec_bench

    assert spec_bench.FILE.read_bytes() == (SHARED / "data" / "spec_bench_question.jsonl").read_bytes()
