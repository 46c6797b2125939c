"""Policy sweeps over lm-evaluation-harness tasks through skipbench's backend (evaluation/lmeval_model.py): the library of the
`skipbench lm-eval` and `skipbench compare` recipes.

One part per (task, policy point), written atomically under `.skipbench-parts/` beside the output with lm-eval's
own results in its manifest, and reused on rerun; then one tidy parquet (a row per task, metric and point) with the
manifest, one lm-eval results JSON per point, and a figure of each task's metric against mean executed layers.
Under torchrun lm-eval shards each task's requests over the ranks (the backend's rank, world size and gathers) and
rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from skipbench.store import distributed
from skipbench.store import readers
from skipbench.errors import SkipbenchError, note
from skipbench.evaluation.quality import expand, nominal_cost, part_key
from skipbench.models import load_model
from skipbench.models.loading import default_batch_size
from skipbench.policies import PolicySpec
from skipbench.store.readers import reusable
from skipbench.analysis.lmeval_tables import summarise, with_paired_tests
from skipbench.store.results import (Shown, Written, atomic_path, check_out_path, companion, config_dict, manifest, manifest_path,
                               run_id, tidy, write_tables)

INSTALL = "lm-eval is not installed: pip install 'skipbench[lmeval]' (make setup installs it)"
SHIPPED_PREFIX = "skipbench"  # the shipped tasks' names (skipbench_choice, ...) and tags (skipbench, skipbench_text)
PARTS_VERSION = 2  # 2: each part keeps its per-document scores (the `docs` table) for paired intervals


@dataclass(frozen=True, kw_only=True)
class LmEvalConfig:
    model: str
    tasks: tuple[str, ...]  # lm-eval task, group or tag names, or paths to task YAML files
    policies: tuple[PolicySpec, ...] = ()  # full depth always runs too
    limit: int | None = None  # documents per task (lm-eval's --limit)
    num_fewshot: int | None = None
    batch_size: int | None = None  # None: 8 on CPU, 32 on CUDA
    kv_mode: str = "auto"
    prompt_depth: str = "full"
    chat_template: bool = False
    max_length: int | None = None  # None: the model's positions (lm-eval's HF backend's default)
    max_gen_toks: int | None = None  # every generation task's answer length (lm-eval's --gen_kwargs); None: the task's
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""
    resume: bool = True
    allow_code_execution: bool = False  # lm-eval's confirm_run_unsafe_code: tasks that run generated code (humaneval)


@dataclass(kw_only=True)
class LmEvalResult(Written):
    summary: pd.DataFrame  # the main metric of each task per point
    reused_parts: int
    results_json: dict[str, Path]  # lm-eval's results per point, by label


def backend():
    """The backend module (it registers the `skipbench` model with lm-eval), or one line on how to install it."""
    try:
        from skipbench.evaluation import lmeval_model as lmeval
    except ImportError as exc:
        if "lm_eval" not in str(exc):
            raise
        raise SkipbenchError(INSTALL) from None
    return lmeval


@dataclass(frozen=True)
class Tasks:
    names: tuple[str, ...]  # what lm-eval loads: a task, group or tag name, or a user's task YAML (its path)
    defaults: bool  # whether lm-eval's own task index is needed (slow to build: about 10 s)
    digests: dict  # name -> a hash of the files that define it (they key the cached parts)


def shipped_files(tasks_dir: Path) -> list[Path]:
    """What the shipped tasks' rows depend on besides the model and policy: their YAMLs, their utils.py, and the
    skipbench code that makes their data and scores them."""
    import skipbench.data.items as items
    import skipbench.data.synthetic as synthetic
    import skipbench.analysis.metrics as metrics

    return sorted(tasks_dir.glob("*.yaml")) + [tasks_dir / "utils.py"] + [Path(m.__file__) for m in (synthetic, items, metrics)]


def resolve_tasks(requested: tuple[str, ...], tasks_dir: Path) -> Tasks:
    """What lm-eval is asked to load: names as given; a YAML path as its absolute path (lm-eval loads a task file by
    path, resolving its `include:` and `!function` beside it), or, for a shipped task's file, that task's name."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not requested:
        raise SkipbenchError("--tasks is empty; e.g. --tasks skipbench_choice")
    names, files = [], {}
    for t in requested:
        path = Path(t)
        if not t.endswith(".yaml"):
            names.append(t)
            continue
        if not path.is_file():
            raise SkipbenchError(f"task file '{t}' does not exist")
        try:
            name = load_yaml(path, resolve_func=False).get("task")
        except Exception as exc:  # lm-eval's YAML loader: any parse error is the user's file
            raise SkipbenchError(f"task file '{t}' is not a task YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(name, str):
            raise SkipbenchError(f"task file '{t}' names no task (its 'task:' field)")
        folder = path.resolve().parent
        if folder == tasks_dir.resolve():
            names.append(name)
        else:  # the YAMLs it may include and the Python it may name, beside it
            names.append(str(path.resolve()))
            files[names[-1]] = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.py"))
    for n in names:
        if n.startswith(SHIPPED_PREFIX) and n not in files:
            files[n] = shipped_files(tasks_dir)
    digests = {n: hashlib.sha1(b"".join(f.read_bytes() for f in fs if f.is_file())).hexdigest() for n, fs in files.items()}
    return Tasks(tuple(dict.fromkeys(names)), any(n not in files for n in names), digests)


# What the shipped tasks score (tasks/*.yaml, `test_split: test`): the test split of a suite, or of one of its
# subtasks; the choice task's paragraphs are no suite's items. tests/test_lmeval.py checks this against the YAMLs.
SHIPPED_SUITES = {"skipbench_arith": ("arith", None), "skipbench_choice": None,
                  **{f"skipbench_text_{s}": ("text", s) for s in ("copy", "summarize", "continue", "qa")}}
SHIPPED_TAGS = {"skipbench": tuple(SHIPPED_SUITES), "skipbench_text": tuple(n for n in SHIPPED_SUITES if "_text_" in n)}


def check_held_out(pts: list[PolicySpec], names: tuple[str, ...]) -> None:
    """A learned policy is scored on documents it was not trained on, as `evaluate` holds it: a shipped task's test
    items must not be among its checkpoint's training items (refused); a task skipbench did not ship cannot be
    checked (a note)."""
    from skipbench.data import DataSpec, load_items
    from skipbench.data.heldout import check_held_out as refuse_seen

    learned = [p for p in pts if p.strategy.kind == "learned" and p.strategy.needs_checkpoint]
    if not learned:
        return
    leaves = [leaf for n in names for leaf in SHIPPED_TAGS.get(n, (n,))]
    for leaf in dict.fromkeys(leaves):
        if leaf not in SHIPPED_SUITES:
            note(f"task '{leaf}' is not shipped with skipbench: whether its documents were among the training items of "
                 f"{', '.join(p.label for p in learned)} cannot be checked")
            continue
        if SHIPPED_SUITES[leaf] is None:
            continue
        suite, subtask = SHIPPED_SUITES[leaf]
        items = [it for it in load_items(DataSpec(name=suite, split="test")) if subtask in (None, it.subtask)]
        for p in learned:
            refuse_seen(items, p.value)


def task_manager(tasks: Tasks, tasks_dir: Path):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=tasks.defaults)
    unknown = [n for n in tasks.names if n not in tm.all_tasks and not n.endswith(".yaml")]
    if unknown:
        shipped = ", ".join(n for n in tm.all_tasks if n.startswith(SHIPPED_PREFIX))
        raise SkipbenchError(f"unknown lm-eval task(s) {', '.join(unknown)}; shipped offline: {shipped}; "
                             "or any lm-eval task name, or a task YAML path")
    return tm


def check_loads(name: str, tm) -> None:
    """Build the task once before any work: a hub task without the hub fails here, in one line."""
    try:
        tm.load([name])
    except Exception as exc:  # lm-eval and datasets raise many kinds; all mean the task cannot be built here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SkipbenchError(f"task '{name}' cannot be loaded ({type(exc).__name__}: {first[:200]}); offline, "
                             "use the shipped tasks (skipbench_choice, skipbench_arith, skipbench_text)") from None


def part_path(cfg: LmEvalConfig, task: str, p: PolicySpec, task_files: str) -> Path:
    """A (task, point) part, keyed like `evaluate`'s parts (the config without the output, the batch size and the
    other points; the model and a checkpoint by their files), plus the task's own files and lm-eval's version.
    Sampled generation (a task asking for do_sample) also depends on the batch size, which the key leaves out, as
    `evaluate`'s does."""
    from lm_eval import __version__ as lm_eval_version

    ident = replace(cfg, tasks=(task,), policies=(p,), out="", resume=True, batch_size=None)
    fields = config_dict(ident)
    fields.pop("allow_code_execution")  # a permission, not a setting: it changes no row (and keeps earlier keys)
    if fields["max_gen_toks"] is None:  # the tasks' own lengths: the keys of parts written before the setting existed
        fields.pop("max_gen_toks")
    key = part_key({**fields, "task_files": task_files, "lm_eval": lm_eval_version, "parts": PARTS_VERSION}, cfg.model, p)
    return Path(cfg.out).parent / ".skipbench-parts" / f"lmeval-{_slug(Path(task).stem + '-' + p.label)[:80]}-{key}.parquet"


def run(cfg: LmEvalConfig, on_part: Callable | None = None, lm=None, fresh: frozenset[str] = frozenset()) -> LmEvalResult:
    """on_part(task, point) after each finished part. `lm`: an already loaded model. `fresh`: labels of points run
    again whatever `cfg.resume` says (compare's controls under --no-resume, added to a run whose other parts it
    just made)."""
    out = check_out_path(cfg.out)
    lmeval = backend()
    d = distributed.current()
    tasks = resolve_tasks(cfg.tasks, lmeval.TASKS_DIR)
    tm = task_manager(tasks, lmeval.TASKS_DIR)
    if cfg.limit is not None and cfg.limit < 1:
        raise SkipbenchError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.max_gen_toks is not None and cfg.max_gen_toks < 1:
        raise SkipbenchError(f"--max-gen-toks must be >= 1, got {cfg.max_gen_toks}")
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.max_gen_toks is not None:  # before any part runs (the backend checks each task's own length as it comes)
        from lm_eval.models.utils import resolve_max_length

        window = cfg.max_length or resolve_max_length(lm.model.config, lm.tokenizer)
        if cfg.max_gen_toks >= window:
            raise SkipbenchError(f"--max-gen-toks {cfg.max_gen_toks} leaves no room for a prompt in the model's "
                                 f"{window}-token window (--max-length)")
    if cfg.chat_template and not getattr(lm.tokenizer, "chat_template", None):
        raise SkipbenchError(f"--chat-template: model '{cfg.model}' has no chat template")
    pts = expand(cfg.policies, lm.num_layers)
    check_held_out(pts, tasks.names)
    jobs = [(t, p, part_path(cfg, t, p, tasks.digests.get(t, ""))) for t in tasks.names for p in pts]
    # rank 0 decides what is left (the ranks run lm-eval's collectives together, so they must agree)
    todo = d.all_gather([i for i, j in enumerate(jobs) if not (cfg.resume and j[1].label not in fresh and reusable(j[2])
                                                                and reusable(companion(j[2], "docs")))])[0]
    for name in dict.fromkeys(jobs[i][0] for i in todo):
        check_loads(name, tm)
    model, built = None, None
    # point by point: each point's policy is built once, only when some task still needs it, and let go after its
    # last task (a strategy with a model of its own, LaCo or LayerSkip, holds one model at a time)
    for i in sorted(todo, key=lambda i: pts.index(jobs[i][1])):
        task, p, path = jobs[i]
        if built != p:
            model = built = None
            model = lmeval.SkipbenchLM(model=cfg.model, lm=lm, policy=p, kv_mode=cfg.kv_mode,
                                       prompt_depth=cfg.prompt_depth, batch_size=cfg.batch_size,
                                       max_length=cfg.max_length, seed=cfg.seed)
            built = p
        rows, docs, raw = evaluate_one(lmeval, model, task, tm, cfg, lm.num_layers)
        if d.main:  # lm-eval's own results travel in the part's manifest; its per-document scores beside it
            write_tables(rows, path, {"lm_eval": raw}, docs=docs)
        if on_part:
            on_part(task, p)

    def write() -> LmEvalResult:
        parts = [readers.table(path, "cached part", "rerun to compute it again", checked=True) for _, _, path in jobs]
        rows = tidy(pd.concat(parts, ignore_index=True), cfg, skip=("out", "resume", "policies", "tasks"), lm=lm,
                    model=cfg.model, batch_size=cfg.batch_size or default_batch_size(lm.device))
        docs = pd.concat([readers.table(companion(path, "docs"), "cached part", "rerun to compute it again", checked=True)
                          for _, _, path in jobs], ignore_index=True)
        docs.insert(0, "run_id", rows["run_id"].iloc[0] if len(rows) else run_id(cfg))
        jsons = write_results_json(out, pts, jobs)
        meta = manifest(cfg, lm=lm, num_layers=lm.num_layers, tasks=list(tasks.names), ranks=d.world,
                        points=[p.label for p in pts], results_json={k: str(v) for k, v in jsons.items()},
                        layers_convention="per token the policy gated: continuation tokens fed back (and the context "
                                          "with prompt_depth policy); generated tokens fed back for generation tasks "
                                          "(and the prompt with prompt_depth policy)")
        summary = with_paired_tests(summarise(rows), docs)
        path = write_tables(rows, out, meta, docs=docs)["rows"]
        from skipbench.analysis.plots import lmeval_figure

        figure = lmeval_figure(summary, lm.num_layers, out.with_suffix(".png"))
        return LmEvalResult(rows=rows, summary=summary, path=path, reused_parts=len(jobs) - len(todo),
                            results_json=jsons, files={"figure": figure, "docs": companion(out, "docs")},
                            tables={"docs": docs}, shown=shown(rows, cfg.model),
                            said=[f"wrote {path} ({len(rows)} rows; {len(jobs) - len(todo)} finished part(s) reused); "
                                  f"lm-eval's results: {out.with_name(out.stem + '-lmeval')}/; figure: {figure}"])

    def read() -> LmEvalResult:
        rows, docs = readers.table(out), readers.table(companion(out, "docs"))
        return LmEvalResult(rows=rows, summary=with_paired_tests(summarise(rows), docs), path=out,
                            reused_parts=len(jobs) - len(todo), results_json={}, tables={"docs": docs})

    return d.on_main(write, read)


def shown(rows: pd.DataFrame, model: str) -> list[Shown]:
    """Every metric and filter lm-eval reported, with a 95% interval each (the figure and the report take each task's
    main one)."""
    from skipbench.analysis.lmeval_tables import interval

    bounds = [interval(m, v, e, n, g) for m, v, e, n, g in zip(rows["metric"], rows["value"], rows["stderr"], rows["n"],
                                                                rows["group"])]
    table = rows.assign(interval=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in bounds])
    return [Shown(f"lm-eval · {model}", table[["task", "policy_spec", "layers_mean", "metric", "filter", "value",
                                               "interval", "n"]])]


class _GenKwargsWarned(logging.Filter):
    """Drops lm-eval's per-call warning that generation settings were given (`--max-gen-toks`); one filter, however
    many calls add it (filters compare equal by class)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("generation_kwargs:")

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


def evaluate_one(lmeval, model, task: str, tm, cfg: LmEvalConfig,
                 num_layers: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One task under one point through `lm_eval.simple_evaluate`: tidy rows (a row per task and metric; a group
    adds its subtasks' rows), the per-document scores (`doc_scores`) and lm-eval's results without its logged
    samples (rank 0; the other ranks get empty ones)."""
    import lm_eval

    model.usage.clear()
    # lm-eval warns at every call that --gen_kwargs overrides the tasks' settings, which the user asked for
    logging.getLogger("lm_eval.evaluator").addFilter(_GenKwargsWarned())
    raw = lm_eval.simple_evaluate(model=model, tasks=[task], limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                  task_manager=tm, apply_chat_template=cfg.chat_template, log_samples=True,
                                  confirm_run_unsafe_code=cfg.allow_code_execution,
                                  gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
                                  bootstrap_iters=1000)  # lm-eval's own seeds: its few-shot examples, as a plain run
    usage = [u for share in distributed.current().all_gather(model.usage) for u in share]
    if raw is None:  # not rank 0
        return pd.DataFrame(), pd.DataFrame(), {}
    by_task = lmeval.usage_by_task(usage)
    members = _members(raw.get("group_subtasks", {}))
    asked = top_level(raw)
    p = model.spec
    policy = getattr(model, "policy", None)  # what holds for all its rows (LaCo: its forced merges)
    point_record = policy.point_record() if hasattr(policy, "point_record") else {}
    rows = []
    for name, metrics in raw["results"].items():
        subtasks = members.get(name, [name])
        tokens, passes, requests, attention = (sum(by_task.get(s, (0, 0, 0, 0))[k] for s in subtasks) for k in range(4))
        n = sum(raw.get("n-samples", {}).get(s, {}).get("effective", 0) for s in subtasks)
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": name, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                         "n": int(n), "group": name in members, "top": name in asked,
                         "policy": p.name, "policy_spec": p.label,
                         "policy_seed": p.seed, "cost": nominal_cost(p, num_layers),
                         "layers_mean": passes / tokens if tokens else math.nan,
                         "attention_mean": attention / tokens if tokens else math.nan, "gated_tokens": tokens,
                         "requests": requests, **point_record})
    df = pd.DataFrame(rows)
    if p.cost(num_layers) is None and len(df):  # thresholds and learned policies: the measured mean, rounded
        df["cost"] = int(round(df["layers_mean"].mean())) if df["layers_mean"].notna().any() else 0
    raw["skipbench"] = {"policy": p.label, "layers_mean": {t: v[1] / v[0] if v[0] else None for t, v in by_task.items()},
                        "prompt_depth": cfg.prompt_depth, "kv_mode": model.kv_mode}
    docs = doc_scores(raw.pop("samples", {}), members, asked).assign(policy_spec=p.label)
    return df, docs, raw


DOC_COLUMNS = ["task", "of", "filter", "metric", "doc_id", "value"]


def doc_scores(samples: dict, members: dict[str, list[str]], asked: set[str]) -> pd.DataFrame:
    """Per document, lm-eval's numeric score per metric and filter (its logged samples): a row per (task, filter,
    metric, doc_id); `of` names the result the document counts in (a group asked for, such as MMLU, or the task
    itself), so paired intervals resample a group's documents within each of its tasks."""
    owner = {leaf: group for group, leaves in members.items() if group in asked for leaf in leaves}
    rows = []
    for name, examples in samples.items():
        for ex in examples:
            for metric in ex.get("metrics", []):
                value = ex.get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # corpus-level metrics log tuples per document (BLEU, perplexity): no paired score
                rows.append({"task": name, "of": owner.get(name, name), "filter": ex["filter"], "metric": metric,
                             "doc_id": int(ex["doc_id"]), "value": float(value)})
    return pd.DataFrame(rows, columns=DOC_COLUMNS)


def top_level(raw: dict) -> set[str]:
    """The results that stand for what was asked: a task or group none of whose enclosing groups reports a metric of
    its own (a group with an aggregate stands for its subtasks; one without, as lm-eval writes some, does not)."""
    parents: dict[str, list[str]] = {}
    for group, subs in raw.get("group_subtasks", {}).items():
        for sub in subs:
            parents.setdefault(sub, []).append(group)
    scored = {name for name, metrics in raw["results"].items()
              if any("," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))
                     for k, v in metrics.items())}

    def covered(name: str, seen: frozenset = frozenset()) -> bool:
        return any(g in scored or (g not in seen and covered(g, seen | {g})) for g in parents.get(name, []))

    return {name for name in raw["results"] if not covered(name)}


def _members(group_subtasks: dict) -> dict[str, list[str]]:
    """Each group's leaf tasks (groups nest)."""
    def leaves(name: str) -> list[str]:
        subs = group_subtasks.get(name)
        return [leaf for s in subs for leaf in leaves(s)] if subs else [name]

    return {g: leaves(g) for g in group_subtasks if group_subtasks[g]}


def write_results_json(out: Path, pts: list[PolicySpec], jobs) -> dict[str, Path]:
    """lm-eval's results per point, the tasks' results merged: `<out>-lmeval/<point>.json`."""
    paths = {}
    for p in pts:
        merged: dict = {}
        for _, q, path in jobs:
            if q != p:
                continue
            _merge_into(merged, readers.json_file(manifest_path(path), "part manifest", "rerun to compute it again")["lm_eval"])
        target = out.with_name(f"{out.stem}-lmeval") / (_slug(p.label) + ".json")
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(merged, indent=1, default=str))
        paths[p.label] = target
    return paths


def _merge_into(into: dict, other: dict) -> None:
    """Nested dicts merged key by key (each task's results, configs, layers); other values: the first seen."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_into(into[key], value)
        else:
            into.setdefault(key, value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
