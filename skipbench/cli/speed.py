"""Commands that measure wall-clock speed: bench (skipping and self-speculative decoding against full depth) and
bench-oracle (the knapsack solver against HiGHS)."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.store.paths import default_out
from skipbench.cli.options import (
    POLICIES, DeviceOpt, DraftThreshold, DtypeOpt, KvMode, KvOpt, Model, OracleMetric, PolicyOptions, Device, Dtype,
    drafts, for_policies, int_list, plain, specs, speculation, speculations, split_auto,
)


def bench(
    model: str = Model,
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable (default: full and uniform at half the "
                                               "depth): " + POLICIES),
    batch_sizes: str = typer.Option("1,8", help="comma-separated batch sizes"),
    max_new_tokens: int = typer.Option(64, help="tokens generated per sequence (EOS does not stop a run)"),
    repeats: int = typer.Option(3, help="timed repeats per variant (medians are reported)"),
    warmup: int = typer.Option(1, help="untimed warm-up rounds"),
    kv_mode: KvMode = KvOpt,
    impl: str = typer.Option("auto", help="auto (per layer and step, the cheaper of the two by a measured cost "
                             "table), gather, mask; comma-separated, per-token policies run under each (both = "
                             "gather,mask; all = auto,gather,mask)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each static plan's whole pass (loop, gates, cache writes) into graphs; per-token policies run eagerly"),
    lockstep: bool = typer.Option(True, help="skipbench's variants decode together, one step each in turn, so a "
                                  "drift of the machine's speed hits all alike (--no-lockstep: one run after another)"),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="measure --impl auto's layer cost tables again "
                                     "(they are kept in the cache once measured)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    seed: int = typer.Option(0, help="seed of random policies"),
    out: Optional[str] = typer.Option(None, help="parquet of per-repeat timings (manifest beside it)"),
    policy_option: Optional[list[str]] = PolicyOptions,
    draft: Optional[list[str]] = typer.Option(None, help="self-speculative decoding: draft policies (specs, repeatable), "
                                              "each verified by the full model, or 'auto' (search a draft layer set "
                                              "for this model and machine)"),
    speculate: str = typer.Option("4", help="--draft: draft tokens per round, comma-separated (one variant each), "
                                  "or 'auto'"),
    draft_threshold: float = DraftThreshold,
    draft_vocab: str = typer.Option("0", help="--draft: the draft head's vocabulary, the N most frequent tokens of the "
                                    "text suite's train split (FR-Spec), comma-separated (one variant each; 0: all)"),
) -> None:
    """Wall-clock speed of skipping, side by side in one process: prefill and decode tokens/s, step latency,
    memory, realized vs ideal speedup; model.generate as the baseline; removed-layer models as the bound;
    self-speculative decoding with --draft (acceptance, time shares, realized vs predicted speedup).

    Example: skipbench bench --policy full,uniform:15,uniform:8,random-token:22 --batch-sizes 1,8 --impl all
    Example: skipbench bench --policy full --draft early-exit:8,uniform:20 --speculate 2,4,6 --batch-sizes 1,8
    """
    from skipbench.experiments.bench import BenchConfig, run

    draft_specs, search = drafts(draft, seed, policy_option)
    own = for_policies(policy_option, specs(policy, seed=seed) if policy else [], draft or [], seed)
    cfg = BenchConfig(model=model, policies=tuple(specs(policy, seed=seed, policy_options=own)) if policy else (),
                      batch_sizes=int_list(batch_sizes, "--batch-sizes"), max_new_tokens=max_new_tokens, repeats=repeats,
                      warmup=warmup, kv_mode=kv_mode, impl=impl, compile=compile, lockstep=lockstep,
                      recalibrate=recalibrate, device=device, dtype=dtype, seed=seed, out=out, drafts=draft_specs,
                      draft_search=search, speculations=speculations(speculate, draft_threshold, draft_vocab))
    if search:
        display.say("[dim]searching a draft layer set (calibration on the text suite's train split)...[/dim]")
    with display.Bar("bench") as bar:
        display.result(run(cfg, progress=bar.advance, start=bar.start))


def bench_oracle(
    items: int = typer.Option(7800, min=1, help="items (the paper's Alpaca test size)"),
    costs: str = typer.Option("4,8,12,24", help="the configurations' costs (layers per token), comma-separated"),
    metric: OracleMetric = typer.Option(OracleMetric.rouge, callback=plain, help="rouge: continuous; binary: 0/1, tie-heavy"),
    big_items: int = typer.Option(1_000_000, min=0, help="a large instance run by the oracle alone (0 to skip)"),
    seed: int = typer.Option(0, help="seed of the synthetic instance"),
) -> None:
    """Time the exact oracle against scipy's HiGHS MILP on the same instance (one process).

    Example: skipbench bench-oracle --items 7800 --costs 4,8,12,24
    """
    from skipbench.experiments.bench_knapsack import KnapsackBenchConfig, run

    display.result(run(KnapsackBenchConfig(items=items, costs=int_list(costs, "--costs"), metric=metric,
                                           big_items=big_items, seed=seed)))


def track(
    model: str = Model,
    dataset: str = typer.Option("spec-bench", "--dataset", "-d", help="the prompts: spec-bench (Spec-Bench's 480, "
                                "shipped), spec-bench/CATEGORY, or any dataset"),
    per_category: int = typer.Option(1, help="prompts of each category taken in order (0: every prompt)"),
    draft: Optional[list[str]] = typer.Option(None, help="the methods (draft specs, repeatable; 'auto': the searched "
                                              "layer set); default: early exit and CLaSp at 3/4 of the depth, DEL, "
                                              "KnapSpec and the searched layer set"),
    speculate: str = typer.Option("4", help="draft tokens per round, or 'auto'"),
    draft_threshold: float = DraftThreshold,
    max_new_tokens: int = typer.Option(64, help="tokens generated per prompt at most (EOS stops it)"),
    max_prompt_tokens: int = typer.Option(1024, help="longer prompts are cut to this many tokens"),
    warmup: int = typer.Option(1, help="prompts run untimed first by every method"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    seed: int = typer.Option(0, help="seed of random drafts"),
    out: Optional[str] = typer.Option(None, help="parquet of per-prompt rows, with its manifest, -agg table and figure "
                                      "(default results/track-<model>-<dataset>.parquet)"),
    policy_option: Optional[list[str]] = PolicyOptions,
) -> None:
    """The self-speculative track: every draft method on the same prompts (batch 1, greedy), timed against full
    depth with Spec-Bench's two figures (mean speedup, mean tokens per round) per category, and each prompt's output
    checked against full depth's (a method that differs is flagged, not dropped).

    Example: skipbench track --per-category 2 --draft early-exit:22,clasp:22 --draft auto --out results/track.parquet
    """
    from skipbench.experiments.track import TrackConfig, run

    given, search = split_auto(draft)
    specs_, _ = drafts(given, seed, policy_option) if given else ((), False)
    for_policies(policy_option, [], given, seed)
    cfg = TrackConfig(model=model, dataset=dataset, per_category=per_category, drafts=tuple(specs_) if draft else None,
                      draft_search=not draft or search,
                      speculation=speculation(speculate, draft_threshold), max_new_tokens=max_new_tokens,
                      max_prompt_tokens=max_prompt_tokens, warmup=warmup, device=device, dtype=dtype, seed=seed,
                      out=out or default_out("track", model, dataset))
    with display.Bar("track") as bar:
        display.result(run(cfg, progress=bar.advance, start=bar.start))


COMMANDS = {"bench": bench, "bench-oracle": bench_oracle, "track": track}
