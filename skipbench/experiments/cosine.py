"""`skipbench cosine`: hidden-state fidelity of early exit vs uniform vs random skipping (Glavas et al. Sec. 3.1).

For each item the full model's greedy response (or the reference, `--teacher reference`) is fed back
teacher-forced, the prompt at full depth. Every strategy and cost then gives, per response token:

* cos_final      cosine of the last layer's output state with the full model's;
* cos_layerwise  mean over layers 1..L-1 of the cosine of the state entering each layer (what that layer
                 caches K/V from) with the full model's — the KV-cache propagation error;
* kl_next        KL(p_full || p_strategy) of the next-token distributions;
* top1_agree     whether both pick the same next token.

Convention: raw residual-stream states everywhere (no norm applied), named in the manifest. The prompt
is run once per batch and its cache cloned for every strategy, so only response tokens are recomputed,
and static plans skip the layers they skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
from skipbench.store import distributed
from skipbench.store import readers
from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_items
from skipbench.evaluation.fidelity import CONVENTION, MEASURES, compare_to_full
from skipbench.analysis.stats import t_interval
from skipbench.engine import generate, resolve_kv_mode
from skipbench.engine.decode import eos_ids
from skipbench.errors import SkipbenchError
from skipbench.policies import STRATEGIES as REGISTRY, PolicySpec
from skipbench.models import load_model
from skipbench.models.loading import default_batch_size
from skipbench.store.results import Shown, Written, check_out_path, companion, manifest, run_id, tidy, write_tables

STRATEGIES = ("early-exit", "uniform", "random")
CI = "95% t-interval over per-item means (items are the unit)"


@dataclass(frozen=True, kw_only=True)
class CosineConfig:
    model: str
    data: DataSpec
    costs: tuple[int, ...] = ()  # empty: about L/5, L/3, L/2, 2L/3, 4L/5
    strategies: tuple[str, ...] = STRATEGIES  # names (each at every cost) or points such as uniform:15
    num_seeds: int = 3  # random skipping is repeated with seeds 0..num_seeds-1
    per_token: bool = False
    teacher: str = "full"  # full | reference
    max_new_tokens: int = 64
    max_prompt_tokens: int = 1024
    batch_size: int | None = None
    kv_mode: str = "auto"  # the strategies here require no mode: auto is fill
    policy_options: tuple[tuple[str, str], ...] = ()  # --policy-option NAME=VALUE, for the strategies that take NAME
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""


@dataclass(kw_only=True)
class CosineResult(Written):
    """rows: one per (item, pass, token); tables["agg"]: per (strategy, point) with intervals; files: agg, figure."""

    @property
    def agg(self) -> pd.DataFrame:
        return self.tables["agg"]

    def __post_init__(self) -> None:  # what a person sees: the means per point, and where the files went
        first = self.rows.iloc[0] if len(self.rows) else {}
        columns = ["strategy", "point", "layers", "items", "cos_final_normed", "cos_final", "cos_layerwise", "kl_next",
                   "top1_agree"]
        self.shown = [Shown(f"cosine · {first.get('model', '')} · {first.get('dataset', '')} (means; 95% CIs in the "
                            "-agg file)", self.agg[[c for c in columns if c in self.agg]])]
        self.said = [f"wrote {self.path}, {self.files['agg'].name}, {self.files['figure'].name}"]


def strategies(policy: list[str]) -> tuple[str, ...]:
    """`--policy` texts as the strategies compared: names (each at every cost) or points (uniform:10,15)."""
    from skipbench.policies import parse_policies

    return tuple(s.name + (f":{s.arg}" if s.arg else "") for s in parse_policies(policy))


def default_costs(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(num_layers * f)) for f in (0.2, 0.35, 0.5, 0.65, 0.8)}))


def passes(cfg: CosineConfig, lm) -> dict[tuple[str, str, int], object]:
    """Every pass, (strategy, point, seed) -> what runs it (built once, a plugin's checks up front too): any
    registered strategy whose argument is a cost (plugins too), at `--costs` or its own point (`uniform:15`), or a
    threshold at its own point (`confidence:0.9`, costed by the layers its tokens ran); strategies that draw at
    random are repeated with seeds 0..seeds-1."""
    out = {}
    for text in cfg.strategies:
        strategy, _, arg = text.partition(":")
        entry = REGISTRY.get(strategy)
        if entry.arg not in ("cost", "threshold") or (entry.arg == "threshold" and not arg):
            takes = [n for n in REGISTRY.names() if REGISTRY.get(n).arg in ("cost", "threshold")]
            raise SkipbenchError(f"cosine compares strategies that take a cost, or a threshold given as NAME:T; "
                                 f"'{text}' takes {entry.arg}. Known: {', '.join(takes)}")
        # a dynamic plan at a cost draws its layers at random (random, random-token); a threshold decides (confidence)
        random_draws = entry.draws
        for point in [arg] if arg else map(str, cfg.costs or default_costs(lm.num_layers)):
            for seed in range(cfg.num_seeds if random_draws else 1):
                out[(strategy, point, seed)] = _variant(_spec(cfg, strategy, point, seed), lm, cfg.data)
    unused = [n for n, _ in cfg.policy_options
              if not any(REGISTRY.get(t.partition(":")[0]).option(n) for t in cfg.strategies)]
    if unused:
        raise SkipbenchError(f"--policy-option {', '.join(unused)}: no strategy given takes it")
    return out


def _spec(cfg: CosineConfig, strategy: str, point: str, seed: int) -> PolicySpec:
    name = "random-token" if strategy == "random" and cfg.per_token else strategy
    own = tuple((k, v) for k, v in cfg.policy_options if REGISTRY.get(name).option(k) is not None)
    return PolicySpec(name=name, arg=point, seed=seed, options=own)


def _variant(spec: PolicySpec, lm, data):
    """A static policy that runs a prefix of the layers (early exit) is read off the full pass; others are run."""
    spec.check_held_out(data)
    if spec.strategy.own_model:
        raise SkipbenchError(f"cosine compares states of one model's layers; '{spec.label}' runs a model of its own")
    policy = spec.build(lm.num_layers, lm, data)
    plan = policy.executed_layers() if policy.static else None
    if plan is not None and plan == list(range(len(plan))):
        return ("prefix", len(plan))
    return policy


def teacher_responses(lm, items, encoded, cfg: CosineConfig, batch_size: int) -> list[list[int]]:
    if cfg.teacher == "reference":
        return [lm.tokenizer(it.reference, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens] for it in items]
    if cfg.teacher != "full":
        raise SkipbenchError(f"--teacher must be 'full' or 'reference', got '{cfg.teacher}'")
    stops = eos_ids(lm)
    out: list[list[int]] = [[] for _ in items]
    for start in range(0, len(items), batch_size):
        idx = list(range(start, min(start + batch_size, len(items))))
        gen = generate(lm, [encoded[i] for i in idx], None, cfg.max_new_tokens)
        for r, i in enumerate(idx):
            out[i] = [t for t in gen.tokens[r] if t not in stops]
    return out


def run_batch(lm, prompts, responses, keys, plan: dict, cfg: CosineConfig) -> list[dict]:
    variants = list(plan.items())
    rows = []
    kv_mode = resolve_kv_mode(cfg.kv_mode, None)
    for (strategy, point, seed), m in compare_to_full(lm, prompts, responses, keys, variants, kv_mode,
                                                      cfg.max_new_tokens):
        for r, toks in enumerate(responses):
            for t in range(len(toks)):
                rows.append({"row": r, "token": t, "strategy": strategy, "point": point, "seed": seed,
                             **{k: float(m[k][r, t]) for k in (*MEASURES, "layers")}})
    return rows


def item_rows(lm, items, encoded, plan, cfg: CosineConfig, batch_size: int, progress: Callable | None) -> pd.DataFrame:
    """One row per (item, strategy, cost, seed, response token), in item order then plan order."""
    responses = []
    for s in range(0, len(items), batch_size):  # teacher responses, then the teacher-forced passes
        responses += teacher_responses(lm, items[s : s + batch_size], encoded[s : s + batch_size], cfg, batch_size)
        if progress:
            progress(len(items[s : s + batch_size]))
    rows = []
    for s in range(0, len(items), batch_size):
        idx = [i for i in range(s, min(s + batch_size, len(items))) if responses[i]]
        if idx:
            batch_rows = run_batch(lm, [encoded[i] for i in idx], [responses[i] for i in idx],
                                   [items[i].key for i in idx], plan, cfg)
            for row in batch_rows:
                row["item_id"] = items[idx[row.pop("row")]].item_id
            rows += batch_rows
        if progress:
            progress(min(batch_size, len(items) - s))
    columns = ["token", "strategy", "point", "seed", *MEASURES, "layers", "item_id"]
    return pd.DataFrame(rows, columns=columns)


def run(cfg: CosineConfig, progress: Callable | None = None, start: Callable | None = None) -> CosineResult:
    out = check_out_path(cfg.out)
    d = distributed.current()
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    plan = passes(cfg, lm)
    items = load_items(cfg.data)
    encoded, truncated = encode_items(lm, items, cfg.max_prompt_tokens)
    batch_size = cfg.batch_size or default_batch_size(lm.device)
    mine = d.shard([it.item_id for it in items])  # every item in a single process
    whole = out.parent / ".skipbench-parts" / f"cosine-{run_id(cfg)}.parquet"  # never written: named in shares

    def compute() -> pd.DataFrame:
        if start:
            start(2 * len(mine))
        return item_rows(lm, [items[i] for i in mine], [encoded[i] for i in mine], plan, cfg, batch_size, progress)

    def write(df: pd.DataFrame) -> CosineResult:
        # canonical order (items as listed, then the plan, then tokens): the same with any number of ranks
        order = {it.item_id: n for n, it in enumerate(items)}
        variant = {v: n for n, v in enumerate(plan)}
        df = (df.assign(_i=df["item_id"].map(order), _v=[variant[v] for v in zip(df["strategy"], df["point"], df["seed"])])
              .sort_values(["_i", "_v", "token"], kind="stable").drop(columns=["_i", "_v"]).reset_index(drop=True))
        if df.empty:
            raise SkipbenchError("no item produced a response to compare on")
        # the cost: a cost strategy's own; a threshold's, the mean layers per token its pass ran, rounded
        mean = df.groupby(["strategy", "point"])["layers"].transform("mean").round().astype(int)
        own = df["strategy"].map(lambda s: REGISTRY.get(s).arg == "cost")
        df.insert(df.columns.get_loc("point"), "cost", mean.where(~own, pd.to_numeric(df["point"], errors="coerce")).astype(int))
        df["subtask"] = df["item_id"].map({it.item_id: it.subtask for it in items})
        df = tidy(df, cfg, lm=lm, model=cfg.model, num_layers=lm.num_layers, batch_size=batch_size,
                  kv_mode=resolve_kv_mode(cfg.kv_mode, None))
        agg = aggregate(df)
        agg.insert(0, "run_id", df["run_id"].iloc[0])
        meta = manifest(cfg, lm=lm, hidden_state_convention=CONVENTION, confidence_interval=CI,
                        num_layers=lm.num_layers, items=len(items), prompt_truncations=truncated, ranks=d.world)
        from skipbench.analysis.plots import cosine_figure

        out.parent.mkdir(parents=True, exist_ok=True)
        figure = cosine_figure(agg, lm.num_layers, out.with_suffix(".png"), cfg.model)
        paths = write_tables(df, out, meta, agg=agg)
        if d.enabled:
            d.remove_parts(whole)
        return CosineResult(rows=df, path=paths["rows"], tables={"agg": agg}, files={"agg": paths["agg"], "figure": figure})

    def read() -> CosineResult:
        agg = companion(out, "agg")
        return CosineResult(rows=readers.table(out), path=out, tables={"agg": readers.table(agg)},
                            files={"agg": agg, "figure": out.with_suffix(".png")})

    mine_rows = d.share(whole, compute)
    return d.on_main(lambda: write(d.joined(whole, mine_rows)), read)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, point): mean and 95% CI of each measure over per-item means (seeds pooled per item), with the
    cost and the mean layers per token the pass ran."""
    per_item = df.groupby(["strategy", "point", "cost", "item_id"])[[*MEASURES, "layers"]].mean().reset_index()
    rows = []
    for (strategy, point, cost), g in per_item.groupby(["strategy", "point", "cost"]):
        row = {"strategy": strategy, "point": point, "cost": int(cost), "layers": float(g["layers"].mean()),
               "items": len(g)}
        for m in MEASURES:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = t_interval(g[m].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["strategy", "layers"], kind="stable").reset_index(drop=True)
