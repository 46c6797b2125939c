"""`skipbench bench`: the wall-clock cost of skipping, measured side by side in one process.

Every variant generates exactly `max_new_tokens` tokens (EOS does not stop it) on the same prompts, after
warm-up, CUDA synchronised before each clock read. Prefill (the prompt and the first token) and decode (each
later token) are timed separately. skipbench's own variants (every policy and the removed-layer bounds) decode in
lockstep: one step of each in turn (`lockstep`), so that the steps compared are a few apart and a drift of the
machine's speed hits all alike; `model.generate` and speculative variants run whole, one after another, in an
order that alternates from round to round. A speedup is the median over rounds of the variant's tokens/s over full
depth's in the same round.

Rows:
  hf-generate           transformers' own `model.generate` at full depth (the baseline)
  <policy>              skipbench under each policy (`full`, `uniform:15`, `random-token:22`, `flexidepth:DIR`, ...);
                        per-token policies once per implementation given (`--impl auto,gather,mask`: `<policy> [mask]`)
  removed:<plan>        for a static plan: the same model with the other layers physically removed (the bound)

  spec <draft> k=<K>    self-speculative decoding (`--drafts`, `--speculate`): the draft policy proposes K tokens,
                        the full model verifies them; the output is full depth's, so its speedup is lossless

Speedups are of decode tokens/s over `full`. Two ideals, both from a decode step costing a fixed part F (embedding,
final norm, head, sampling; timed on its own) plus its layers, scaled so that full depth's L layers cost T_full - F:

* `ideal_speedup` counts layers per token: m layers on average ideally take F + (m / L)(T_full - F);
* `ideal_batch_speedup` counts what the batch can actually skip: a layer part (attention, MLP) costs its dense time
  (engine/costs.py's table for the variant's KV mode) at a step when at least one row runs it, and nothing when
  none does, except the K/V every row still writes where none attends (`fill`): a skipped layer, a FlexiDepth
  layer no token is routed through (its KV-preserving skip computes the K/V, not the attention), a MindSkip
  attention no token runs. At batch 8 almost every layer has a row that runs it, so a per-token policy's batch
  ideal is near 1. (Gathering a layer that one row runs can cost a little less than its dense time, so `auto` may
  beat this ideal slightly.) The policy's own work (routers, FlexiDepth's adapters) is not in it: `policy_s`,
  `skip_path_s`.

Each policy variant also reports the policy's own time per decode step (`policy_s`: its `new_step` and `gate`
calls, host time; `skip_path_s`: a routed layer's skip path, FlexiDepth's adapters), the layer parts any row ran per step (`attention_layers`, `mlp_layers`, `kv_layers`) and how
its partial layers ran (`dense_layers`, `gathered_layers`): realized against the batch ideal then says whether the
difference is the policy or the engine.

The memory bound: a decode step reads every weight it uses once, whatever its rows. `bound_fraction` is the weight
bytes a step reads (`weight_bytes_per_step`: the layer parts it ran, from the meter where there is one, plus the
head; not given for speculative variants, whose verify pass reads each weight once for several tokens) times steps/s, over the
machine's weight-read rate (engine/costs.read_rate: a matrix-vector product over a 256 MiB matrix in the run's dtype
and threads, measured again in every run, before any clock runs, since the machine's rate drifts between days; the
manifest records it). 1.0 is a decode that does
nothing but stream its weights; the rest is overhead (Python, cache writes, attention, norms, sampling).

A speculative variant's decode row adds its acceptance (`acceptance_rate`: accepted over drafted draft tokens;
`acceptance_prob`: Leviathan et al.'s alpha, the per-token acceptance probability, accepted / (accepted + rejections)), the mean accepted tokens per
round, the layer passes per token (draft and verify), the shares of its time spent drafting, verifying and
accepting (bookkeeping), and two predictions from its own measured parts, a round costing k_mean t_draft +
t_verify (mean draft step, mean verify pass) against full depth's mean step:

* `predicted_speedup`: tokens per round from the standard formula, E = (1 - alpha^(K+1)) / (1 - alpha) (averaged
  over the rounds' K), which assumes tokens accepted independently and batch 1 (at batch B a round lasts until
  its slowest row);
* `cost_model_speedup`: the tokens per round it measured (each row's new tokens after the first over the batch's
  rounds, which last until the slowest row is done), so the realized speedup below it is only bookkeeping and
  time outside the draft steps and verify passes.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from skipbench.data.prompts import encode_prompt
from skipbench.engine.cache import resolve_kv_mode
from skipbench.engine.costs import LayerCosts, layer_costs, read_rate
from skipbench.engine.decode import decoding, finish, left_pad, next_token, pad_id, Sampling
from skipbench.errors import SkipbenchError
from skipbench.models import EMBEDDED, load_model, wrap_model
from skipbench.models.loading import PLACEMENT, LoadedModel, remove_layers, sync
from skipbench.engine.forward import IMPLS, Engine, Meter
from skipbench.engine.protocol import Policy
from skipbench.engine.speculative import Speculation, speculate
from skipbench.policies import PolicySpec, parse_policies
from skipbench.policies.calibration import frequent_tokens
from skipbench.store.results import Shown, Written, check_out_path, manifest, tidy, write_atomic

PROMPTS = [
    "Please calculate the sum of 99, 45 and 12.",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers larger than 50.",
    "What is the capital of France, and why is it famous?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Describe a cat to someone who has never seen one.",
    "Give me a simple recipe for a cup of tea.",
]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str = EMBEDDED
    policies: tuple[PolicySpec, ...] = ()  # empty: full and uniform at half depth
    batch_sizes: tuple[int, ...] = (1, 8)
    max_new_tokens: int = 64  # exactly: EOS does not stop a run
    repeats: int = 3
    warmup: int = 1
    kv_mode: str = "auto"  # auto: the KV mode a trained policy requires, else none for a static plan, else fill
    impl: str = "auto"  # auto | gather | mask, comma-separated (per-token policies run under each); both = gather,mask
    compile: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None
    drafts: tuple[PolicySpec, ...] = ()  # self-speculative decoding: the draft policies
    draft_search: bool = False  # `--drafts auto`: search a static draft layer set first (draft_search.py)
    speculations: tuple[Speculation, ...] = (Speculation(),)  # `--speculate`: K per round, one variant per draft and K
    lockstep: bool = True  # skipbench's own variants decode together, one step each in turn (`lockstep`)
    recalibrate: bool = False  # measure the cost tables again instead of reading them from the cache


@dataclass
class Variant:
    name: str
    run: Callable  # prompts -> (timings [(phase, seconds)], layers_mean, extra columns)
    kind: str  # baseline | policy | bound | speculative
    kv_mode: str = "fill"  # the KV mode it ran under (a full-depth run writes every K/V: `fill`)
    start: Callable | None = None  # skipbench's own decodings: prompts -> (steps, collect), for `lockstep`


def _hf_variant(lm: LoadedModel, n: int) -> Variant:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per generated token: its timestamps time the steps
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            sync(scores.device)
            self.times.append(time.perf_counter())
            return scores

    def run(prompts):
        ids, present = left_pad(prompts, pad_id(lm), lm.device)
        stamp = Stamp()
        sync(lm.device)
        start = time.perf_counter()
        lm.model.generate(input_ids=ids, attention_mask=present.long(), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad_id(lm), logits_processor=LogitsProcessorList([stamp]))
        marks = [start, *stamp.times]
        return [("prefill" if j == 0 else "decode", b - a) for j, (a, b) in enumerate(zip(marks, marks[1:]))], lm.num_layers, {}

    return Variant("hf-generate", run, "baseline")


def _ours(lm: LoadedModel, policy: Policy, cfg: BenchConfig, impl: str, kv_mode: str = "fill") -> tuple[Callable, Callable]:
    """A skipbench variant: `start(prompts)` gives its decoding (one token per `next`) and what turns the finished
    Generation into (timings, layers_mean, extra columns); `run(prompts)` runs it alone."""
    def start(prompts):
        timings: list = []
        meter = Meter()
        steps = decoding(lm, prompts, policy, cfg.max_new_tokens, kv_mode, stop_at_eos=False, impl=impl, timings=timings,
                         meter=meter)

        def collect(gen):
            layers = [len(rec) for row in gen.layers for rec in row]
            n = max(meter.steps, 1)
            extra = {"policy_s": meter.policy_seconds / n, "skip_path_s": meter.skip_seconds / n,
                     **{f"{part}_layers": getattr(meter, part) / n for part in METER_PARTS}}
            return timings, float(np.mean(layers)) if layers else float(lm.num_layers), extra

        return steps, collect

    def run(prompts):
        steps, collect = start(prompts)
        return collect(finish(steps))

    return run, start


def lockstep(variants: list[Variant], prompts) -> dict[str, tuple]:
    """Decode with every variant at once, one token each in turn, so that the steps compared are at most a few
    steps apart: a machine whose speed drifts over seconds (this 2-core CPU's did by 10-20% between runs) then
    slows all variants alike. Each variant's clock runs only during its own steps."""
    running = {v.name: v.start(prompts) for v in variants}
    results = {}
    while running:
        for name, (steps, collect) in list(running.items()):
            try:
                next(steps)
            except StopIteration as done:
                results[name] = collect(done.value)
                del running[name]
    return results


def _speculative(lm: LoadedModel, draft: Policy, spec: Speculation, cfg: BenchConfig, kv_mode: str) -> Callable:
    vocab = frequent_tokens(lm, spec.draft_vocab) if spec.draft_vocab else None  # counted before any clock runs

    def run(prompts):
        timings: list = []
        gen = speculate(lm, prompts, draft, spec, cfg.max_new_tokens, kv_mode, stop_at_eos=False, impl=_impl(cfg),
                        timings=timings, vocab=vocab)
        s = gen.speculation
        laps = {phase: [t for p, t in timings if p == phase] for phase in ("draft", "verify", "accept", "adapt")}
        total = sum(map(sum, laps.values()))
        fed = sum(len(t) - 1 for t in gen.tokens)
        extra = {"draft_spec": draft.describe(), "speculate": spec.label, "draft_vocab": spec.draft_vocab,
                 "acceptance_rate": s.acceptance_rate(),
                 "acceptance_prob": s.acceptance_prob(), "accepted_per_round": s.accepted_per_round(),
                 "expected_per_round": s.expected_per_round(), "k_mean": float(np.mean(s.round_k)),
                 "rounds": len(s.round_k), "tokens_per_round": (cfg.max_new_tokens - 1) / len(s.round_k),
                 "layer_passes_per_token": sum(s.layer_passes) / fed,
                 "t_draft": float(np.mean(laps["draft"])) if laps["draft"] else 0.0,
                 "t_verify": float(np.mean(laps["verify"])),
                 **{f"{phase}_share": sum(laps[phase]) / total for phase in laps}}
        return timings, extra["layer_passes_per_token"], extra  # its layers: every pass, drafting and verifying

    return run


def impls_of(text: str) -> list[str]:
    """`--impl`: implementations, comma-separated (`both` = gather,mask; `all` = auto,gather,mask)."""
    names = {"both": ["gather", "mask"], "all": list(IMPLS)}
    out = [i for part in text.split(",") if part.strip() for i in names.get(part.strip(), [part.strip()])]
    bad = [i for i in out if i not in IMPLS]
    if not out or bad:
        raise SkipbenchError(f"--impl takes {', '.join(IMPLS)}, both or all, comma-separated; got '{text}'")
    return list(dict.fromkeys(out))


def _impl(cfg: BenchConfig) -> str:
    """The implementation of variants that run once (static plans, drafts): the first one given."""
    return impls_of(cfg.impl)[0]


def variants(lm: LoadedModel, cfg: BenchConfig, drafts: tuple[PolicySpec, ...] = ()) -> list[Variant]:
    out = [_hf_variant(lm, cfg.max_new_tokens)]
    bounds = []
    specs = cfg.policies or parse_policies(f"full,uniform:{max(1, lm.num_layers // 2)}")
    if drafts and not any(s.name == "full" for s in specs):
        specs = (*parse_policies("full"), *specs)  # speculative speedups are over full depth, measured beside them
    for spec in specs:
        policy = spec.build(lm.num_layers, lm)
        label = spec.name + (f":{spec.arg}" if spec.arg else "")  # as the user wrote it
        impls = [_impl(cfg)] if policy.static else impls_of(cfg.impl)
        kv_mode = resolve_kv_mode(cfg.kv_mode, policy.kv_mode, f"policy '{label}'", policy.skips_statically())
        spec.check_kv_mode(kv_mode)
        for j, impl in enumerate(impls):
            name = label if len(impls) == 1 else f"{label} [{impl}]"
            # one policy object per variant: lockstep interleaves their steps, and a policy keeps per-run state
            run, start = _ours(lm, policy if j == 0 else spec.build(lm.num_layers, lm), cfg, impl, kv_mode)
            out.append(Variant(name, run, "policy", kv_mode, start))
        keep = policy.executed_layers() if policy.static and policy.lm is None else None  # LaCo: its own model
        if keep is not None and len(keep) < lm.num_layers:
            # the model's own layers where they are (a placed model's too: no move)
            small = wrap_model(remove_layers(lm.model, keep), lm.tokenizer, "removed", None)
            small.adapter.compiled = getattr(lm.adapter, "compiled", False)  # `--compile`: the bound compiled alike
            run, start = _ours(small, None, cfg, "gather")
            bounds.append(Variant(f"removed:{label}", run, "bound", start=start))
    for spec in drafts:
        draft = spec.check_draft().build(lm.num_layers, lm, draft=True)
        kv_mode = resolve_kv_mode(cfg.kv_mode, draft.kv_mode, f"draft '{spec.label}'")
        spec.check_kv_mode(kv_mode)
        for k in cfg.speculations:
            out.append(Variant(f"spec {spec.label} k={k.label}", _speculative(lm, draft, k, cfg, kv_mode), "speculative",
                               kv_mode))
    out += bounds
    names = [v.name for v in out]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SkipbenchError(f"bench: variant(s) {', '.join(twice)} named twice; give each policy once")
    return out


def fixed_part(lm: LoadedModel, batch: int, reps: int = 20) -> float:
    """Seconds of one decode step outside the layers: embedding, final norm, head and token choice."""
    ad = lm.adapter
    ids = torch.zeros((batch, 1), dtype=torch.long, device=lm.device)
    pos = torch.zeros((batch, 1), dtype=torch.long, device=lm.device)
    times = []
    with torch.no_grad():
        for r in range(reps + 3):
            sync(lm.device)
            t = time.perf_counter()
            h = ad.embed(ids, pos)
            ad.position_embeddings(h, pos)
            next_token(ad.head(ad.final_norm(h))[:, -1], Sampling(), None)
            sync(lm.device)
            if r >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (never decreases)


@dataclass(kw_only=True)
class BenchResult(Written):
    """rows: one per (variant, batch size, repeat, phase), written when --out is given."""

    summary: pd.DataFrame  # one row per (variant, batch size, phase), in the manifest
    search: object = None  # `--drafts auto`: the draft search (draft_search.Search)


def run(cfg: BenchConfig, progress=None, start=None) -> BenchResult:
    if cfg.max_new_tokens < 2 or cfg.repeats < 1 or cfg.warmup < 0 or any(b < 1 for b in cfg.batch_sizes):
        raise SkipbenchError("bench needs --max-new-tokens >= 2, --repeats >= 1, --warmup >= 0 and batch sizes >= 1")
    impls_of(cfg.impl)
    if cfg.out:
        check_out_path(cfg.out)
    placement = PLACEMENT.get()
    if placement is not None and placement.tp:  # the ranks must run the same products: refused before the load
        if cfg.draft_search or cfg.compile:
            raise SkipbenchError(f"{'--draft auto chooses its draft by timings' if cfg.draft_search else '--compile traces'}"
                                 " each rank would take apart: run it without --tp")
        if any(s.draft_vocab for s in cfg.speculations) and (cfg.drafts or cfg.draft_search):
            raise SkipbenchError("--draft-vocab copies rows of the head, which tensor parallelism shards across the ranks")
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    encoded = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    drafts, found = cfg.drafts, None
    if cfg.draft_search:
        from skipbench.evaluation.draft_search import search

        found = search(lm, encoded[0], cfg.speculations[0].k)
        drafts = (*drafts, *parse_policies(found.label))
    if cfg.compile:  # after the search, which tries many layer sets: compiling each would cost more than it saves
        from skipbench.engine.forward import enable_compile

        enable_compile(lm.adapter)
    vs = variants(lm, cfg, drafts)
    # the memory bound's rate, measured in this run before any clock runs (a few seconds): this 2-core machine's rate
    # drifted by 14% between two days (25.8 and 29.4 GB/s), so a cached rate would misstate the fraction
    rate = read_rate(lm.device, lm.dtype, fresh=True)
    rows, fixed, parts = [], {}, {}
    if start:
        start(len(cfg.batch_sizes) * (cfg.repeats + cfg.warmup) * len(vs))
    for batch in cfg.batch_sizes:
        prompts = [encoded[i % len(encoded)] for i in range(batch)]
        fixed[batch] = fixed_part(lm, batch)
        # the cost tables (auto's choice, the batch ideal's parts): read or measured now, before any clock runs
        parts[batch] = {mode: layer_costs(Engine(lm.adapter, mode), batch, fresh=cfg.recalibrate)
                        for mode in sorted({"fill", *(v.kv_mode for v in vs)})}
        memory: dict[str, float] = {}  # peak memory of a variant run alone (warm-up rounds, or every round)
        for rep in range(-cfg.warmup, cfg.repeats):
            order = vs if rep % 2 == 0 else vs[::-1]  # alternating order: a drift within a round cancels
            together = [v for v in order if v.start is not None] if cfg.lockstep and rep >= 0 else []
            results = {}
            for v in order:
                if any(v is t for t in together):
                    continue
                if lm.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                results[v.name] = v.run(prompts)
                memory[v.name] = _peak_memory_mb(lm.device)
                if progress:
                    progress()
            if together:
                results.update(lockstep(together, prompts))
                for _ in together:
                    if progress:
                        progress()
            if rep < 0:
                continue
            for v in order:
                timings, layers, extra = results[v.name]
                rows += phase_rows(timings, prompts, cfg.max_new_tokens, peak_memory_mb=memory.get(v.name, np.nan),
                                   variant=v.name, kind=v.kind, kv_mode=v.kv_mode, batch_size=batch, repeat=rep,
                                   layers_mean=layers, **extra)
    # tensor parallelism: what the ranks' collectives take of a full-depth decoding, profiled apart from the clocks
    collectives = collective_share(lm, [encoded[0]] * cfg.batch_sizes[0], cfg.max_new_tokens) if lm.adapter.tp > 1 else None
    summary = summarise(pd.DataFrame(rows), fixed, lm.num_layers, parts, lm.adapter.weight_bytes(), rate.bytes_per_s)
    df = tidy(with_bound(pd.DataFrame(rows), lm.adapter.weight_bytes(), rate.bytes_per_s), cfg, skip=("out",), lm=lm)  # a row's own kv_mode is the mode it ran under, not the option given
    summary.insert(0, "run_id", df["run_id"].iloc[0])
    if not cfg.out:
        return BenchResult(rows=df, summary=summary, search=found, shown=shown(summary, cfg, found, lm.placement, collectives),
                           said=[] if found is None else [f"chosen draft: {found.label}"])
    meta = manifest(cfg, lm=lm, num_layers=lm.num_layers, fixed_part_seconds=fixed, read_rate=asdict(rate),
                    collective_share=collectives,
                    weight_bytes=lm.adapter.weight_bytes(),
                    layer_costs={str(b): {mode: {**c.__dict__, "auto": c.crossover()} for mode, c in t.items()}
                                 for b, t in parts.items()},
                    draft_search=None if found is None else {
                        "chosen": found.label, "k": found.k, "t_full": found.t_full, "t_verify": found.t_verify,
                        "path": [s.__dict__ for s in found.path]},
                    summary=summary.to_dict("records"),
                    memory="CUDA: max_memory_allocated per variant; CPU: process peak RSS (cumulative); taken on runs "
                           "of a variant alone (warm-up rounds, every round with --no-lockstep), none without them")
    from skipbench.analysis.plots import speedup_figure

    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    figures = {"figure": speedup_figure(summary, lm.num_layers, Path(cfg.out).with_suffix(".png"))}
    if drafts:
        from skipbench.analysis.plots import speculative_figure

        stem = Path(cfg.out)
        figures["speculative"] = speculative_figure(summary, stem.with_name(stem.stem + "-speculative.png"))
    path = write_atomic(df, cfg.out, meta)
    return BenchResult(rows=df, summary=summary, path=path, files=figures, search=found,
                       shown=shown(summary, cfg, found, lm.placement, collectives),
                       said=([] if found is None else [f"chosen draft: {found.label}"]) + [f"wrote {path}"])


def collective_share(lm: LoadedModel, prompts: list[list[int]], tokens: int) -> float:
    """Under tensor parallelism: the share of a full-depth decoding's wall time its collectives took, by
    torch.profiler (the self times of the all-reduce, all-gather and wait operations, CPU side; on CUDA the NCCL
    kernels' device time). One decoding, profiled apart from the timed runs (the profiler slows what it watches)."""
    from torch.profiler import ProfilerActivity, profile

    from skipbench.engine.decode import generate

    cuda = lm.device.type == "cuda"
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        generate(lm, prompts, None, tokens, stop_at_eos=False)
        sync(lm.device)
    wall = time.perf_counter() - began
    spent = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if cuda:  # the NCCL kernels alone (the CPU-side ops that launch and wait for them would count them again)
            spent += e.self_device_time_total if "nccl" in name and getattr(e.device_type, "name", "") == "CUDA" else 0.0
        elif any(k in name for k in ("all_reduce", "allreduce", "all_gather", "allgather", "wait_tensor")):
            spent += e.self_cpu_time_total
    return spent / 1e6 / wall


def shown(s: pd.DataFrame, cfg: BenchConfig, found=None, placement: dict | None = None,
          collectives: float | None = None) -> list[Shown]:
    """What a person sees: the draft search's path (with --draft auto), every variant's speed beside its ideals, and
    the self-speculative variants' acceptance and time shares (p90 and the parts are in the summary); for a placed
    model, what its speedups compare."""
    out = [] if found is None else [search_table(found)]
    if placement is not None and placement.get("tp"):
        out.append(Shown(f"tensor parallelism (--tp {placement['tp']}, rank 0's clock; the ranks wait for each other at "
                         f"every all-reduce): collectives took {100 * collectives:.0f}% of a full-depth decoding of batch "
                         f"{cfg.batch_sizes[0]}, prompt included (torch.profiler's self times of the all-reduce and "
                         "wait ops over the decoding's wall time, one decoding profiled apart from the timed ones)"))
    elif placement is not None:
        where = ", ".join(f"{n} x {d}" for d, n in pd.Series(placement["layers"]).value_counts(sort=False).items())
        out.append(Shown(f"placed by --device-map {placement['device_map']} (layers: {where}): the devices run one "
                         "after another (no pipelining), so every speedup compares a variant with full depth on this "
                         "same placement, not with a model on one device; % of bound assumes one device's read rate"))
    out.append(Shown(f"skipbench bench · {cfg.model} · {cfg.max_new_tokens} new tokens", pd.DataFrame({
        "batch": s["batch_size"], "variant": s["variant"], "phase": s["phase"], "tok/s": s["tokens_per_s"],
        "p50 ms": 1e3 * s["step_p50"], "layers": s["layers_mean"], "speedup": s["speedup"], "ideal": s["ideal_speedup"],
        "real/ideal": s["realized_over_ideal"], "batch ideal": s["ideal_batch_speedup"],
        "real/batch": s["realized_over_batch_ideal"], "policy %": 100 * s.get("policy_share", np.nan),
        "% of bound": 100 * s.get("bound_fraction", np.nan), "vs generate": s["vs_generate"]}),
        {"tok/s": "{:.1f}", "p50 ms": "{:.1f}", "layers": "{:.1f}", "policy %": "{:.1f}", "% of bound": "{:.0f}"},
        width=170))
    if "bound_fraction" in s and len(s):
        out.append(Shown("% of bound: weight bytes read per decode step x steps/s over the machine's weight-read rate "
                         "(a 256 MiB matrix-vector product measured in this run; engine/costs.read_rate)"))
    d = s[(s["kind"] == "speculative") & (s["phase"] == "decode")]
    if len(d):
        out.append(Shown("self-speculative decoding (decode phase; output = full depth's)", pd.DataFrame({
            "batch": d["batch_size"], "variant": d["variant"], "accept rate": d["acceptance_rate"],
            "accept prob": d["acceptance_prob"], "accepted/round": d["accepted_per_round"], "K mean": d["k_mean"],
            "passes/tok": d["layer_passes_per_token"], "draft %": 100 * d["draft_share"],
            "verify %": 100 * d["verify_share"], "accept %": 100 * d["accept_share"],
            "adapt %": 100 * d.get("adapt_share", 0.0), "speedup": d["speedup"],
            "predicted": d["predicted_speedup"], "real/pred": d["realized_over_predicted"],
            "cost model": d["cost_model_speedup"], "real/cost": d["realized_over_cost_model"]}),
            {"accepted/round": "{:.2f}", "K mean": "{:.2f}", "passes/tok": "{:.1f}", "draft %": "{:.0f}",
             "verify %": "{:.0f}", "accept %": "{:.1f}", "adapt %": "{:.1f}"}, width=170))
    return out


def search_table(found) -> Shown:
    """The draft search's path: each layer set it tried (the chosen one starred), the layer it dropped last, its
    agreement with full depth, its measured step and the speedup predicted from them."""
    rows, prev = [], None
    for s in found.path:
        rows.append({"layers": f"{len(s.layers)}{' *' if s.layers == found.chosen else ''}",
                     "dropped last": "" if prev is None else str(next(iter(set(prev) - set(s.layers)))),
                     "agreement": s.agreement, "draft step ms": 1e3 * s.t_draft, "predicted speedup": s.predicted_speedup})
        prev = s.layers
    return Shown(f"draft search (K={found.k}; full step {1e3 * found.t_full:.1f} ms, verify pass {1e3 * found.t_verify:.1f} "
                 "ms)", pd.DataFrame(rows), {"draft step ms": "{:.1f}"}, width=160)


def phase_rows(timings: list[tuple[str, float]], prompts: list[list[int]], new_tokens: int, **fields) -> list[dict]:
    """One row per phase of one timed run. Prefill: the batch's real prompt tokens (padding excluded) over its
    seconds; decode: the tokens after the first (new_tokens - 1 per sequence) over the steps' seconds. A step is
    one token for plain decoding, one round (its draft steps, verify pass and acceptance) for a speculative run."""
    rows = []
    for phase in ("prefill", "decode"):
        secs = _steps(timings) if phase == "decode" else [t for p, t in timings if p == phase]
        tokens = sum(map(len, prompts)) if phase == "prefill" else len(prompts) * (new_tokens - 1)
        extra = fields if phase == "decode" else {k: v for k, v in fields.items() if k not in DECODE_ONLY}
        rows.append({**extra, "phase": phase, "seconds": float(sum(secs)), "steps": len(secs), "tokens": tokens,
                     "step_p50": float(np.median(secs)), "step_p90": float(np.percentile(secs, 90)),
                     "step_mean": float(sum(secs) / len(secs)), "tokens_per_s": tokens / sum(secs)})
    return rows


def _steps(timings: list[tuple[str, float]]) -> list[float]:
    """Decode step times: each ("decode", s) lap, or each speculative round (laps up to its "accept", and its
    "adapt")."""
    steps, current = [], 0.0
    for phase, t in timings:
        if phase == "decode":
            steps.append(t)
        elif phase in ("draft", "verify"):
            current += t
        elif phase == "accept":
            steps.append(current + t)
            current = 0.0
        elif phase == "adapt":  # an adapting draft's own step: part of the round before it (after the prompt: the first)
            if steps:
                steps[-1] += t
            else:
                current += t
    return steps


SPECULATIVE = ("draft_vocab", "acceptance_rate", "acceptance_prob", "accepted_per_round", "expected_per_round", "k_mean", "rounds", "tokens_per_round",
               "layer_passes_per_token", "t_draft", "t_verify", "draft_share", "verify_share", "accept_share", "adapt_share")
METER_PARTS = ("attention", "mlp", "kv", "dense", "gathered")
METERED = ("policy_s", "skip_path_s", *(f"{part}_layers" for part in METER_PARTS))  # a plain decode's meter, per step
DECODE_ONLY = SPECULATIVE + METERED


def weight_bytes_per_step(r, weights: dict[str, int]) -> float:
    """Weight bytes a decode step reads (per generated token of each row; NaN outside the decode phase): the
    layer parts the engine's meter counted where it counted them (attention, MLP, and K/V alone at a layer no row
    runs in `fill`), else the executed layers; plus the head once per step. None for a speculative round (its
    t_draft and t_verify say where its time goes)."""
    if r.phase != "decode":
        return np.nan
    if r.kind == "speculative":  # its layer passes count a verify pass's layer once per token, but it reads the
        return np.nan  # layer's weights once for all of them: per-token bytes would overstate its share of the bound
    if not np.isnan(getattr(r, "attention_layers", np.nan)):
        return (r.attention_layers * weights["attention"] + r.mlp_layers * weights["mlp"]
                + r.kv_layers * weights["kv"] + weights["head"])
    return r.layers_mean * weights["layer"] + weights["head"]


def with_bound(df: pd.DataFrame, weights: dict[str, int], rate: float) -> pd.DataFrame:
    """`weight_bytes_per_step` and `bound_fraction` (NaN outside the decode phase): a step reads its weights once
    for all its rows, so steps/s is tokens/s over the batch."""
    wb = [weight_bytes_per_step(r, weights) for r in df.itertuples()]
    return df.assign(weight_bytes_per_step=wb, bound_fraction=np.asarray(wb) * df["tokens_per_s"] / df["batch_size"] / rate)


def summarise(df: pd.DataFrame, fixed: dict, num_layers: int, parts: dict[int, dict[str, LayerCosts]] | None = None,
              weights: dict[str, int] | None = None, rate: float | None = None) -> pd.DataFrame:
    """Medians per (batch, variant, phase), speedups over `full`, the ideals (module docstring). `parts`: each
    batch's cost tables by KV mode, whose attention, MLP and K/V times weigh the parts a variant ran for the batch
    ideal. `weights` (Adapter.weight_bytes) and `rate` (the measured read rate, bytes/s): the share of the memory
    bound each decode reaches (`bound_fraction`)."""
    # a speedup is the median over repeats of the variant's tokens/s over full depth's in the same round (paired:
    # drift between rounds cancels; run() alternates the order of the variants from round to round)
    keys = ["batch_size", "phase", "repeat"]
    df = df.assign(repeat=df["repeat"] if "repeat" in df else 0)
    full_tps = df[df.variant == "full"].groupby(keys)["tokens_per_s"].first()
    df["paired_speedup"] = df["tokens_per_s"].to_numpy() / full_tps.reindex(pd.MultiIndex.from_frame(df[keys])).to_numpy()
    g = df.groupby(["batch_size", "variant", "kind", "kv_mode", "phase"], sort=False)
    extra = {c: (c, "median") for c in DECODE_ONLY if c in df}
    out = g.agg(tokens_per_s=("tokens_per_s", "median"), step_p50=("step_p50", "median"), step_p90=("step_p90", "median"),
                step_mean=("step_mean", "median"), speedup=("paired_speedup", "median"),
                layers_mean=("layers_mean", "mean"), peak_memory_mb=("peak_memory_mb", "max"), **extra).reset_index()
    ideal, batch_ideal, predicted, costed = [], [], [], []
    for r in out.itertuples():
        full = out[(out.batch_size == r.batch_size) & (out.variant == "full") & (out.phase == r.phase)]
        ideal.append(np.nan)
        batch_ideal.append(np.nan)
        predicted.append(np.nan)
        costed.append(np.nan)
        if full.empty or r.phase != "decode":
            continue
        if r.kind == "speculative":
            # per round: E tokens (the formula at its alpha) or the tokens it measured, over the round's cost from
            # its measured parts (mean draft step, mean verify pass), relative to full depth's mean step
            t_full, round_cost = float(full.step_mean.iloc[0]), r.k_mean * r.t_draft + r.t_verify
            predicted[-1] = r.expected_per_round * t_full / round_cost
            costed[-1] = r.tokens_per_round * t_full / round_cost
            continue
        t_full, f = float(full.step_p50.iloc[0]), fixed[r.batch_size]
        # a step that does a share of full depth's layer work ideally takes F + share * (T_full - F)
        ideal_at = lambda share: t_full / (f + share * max(t_full - f, 0.0))  # noqa: E731
        ideal[-1] = ideal_at(r.layers_mean / num_layers)
        c = (parts or {}).get(r.batch_size, {}).get(r.kv_mode)
        if c is not None and not np.isnan(getattr(r, "attention_layers", np.nan)):
            # per step: the layers where some row attended (A), ran the MLP (M), or only wrote K/V (K, `fill`), as the
            # engine's meter counted them, each at its dense time: work = A t_attn + M t_mlp + K t_kv, a share
            # work / (L (t_attn + t_mlp)) of full depth's. A routed layer (FlexiDepth, MindSkip's attention) counts
            # as attention where a token attends and as K/V where none does: its skipped tokens' queries are not run
            work = r.attention_layers * c.attention + r.mlp_layers * c.mlp + r.kv_layers * c.kv
            batch_ideal[-1] = ideal_at(work / (num_layers * (c.attention + c.mlp)))
    out["ideal_speedup"] = ideal
    out["realized_over_ideal"] = out["speedup"] / out["ideal_speedup"]
    out["ideal_batch_speedup"] = batch_ideal
    out["realized_over_batch_ideal"] = out["speedup"] / out["ideal_batch_speedup"]
    if "policy_s" in out:
        out["policy_share"] = out["policy_s"] / out["step_mean"]
    out["predicted_speedup"] = predicted
    out["realized_over_predicted"] = out["speedup"] / out["predicted_speedup"]
    out["cost_model_speedup"] = costed  # measured tokens per round: what only the cost model (and overhead) explains
    out["realized_over_cost_model"] = out["speedup"] / out["cost_model_speedup"]
    if weights and rate:
        out = with_bound(out, weights, rate)
    hf = out[out.variant == "hf-generate"].set_index(["batch_size", "phase"])["tokens_per_s"]
    out["vs_generate"] = out["tokens_per_s"].to_numpy() / hf.reindex(pd.MultiIndex.from_frame(out[["batch_size", "phase"]])).to_numpy()
    return out
