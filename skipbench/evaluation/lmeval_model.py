"""A backend for lm-evaluation-harness: any skipbench policy on any lm-eval task, through skipbench's engine.

Importing this module registers the model `skipbench` with lm-eval (`lm_eval.simple_evaluate(model="skipbench",
model_args="model=smollm2-135m,policy=uniform:15", ...)`; in `model_args`, whose pairs lm-eval splits at commas,
write a policy's own commas as semicolons: `policy=layers:0;3;5`). `skipbench lm-eval` (lmeval_sweep.py)
runs it over policy sweeps and writes tidy parquet.

Semantics are the project's (DESIGN.md § Skipping semantics), for scoring as for generation:

* `prompt_depth="full"` (default): a request's context runs at full depth, so the first continuation token is
  scored from the full-depth context (as generation picks its first token) and every later continuation token
  teacher-forced under the policy (fed through the policy's layers, as a generated token is fed back). A
  single-token continuation therefore scores the same under every policy; tasks whose answers are one token
  (MMLU's letters) measure skipping with
* `prompt_depth="policy"`: the context runs under the policy too (FlexiDepth skips the prompt's layers as well).

Each request records the layer passes of the tokens the policy gated (continuation tokens fed back; with
`prompt_depth="policy"` the context's tokens too), so every task's result carries its mean executed layers.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from skipbench.store import distributed
from skipbench.engine import Engine, generate, resolve_kv_mode
from skipbench.engine.decode import Sampling, left_pad, pad_id
from skipbench.engine.forward import passes as engine_passes
from skipbench.errors import SkipbenchError
from skipbench.evaluation.quality import build_checked
from skipbench.models import load_model
from skipbench.models.loading import LoadedModel, default_batch_size
from skipbench.policies import PolicySpec, parse_policies
from skipbench.policies.spec import parse_policy_options

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"  # the offline tasks shipped with the package
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's default
LOGITS_BUDGET = 2**28  # logits per scoring batch (1 GiB in fp32) when it holds more than one row: long windows go alone
NO_OPS = {"num_beams": 1, "repetition_penalty": 1.0}  # settings some tasks pass at values that change nothing
GENERATION_SETTINGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}  # after lm-eval's normalising
# the run length a scored continuation counts as (Policy.lengths): lm-eval's default max_gen_toks, so that a policy
# scheduled over a generation's positions (SkipDecode) scores a request alike whatever the other requests of its batch
SCORED_LENGTH = 256


@dataclass
class Usage:
    """What one request cost: the tokens the policy gated and the layers they ran, summed."""

    task: str
    tokens: int
    layer_passes: int
    attention_passes: int  # attention sub-layers they ran (fewer than layer_passes under MindSkip)


def request_key(tokens: list[int]) -> int:
    """A row key from the context's tokens: a per-sequence draw depends on the request, not on its batch (and the
    choices of one question, which share a context, share it)."""
    return int(hashlib.sha1(repr(tokens).encode()).hexdigest()[:15], 16)


@register_model("skipbench")
class SkipbenchLM(TemplateLM):
    """lm-eval's `TemplateLM` on skipbench's engine under one policy point.

    Arguments (lm-eval's `model_args`): model (alias, hub id, folder or .gguf; default the embedded model), policy
    (one spec), policy_options (`NAME=VALUE;NAME=VALUE`, as --policy-option), gate, kv_mode, prompt_depth (full |
    policy), impl, dtype, max_length (default: the model's positions, as lm-eval's HF backend), seed; lm-eval's own
    batch_size, max_batch_size and device. `lm` takes an already loaded model and `policy` a parsed spec (the
    command)."""

    def __init__(self, model: str = "smollm2-135m", policy: str | PolicySpec = "full", policy_options: str = "",
                 gate: str = "sample", kv_mode: str = "auto", prompt_depth: str = "full", impl: str = "auto",
                 device: str | None = None, dtype: str = "auto", batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_length: int | None = None, seed: int = 0,
                 lm: LoadedModel | None = None, **unknown) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if v is not None}
        if unknown:
            raise SkipbenchError(f"skipbench model: unknown argument(s) {', '.join(sorted(unknown))}; known: model, policy, "
                                 "policy_options, gate, kv_mode, prompt_depth, impl, device, dtype, batch_size, "
                                 "max_batch_size, max_length, seed")
        if prompt_depth not in ("full", "policy"):
            raise SkipbenchError(f"prompt_depth must be 'full' or 'policy', got '{prompt_depth}'")
        self.model_name = str(model)
        self.lm = lm or load_model(self.model_name, device or "auto", dtype)
        self.spec = policy if isinstance(policy, PolicySpec) else one_spec(str(policy), seed, str(policy_options), gate)
        self.policy = build_checked(self.spec, self.lm, self.model_name, None, kv_mode)
        self.lm = self.policy.lm or self.lm  # a policy whose layers are new weights (LaCo) runs on its own model
        self.kv_mode = resolve_kv_mode(kv_mode, self.policy.kv_mode, f"policy '{self.spec.label}'",
                                       self.policy.skips_statically())
        self.prompt_depth, self.impl, self.seed = prompt_depth, impl, int(seed)
        self.engine = Engine(self.lm.adapter, self.kv_mode, impl)
        self.tokenizer = self.lm.tokenizer
        self.batch_size = _batch_size(batch_size, max_batch_size, self.lm.device)
        limit = resolve_max_length(self.lm.model.config, self.tokenizer)  # lm-eval's HF backend's default, 2048 if unknown
        self.max_length = int(max_length) if max_length else limit
        if not 2 <= self.max_length <= limit:
            raise SkipbenchError(f"max_length must be in [2, {limit}] (the model's positions), got {self.max_length}")
        self.usage: list[Usage] = []
        d = distributed.current()
        self._rank, self._world_size, self._device = d.rank, d.world, self.lm.device

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else pad_id(self.lm)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.model_name).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """None: the tokenizer's own default (a BOS where it adds one), except for text that already begins with BOS
        (a chat template's output): lm-eval's HF backend encodes the same way."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise SkipbenchError(f"model '{self.model_name}' has no chat template; leave out --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = super().loglikelihood(requests, disable_tqdm=True)  # tokenises (quickly: no bar), _loglikelihood_tokens
        self._attribute(requests, range(len(requests)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity: the text in lm-eval's disjoint rolling windows of `max_length` tokens, each window scored as a
        continuation of its context (the first window's context is the prefix token)."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(r)
        scored = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for (logprob, _), r in zip(scored, owner):
            totals[r] += logprob
        self._attribute(requests, owner)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether every continuation token is the greedy choice) per
        (_, context tokens, continuation tokens), in batches of similar length."""
        fitted = [self._fit(ctx, cont) for _, ctx, cont in requests]
        # longest continuation first (a batch's logits are its rows times its longest continuation), then context
        order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i][1]), -len(fitted[i][0])))
        results: list = [None] * len(fitted)
        self._pending = [None] * len(fitted)  # each request's cost, for the caller that knows its task (_attribute)
        vocab = self.lm.model.config.vocab_size
        start = 0
        while start < len(order):  # a batch holds at most LOGITS_BUDGET logits
            width = len(fitted[order[start]][1])
            rows = max(1, min(self.batch_size, LOGITS_BUDGET // (width * vocab)))
            idx = order[start : start + rows]
            for i, res, cost in zip(idx, *self._score([fitted[i] for i in idx])):
                results[i], self._pending[i] = res, cost
            start += rows
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) generation under the policy, stopped at the first stop string
        (cut off the text, as lm-eval's HF backend does), at EOS, or after max_gen_toks tokens."""
        groups = defaultdict(list)
        for r, req in enumerate(requests):
            context, kwargs = req.args
            groups[repr(sorted((kwargs or {}).items()))].append(r)
        texts: list = [None] * len(requests)
        self._pending = [None] * len(requests)
        for members in groups.values():
            until, max_gen, sampling = self._generation_kwargs(requests[members[0]].args[1])
            prompts = {r: self.tok_encode(requests[r].args[0])[-max(1, self.max_length - max_gen):] for r in members}
            members.sort(key=lambda r: -len(prompts[r]))
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                batch = [prompts[r] or [self.prefix_token_id] for r in idx]
                gen = generate(self.lm, batch, self.policy, max_gen, self.kv_mode, sampling, row_keys=list(map(request_key, batch)),
                               prompt_depth=self.prompt_depth, impl=self.impl, stop=self._stopper(until))
                for row, r in enumerate(idx):
                    texts[r] = _cut(self.tok_decode(gen.tokens[row]), until)
                    passes = sum(map(len, gen.layers[row])) + (gen.prompt_passes[row] if gen.prompt_passes else 0)
                    attention = (passes - sum(gen.attention_skips[row])
                                 - (gen.prompt_passes[row] - gen.prompt_attention_passes[row] if gen.prompt_passes else 0))
                    tokens = len(gen.layers[row]) + (len(batch[row]) if gen.prompt_passes else 0)
                    self._pending[r] = (tokens, passes, attention)
        self._attribute(requests, range(len(requests)))
        return texts

    # -- the engine underneath
    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Context and continuation within `max_length` input tokens (the context cut from the left, at least its last
        token kept; lm-eval's HF backend cuts the same way)."""
        if not cont:
            raise SkipbenchError("lm-eval asked to score an empty continuation")
        if len(cont) > self.max_length:
            raise SkipbenchError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        room = self.max_length + 1 - len(cont)
        return (ctx[-room:] if ctx else [self.prefix_token_id]), cont

    @torch.no_grad()
    def _score(self, batch: list[tuple[list[int], list[int]]]):
        """One batch: the contexts left-padded into a prompt cache (full depth, or under the policy), then every
        continuation but its last token teacher-forced under the policy in one pass."""
        ctxs, conts = [b[0] for b in batch], [b[1] for b in batch]
        dev, width = self.lm.device, max(map(len, conts))
        self.policy.begin(len(batch), list(map(request_key, ctxs)))
        self.policy.lengths([len(c) for c in ctxs], SCORED_LENGTH)
        ids, present = left_pad(ctxs, pad_id(self.lm), dev)
        cache = self.engine.prompt_cache(present, ids.shape[1] + width)
        context_policy = self.policy if self.prompt_depth == "policy" else None
        first = self.engine.forward(ids, cache, context_policy, present=present, last_only=True,
                                    record=context_policy is not None)
        target = torch.full((len(batch), width), pad_id(self.lm), dtype=torch.long)
        for r, c in enumerate(conts):
            target[r, : len(c)] = torch.tensor(c)
        target = target.to(dev)
        logits = first.logits
        passes, attention = (torch.zeros(len(batch), dtype=torch.long, device=dev) for _ in range(2))
        if first.executed is not None:
            layers, attended = engine_passes(first, present)
            passes, attention = passes + layers, attention + attended
        if width > 1:  # the continuation fed back, teacher-forced, under the policy
            rest = self.engine.forward(target[:, :-1], cache, self.policy, record=True)
            logits = torch.cat([logits, rest.logits], 1)
            fed = torch.arange(width - 1, device=dev)[None] < torch.tensor([len(c) - 1 for c in conts], device=dev)[:, None]
            layers, attended = engine_passes(rest, fed)
            passes, attention = passes + layers, attention + attended
        logp = torch.log_softmax(logits.float(), -1)
        token_lp = logp.gather(-1, target[..., None])[..., 0]
        greedy = logits.argmax(-1) == target
        results, costs = [], []
        for r, c in enumerate(conts):
            n = len(c)
            results.append((float(token_lp[r, :n].sum()), bool(greedy[r, :n].all())))
            costs.append(((n - 1) + (len(ctxs[r]) if context_policy is not None else 0), int(passes[r]), int(attention[r])))
        return results, costs

    def _generation_kwargs(self, kwargs: dict | None) -> tuple[list[str], int, Sampling]:
        """A task's generation settings, read by lm-eval's own rules (max_gen_toks and its aliases; do_sample false
        means greedy whatever the temperature); a setting the engine has no use for is refused, not ignored."""
        kw = normalize_gen_kwargs({k: v for k, v in (kwargs or {}).items() if v is not None and NO_OPS.get(k) != v},
                                  DEFAULT_MAX_GEN_TOKS)
        other = sorted(set(kw) - GENERATION_SETTINGS)
        if other:
            raise SkipbenchError(f"skipbench model: generation setting(s) {', '.join(other)} not supported "
                                 f"(supported: {', '.join(sorted(GENERATION_SETTINGS))})")
        # do_sample without a temperature samples at 1.0, as transformers' generate (lm-eval's HF backend) does
        temperature = float(kw.get("temperature", 1.0)) if kw["do_sample"] else 0.0
        sampling = Sampling(temperature=temperature, top_p=float(kw.get("top_p", 1.0)), seed=self.seed)
        max_gen = int(kw["max_gen_toks"])
        if max_gen >= self.max_length:
            raise SkipbenchError(f"the task asks for {max_gen} new tokens, not fewer than max_length {self.max_length}; "
                                 "raise max_length (--max-length) or lower the task's max_gen_toks (--max-gen-toks)")
        eos = self.tokenizer.decode([self.eot_token_id])  # EOS ends generation anyway (and is not in the text)
        return [u for u in kw["until"] if u and u != eos], max_gen, sampling

    def _stopper(self, until: list[str]):
        """Which rows' text now contains a stop string: checked after every token, so a new match ends in the last
        few tokens; only that tail is decoded (a token is at least one byte of the text)."""
        if not until:
            return None
        tail = max(len(u.encode("utf-8")) for u in until) + 2
        return lambda rows: [any(u in self.tok_decode(row[-tail:]) for u in until) for row in rows]

    def _attribute(self, requests, owner) -> None:
        """Each request's cost (summed over its windows) with the task it came from. Under torchrun lm-eval pads a
        rank's requests with copies of its last one (the same object beyond its `repeats`): those are not counted."""
        totals: dict = {}
        for i, r in enumerate(owner):
            totals[r] = tuple(a + b for a, b in zip(totals.get(r, (0, 0, 0)), self._pending[i]))
        seen: dict = defaultdict(int)
        for r, (tokens, passes, attention) in sorted(totals.items()):
            req = requests[r]
            seen[id(req)] += 1
            if seen[id(req)] <= getattr(req, "repeats", 1):
                self.usage.append(Usage(getattr(req, "task_name", None) or "", tokens, passes, attention))
        self._pending = []

    # -- torchrun: lm-eval shards requests by rank and gathers through these
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        every = [torch.as_tensor(t) for t in distributed.current().all_gather(tensor.cpu())]
        return (torch.stack(every) if tensor.dim() == 0 else torch.cat(every)).to(tensor.device)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        everyone = distributed.current().all_gather(obj)
        return everyone if self._rank == dst else None

    def barrier(self) -> None:
        distributed.current().barrier()


def one_spec(text: str, seed: int = 0, policy_options: str = "", gate: str = "sample") -> PolicySpec:
    """The one policy point of `model_args` (semicolons stand for the spec's commas there, and separate the
    options: `policy_options=measure=state;min-layers=4`)."""
    options = parse_policy_options([o for o in policy_options.split(";") if o])
    specs = parse_policies(text.replace(";", ","), options, seed=seed, gate=gate)
    if len(specs) != 1:
        raise SkipbenchError(f"policy '{text}' names {len(specs)} points; the skipbench model runs one "
                             "(skipbench lm-eval sweeps)")
    return specs[0]


def usage_by_task(usage: list[Usage]) -> dict[str, tuple[int, int, int, int]]:
    """Per task: (gated tokens, their layer passes, requests, their attention passes)."""
    sums: dict = defaultdict(lambda: [0, 0, 0, 0])
    for u in usage:
        s = sums[u.task]
        s[0] += u.tokens
        s[1] += u.layer_passes
        s[2] += 1
        s[3] += u.attention_passes
    return {t: tuple(v) for t, v in sums.items()}


def _cut(text: str, until: list[str]) -> str:
    for u in until:
        text = text.split(u)[0]
    return text


def _batch_size(batch_size, max_batch_size, device) -> int:
    """lm-eval passes an int, a string of one, or 'auto' (here: skipbench's default for the device, capped by
    max_batch_size)."""
    if batch_size in (None, "", "auto") or str(batch_size).startswith("auto"):
        size = default_batch_size(device)
        return min(size, int(max_batch_size)) if max_batch_size else size
    try:
        size = int(batch_size)
    except ValueError:
        raise SkipbenchError(f"batch_size must be an integer or 'auto', got '{batch_size}'") from None
    if size < 1:
        raise SkipbenchError(f"batch_size must be >= 1, got {size}")
    return size
