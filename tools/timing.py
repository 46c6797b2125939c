"""What the measurement scripts in tools/ share: a median timer and the engine's passes over a cached prompt (run as
`python tools/NAME.py`, which puts this folder on the import path)."""
import statistics
import time

import torch


def median_ms(fn, n=15, warm=3):
    """The median of n timed calls of fn after `warm` untimed ones, in milliseconds."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def engine_pass(lm, engine, room=80):
    """`pass_of(n)`: a function that runs n new tokens through `engine` after a cached prompt, the cache rewound
    before each call so every call sees the same context."""
    from skipbench.data.prompts import encode_prompt

    ids = torch.tensor([encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")])
    present = torch.ones_like(ids, dtype=torch.bool)
    cache = engine.prompt_cache(present, ids.shape[1] + room)
    engine.forward(ids, cache, present=present, last_only=True)
    base = cache.length

    def pass_of(n):
        def f():
            cache.length = base
            engine.forward(torch.zeros(1, n, dtype=torch.long), cache)
        return f

    return pass_of
