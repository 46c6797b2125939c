"""Embedded datasets generated from a seed (no download): FlexiDepth's math and text subtasks.

`arith`: lists of 5-10 integers in 10..99 — repeat the list 5 times, sum, product — with exact answers.
`text`: short paragraphs composed from templates (names, places, events) — copy, summarize in one
sentence, continue, answer a factual question — with references from the templates.
`choice`: multiple choice over paragraphs from the same templates (none of them a `text` item's paragraph at the same
seed) — which of four one-sentence summaries is right; the wrong ones
change the place, the day or both, so every choice begins with the same words and the choice is decided by later
tokens.
"""

from __future__ import annotations

import random

from skipbench.data.items import Item, make_item

ARITH_SUBTASKS = ("repeat", "sum", "product")
TEXT_SUBTASKS = ("copy", "summarize", "continue", "qa")


def arith(n_per_subtask: int = 100, seed: int = 0) -> list[Item]:
    rng = random.Random(f"arith:{seed}")
    items = []
    for i in range(n_per_subtask):
        for subtask in ARITH_SUBTASKS:
            nums = [rng.randint(10, 99) for _ in range(rng.randint(5, 10))]
            listed = ", ".join(map(str, nums))
            if subtask == "repeat":
                answer = ", ".join([listed] * 5)
                items.append(make_item(f"Repeat the following list 5 times, separated by commas: {listed}.", answer, subtask, answer))
            elif subtask == "sum":
                total = sum(nums)
                items.append(make_item(f"Please calculate the sum of {listed}.", f"The sum is {total}.", subtask, str(total)))
            else:
                prod = 1
                for x in nums:
                    prod *= x
                items.append(make_item(f"Please calculate the product of {listed}.", f"The product is {prod}.", subtask, str(prod)))
    return items


NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Marta", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara"]
PLACES = ["Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Dublin", "Krakow", "Hanoi", "Toronto", "Seville", "Tunis",
          "Adelaide", "Bergen", "Cusco", "Porto"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (event phrase, object, detail sentence, summary verb phrase, continuation)
EVENTS = [
    ("opened a small bakery", "bakery", "The first customers lined up before sunrise to buy fresh bread.",
     "opened a bakery", "By the end of the week the bakery had sold out every morning."),
    ("won a chess tournament", "tournament", "The final game lasted more than four hours.",
     "won a chess tournament", "The next month brought an invitation to play abroad."),
    ("planted a community garden", "garden", "Neighbours brought seeds, tools and water from their homes.",
     "planted a community garden", "By summer the garden was full of tomatoes and beans."),
    ("repaired an old fishing boat", "boat", "The hull needed new planks and three coats of paint.",
     "repaired a fishing boat", "When spring came the boat sailed out of the harbour again."),
    ("organised a music festival", "festival", "Twelve bands played on two stages near the river.",
     "organised a music festival", "The festival was so popular that it became a yearly event."),
    ("found a lost painting", "painting", "It had been hidden behind a wall of the old library.",
     "found a lost painting", "Experts later confirmed that the painting was two hundred years old."),
    ("finished a marathon", "marathon", "The route crossed four bridges and the old town.",
     "finished a marathon", "After resting for a week, training for the next race began."),
    ("built a wooden bridge", "bridge", "The bridge connected two villages across a narrow stream.",
     "built a wooden bridge", "Soon children from both villages walked to school together."),
]
COMPANIONS = ["a neighbour", "two friends", "a younger brother", "an old teacher", "a group of students", "a cousin"]


def _paragraph(rng: random.Random):
    name, place, day = rng.choice(NAMES), rng.choice(PLACES), rng.choice(DAYS)
    event, obj, detail, summary_vp, continuation = rng.choice(EVENTS)
    companion = rng.choice(COMPANIONS)
    text = f"On {day}, {name} {event} in {place} together with {companion}. {detail}"
    facts = {"name": name, "place": place, "day": day, "companion": companion, "object": obj}
    return text, f"{name} {summary_vp} in {place} on {day}.", continuation, facts


QUESTIONS = [
    ("Where did this happen?", "place"),
    ("On which day did this happen?", "day"),
    ("Who is the main person in the text?", "name"),
    ("Who helped the main person?", "companion"),
]


def text(n_per_subtask: int = 100, seed: int = 0) -> list[Item]:
    rng = random.Random(f"text:{seed}")
    items = []
    for i in range(n_per_subtask):
        for subtask in TEXT_SUBTASKS:
            para, summary, continuation, facts = _paragraph(rng)
            if subtask == "copy":
                items.append(make_item(f"Copy the following paragraph exactly.\n\n{para}", para, subtask))
            elif subtask == "summarize":
                items.append(make_item(f"Summarize the following paragraph in one sentence.\n\n{para}", summary, subtask))
            elif subtask == "continue":
                items.append(make_item(f"Continue the following paragraph with one more sentence.\n\n{para}", continuation, subtask))
            else:
                question, field = rng.choice(QUESTIONS)
                answer = facts[field]
                items.append(make_item(f"Read the paragraph and answer the question.\n\n{para}\n\nQuestion: {question}",
                                       answer[0].upper() + answer[1:] + ".", subtask, answer))
    return items


def choice(n_items: int = 1000, seed: int = 0) -> list[dict]:
    """Multiple-choice records: `item_id` (a hash of the paragraph, as items have), `paragraph`, four `choices`,
    `gold` (the index of the right one). No paragraph of the `text` suite (same seed) is one of them, so a policy
    tuned on any `text` split never saw a `choice` paragraph."""
    from skipbench.data.items import item_id

    rng = random.Random(f"choice:{seed}")
    records, seen = [], {it.prompt.split("\n\n")[1] for it in text(seed=seed)}  # each text prompt: instruction, paragraph
    while len(records) < n_items:
        para, summary, _, facts = _paragraph(rng)
        if para in seen:
            continue
        seen.add(para)
        head = summary[: summary.index(f" in {facts['place']} on ")]  # name and event: the same in every choice
        place = rng.choice([p for p in PLACES if p != facts["place"]])
        day = rng.choice([d for d in DAYS if d != facts["day"]])
        choices = [f"{head} in {p} on {d}." for p, d in
                   [(facts["place"], facts["day"]), (place, facts["day"]), (facts["place"], day), (place, day)]]
        rng.shuffle(choices)
        records.append({"item_id": item_id(para), "paragraph": para, "choices": choices, "gold": choices.index(summary)})
    return records
