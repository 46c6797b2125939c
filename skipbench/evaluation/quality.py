"""Evaluation: generation quality of policies at several costs, one tidy row per (policy point, item).

A library: the `evaluate` recipe runs it, and the controllers sweep evaluates its trained runs with it.

Each (policy, cost) point is written as its own parquet part (atomically) beside the output; a rerun
skips finished parts, so an interrupted sweep resumes. The full model always runs once per item, so
`full_rougeL` (agreement with the full model's own output, no reference needed) is defined for every row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from skipbench.store import distributed
from skipbench.store import readers
from skipbench.data import DataSpec, Item, load_items
from skipbench.data.prompts import encode_items
from skipbench.engine import LAYERS_CONVENTION, generate, resolve_kv_mode
from skipbench.errors import SkipbenchError, note
from skipbench.engine.protocol import Policy
from skipbench.engine.speculative import Speculation, speculate
from skipbench.policies.calibration import frequent_tokens
from skipbench.policies import PolicySpec
from skipbench.policies.spec import CALIBRATION_SEED, calibration_point, samples_calibration
from skipbench.analysis.metrics import exact_match, rouge_l
from skipbench.models import load_model
from skipbench.models.loading import LoadedModel, default_batch_size, model_fingerprint
from skipbench.policies.controller import check_backbone
from skipbench.store.readers import reusable
from skipbench.store.results import Shown, Written, check_out_path, config_dict, manifest, tidy, write_atomic


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    model: str
    data: DataSpec
    policies: tuple[PolicySpec, ...] = ()  # the points to run besides full depth; a sweeping strategy without an
    # argument (`uniform`) runs at L/4, L/2, 3L/4
    seed: int = 0  # the data split's seed (a policy's own seed is in its spec)
    max_new_tokens: int = 96
    max_prompt_tokens: int = 1024
    batch_size: int | None = None  # None: 8 on CPU, 32 on CUDA
    kv_mode: str = "auto"
    prompt_depth: str = "full"
    impl: str = "auto"  # the engine's path at partial layers (engine/forward.Engine); not in a part's key
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""
    resume: bool = True
    draft: PolicySpec | None = None  # self-speculative decoding: one more point, full depth's output drafted by this
    speculation: Speculation = field(default_factory=Speculation)
    # after each learned point that skips whole layers, a random-token point of the same realized mean layers per
    # token (`matched_spec`): a router that does not beat it is no better than chance at its compute
    matched_random: bool = False


FULL = PolicySpec(name="full")


@dataclass(frozen=True)
class Drafted:
    """`evaluate --draft`: the full model's output by self-speculative decoding, drafted by `draft` (one point
    beside the policy points; its rows' `policy` is `speculative`, so no reader takes them for full depth). Its
    `cost` is the output's depth (L); `layers_mean` counts every layer pass drafting and verifying cost, per token
    fed back (it can exceed L); the oracle and the report's quality figure leave these rows out."""

    draft: PolicySpec
    speculation: Speculation
    name = "speculative"

    @property
    def label(self) -> str:
        return f"speculative:{self.draft.label}@{self.speculation.label}"

    @property
    def seed(self) -> int:
        return self.draft.seed

    @property
    def gate(self) -> str:
        return self.draft.gate

    @property
    def strategy(self):
        return self.draft.strategy

    @property
    def value(self) -> str:
        return self.draft.value

    def cost(self, num_layers: int) -> int:
        return num_layers  # the output is full depth's


@dataclass(kw_only=True)
class EvalResult(Written):
    summary: pd.DataFrame  # one row per policy point (not written: `summarise(rows)` again from the file)
    reused_parts: int
    reused_shares: int = 0  # under torchrun: ranks' shares finished by an earlier, failed run


def default_costs(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)}))


def points(cfg: EvalConfig, lm: LoadedModel) -> dict[PolicySpec, Policy]:
    """Full depth first, then every requested point, each built once and checked (argument, KV mode, held-out
    backbone) before any generation starts."""
    built = {p: build_checked(p, lm, cfg.model, cfg.data, cfg.kv_mode) for p in expand(cfg.policies, lm.num_layers)}
    if cfg.draft is not None:
        if cfg.prompt_depth != "full":
            raise SkipbenchError("--draft runs the prompt at full depth (the verifier's); --prompt-depth must be full")
        built[Drafted(cfg.draft, cfg.speculation)] = build_checked(cfg.draft.check_draft(), lm, cfg.model, cfg.data,
                                                                   cfg.kv_mode, "draft")
    return built


def expand(policies: tuple[PolicySpec, ...], num_layers: int) -> list[PolicySpec]:
    """Full depth first, then every point of `policies` once (a sweeping strategy without an argument, `uniform`,
    at L/4, L/2, 3L/4)."""
    from skipbench.policies import with_costs

    pts = [FULL]
    for spec in policies:
        for p in with_costs([spec], default_costs(num_layers)):
            if p.name != "full" and p not in pts:
                pts.append(p)
    return pts


def build_checked(p: PolicySpec, lm: LoadedModel, model: str, data: DataSpec | None, kv_mode: str,
                  who: str = "policy") -> Policy:
    """A point's policy, checked before any work: the split it may be scored on, the KV mode it runs under, and a
    controller's backbone."""
    p.check_held_out(data)
    policy = p.build(lm.num_layers, lm, data, draft=who == "draft")
    p.check_kv_mode(resolve_kv_mode(kv_mode, policy.kv_mode, f"{who} '{p.label}'"))
    if p.name == "controller":
        check_backbone(p.value, model)
    return policy


def nominal_cost(p: PolicySpec, num_layers: int) -> int:
    """The `cost` column: the nominal layers per token, 0 until measured for learned and threshold policies."""
    cost = p.cost(num_layers)
    return int(cost) if cost is not None else 0


def part_key(fields: dict, model: str, p: PolicySpec) -> str:
    """A cached part's key: the fields that change its rows, plus what the names alone do not say: a local model
    folder written again (a new fine-tuning run) is another model, and a checkpoint folder retrained another policy."""
    fields = dict(fields)
    fingerprint = model_fingerprint(model)
    if fingerprint:
        fields["model_fingerprint"] = fingerprint
    if p.strategy.needs_checkpoint:
        from skipbench.store.checkpoints import checkpoint_fingerprint

        fields["checkpoint"] = checkpoint_fingerprint(p.value)
        if p.strategy.own_model:  # a model folder as the checkpoint (layerskip: DIR or a fine-tuning's DIR/best)
            fields["checkpoint_model"] = [model_fingerprint(p.value), model_fingerprint(str(Path(p.value) / "best"))]
    if p.strategy.calibrates_with == "skip" and p.opt("skip"):  # a threshold chosen by a search that may change
        from skipbench.policies.calibration import THRESHOLD_SEARCH

        fields["threshold_search"] = THRESHOLD_SEARCH
    if p.strategy.own_model and isinstance(p.strategy.build, str):  # its model changes with its module's VERSION
        import importlib

        fields["strategy_version"] = getattr(importlib.import_module(p.strategy.build.partition(":")[0]), "VERSION", None)
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def part_path(cfg: EvalConfig, p: PolicySpec) -> Path:
    """Where a point's part lives: `.skipbench-parts/` beside the output, keyed by everything that changes
    its rows (not the costs, the output name or the batch size), so reruns and other sweeps reuse it.
    The full-depth point does not depend on the policy being swept, so every sweep shares it."""
    drafted = isinstance(p, Drafted)
    ident = replace(cfg, policies=(p.draft,) if drafted else (p,), out="", resume=True, batch_size=None)
    fields = config_dict(ident)
    fields.pop("impl")  # like the batch size, it moves floats' last bits only (and keeps the keys parts had before)
    fields.pop("matched_random")  # adds points; changes none
    if drafted:
        fields["speculative"] = True
    else:  # a policy point does not depend on a draft (and keeps the key it had before drafts existed)
        fields.pop("draft")
        fields.pop("speculation")
    key = part_key(fields, cfg.model, p.draft if drafted else p)
    tag = "" if drafted else p.arg if p.strategy.sweeps else str(len(p.value.split(","))) if p.strategy.arg == "layers" else ""
    return Path(cfg.out).parent / ".skipbench-parts" / f"{p.name}{'-' + tag if tag else ''}-{key}.parquet"


def run_point(lm, items, encoded, cfg: EvalConfig, p: PolicySpec, policy, batch_size: int,
              progress: Callable | None) -> pd.DataFrame:
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    rows = []
    vocab = (frequent_tokens(lm, p.speculation.draft_vocab, cfg.data)
             if isinstance(p, Drafted) and p.speculation.draft_vocab else None)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        keys, batch = [items[i].key for i in idx], [encoded[i] for i in idx]
        if isinstance(p, Drafted):
            gen = speculate(lm, batch, policy, p.speculation, cfg.max_new_tokens, cfg.kv_mode, row_keys=keys,
                            impl=cfg.impl, vocab=vocab)
        else:
            gen = generate(lm, batch, policy, cfg.max_new_tokens, cfg.kv_mode, row_keys=keys, prompt_depth=cfg.prompt_depth,
                           impl=cfg.impl)
        origin = policy.origin  # a collapsed model's layers, as the loaded model's (LaCo)
        for r, i in enumerate(idx):
            layers = gen.layers[r] if origin is None else [[origin[j] for j in rec] for rec in gen.layers[r]]
            row = (_row(lm, items[i], p, gen.tokens[r], layers, len(encoded[i]))
                   | {"kv_mode": gen.kv_mode, "attention_mean": gen.attention_mean(r)}
                   | (policy.row_record(r) if hasattr(policy, "row_record") else {})
                   | (policy.point_record() if hasattr(policy, "point_record") else {}))
            if gen.speculation is not None:  # what drafting did for this item; its layers: every pass it cost
                stats = gen.speculation.row(r)
                row |= {"draft_spec": p.draft.label, "speculate": p.speculation.label, **stats,
                        "layers_mean": stats["layer_passes"] / len(gen.layers[r]) if gen.layers[r] else math.nan,
                        "attention_mean": math.nan}  # drafting's attention passes are not counted
            rows.append(row)
        if progress:
            progress(len(idx))
    return pd.DataFrame(rows)


def finish_part(df: pd.DataFrame, p: PolicySpec, num_layers: int) -> pd.DataFrame:
    """A point's rows in item order; a policy without a nominal cost (learned, thresholds) gets its measured mean
    executed layers, rounded (over all items, so after the ranks' shares are joined)."""
    df = df.sort_values("item_id", kind="stable").reset_index(drop=True)
    if p.cost(num_layers) is None:
        df["cost"] = int(round(df["layers_mean"].mean()))
    return df


def _row(lm, item: Item, p: PolicySpec, tokens: list[int], layers: list[list[int]], prompt_tokens: int) -> dict:
    output = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    use = np.zeros(lm.num_layers, dtype=np.int64)
    for rec in layers:
        use[rec] += 1
    return {
        # `random-token` rows keep the policy name `random` older outputs had (policy_spec says which)
        "item_id": item.item_id, "subtask": item.subtask, "policy": "random" if p.name == "random-token" else p.name,
        "cost": nominal_cost(p, lm.num_layers),
        "policy_spec": p.label, "policy_seed": p.seed, "policy_gate": p.gate,
        "layers_mean": float(np.mean([len(r) for r in layers])) if layers else math.nan,
        "layers_per_token": [len(r) for r in layers],  # realized layers of each generated token that ran the model
        "layer_use": use.tolist(), "skipped_tokens": len(layers),
        "prompt_tokens": prompt_tokens, "new_tokens": len(tokens), "output": output, "reference": item.reference,
        "reference_tokens": len(lm.tokenizer(item.reference, add_special_tokens=False)["input_ids"]),
        "rougeL": rouge_l(output, item.reference), "exact_match": exact_match(item.subtask, output, item.answer),
    }


SPECULATION_DTYPES = {"speculation_k": "Int64", "speculation_adaptive": "boolean", "speculation_threshold": "Float64",
                      "speculation_k_max": "Int64", "speculation_draft_vocab": "Int64", "draft_spec": "string", "speculate": "string", "drafted": "Int64",
                      "accepted": "Int64", "rejections": "Int64", "rounds": "Int64", "acceptance_rate": "Float64",
                      "acceptance_prob": "Float64", "accepted_per_round": "Float64", "layer_passes": "Int64",
                      "matches_full": "boolean"}


def speculation_columns(cfg: EvalConfig) -> dict:
    """The speculation settings as columns (null on every row but the speculative point's, `--draft`)."""
    from skipbench.store.results import flat_config

    return {k: v for k, v in flat_config(cfg).items() if k in SPECULATION_DTYPES}


def run(cfg: EvalConfig, progress: Callable | None = None, on_part: Callable | None = None,
        start: Callable | None = None, lm: LoadedModel | None = None) -> EvalResult:
    """progress(n) after each batch; on_part(point) after each finished part; start(total) once.
    `lm`: an already loaded model (sweeps reuse one)."""
    out = check_out_path(cfg.out)
    d = distributed.current()
    if cfg.matched_random and (d.enabled or d.tp_world > 1):
        raise SkipbenchError("--matched-random reads each learned point's realized layers: run it in one process "
                             "(without torchrun)")
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
    built = points(cfg, lm)
    pts = list(built)
    items = load_items(cfg.data)
    for p in pts:
        if p.strategy.kind == "learned":
            from skipbench.data.heldout import check_held_out

            check_held_out(items, p.value)
    encoded, truncated = encode_items(lm, items, cfg.max_prompt_tokens)
    batch_size = cfg.batch_size or default_batch_size(lm.device)
    if batch_size < 1:
        raise SkipbenchError(f"--batch-size must be >= 1, got {batch_size}")
    mine = d.shard([it.item_id for it in items])  # every item in a single process
    todo = [p for p in pts if not (cfg.resume and reusable(part_path(cfg, p)))]  # a damaged part: a note, then again
    mine_todo = [p for p in todo if not (d.enabled and cfg.resume and reusable(d.part(part_path(cfg, p)), "cached share"))]
    reused_shares = int(d.sum([len(todo) - len(mine_todo)])[0])
    total = len(mine_todo) * len(mine)
    if start:
        start(total)
    def run_part(p) -> None:
        df = run_point(lm, [items[i] for i in mine], [encoded[i] for i in mine], cfg, p, built[p], batch_size, progress)
        write_atomic(df if d.enabled else finish_part(df, p, lm.num_layers), d.part(part_path(cfg, p)), {})
        if on_part:
            on_part(p)

    for p in mine_todo:
        run_part(p)
    matched: dict = {}  # the control's spec -> the learned points it is matched to
    controls_run = 0
    if cfg.matched_random:
        for p in [p for p in pts if matches(p)]:
            part = readers.table(part_path(cfg, p), "cached part")
            realized = realized_compute(part, p)
            q = matched_spec(p, realized, lm.num_layers, built[p].kv_mode)  # MindSkip's checkpoint decides its mode
            if q is None:
                note(f"--matched-random: {p.label} ran {realized:.2f} {MATCHED_UNIT.get(p.name, 'layers')} per "
                     f"token, which no random plan of 2 .. {lm.num_layers - 1} matches; no control for it")
                continue
            matched.setdefault(q, []).append(p.label)
            if q in built:  # the same control serves two points (or was asked for): run once
                continue
            built[q] = build_checked(q, lm, cfg.model, cfg.data, cfg.kv_mode)
            pts.append(q)
            if not (cfg.resume and reusable(part_path(cfg, q))):
                total += len(mine)  # the control's items join the progress total
                if start:
                    start(total)
                run_part(q)
                controls_run += 1

    def write() -> EvalResult:  # rank 0: each point's shares joined into its part, then the parts into the result
        for p in todo if d.enabled else ():
            write_atomic(finish_part(d.read_parts(part_path(cfg, p)), p, lm.num_layers), part_path(cfg, p), {})
            d.remove_parts(part_path(cfg, p))
        rows = tidy(_merge(cfg, pts, items, matched), cfg, skip=("out", "resume", "policies", "draft", "speculation"), lm=lm,
                    model=cfg.model, seed=cfg.seed, batch_size=batch_size, **speculation_columns(cfg))
        speculative = rows["policy"] == "speculative"
        for column, dtype in SPECULATION_DTYPES.items():  # only the speculative point's rows speculated: null elsewhere
            if column not in rows:
                rows[column] = None
            rows[column] = rows[column].where(speculative, None).astype(dtype)
        meta = manifest(cfg, lm=lm, num_layers=lm.num_layers, items=len(items), prompt_truncations=truncated,
                        layers_convention=LAYERS_CONVENTION, batch_size=batch_size, ranks=d.world,
                        points=[f"{p.name}:{nominal_cost(p, lm.num_layers)}" if p.strategy.arg == "none" else p.label
                                for p in pts])
        return result(rows, write_atomic(rows, out, meta))

    def result(rows: pd.DataFrame, path: Path) -> EvalResult:
        from skipbench.analysis.spread import calibration_spread, rankings, references

        summary, reused = summarise(rows), len(pts) - len(todo) - controls_run - len(matched)
        shares = f", {reused_shares} rank share(s) of a failed run reused" if reused_shares else ""
        spread = calibration_spread(rows)
        shown = [Shown(f"evaluate · {cfg.model} · {cfg.data.name}", summary)]
        if len(spread):
            shown.append(Shown("calibration spread: each calibrated point's mean full_rougeL over its samples",
                               spread.drop(columns=["dataset", "split"], errors="ignore")))
        return EvalResult(rows=rows, summary=summary, path=path, reused_parts=reused, reused_shares=reused_shares,
                          shown=shown, said=[*rankings(spread, reference=references(rows, spread), rows=rows),
                                             f"wrote {path} ({len(rows)} rows; {reused} finished part(s) reused{shares})"])

    return d.on_main(write, lambda: result(readers.table(out), out))


# learned strategies and their random control: per sequence (a prompt-level router assigns each item one static
# plan) or per token; MindSkip skips attention only (its layers per token are L), so its control draws attention
# sub-layers at random (every MLP runs), matched to the attention sub-layers it realized
MATCHED = {"controller": "random-token", "flexidepth": "random-token", "route": "random", "mindskip": "random-attention"}
MATCHED_UNIT = {"mindskip": "attention sub-layers"}  # what is matched, where not layers


def realized_compute(part: pd.DataFrame, p) -> float:
    """The compute a point spent, pooled over every item's generated tokens: layers per token, or attention
    sub-layers per token for an attention-only router (MATCHED_UNIT)."""
    from skipbench.analysis.metrics import pooled_per_token

    return pooled_per_token(part, attention=p.name in MATCHED_UNIT)


def matches(p) -> bool:
    """A point that gets a matched random control (MATCHED)."""
    return not isinstance(p, Drafted) and p.name in MATCHED


def matched_spec(p: PolicySpec, realized: float, num_layers: int, kv_mode: str | None = None) -> PolicySpec | None:
    """The random plan of the same kind (per token, or per sequence for a prompt-level router; attention
    sub-layers for MindSkip, under the KV mode the point ran) with C = ceil(realized) and `-o mean=realized`
    (rounded to 1e-4): per draw, C or C - 1 random layers, the same expected layers (or attention sub-layers) per
    token as the learned point's pooled mean; None when that is every layer or under 2."""
    import math

    mean = round(realized, 4)
    if not 2 <= mean < num_layers:
        return None
    cost = math.ceil(mean)
    options = (("mean", f"{mean:g}"),) if mean != cost else ()
    if MATCHED[p.name] == "random-attention" and kv_mode is not None:  # the KV mode MindSkip requires
        options = tuple(sorted(options + (("kv", kv_mode),)))
    return PolicySpec(name=MATCHED[p.name], arg=str(cost), seed=p.seed, first_layer=p.first_layer, options=options)


def _merge(cfg: EvalConfig, pts: list[PolicySpec], items: list[Item], matched: dict | None = None) -> pd.DataFrame:
    parts = {p: readers.table(part_path(cfg, p), "cached part", "rerun to compute it again", checked=True) for p in pts}
    ids = {it.item_id for it in items}
    full = parts[pts[0]].set_index("item_id")["output"]
    frames = []
    for p, df in parts.items():
        df = df[df["item_id"].isin(ids)].copy()
        df["full_rougeL"] = [rouge_l(o, full[i]) for o, i in zip(df["output"], df["item_id"])]
        if isinstance(p, Drafted):  # lossless: the same text as full depth's (greedy; sampling differs by design)
            df["matches_full"] = [o == full[i] for o, i in zip(df["output"], df["item_id"])]
        # the calibration sample a point's plan came from (-o calibration-seed; None where none is drawn), and the
        # point it is a sample of (analysis/spread.py): computed here, so parts cached before keep their keys
        sampled = not isinstance(p, Drafted) and samples_calibration(p)
        df["calibration_seed"] = pd.array([p.opt(CALIBRATION_SEED) if sampled else None] * len(df), dtype="Int64")
        df["calibration_point"] = calibration_point(p) if sampled else p.label
        # a --matched-random control: the learned point it matches
        to = (matched or {}).get(p)
        df["matched_to"] = pd.array([";".join(to) if to else None] * len(df), dtype="string")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    drafted = {"matches_full": ("matches_full", "mean"), "acceptance_rate": ("acceptance_rate", "mean")}
    return (rows.groupby(["policy", "cost", "policy_spec"], sort=False)
            .agg(items=("item_id", "count"), layers_mean=("layers_mean", "mean"), rougeL=("rougeL", "mean"),
                 full_rougeL=("full_rougeL", "mean"), exact_match=("exact_match", "mean"), new_tokens=("new_tokens", "mean"),
                 **{k: v for k, v in drafted.items() if k in rows})
            .reset_index())
