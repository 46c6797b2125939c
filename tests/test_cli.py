"""The CLI end to end through Typer's runner: JSON read back, bad input = one line and exit code 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.policies.static import uniform_plan

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_plan_prints_eq2():
    res = invoke("plan", "--layers", 24, "--costs", 12, "--policy", "uniform")
    assert res.exit_code == 0
    assert res.stdout.split() == [str(i) for i in range(0, 24, 2)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_generate_json_uniform(tiny_dirs, family):
    res = invoke("generate", "--model", tiny_dirs[family], "--policy", "uniform", "--costs", 3,
                 "--prompt", "Please calculate the sum of 99, 45 and 12.", "--max-new-tokens", 12, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) >= {"text", "token_ids", "layers_per_token", "cost_mean"}
    assert len(out["layers_per_token"]) == len(out["token_ids"]) - 1
    assert all(layers == uniform_plan(6, 3) for layers in out["layers_per_token"])
    assert out["cost_mean"] == 3.0


def test_generate_json_random_per_token(tiny_dirs):
    res = invoke("generate", "--model", tiny_dirs["llama"], "--policy", "random", "--costs", 4, "--per-token",
                 "--seed", 3, "--prompt", "Repeat the list 5 times: 12, 34.", "--max-new-tokens", 10, "--json")
    out = json.loads(res.stdout)
    assert all(len(layers) == 4 and layers[0] == 0 for layers in out["layers_per_token"])
    assert len({tuple(x) for x in out["layers_per_token"]}) > 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--layers", 24, "--costs", 30], "the cost must be between 1 and 24"),
        (["plan", "--layers", 24, "--costs", "x"], "Invalid value for '--costs'"),
        (["plan", "--layers", 24, "--costs", 3, "--policy", "nope"], "unknown policy 'nope'"),
        (["generate", "--model", "no-such-alias", "--prompt", "hi"], "unknown model 'no-such-alias'"),
        (["generate", "--model", "some-org/not-cached-anywhere", "--prompt", "hi"], "not in the local Hugging Face cache"),
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "GGUF file not found"),
        (["generate", "--prompt", "hi", "--kv-mode", "maybe", "--model", "{llama}"], "Invalid value for '--kv-mode'"),
        (["generate", "--prompt", "hi", "--policy", "uniform", "--model", "{llama}"], "needs a cost"),
        (["generate", "--prompt", "hi", "--policy", "uniform", "--costs", 7, "--model", "{llama}"], "between 1 and 6"),
        (["generate", "--prompt", "hi", "--device", "tpu", "--model", "{llama}"], "Invalid value for '--device'"),
    ],
)
def test_bad_input_is_one_line_exit_1(args, message, tiny_dirs):
    args = [str(a).replace("{llama}", str(tiny_dirs["llama"])) for a in args]
    res = invoke(*args)
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    res = invoke("generate", "--model", tmp_path, "--prompt", "hi")
    assert res.exit_code == 1
    assert "unsupported architecture 'gpt2'" in res.stderr and "OPT" in res.stderr


def test_post_ln_opt_is_refused(tmp_path, tokenizer):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("opt", len(tokenizer))
    cfg.do_layer_norm_before = False
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    res = invoke("generate", "--model", tmp_path, "--prompt", "hi")
    assert res.exit_code == 1 and "post-LN" in res.stderr


def test_models_lists_aliases():
    res = invoke("models")
    assert res.exit_code == 0
    for alias in ("smollm2-135m", "opt-1.3b", "llama-3-8b-instruct", "qwen3-4b"):
        assert alias in res.stdout


def test_atomic_writes_leave_no_half_file(tmp_path):
    from skipbench.store.results import atomic_path, write_text_atomic

    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_cli_defaults_are_the_configs_defaults():
    """One default per setting: where a command option and its config field share a name, they agree (up to how
    the command line writes it: '' / 0 / None all mean 'automatic', comma text is the parsed tuple)."""
    import dataclasses

    import typer

    import skipbench.evaluation.quality as ev
    from skipbench.evaluation import lmeval_sweep as lmeval
    from skipbench.experiments import bench, compare, cosine, finetune, generate, oracle, route

    def norm(v):
        if v in ("", 0, None, ()) and not isinstance(v, bool):
            return "auto"
        if isinstance(v, str) and "," in v:
            return tuple(x.strip() for x in v.split(","))
        if isinstance(v, tuple):
            return tuple(str(x) for x in v) or "auto"
        return v

    cmd = typer.main.get_command(app)
    pairs = {"evaluate": ev.EvalConfig, "cosine": cosine.CosineConfig, "bench": bench.BenchConfig,
             "generate": generate.GenerateConfig, "finetune": finetune.FinetuneConfig, "oracle": oracle.OracleConfig,
             "lm-eval": lmeval.LmEvalConfig, "compare": compare.CompareConfig, "route train": route.RouteTrainConfig, "route curve": route.RouteCurveConfig}
    drift = []
    for name, config in pairs.items():
        command = cmd
        for word in name.split():
            command = command.commands[word]
        params = {p.name: p.default for p in command.params}
        for f in dataclasses.fields(config):
            if f.name in params and f.default is not dataclasses.MISSING and norm(params[f.name]) != norm(f.default):
                drift.append(f"{name} --{f.name}: command {params[f.name]!r}, config {f.default!r}")
    assert not drift, "\n".join(drift)


def test_choice_enums_are_the_librarys_choices():
    """The command line's choices are exactly what the library accepts."""
    from skipbench.cli import options as cli
    from skipbench.engine.cache import KV_CHOICES
    from skipbench.models.loading import DTYPES
    from skipbench.policies.controller import ALPHA_UNITS, GATES, INPUTS

    from skipbench.engine.forward import IMPLS

    values = lambda e: {m.value for m in e}  # noqa: E731
    from skipbench.experiments.finetune import SCHEDULES

    assert values(cli.KvMode) == set(KV_CHOICES) and values(cli.Impl) == set(IMPLS)
    assert values(cli.DropoutSchedule) == set(SCHEDULES)
    assert values(cli.Dtype) == {"auto", *DTYPES}
    assert values(cli.AlphaUnits) == set(ALPHA_UNITS) and values(cli.GateMode) == set(GATES)
    assert values(cli.ControllerInput) == set(INPUTS)


def _commands():
    """Every leaf command of the app: (words, click command)."""
    import typer

    out = []

    def walk(cmd, words):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, words + [name])
        else:
            out.append((words, cmd))

    walk(typer.main.get_command(app), [])
    return out


def test_every_option_of_every_command_has_help_and_help_exits_0():
    """`-h` and `--help` work everywhere; every option says what it does."""
    missing = [f"{' '.join(w)} {p.opts[0]}" for w, cmd in _commands() for p in cmd.params
               if getattr(p, "param_type_name", "") == "option" and not p.help]
    assert not missing, missing
    for words, _ in _commands():
        res = invoke(*words, "-h")
        assert res.exit_code == 0 and "Usage:" in res.output, (words, res.output)
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip().startswith("skipbench 0.")


def test_a_repeated_single_value_option_is_refused():
    """An option that takes one value given twice is refused in one line, not silently the last one kept (a
    repeated --policy appends: tests/test_cli_mapping.py)."""
    for args, said in ((["evaluate", "--limit", 2, "--limit", 3], "--limit given 2 times"),
                       (["generate", "--prompt", "a", "--policy", "full", "--policy", "uniform:2"], "--policy given 2 times"),
                       (["evaluate", "--resume", "--no-resume"], "--resume and --no-resume given 2 times"),
                       (["evaluate", "--limit=2", "--limit", 3], "--limit given 2 times")):
        res = invoke(*args)
        assert res.exit_code == 1 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_a_malformed_or_unused_policy_option_is_refused_everywhere(tiny_dirs, tmp_path):
    """lm-eval's habit `-o DIR` (its output path) is skipbench's --policy-option: refused, with or without --policy,
    before any work."""
    pytest.importorskip("lm_eval")
    for extra in ([], ["--policy", "uniform:3"]):
        res = invoke("lm-eval", "--model", tiny_dirs["llama"], "--tasks", "skipbench_choice", *extra, "-o", tmp_path / "dir",
                     "--out", tmp_path / "x.parquet")
        assert res.exit_code == 1 and "NAME=VALUE" in res.stderr and not (tmp_path / "x.parquet").exists(), res.output
    res = invoke("lm-eval", "--model", tiny_dirs["llama"], "--tasks", "skipbench_choice", "-o", "min-layers=2",
                 "--out", tmp_path / "x.parquet")
    assert res.exit_code == 1 and "no policy given takes it" in res.stderr
    for args, said in ((["bench", "-o", "DIR"], "NAME=VALUE"), (["bench", "--policy", "full", "-o", "min-layers=2"],
                       "no policy given takes it"), (["evaluate", "-o", "tau=0.3", "-o", "tau=0.5"], "given twice"),
                       (["generate", "--prompt", "x", "-o", "oops"], "NAME=VALUE")):
        res = invoke(*args, "--model", tiny_dirs["llama"])
        assert res.exit_code == 1 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.output)


def test_seed_draws_skips_and_data_seed_draws_items(tiny_dirs, tmp_path):
    import pandas as pd

    def items(*extra):
        out = tmp_path / f"e{len(list(tmp_path.iterdir()))}.parquet"
        res = invoke("evaluate", "--model", tiny_dirs["llama"], "--dataset", "arith", "--split", "test", "--limit", 3,
                     "--policy", "random:3", "--max-new-tokens", 2, "--out", out, *extra)
        assert res.exit_code == 0, res.output
        df = pd.read_parquet(out)
        return sorted(set(df["item_id"])), df[df["policy"] == "random"]["layer_use"].map(tuple).tolist()

    (a, use_a), (b, use_b), (c, _) = items("--seed", 1), items("--seed", 2), items("--data-seed", 2)
    assert a == b and a != c  # the test items follow --data-seed only
    assert use_a != use_b  # --seed draws the random skips


def test_old_spellings_still_work_with_a_note():
    res = invoke("plan", "--layers", 24, "--cost", 12)
    assert res.exit_code == 0 and res.stdout.split() == [str(i) for i in range(0, 24, 2)]
    assert "'plan --cost' is now '--costs'" in res.stderr


def test_piped_tables_are_plain_and_never_wrapped(tiny_dirs):
    """Piped (not a terminal), a table is plain aligned text, one row per line, its long cells whole."""
    res = invoke("policies")
    assert res.exit_code == 0 and "┃" not in res.stdout and res.stdout.startswith("# skipbench policies")
    row = next(line for line in res.stdout.splitlines() if line.lstrip().startswith("laco "))
    assert "laco" in row and "LaCo (Yang et al.)" in row and "collapsed model" in row  # the help cell, whole


def test_lm_eval_prints_every_metric(tiny_dirs, tmp_path):
    pytest.importorskip("lm_eval")
    res = invoke("lm-eval", "--model", tiny_dirs["llama"], "--tasks", "skipbench_choice", "--limit", 2,
                 "--out", tmp_path / "x.parquet")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if "skipbench_choice" in line]
    assert any(" acc " in line for line in lines) and any(" acc_norm " in line for line in lines)
    assert "lm-eval: skipbench_choice · full done" in res.stderr  # piped: a log line per finished point
