"""Commands that measure what skipping costs in quality: generate, evaluate, cosine."""

from __future__ import annotations

import json
from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.options import (
    POLICIES, DatasetOpt, DeviceOpt, Draft, DraftThreshold, DraftVocab, DtypeOpt, Gate, Impl, KvMode, KvOpt, Model, PolicyOptions,
    PromptDepth, Speculate, Teacher, Device, Dtype, GateMode, draft as draft_spec, for_policies, ints, one_spec, plain, specs,
    speculation, with_budget,
)
from skipbench.store.paths import default_out


def generate(
    prompt: str = typer.Option(..., help="the user instruction (the chat template is applied when the model has one)"),
    model: str = Model,
    policy: str = typer.Option("full", help=POLICIES),
    cost: Optional[int] = typer.Option(None, "--costs", help="layers executed per generated token, for a policy given "
                                       "without its argument (--policy uniform --costs 15 is uniform:15)"),
    exit_layer: Optional[int] = typer.Option(None, help="early-exit: number of layers run before the exit"),
    keep: Optional[str] = typer.Option(None, help="layers: comma-separated 0-based layer indices"),
    seed: int = typer.Option(0, help="seed of random skipping and of sampling"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw for every token"),
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate at most"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=plain,
                                             help="full: the prompt runs every layer; policy: the prompt is skipped too"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling: the smallest set of tokens with this much probability"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    policy_option: Optional[list[str]] = PolicyOptions,
    draft: Optional[str] = Draft,
    speculate: str = Speculate,
    draft_threshold: float = DraftThreshold,
    draft_vocab: int = DraftVocab,
) -> None:
    """Generate text under a layer-skipping policy, or at full depth with a skipping policy drafting (--draft).

    Example: skipbench generate --policy uniform:15 --prompt "Please calculate the sum of 99, 45 and 12."
    Example: skipbench generate --draft early-exit:10 --speculate 4 --prompt "..." --json
    """
    from skipbench.engine import Sampling
    from skipbench.experiments.generate import GenerateConfig, run, summary

    flags = dict(cost=cost, exit_layer=exit_layer, keep=keep, seed=seed, per_token=per_token, first_layer=first_layer)
    own = for_policies(policy_option, specs(policy, **flags), [draft], seed)
    cfg = GenerateConfig(
        prompt=prompt, model=model, policy=one_spec(policy, **flags, policy_options=own),
        max_new_tokens=max_new_tokens, kv_mode=kv_mode, prompt_depth=prompt_depth,
        sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed), device=device, dtype=dtype,
        draft=draft_spec(draft, seed, policy_option), speculation=speculation(speculate, draft_threshold, draft_vocab))
    record = run(cfg)
    typer.echo(json.dumps(record) if as_json else record["text"])
    if not as_json:
        display.say(f"[dim]{display.escape(summary(record))}[/dim]")


def evaluate(
    model: str = Model,
    dataset: str = DatasetOpt,
    split: str = typer.Option("all", help="all | train | validation | test (a seeded 70/15/15 split)"),
    limit: int = typer.Option(100, help="first N items of the split (0 = all)"),
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable, e.g. uniform:8,15,22 or "
                                               "early-exit:10,uniform:15 (default: uniform; " + POLICIES
                                               + "); a sweeping policy without an argument takes --costs"),
    costs: str = typer.Option("", help="comma-separated layer counts (default: L/4, L/2, 3L/4); full always runs too"),
    seed: int = typer.Option(0, help="seed of random skipping (the items do not depend on it: --data-seed)"),
    data_seed: int = typer.Option(0, help="seed of the dataset's 70/15/15 split (the items of --split)"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw per token"),
    max_new_tokens: int = typer.Option(96, help="tokens to generate per item at most"),
    max_prompt_tokens: int = typer.Option(1024, help="longer instructions are truncated (counted in the manifest)"),
    batch_size: int = typer.Option(0, min=0, help="sequences per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=plain, help="the prompt's depth"),
    impl: Impl = typer.Option(Impl.auto, callback=plain, help="partial layers at decode steps: auto (the cheaper "
                              "of gathered and dense, by a measured cost table), gather or mask; the rows agree but for "
                              "floats' last bits"),
    prompt_field: Optional[str] = typer.Option(None, help="column holding the prompt (files)"),
    reference_field: Optional[str] = typer.Option(None, help="column holding the reference (files)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/evaluate-<model>-<dataset>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (policy, cost) parts of an earlier run"),
    controller: Optional[str] = typer.Option(None, help="policy controller: folder written by 'controllers train'"),
    gate: GateMode = Gate,
    router: Optional[str] = typer.Option(None, help="policy flexidepth: folder written by 'flexidepth train'"),
    policy_option: Optional[list[str]] = PolicyOptions,
    budget: Optional[float] = typer.Option(None, help="policy route: the mean layers per token over the items "
                                           "(the same as -o budget=B)"),
    draft: Optional[str] = Draft,
    speculate: str = Speculate,
    draft_threshold: float = DraftThreshold,
    draft_vocab: int = DraftVocab,
    matched_random: bool = typer.Option(False, "--matched-random", help="after each learned point (controller, "
                                        "flexidepth, route, mindskip), a random point of the same realized mean "
                                        "layers (MindSkip: attention sub-layers) per token, for the report's "
                                        "comparison"),
    calibration_seeds: str = typer.Option("", help="run every calibrated point (block-influence, angular, laco, a "
                                          "router with -o skip) once per calibration sample, e.g. 0,1,2 (0: the "
                                          "split's first items; S: a seeded sample of the same size); the output "
                                          "adds each point's spread over its samples"),
) -> None:
    """Generate for every item under a policy at several costs; ROUGE-L, exact match and fidelity per item.
    With --draft, one more point: full depth's output by self-speculative decoding (acceptance columns,
    matches_full).

    Example: skipbench evaluate --dataset arith --policy uniform --costs 8,15,22,30 --limit 100
    Example: skipbench evaluate --dataset text --policy full --draft uniform:20 --speculate 4
    Example: skipbench evaluate --dataset text --split test --policy route:runs/route-text --budget 12
    Example: skipbench evaluate --dataset text --split test --policy block-influence:20,angular:20 --calibration-seeds 0,1,2
    """
    from skipbench.data import DataSpec
    from skipbench.evaluation.quality import EvalConfig, run
    from skipbench.policies.spec import with_calibration_seeds

    options = with_budget(policy_option, budget)
    flags = dict(costs=ints(costs, "--costs"), seed=seed, per_token=per_token, gate=gate,
                 checkpoint={"controller": controller, "flexidepth": router})
    own = for_policies(options, specs(policy or ["uniform"], **flags), [draft], seed)
    cfg = EvalConfig(
        model=model, data=DataSpec(name=dataset, split=split, limit=limit or None, seed=data_seed,
                                   prompt_field=prompt_field, reference_field=reference_field),
        policies=with_calibration_seeds(specs(policy or ["uniform"], **flags, policy_options=own),
                                        ints(calibration_seeds, "--calibration-seeds")),
        seed=seed, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size or None,
        kv_mode=kv_mode, prompt_depth=prompt_depth, impl=impl, device=device, dtype=dtype,
        out=out or default_out("evaluate", model, dataset), resume=resume,
        draft=draft_spec(draft, seed, options), speculation=speculation(speculate, draft_threshold, draft_vocab),
        matched_random=matched_random)
    with display.Bar("evaluate") as bar:
        display.result(run(cfg, progress=bar.advance, start=bar.start, on_part=lambda p: bar.point(p.label)))


def cosine(
    model: str = Model,
    dataset: str = DatasetOpt,
    split: str = typer.Option("all", help="all | train | validation | test (a seeded 70/15/15 split)"),
    limit: int = typer.Option(100, help="first N items (0 = all)"),
    costs: str = typer.Option("", help="comma-separated costs (default: about L/5, L/3, L/2, 2L/3, 4L/5)"),
    policy: Optional[list[str]] = typer.Option(None, help="strategies that take a cost, in the policy grammar, "
                                               "repeatable (default: early-exit,uniform,random): names run at every "
                                               "--costs value, points (uniform:10,15) at theirs; a threshold strategy "
                                               "at its points (confidence:0.9,0.95)"),
    num_seeds: int = typer.Option(3, help="random skipping is repeated with seeds 0..N-1"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw per token"),
    teacher: Teacher = typer.Option(Teacher.full, callback=plain, help="full: the full model's greedy response; "
                                    "reference: the item's reference (the authors teacher-force the labels)"),
    max_new_tokens: int = typer.Option(64, help="tokens of the teacher response compared at most"),
    max_prompt_tokens: int = typer.Option(1024, help="longer instructions are truncated (counted in the manifest)"),
    batch_size: int = typer.Option(0, min=0, help="sequences per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="detailed parquet (default results/cosine-<model>-<dataset>.parquet); "
                                      "-agg.parquet and .png beside it"),
    policy_option: Optional[list[str]] = PolicyOptions,
) -> None:
    """Hidden-state cosine similarity of early exit, uniform and random skipping vs the full model (Fig. 1a).

    Example: skipbench cosine --dataset text --costs 6,10,15,20,25 --limit 200
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.cosine import CosineConfig, run, strategies
    from skipbench.policies.spec import parse_policy_options

    cfg = CosineConfig(
        model=model, data=DataSpec(name=dataset, split=split, limit=limit or None), costs=ints(costs, "--costs"),
        strategies=strategies(policy or ["early-exit,uniform,random"]), num_seeds=num_seeds, per_token=per_token,
        teacher=teacher, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size or None, kv_mode=kv_mode, device=device, dtype=dtype,
        policy_options=tuple(sorted(parse_policy_options(policy_option).items())),
        out=out or default_out("cosine", model, dataset))
    with display.Bar("cosine") as bar:
        display.result(run(cfg, progress=bar.advance, start=bar.start))


COMMANDS = {"generate": generate, "evaluate": evaluate, "cosine": cosine}
