"""The decode loop: full-depth prompt, then one token per step under the policy.

Per-token accounting follows one convention, named `input` in outputs: the layers recorded for a
generated token are the layers that token ran through when it was fed back to produce the next one
(its hidden state and its K/V). The last generated token is never fed back, so a sequence of N new
tokens has N-1 records (none when N=1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator

import torch

from skipbench.engine.cache import KVCache, resolve_kv_mode
from skipbench.engine.forward import Engine, Meter, passes
from skipbench.errors import SkipbenchError
from skipbench.models.loading import LoadedModel, sync
from skipbench.engine.protocol import Full, Policy

LAYERS_CONVENTION = "input"


@dataclass(frozen=True, kw_only=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SkipbenchError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SkipbenchError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per sequence, up to and including EOS
    layers: list[list[list[int]]]  # per sequence, per fed-back generated token: executed 0-based layers
    prompt_tokens: list[int] = field(default_factory=list)
    kv_mode: str = "fill"  # the KV mode the run used (after resolving `auto`)
    speculation: "object | None" = None  # self-speculative decoding: its SpecStats (engine/speculative.py)
    cache: "KVCache | None" = None  # the cache as the run left it (tests compare its K/V)
    prompt_passes: list[int] | None = None  # prompt_depth `policy`: layer passes of each prompt's tokens
    # per sequence, per fed-back generated token: layers it ran without their attention (MindSkip); None when not
    # recorded (self-speculative decoding)
    attention_skips: list[list[int]] | None = None
    prompt_attention_passes: list[int] | None = None  # prompt_depth `policy`: attention sub-layers the prompt ran

    def attention_mean(self, row: int) -> float:
        """Attention sub-layers per fed-back token (the layers, less those run without attention)."""
        rec = self.layers[row]
        if not rec or self.attention_skips is None:
            return float("nan")
        return (sum(map(len, rec)) - sum(self.attention_skips[row])) / len(rec)

    def cost_mean(self, row: int) -> float:
        rec = self.layers[row]
        return sum(map(len, rec)) / len(rec) if rec else float("nan")


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    present = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p) :] = torch.tensor(p)
            present[r, width - len(p) :] = True
    return ids.to(device), present.to(device)


def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The normalised probabilities sampling draws from (temperature, then top-p), over the last dimension of
    `logits` (normalised, so speculative sampling's ratios p/q compare the two distributions actually sampled)."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [..., V] (not necessarily normalised)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return draw(distribution(logits, sampling), gen)


def eos_ids(lm: LoadedModel) -> set[int]:
    ids = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def pad_id(lm: LoadedModel) -> int:
    pid = getattr(lm.tokenizer, "pad_token_id", None)
    if pid is None:
        pid = min(eos_ids(lm)) if eos_ids(lm) else 0
    return pid


def generate(*args, **kw) -> Generation:
    """Greedy or sampled decoding of left-padded prompts under `policy` (the arguments of `decoding`)."""
    return finish(decoding(*args, **kw))


def finish(steps: Iterator[None]) -> Generation:
    """Run a `decoding` to its end: its Generation."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@torch.no_grad()
def decoding(
    lm: LoadedModel,
    prompts: list[list[int]],
    policy: Policy | None,
    max_new_tokens: int = 64,
    kv_mode: str = "auto",
    sampling: Sampling = Sampling(),
    row_keys: list[int] | None = None,
    stop_at_eos: bool = True,
    prompt_depth: str = "full",
    impl: str = "auto",
    timings: list | None = None,
    stop: Callable[[list[list[int]]], list[bool]] | None = None,
    meter: Meter | None = None,
) -> Generator[None, None, Generation]:
    """Greedy or sampled decoding of left-padded prompts under `policy`, one token per `next` when timed (bench
    interleaves several decodings step by step this way), returning its Generation; `generate` runs it through.

    prompt_depth `full` (default, as in both papers) runs the prompt through every layer; `policy`
    runs it under the policy too (a static plan then equals the physically smaller model).
    stop: given every row's new tokens so far, which rows are finished (stop strings); like EOS, the token that
    finishes a row is kept and not fed back.
    timings: when a list, receives ("prefill", seconds) and one ("decode", seconds) per later token,
    each measured from the previous token's choice (or from the resumption after it) to this one's (CUDA
    synchronised); the decoding pauses after each, so time spent elsewhere between two `next` is not counted.
    meter: when given, counts the decode steps' policy time and layer parts (engine/forward.Meter).
    """
    policy = policy or Full(lm.num_layers)
    lm = policy.lm or lm  # a policy whose layers are new weights (LaCo) runs on its own model
    kv_mode = resolve_kv_mode(kv_mode, policy.kv_mode, f"policy '{policy.describe()}'", policy.skips_statically())
    if prompt_depth not in ("full", "policy"):
        raise SkipbenchError(f"--prompt-depth must be 'full' or 'policy', got '{prompt_depth}'")
    engine = Engine(lm.adapter, kv_mode, impl)
    ids, present, cache = start(lm, engine, prompts, max_new_tokens, max_new_tokens)
    dev = lm.device
    batch = ids.shape[0]
    stops = torch.tensor(sorted(eos_ids(lm)) if stop_at_eos else [], dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(sampling.seed) if sampling.temperature > 0 else None

    policy.begin(batch, row_keys)
    policy.lengths([len(p) for p in prompts], max_new_tokens)
    prompt_policy = policy if prompt_depth == "policy" else None
    clock = Clock(dev) if timings is not None else None
    out = engine.forward(ids, cache, prompt_policy, present=present, last_only=True, record=prompt_policy is not None)
    prompt_passes = prompt_attention = None
    if out.executed is not None:
        prompt_passes, prompt_attention = (t.tolist() for t in passes(out, present))
    engine.meter = meter
    done = torch.zeros(batch, dtype=torch.bool, device=dev)
    poll = DonePoll(dev)
    tokens, records = [], []
    lengths = torch.zeros(batch, dtype=torch.long, device=dev)
    fill = torch.full((batch,), pad_id(lm), dtype=torch.long, device=dev)
    for step in range(max_new_tokens):
        tok = torch.where(done, fill, next_token(out.logits[:, -1], sampling, gen))
        if clock is not None:
            timings.append(("prefill" if step == 0 else "decode", clock.lap()))
            yield
            clock.lap()  # the clock restarts when the decoding resumes
        tokens.append(tok)
        lengths += (~done).long()
        fed = ~done & ~torch.isin(tok, stops)  # tokens that are fed back and get a layer record
        if stop is not None:
            fed &= ~torch.tensor(stop(torch.stack(tokens, 1).tolist()), dtype=torch.bool, device=dev)
        done = ~fed
        if step == max_new_tokens - 1 or poll.finished(done):
            break
        out = engine.forward(tok[:, None], cache, policy, record=True)
        records.append((fed, out.executed[:, 0], None if out.attention_skips is None else out.attention_skips[:, 0]))
    gen = _collect(tokens, lengths, records, prompts)
    gen.kv_mode, gen.cache, gen.prompt_passes, gen.prompt_attention_passes = kv_mode, cache, prompt_passes, prompt_attention
    return gen


def start(lm: LoadedModel, engine: Engine, prompts: list[list[int]], max_new_tokens: int, room: int):
    """Checked, left-padded prompts and their empty cache with `room` positions after the prompt (allocated here,
    before any clock starts): (ids, present, cache)."""
    if max_new_tokens < 1:
        raise SkipbenchError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise SkipbenchError("empty prompt: every prompt needs at least one token")
    ids, present = left_pad(prompts, pad_id(lm), lm.device)
    width = ids.shape[1]
    check_room(lm, width, max_new_tokens)
    return ids, present, engine.prompt_cache(present, width + room)


def check_room(lm: LoadedModel, width: int, max_new_tokens: int) -> None:
    """A prompt of `width` tokens and `max_new_tokens` fit the model's context length: OPT's learned positions end
    there, and a rotary model is not trained past it (the check also keeps a huge --max-new-tokens from allocating a
    cache the machine cannot hold)."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit and width + max_new_tokens > limit:
        raise SkipbenchError(
            f"prompt ({width} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's {limit} positions; "
            "lower --max-prompt-tokens or --max-new-tokens"
        )


class DonePoll:
    """Whether every row has finished, without making the host wait on the GPU. Each step's `done.all()` is copied
    into pinned host memory without blocking, behind an event on the stream of `done`'s device; a step reads the flags
    whose events have completed (`Event.query`, which never waits), oldest first. So on CUDA a batch whose rows have
    all finished runs on until its flag has arrived, usually one step more: those steps' tokens are padding that counts
    in no row, though they do write the cache (`Generation.cache` then holds a position or two more than on the CPU).
    On the CPU (`lagged` False) the copy is complete at once and is read in the same step. tests/test_syncs.py runs the
    lagged path on the CPU with events that are always complete."""

    def __init__(self, device: torch.device, lagged: bool | None = None) -> None:
        self.lagged = device.type == "cuda" if lagged is None else lagged
        self.pinned = device.type == "cuda"
        self.pending: list[tuple[torch.Tensor, object]] = []  # host flags and their events, oldest first

    def finished(self, done: torch.Tensor) -> bool:
        flag = torch.empty((), dtype=torch.bool, pin_memory=self.pinned)
        flag.copy_(done.all(), non_blocking=self.pinned)
        if not self.lagged:
            return bool(flag.numpy())  # a host tensor, complete: no device to wait for
        self.pending.append((flag, self._event(done.device)))
        while self.pending and self.pending[0][1].query():
            arrived, _ = self.pending.pop(0)
            if bool(arrived.numpy()):
                return True
        return False

    @staticmethod
    def _event(device: torch.device):
        if device.type != "cuda":
            return _Complete()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event


class _Complete:
    """An event that has always completed (the lagged poll on a CPU, where copies are synchronous)."""

    def query(self) -> bool:
        return True


class Clock:
    def __init__(self, device: torch.device) -> None:
        import time

        self.device, self.now = device, time.perf_counter
        self.last = self._read()

    def _read(self) -> float:
        sync(self.device)
        return self.now()

    def lap(self) -> float:
        t = self._read()
        seconds, self.last = t - self.last, t
        return seconds


def _collect(tokens, lengths, records, prompts) -> Generation:
    rows = torch.stack(tokens, 1).tolist()
    toks = [row[:n] for row, n in zip(rows, lengths.tolist())]
    layers: list[list[list[int]]] = [[] for _ in toks]
    skips: list[list[int]] = [[] for _ in toks]
    if not records:
        return Generation(tokens=toks, layers=layers, prompt_tokens=[len(p) for p in prompts], attention_skips=skips)
    # every step's records in one copy to the host (one transfer after the loop, not one per step)
    feds = torch.stack([fed for fed, _, _ in records]).cpu()
    executed = torch.stack([ex for _, ex, _ in records]).cpu()
    zeros = torch.zeros_like(records[0][0], dtype=torch.long)
    attention = torch.stack([zeros if sk is None else sk for _, _, sk in records]).tolist()
    for step in range(len(records)):
        ex = executed[step]
        for r in torch.nonzero(feds[step]).flatten().tolist():
            layers[r].append(torch.nonzero(ex[r]).flatten().tolist())
            skips[r].append(attention[step][r])
    return Generation(tokens=toks, layers=layers, prompt_tokens=[len(p) for p in prompts], attention_skips=skips)
