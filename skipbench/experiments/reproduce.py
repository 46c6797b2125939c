"""`skipbench reproduce --preset NAME`: the papers' experiments as the exact sequence of CLI calls.

A preset (skipbench/experiments/presets/NAME.toml, shipped in the wheel; `experiments/` at the repository's root
links to it) names the model, datasets, costs, budgets, alphas, steps and limits;
this module turns it into `skipbench ...` argument lists. A finished stage is skipped, so an interrupted
run resumes (evaluate also resumes inside a stage, point by point) — but only when the stage's recorded
command is the one the preset asks for now: a stage whose settings changed runs again.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from skipbench.errors import SkipbenchError

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data (the repository's experiments/ links here)


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    output: Path
    results: Path = Path("results")
    restartable: bool = False  # a training stage: its checkpoint is resumed only by the same settings
    produces: Path | None = None  # what later stages name in their arguments (default: `output`)
    needs: tuple[str, ...] = ()  # earlier stages whose products this one reads

    def _record_of(self, name: str) -> Path:
        return self.results / ".reproduce" / (name.replace(" ", "-") + ".json")

    @property
    def record(self) -> Path:
        """Where a finished stage records the command it ran (written only once the command succeeded)."""
        return self._record_of(self.name)

    def _read(self, path: Path) -> dict | None:
        from skipbench.store import readers
        from skipbench.errors import note

        if not path.exists():
            return None
        try:
            return readers.json_file(path, "stage record")
        except readers.Unreadable as exc:  # as if the stage never finished: it runs again
            note(f"{exc}: the stage runs again")
            return None

    def _upstream(self) -> dict:
        """The finish stamps of the stages this one reads: a stage re-run upstream makes this one stale."""
        return {name: (self._read(self._record_of(name)) or {}).get("stamp") for name in self.needs}

    def _stale(self) -> bool | None:
        """None: never finished; else whether its command or an upstream product changed since it finished."""
        rec = self._read(self.record)
        if rec is None:
            return None
        return rec.get("argv") != list(self.argv) or rec.get("upstream", {}) != self._upstream()

    def done(self) -> bool:
        return self.output.exists() and self._stale() is False

    def run_argv(self) -> list[str]:
        """The command to run now: a training stage that finished with other settings or other inputs starts
        over (an unfinished one resumes its checkpoint)."""
        return [*self.argv, "--restart"] if self.restartable and self._stale() else list(self.argv)

    def finish(self) -> None:
        import time

        from skipbench.store.results import write_text_atomic

        write_text_atomic(self.record, json.dumps({"argv": list(self.argv), "output": str(self.output),
                                                   "stamp": time.time_ns(), "upstream": self._upstream()}))

    def command(self) -> str:
        import shlex

        return "skipbench " + " ".join(shlex.quote(a) for a in self.argv)


# a preset's own keys that a preset built on it (`base`) does not inherit: what it differs by and its measured run
OWN_KEYS = ("base", "differences", "seconds")


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """A preset's table. `base = "NAME"` starts from that preset: each of its sections is updated key by key with
    this one's (a section this one does not name is kept whole), and its `differences` and `[seconds]` are not
    inherited (they describe that preset's sizes and run)."""
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise SkipbenchError(f"unknown preset '{name}'; known: {known} (or a path to a .toml file)")
    from skipbench.store import readers

    raw = readers.file_bytes(path, "preset", "see skipbench/experiments/presets/quick.toml for the format")
    try:
        own = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SkipbenchError(f"cannot read preset {path}: {readers.why(exc)}") from None
    base = own.get("base")
    if base is None:
        return own
    if not isinstance(base, str) or base in (*_seen, name):
        raise SkipbenchError(f"preset {path}: base must name another preset, without a cycle; got {base!r}")
    merged = {k: v for k, v in load_preset(base, (*_seen, name)).items() if k not in OWN_KEYS}
    for key, value in own.items():
        if key == "base":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "seconds":
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def record_preset(preset: dict, name: str, results: Path) -> None:
    """The preset's name and its stated differences from the papers' setups, for the report."""
    from skipbench.store.results import write_text_atomic

    write_text_atomic(results / ".reproduce" / "preset.json",
                      json.dumps({"name": Path(name).stem, "differences": preset.get("differences", [])}, indent=2))


def _opt(section: dict, key: str, flag: str) -> list[str]:
    """`flag value` when the preset states the key, else nothing: the command's own default applies (defaults live
    in the CLI only)."""
    return [flag, str(section[key])] if key in section else []


def _options(section: dict) -> list[str]:
    """A section's `options`: a list of NAME=VALUE strings (one string alone would be read letter by letter)."""
    options = section.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise SkipbenchError(f"the preset's options must be a list of \"NAME=VALUE\" strings, got {options!r}")
    return options


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def stages(preset: dict, results: str | None = None) -> list[Stage]:
    model = preset["model"]
    r = Path(results or preset.get("results", "results"))
    out: list[Stage] = []
    ft, ev, cs, orc, ct, fx, bn, ms, lk, cp = (preset.get(k, {}) for k in (
        "finetune", "evaluate", "cosine", "oracle", "controllers", "flexidepth", "bench", "mindskip", "layerskip", "compare"))
    if ft:  # the papers' first stage: every later stage of this model runs on the fine-tuned backbone
        run = r / "finetune"
        out.append(Stage("finetune", (
            "finetune", "--model", model, "--dataset", ft["dataset"], *_opt(ft, "limit", "--limit"),
            *_opt(ft, "val_limit", "--val-limit"), "--steps", str(ft["steps"]), "--batch-size", str(ft["batch_size"]),
            "--lr", str(ft["lr"]), *_opt(ft, "lr_schedule", "--lr-schedule"), "--eval-every", str(ft["eval_every"]),
            "--patience", str(ft["patience"]),
            "--max-seq-len", str(ft["max_seq_len"]), "--max-new-tokens", str(ft["max_new_tokens"]),
            *_opt(ft, "layer_dropout", "--layer-dropout"), *_opt(ft, "dtype", "--dtype"),
            "--out", str(run)), run / "best" / "config.json"))
        model = str(run / "best")

    def split(section):
        return ["--split", section["split"]] if "split" in section else []

    for dataset in ev.get("datasets", []):
        for policy in ev.get("policies", ["uniform"]):  # a name runs at the preset's costs, a spec at its own points
            name = policy.partition(":")[0]
            target = r / f"evaluate-{name}-{dataset}.parquet"
            spec = policy if ":" in policy else f"{policy}:{_csv(ev['costs'])}"
            out.append(Stage(f"evaluate {name} {dataset}", (
                "evaluate", "--model", model, "--dataset", dataset, *split(ev), "--policy", spec,
                *_opt(ev, "limit", "--limit"), *_opt(ev, "batch_size", "--batch-size"),
                *_opt(ev, "max_new_tokens", "--max-new-tokens"), "--out", str(target)), target))
    if cs:
        target = r / f"cosine-{cs['dataset']}.parquet"
        out.append(Stage("cosine", (
            "cosine", "--model", model, "--dataset", cs["dataset"], *split(cs), "--costs", _csv(cs["costs"]),
            *(["--policy", _csv(cs["strategies"])] if "strategies" in cs else []),
            *_opt(cs, "seeds", "--num-seeds"), *_opt(cs, "limit", "--limit"), *_opt(cs, "batch_size", "--batch-size"),
            *_opt(cs, "max_new_tokens", "--max-new-tokens"), "--out", str(target)), target))
    if orc:
        runs = r / f"evaluate-uniform-{orc['dataset']}.parquet"
        if "limit" in orc or "split" in orc:  # the oracle's own items: more than the evaluate points need
            runs = r / "oracle-items" / f"evaluate-uniform-{orc['dataset']}.parquet"  # apart: not an evaluate section
            out.append(Stage(f"evaluate uniform {orc['dataset']} (oracle)", (
                "evaluate", "--model", model, "--dataset", orc["dataset"], *split(orc),
                "--policy", f"uniform:{_csv(orc['costs'])}", *_opt(orc, "limit", "--limit"),
                *_opt(ev, "batch_size", "--batch-size"), *_opt(ev, "max_new_tokens", "--max-new-tokens"),
                "--out", str(runs)), runs))
        target = r / f"oracle-{orc['dataset']}.parquet"
        out.append(Stage("oracle", (
            "oracle", "--runs", str(runs), "--curve",
            *(["--costs", _csv(orc["costs"])] if "costs" in orc else []), "--metric", orc["metric"], "--length-budgets", _csv(orc["length_budgets"]), "--out", str(target)), target))
    if ct:
        target = r / f"controllers-{ct['dataset']}.parquet"
        out.append(Stage("controllers sweep", (
            "controllers", "sweep", "--model", model, "--dataset", ct["dataset"], "--inputs", _csv(ct["inputs"]),
            "--alpha", _csv(ct["alphas"]), "--alpha-units", ct["alpha_units"], "--num-seeds", str(ct["seeds"]),
            *_opt(ct, "metric", "--metric"), *(["--train-backbone"] if ct.get("train_backbone") else []),
            *_opt(ct, "backbone_lr", "--backbone-lr"),
            "--steps", str(ct["steps"]), "--lr", str(ct["lr"]), "--batch-size", str(ct["batch_size"]),
            "--loss", ct["loss"], "--targets", ct["targets"], "--max-seq-len", str(ct["max_seq_len"]),
            *_opt(ct, "train_limit", "--train-limit"), *_opt(ct, "eval_limit", "--eval-limit"),
            *_opt(ct, "max_new_tokens", "--max-new-tokens"), "--out", str(target)), target))
    flexi_run = None
    if fx:
        fmodel = fx.get("model", model)
        flexi_run = r / "flexidepth-run"
        out.append(Stage("flexidepth train", (
            "flexidepth", "train", "--model", fmodel, "--dataset", fx["datasets"], "--skip-weight", str(fx["alpha"]),
            "--steps", str(fx["steps"]), *_opt(fx, "train_limit", "--limit"), *_opt(fx, "eval_every", "--eval-every"),
            *_opt(fx, "val_limit", "--val-limit"), *_opt(fx, "patience", "--patience"), *_opt(fx, "max_new_tokens", "--max-new-tokens"),
            "--out", str(flexi_run)), flexi_run / "config.json"))
        first = fx["datasets"].split(",")[-1]
        target = r / f"evaluate-flexidepth-{first}.parquet"
        out.append(Stage("evaluate flexidepth", (  # held-out items only: the routers were trained on the train split
            "evaluate", "--model", fmodel, "--dataset", first, "--split", "test", "--policy", "flexidepth", "--router", str(flexi_run),
            "--matched-random",  # beside it, random skipping of the same realized layers per token (issue 41)
            *_opt(fx, "usage_limit", "--limit"), *_opt(fx, "max_new_tokens", "--max-new-tokens"),
            "--out", str(target)), target))
        target = r / "flexi-usage.parquet"
        out.append(Stage("flexidepth usage", (
            "flexidepth", "usage", "--model", fmodel, "--router", str(flexi_run), "--dataset", fx["datasets"],
            *_opt(fx, "usage_limit", "--limit"), *_opt(fx, "max_new_tokens", "--max-new-tokens"),
            "--out", str(target)), target))
        target = r / "depthmap.html"
        out.append(Stage("flexidepth depthmap", (
            "flexidepth", "depthmap", "--model", fmodel, "--router", str(flexi_run), "--prompt", fx["prompt"],
            *_opt(fx, "max_new_tokens", "--max-new-tokens"), "--out", str(target)), target))
    if bn:
        policies = [f"flexidepth:{flexi_run}" if p == "flexidepth" and flexi_run else p for p in bn["policies"]]
        target = r / "bench.parquet"
        out.append(Stage("bench", (
            "bench", "--model", bn.get("model", model), "--policy", _csv(policies), "--batch-sizes", _csv(bn["batch_sizes"]),
            *_opt(bn, "new_tokens", "--max-new-tokens"), *_opt(bn, "repeats", "--repeats"),
            *_opt(bn, "warmup", "--warmup"), "--impl", "all", "--out", str(target)), target))
    runs = {"flexidepth": flexi_run}  # the trained methods `compare` puts beside the others
    if ms:
        runs["mindskip"] = r / "mindskip-run"
        out.append(Stage("mindskip train", (
            "mindskip", "train", "--model", ms.get("model", model), "--dataset", ms["datasets"],
            "--capacity", str(ms["capacity"]), "--steps", str(ms["steps"]), *_opt(ms, "train_limit", "--limit"),
            *_opt(ms, "max_new_tokens", "--max-new-tokens"), "--out", str(runs["mindskip"])),
            runs["mindskip"] / "config.json"))
    if lk:  # the LayerSkip recipe: fine-tuning with depth-scaled layer dropout and an early-exit loss
        runs["layerskip"] = r / "layerskip-run"
        out.append(Stage("layerskip finetune", (
            "finetune", "--model", lk.get("model", model), "--dataset", lk["datasets"], "--steps", str(lk["steps"]),
            "--batch-size", str(lk["batch_size"]), "--lr", str(lk["lr"]), "--eval-every", str(lk["eval_every"]),
            "--layer-dropout", str(lk["layer_dropout"]), "--dropout-schedule", "exp",
            "--early-exit-loss", str(lk["early_exit_loss"]), *_opt(lk, "early_exit_every", "--early-exit-every"),
            *_opt(lk, "train_limit", "--limit"), *_opt(lk, "val_limit", "--val-limit"),
            *_opt(lk, "max_seq_len", "--max-seq-len"), *_opt(lk, "max_new_tokens", "--max-new-tokens"),
            "--out", str(runs["layerskip"])), runs["layerskip"] / "best" / "config.json"))
    if cp:
        methods = [f"{m}:{runs[m]}" if runs.get(m) else m for m in cp["methods"]]
        target = r / "compare.parquet"
        out.append(Stage("compare", (
            "compare", "--model", cp.get("model", model), "--policy", _csv(methods), "--skip", _csv(cp["skip"]),
            "--tasks", _csv(cp["tasks"]), *_opt(cp, "limit", "--limit"),
            *_opt(cp, "max_gen_toks", "--max-gen-toks"), *_opt(cp, "batch_size", "--batch-size"),
            *(x for option in _options(cp) for x in ("-o", option)),
            *(["--allow-code-execution"] if cp.get("allow_code_execution") else []),
            *(["--no-chat-template"] if cp.get("chat_template") is False else []), "--out", str(target)), target))
    out.append(Stage("report", ("report", "--results", str(r), "--out", str(r / "REPORT.md")), r / "REPORT.md"))
    training = ("finetune", "controllers sweep", "flexidepth train", "mindskip train", "layerskip finetune")
    products = {"finetune": r / "finetune", "flexidepth train": flexi_run, "mindskip train": runs.get("mindskip"),
                "layerskip finetune": runs.get("layerskip")}
    done: list[tuple[str, str]] = []
    stages_ = []
    for st in out:
        needs = tuple(name for name, made in done if any(re.search(re.escape(made) + r"(/|,|$)", a) for a in st.argv))
        stages_.append(Stage(st.name, st.argv, st.output, r, st.name in training, needs=needs))
        done.append((st.name, str(products.get(st.name) or st.output)))
    return stages_


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class Estimate:
    """What is left of a run. A stage the preset's measured run timed (its `[seconds]` table: stage name -> seconds,
    on the machine its `machine` key names) counts its recorded seconds scaled by this run's pace so far (the stages
    finished here that have a record took x times their recorded seconds, so the rest will too); a stage without a
    record counts the mean of the stages finished here. Before any finished, a run with unrecorded stages left has
    no estimate. A stage that resumes halfway makes the pace look faster than it is."""

    def __init__(self, recorded: dict[str, float], names: list[str]) -> None:
        self.recorded, self.left = recorded, list(names)
        self.took: dict[str, float] = {}

    def finished(self, name: str, seconds: float | None) -> None:
        """A stage done (`seconds` None: skipped, already done)."""
        self.left.remove(name)
        if seconds is not None:
            self.took[name] = seconds

    def remaining(self) -> float | None:
        known = [n for n in self.took if self.recorded.get(n, 0) > 0]
        pace = sum(self.took[n] for n in known) / sum(self.recorded[n] for n in known) if known else 1.0
        unrecorded = [n for n in self.left if n not in self.recorded]
        if unrecorded and not self.took:
            return None
        mean = sum(self.took.values()) / len(self.took) if self.took else 0.0
        return pace * sum(self.recorded[n] for n in self.left if n in self.recorded) + mean * len(unrecorded)


def recorded_seconds(preset: dict) -> dict[str, float]:
    """The preset's `[seconds]` table without its `machine` note; a value that is not a number of seconds is refused."""
    import math

    table = preset.get("seconds", {})
    if not isinstance(table, dict):
        raise SkipbenchError("the preset's [seconds] must be a table of stage name = seconds")
    out = {}
    for name, value in table.items():
        if name == "machine":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SkipbenchError(f"the preset's [seconds] gives '{name}' = {value!r}; each stage's seconds must be a number >= 0")
        out[str(name)] = float(value)
    return out


def run(preset: str, results: str | None, dry_run: bool, command: Callable[[list[str]], int],
        say: Callable[[str], None] = print) -> None:
    """Run the preset's stages in order through `command` (the CLI itself), skipping finished ones. Before each stage a
    line says which of how many it is, the time so far and an estimate of what is left (`Estimate`)."""
    import time

    from skipbench.store.results import check_out_dir

    chosen = load_preset(preset)
    try:
        plan = stages(chosen, results)
    except (KeyError, TypeError) as exc:  # a section without a key its stage needs, or a value of the wrong kind
        raise SkipbenchError(f"preset '{preset}' lacks or misstates {exc} (see skipbench/experiments/presets/quick.toml)") from None
    if not dry_run:
        check_out_dir(plan[-1].results, "--results")
        record_preset(chosen, preset, plan[-1].results)
    estimate, began = Estimate(recorded_seconds(chosen), [st.name for st in plan]), time.perf_counter()
    for number, stage in enumerate(plan, 1):
        if stage.name != "report" and stage.done():
            say(f"[dim]skip (done): {stage.command()}[/dim]")
            estimate.finished(stage.name, None)
            continue
        if not dry_run:
            left = estimate.remaining()
            say(f"[bold cyan]stage {number}/{len(plan)}: {stage.name}[/bold cyan] · {_clock(time.perf_counter() - began)} "
                f"so far · {'about ' + _clock(left) + ' left' if left is not None else 'time left: after the first stage'}")
        say(f"[bold]$ {stage.command()}[/bold]")
        if dry_run:
            continue
        start = time.perf_counter()
        code = command(stage.run_argv())
        if code:
            raise SkipbenchError(f"stage '{stage.name}' failed (exit code {code})")
        stage.finish()
        estimate.finished(stage.name, time.perf_counter() - start)
        say(f"[dim]{stage.name}: {time.perf_counter() - start:.0f} s[/dim]")
    if not dry_run:
        say(f"[bold]all {len(plan)} stages done in {_clock(time.perf_counter() - began)}[/bold]")
