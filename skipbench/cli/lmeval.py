"""Commands on lm-evaluation-harness tasks: lm-eval (policy sweeps) and compare (methods at K skipped layers)."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.options import (
    POLICIES, DeviceOpt, DtypeOpt, Gate, KvMode, KvOpt, Model, PolicyOptions, PromptDepth, Device, Dtype, GateMode,
    int_list, ints, names, no_policy, plain, specs,
)
from skipbench.store.paths import default_out, slug


def lm_eval(
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks, groups or tags, or task YAML paths; shipped "
                              "offline: skipbench_choice, skipbench_arith, skipbench_text (its four subtasks)"),
    model: str = Model,
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable, e.g. uniform:15,22,30 (" + POLICIES
                                               + "); full always runs too"),
    limit: int = typer.Option(0, min=0, help="documents per task (0 = all)"),
    max_gen_toks: int = typer.Option(0, min=0, help="answer length in tokens of every generation task (lm-eval's "
                                     "--gen_kwargs max_gen_toks; 0: each task's own)"),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="few-shot examples (default: the task's)"),
    seed: int = typer.Option(0, help="seed of random skipping and of sampled generation (lm-eval keeps its own seeds)"),
    batch_size: int = typer.Option(0, min=0, help="requests per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=plain, help="the context's depth: full (first "
                                             "continuation token from the full-depth context) | policy"),
    chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template", help="wrap each prompt in the model's "
                                       "chat template (lm-eval's --apply_chat_template)"),
    max_length: int = typer.Option(0, min=0, help="context window in tokens (0: the model's positions)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/lmeval-<model>-<tasks>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (task, policy point) parts of an earlier run"),
    policy_option: Optional[list[str]] = PolicyOptions,
    gate: GateMode = Gate,
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
) -> None:
    """Policies on lm-evaluation-harness tasks through skipbench's engine: a row per task, metric and policy point,
    with each point's mean executed layers; lm-eval's results JSON per point; a figure of metric vs layers.

    Example: skipbench lm-eval --tasks skipbench_choice --policy early-exit:8,15,22 --policy uniform:8,15,22
    Example: skipbench lm-eval --tasks arc_easy,hellaswag --policy uniform:15,22,30 --limit 200
    """
    from skipbench.evaluation.lmeval_sweep import LmEvalConfig, run

    points = (specs(policy, seed=seed, policy_options=policy_option, gate=gate, first_layer=first_layer) if policy
              else no_policy(policy_option))
    asked = names([tasks])
    cfg = LmEvalConfig(
        model=model, tasks=asked, policies=tuple(points), limit=limit or None, max_gen_toks=max_gen_toks or None,
        num_fewshot=num_fewshot, batch_size=batch_size or None, kv_mode=kv_mode, prompt_depth=prompt_depth, chat_template=chat_template,
        max_length=max_length or None, seed=seed, device=device, dtype=dtype,
        out=out or default_out("lmeval", model, "_".join(slug(t) for t in asked)), resume=resume)
    with display.Bar("lm-eval") as bar:
        display.result(run(cfg, on_part=lambda task, p: bar.point(f"{task} · {p.label}")))


def compare(
    ctx: typer.Context,
    policy: Optional[list[str]] = typer.Option(None, help="the methods, comma-separated or repeated (default: shortgpt,"
                                               "laco): shortgpt (block-influence), laco, angular, uniform, early-exit, "
                                               "... (each set to L-K layers), flexidepth:DIR, mindskip:DIR (-o skip=K), "
                                               "layerskip:DIR (early exit after L-K layers of `finetune`'s model)"),
    skip: str = typer.Option("4,8", help="numbers of skipped layers K, comma-separated (compare counts the layers a "
                             "method skips, as the FlexiDepth talk does; other commands' --costs count those run)"),
    tasks: str = typer.Option("skipbench_choice,skipbench_text", help="lm-eval tasks, groups, tags or task YAMLs"),
    preset: Optional[str] = typer.Option(None, help="offline: the embedded model, skipbench_choice and skipbench_text "
                                         "with the chat template | paper: Llama-3-8B-Instruct on the talk's six "
                                         "benchmarks (a GPU machine with the hub); sets --model, --tasks, --skip and "
                                         "--chat-template unless they are given"),
    model: str = Model,
    limit: int = typer.Option(0, min=0, help="documents per task (0 = all)"),
    max_gen_toks: int = typer.Option(0, min=0, help="answer length in tokens of every generation task (lm-eval's "
                                     "--gen_kwargs max_gen_toks; 0: each task's own)"),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="few-shot examples (default: the task's)"),
    batch_size: int = typer.Option(0, min=0, help="requests per batch (0: automatic)"),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="wrap prompts in the model's chat "
                                       "template (an instruct model, as the embedded one; --no-chat-template for a base model)"),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="let tasks such as humaneval run "
                                              "the code the model writes (lm-eval's confirm_run_unsafe_code)"),
    seed: int = typer.Option(0, help="seed of random skipping and sampled generation"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/compare-<model>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (task, point) parts of an earlier run"),
    policy_option: Optional[list[str]] = typer.Option(None, "--policy-option", "-o", metavar="NAME=VALUE",
                                                      help="NAME=VALUE to every method whose strategy takes it, "
                                                      "METHOD.NAME=VALUE to that method's only, e.g. -o "
                                                      "flexidepth.calibration=16 (its threshold prompts; compare "
                                                      "sets -o skip itself)"),
    calibration_seeds: str = typer.Option("", help="run every method drawn from a calibration sample (shortgpt, "
                                          "laco, angular, a router's threshold) once per sample, e.g. 0,1,2 (0: the "
                                          "split's first items); adds the spread of its Retain % over the samples "
                                          "(-spread) and whether each ranking survives it"),
    matched_random: bool = typer.Option(True, help="after each learned router (flexidepth, mindskip), random skipping "
                                        "of the layers (MindSkip: attention sub-layers) per token it realized, as a "
                                        "method of its own: 'random control of METHOD'"),
) -> None:
    """Every method at the same number of skipped layers on lm-eval tasks: Retain % (mean over tasks of score / full
    score), the layers a token actually ran, each task's interval; a table, its summary (-agg), a figure.

    Example: skipbench compare --policy shortgpt,laco,mindskip:runs/mindskip,layerskip:runs/finetune --skip 4,8
    Example: skipbench compare --preset paper --policy shortgpt,laco,flexidepth:runs/flexi --allow-code-execution
    """
    from skipbench.experiments.compare import CompareConfig, run, with_preset

    # by the source's name: typer's click and the click package may be two copies of the same enum
    given = {n for n in ("model", "tasks", "skip", "chat_template")
             if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}
    cfg = with_preset(CompareConfig(
        model=model, methods=names(policy or ["shortgpt,laco"]), skip=int_list(skip, "--skip"), tasks=names([tasks]),
        limit=limit or None, max_gen_toks=max_gen_toks or None, num_fewshot=num_fewshot, batch_size=batch_size or None,
        chat_template=chat_template, allow_code_execution=allow_code_execution, seed=seed, device=device, dtype=dtype, out=out or "", resume=resume,
        policy_options=tuple(policy_option or ()), calibration_seeds=ints(calibration_seeds, "--calibration-seeds"),
        matched_random=matched_random),
        preset, given)
    with display.Bar("compare") as bar:
        display.result(run(cfg, on_part=lambda task, p: bar.point(f"{task} · {p.label}")))


COMMANDS = {"lm-eval": lm_eval, "compare": compare}
