"""Turn a user instruction into prompt token ids: the model's chat template when it has one."""

from __future__ import annotations

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def truncate(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """Cut the instruction itself (not the chat template around it) to `max_tokens` tokens."""
    if not max_tokens:
        return text, False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens]), True


def encode_prompt(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        # transformers returns a list of ids, or a BatchEncoding, depending on version and tokenizer
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(ALPACA_TEMPLATE.format(instruction=text))["input_ids"])


def encode_items(lm, items: list, max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Every item's prompt as token ids (instructions cut to `max_prompt_tokens`), and how many were cut."""
    encoded, truncated = [], 0
    for it in items:
        text, cut = truncate(lm.tokenizer, it.prompt, max_prompt_tokens)
        truncated += cut
        encoded.append(encode_prompt(lm.tokenizer, text))
    return encoded, truncated
