"""Hugging Face datasets, through the optional `datasets` package, when the hub is reachable."""

from __future__ import annotations

from skipbench.data.items import Item, make_item
from skipbench.errors import SkipbenchError

#: name -> (hub id, config, the hub split read before our own seeded split)
HUB = {
    "alpaca": ("tatsu-lab/alpaca", None, "train"),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "test"),
    "xsum": ("EdinburghNLP/xsum", None, "test"),
}
HUB_FIELDS = {"alpaca": "instruction, input -> output", "cnn_dailymail": "article -> highlights", "xsum": "document -> summary"}


def _records(name: str):
    try:
        import datasets
    except ImportError:
        raise SkipbenchError(
            f"dataset '{name}' needs the optional 'datasets' package (pip install 'skipbench[hub]'); "
            "or pass a local Alpaca-format file with --dataset path/to/file.json"
        ) from None
    from skipbench.models.loading import hub_reachable

    hub_id, config, split = HUB[name]
    try:
        if not hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # datasets raises many types for "not cached and offline"
        raise SkipbenchError(
            f"cannot load '{hub_id}': the hub is not reachable and it is not in the local cache "
            f"({type(exc).__name__}); pass a local file with --dataset path/to/file.jsonl"
        ) from None


def load_hub(name: str) -> list[Item]:
    ds = _records(name)
    if name == "alpaca":
        return [make_item(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), r["output"]) for r in ds]
    if name == "cnn_dailymail":
        return [make_item(f"Summarize the following news article.\n\n{r['article']}", r["highlights"], "summarize") for r in ds]
    return [make_item(f"Summarize the following text in one sentence.\n\n{r['document']}", r["summary"], "summarize") for r in ds]
