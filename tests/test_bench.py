"""The bench command end to end on a tiny model, reading the parquet back (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.models import load_model


def test_bench_end_to_end(tiny_dirs, tmp_path):
    out = tmp_path / "bench.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--batch-sizes", "1,2",
                                   "--policy", "full,uniform:3,random-token:4", "--impl", "all",
                                   "--max-new-tokens", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    variants = {"hf-generate", "full", "uniform:3", "random-token:4 [auto]", "random-token:4 [gather]",
                "random-token:4 [mask]", "removed:uniform:3"}
    assert set(df["variant"]) == variants
    assert "[mask]" in res.stdout  # printed as written, not taken for markup
    assert len(df) == 2 * len(variants) * 2 * 2  # batch sizes x variants x repeats x phases
    decode = df[df["phase"] == "decode"]
    assert (decode["steps"] == 3).all() and (df["tokens_per_s"] > 0).all() and df["run_id"].nunique() == 1
    assert set(decode.loc[decode["variant"] == "uniform:3", "layers_mean"]) == {3.0}
    assert (decode.loc[decode["variant"].str.startswith("random-token"), "layers_mean"] == 4.0).all()
    assert (df["step_p90"] >= df["step_p50"]).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    summary = pd.DataFrame(meta["summary"])
    full = summary[(summary["variant"] == "full") & (summary["phase"] == "decode")]
    assert (full["speedup"] == 1.0).all() and (full["ideal_speedup"].round(9) == 1.0).all()
    assert set(meta["fixed_part_seconds"]) == {"1", "2"} or set(meta["fixed_part_seconds"]) == {1, 2}
    assert "real/ideal" in res.stdout and "real/batch" in res.stdout and "% of bound" in res.stdout
    # the memory bound: the bytes a step reads follow the parts it ran (uniform:3 under auto, `none`: 3 layers)
    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    w, rate = lm.adapter.weight_bytes(), meta["read_rate"]["bytes_per_s"]
    assert meta["weight_bytes"] == w and rate > 0 and meta["read_rate"]["dtype"] == "float32"
    assert (decode.loc[decode["variant"] == "full", "weight_bytes_per_step"] == 6 * w["layer"] + w["head"]).all()
    assert (decode.loc[decode["variant"] == "uniform:3", "weight_bytes_per_step"] == 3 * w["layer"] + w["head"]).all()
    assert (decode.loc[decode["variant"] == "removed:uniform:3", "weight_bytes_per_step"] == 3 * w["layer"] + w["head"]).all()
    assert decode["bound_fraction"].to_numpy() == pytest.approx(
        (decode["weight_bytes_per_step"] * decode["tokens_per_s"] / decode["batch_size"] / rate).to_numpy())
    assert df.loc[df["phase"] == "prefill", "bound_fraction"].isna().all() and "bound_fraction" in summary
    assert out.with_suffix(".png").stat().st_size > 10_000
    # the policy's time and the parts each decode step ran are per variant; the batch ideal is recomputed from them
    assert (decode.loc[decode["variant"] != "hf-generate", "policy_s"] >= 0).all()
    ours = decode[decode["kind"] == "policy"]
    assert df.loc[df["phase"] == "prefill", "policy_s"].isna().all() and (ours["skip_path_s"] == 0).all()
    assert (ours["attention_layers"] >= ours["layers_mean"] - 1e-9).all()  # a batch runs a layer any row runs
    uniform = decode[decode["variant"] == "uniform:3"]
    assert (uniform["kv_mode"] == "none").all() and (uniform["kv_layers"] == 0).all()  # no K/V nobody reads
    assert (uniform["attention_layers"] == 3).all()
    mask = decode[decode["variant"] == "random-token:4 [mask]"]
    assert (mask["gathered_layers"] == 0).all() and (mask.loc[mask["batch_size"] == 2, "dense_layers"] > 0).all()
    costs = meta["layer_costs"]
    assert set(costs) == {"1", "2"} and "auto" in costs["2"]["fill"]
    for r in summary[(summary["phase"] == "decode") & (summary["kind"] == "policy")].itertuples():
        c, f = costs[str(r.batch_size)][r.kv_mode], meta["fixed_part_seconds"][str(r.batch_size)]
        full_step = summary[(summary["variant"] == "full") & (summary["phase"] == "decode")
                            & (summary["batch_size"] == r.batch_size)]["step_p50"].iloc[0]
        rows = decode[(decode["variant"] == r.variant) & (decode["batch_size"] == r.batch_size)]
        work = (rows["attention_layers"].median() * c["attention"] + rows["mlp_layers"].median() * c["mlp"]
                + rows["kv_layers"].median() * c["kv"])
        ideal = full_step / (f + work / (6 * (c["attention"] + c["mlp"])) * (full_step - f))
        assert r.ideal_batch_speedup == pytest.approx(ideal)
        # the speedup is the median over repeats of tokens/s over full depth's in the same round
        fulls = decode[(decode["variant"] == "full") & (decode["batch_size"] == r.batch_size)].set_index("repeat")
        paired = rows.set_index("repeat")["tokens_per_s"] / fulls["tokens_per_s"]
        assert r.speedup == pytest.approx(paired.median())


def test_bench_refuses_an_unknown_impl(tiny_dirs, tmp_path):
    out = tmp_path / "bench.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--batch-sizes", "1",
                                   "--impl", "auto,fast", "--out", str(out)])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "--impl" in res.stderr and not out.exists()


def test_impls_of():
    from skipbench.experiments.bench import impls_of

    assert impls_of("auto") == ["auto"] and impls_of("both") == ["gather", "mask"]
    assert impls_of("all") == ["auto", "gather", "mask"] and impls_of("mask, auto,mask") == ["mask", "auto"]


def test_removed_layers_model_equals_plan(tokenizer):
    """The bench's bound (shared-weight smaller model) gives the plan's tokens: it times the same work."""
    from conftest import prompts, tiny_model
    from skipbench.engine import generate
    from skipbench.models import wrap_model
    from skipbench.models.loading import remove_layers
    from skipbench.policies import make_policy

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    plan = make_policy("uniform:3", 6)
    small = wrap_model(remove_layers(lm.model, plan.executed_layers()), tokenizer, "small")
    ps = prompts(tokenizer, 3)
    a = generate(lm, ps, plan, 10, prompt_depth="policy")
    b = generate(small, ps, make_policy("full", 3), 10)
    assert a.tokens == b.tokens
    assert lm.num_layers == 6  # the original is untouched


def test_phase_rows_count_real_prompt_tokens_once():
    """Prefill: the batch's real prompt tokens over its seconds (the old code multiplied by the batch again)."""
    from skipbench.experiments.bench import phase_rows

    timings = [("prefill", 0.5), ("decode", 0.1), ("decode", 0.3)]
    rows = {r["phase"]: r for r in phase_rows(timings, [[1, 2, 3], [4, 5, 6, 7, 8]], 3, variant="v")}
    assert rows["prefill"]["tokens"] == 8 and rows["prefill"]["tokens_per_s"] == 8 / 0.5
    assert rows["decode"]["tokens"] == 4 and rows["decode"]["tokens_per_s"] == 4 / 0.4
    assert rows["decode"]["steps"] == 2 and rows["decode"]["step_p50"] == 0.2 and rows["decode"]["variant"] == "v"


def test_summary_on_synthetic_timings():
    from skipbench.experiments.bench import summarise

    def row(variant, tps, p50, layers, kind="policy"):
        return {"batch_size": 1, "variant": variant, "kind": kind, "kv_mode": "fill", "phase": "decode",
                "tokens_per_s": tps, "step_p50": p50, "step_p90": p50, "step_mean": p50, "layers_mean": layers,
                "peak_memory_mb": 1.0}

    spec = row("spec d k=2", 8.0, 0.2, 70, "speculative") | {
        "acceptance_prob": 0.5, "k_mean": 2.0, "expected_per_round": 1.75, "tokens_per_round": 1.5, "t_draft": 0.03,
        "t_verify": 0.12}
    full = row("full", 10.0, 0.1, 30) | {"step_mean": 0.11}  # the ideal reads the median step, speculation the mean
    df = pd.DataFrame([row("hf-generate", 8.0, 0.125, 30, "baseline"), full, row("uniform:15", 15.0, 0.066, 15), spec])
    s = summarise(df, {1: 0.02}, 30).set_index("variant")
    # speculative: E tokens per round over K t_draft + t_verify (means), against full depth's mean step (0.11 s)
    assert s.loc["spec d k=2", "predicted_speedup"] == pytest.approx(1.75 * 0.11 / (2 * 0.03 + 0.12))
    assert s.loc["spec d k=2", "cost_model_speedup"] == pytest.approx(1.5 * 0.11 / (2 * 0.03 + 0.12))
    assert s.loc["spec d k=2", "speedup"] == pytest.approx(0.8) and np.isnan(s.loc["spec d k=2", "ideal_speedup"])
    assert np.isnan(s.loc["uniform:15", "predicted_speedup"])
    assert s.loc["uniform:15", "speedup"] == pytest.approx(1.5)
    # ideal: T_full / (F + m/L (T_full - F)) = 0.1 / (0.02 + 0.5 * 0.08)
    assert s.loc["uniform:15", "ideal_speedup"] == pytest.approx(0.1 / 0.06)
    assert s.loc["uniform:15", "realized_over_ideal"] == pytest.approx(1.5 / (0.1 / 0.06))
    assert s.loc["full", "vs_generate"] == pytest.approx(1.25) and s.loc["full", "kv_mode"] == "fill"


def test_batch_ideal_counts_what_the_batch_can_skip():
    """The batch ideal weighs the parts any row ran per step by the cost table's dense times: a per-token policy
    whose every layer has a running row gets 1; a layer whose rows all skip but keep their K/V costs the K/V."""
    from skipbench.engine.costs import LayerCosts
    from skipbench.experiments.bench import summarise

    def row(variant, tps, layers, attention, mlp, kv=0.0):
        return {"batch_size": 8, "variant": variant, "kind": "policy", "kv_mode": "fill", "phase": "decode",
                "tokens_per_s": tps, "step_p50": 0.1, "step_p90": 0.1, "step_mean": 0.1, "layers_mean": layers,
                "peak_memory_mb": 1.0, "policy_s": 0.001, "attention_layers": attention, "mlp_layers": mlp,
                "kv_layers": kv, "dense_layers": 0.0, "gathered_layers": 0.0}

    parts = {8: {"fill": LayerCosts(batch=8, rows=(8,), dense=(1.0,), gathered=(1.0,), routed_dense=(1.0,),
                                    routed_gathered=(1.0,), attention=0.001, mlp=0.002, kv=0.0005)}}
    df = pd.DataFrame([row("full", 10.0, 30, 30, 30), row("random-token:22", 9.8, 22, 30, 30),
                       row("flexi", 9.0, 20, 20, 20, kv=10), row("uniform:15", 15.0, 15, 15, 15, kv=15)])
    s = summarise(df, {8: 0.01}, 30, parts).set_index("variant")
    assert s.loc["random-token:22", "ideal_batch_speedup"] == pytest.approx(1.0)
    assert s.loc["random-token:22", "realized_over_batch_ideal"] == pytest.approx(0.98)
    assert s.loc["random-token:22", "ideal_speedup"] > 1.2  # the layer count promises what the batch cannot skip
    # FlexiDepth: 20 attentions and 20 MLPs at 1 and 2 ms, and the K/V alone (0.5 ms) at the 10 layers no row ran:
    # (20 + 40 + 5) / 90 of the layers' 0.09 s (its skipped tokens compute no attention, only their K/V)
    assert s.loc["flexi", "ideal_batch_speedup"] == pytest.approx(0.1 / (0.01 + 65 / 90 * 0.09))
    # fill mode: the skipped layers' K/V (0.5 ms each) are still written
    assert s.loc["uniform:15", "ideal_batch_speedup"] == pytest.approx(0.1 / (0.01 + (45 + 7.5) / 90 * 0.09))
    assert s.loc["random-token:22", "policy_share"] == pytest.approx(0.01)


def test_every_bench_row_names_its_kv_mode(tiny_dirs, tmp_path):
    """One default (auto: `none` for a static plan, else `fill`) as in evaluate; a router trained without K/V runs
    `none`, and asking for `fill` with it is refused in one line instead of being silently overridden."""
    from conftest import no_kv_router

    router = no_kv_router(tmp_path / "r")
    out = tmp_path / "bench.parquet"
    args = ["bench", "--model", str(tiny_dirs["llama"]), "--batch-sizes", "1", "--policy", f"full,uniform:3,flexidepth:{router}",
            "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    modes = pd.read_parquet(out).groupby("variant")["kv_mode"].agg(set).to_dict()
    assert modes == {"hf-generate": {"fill"}, "full": {"fill"}, "uniform:3": {"none"}, "removed:uniform:3": {"fill"},
                     f"flexidepth:{router}": {"none"}}
    res = CliRunner().invoke(app, [*args, "--kv-mode", "fill", "--out", str(tmp_path / "b2.parquet")])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "conflicts with policy" in res.stderr and not (tmp_path / "b2.parquet").exists()


def test_phase_rows_of_a_speculative_run_count_rounds_as_steps():
    """A speculative run's decode step is a round (its draft steps, verify pass and acceptance); its tokens are
    every token after the first, whatever the rounds accepted; acceptance columns stay off the prefill row."""
    from skipbench.experiments.bench import phase_rows

    timings = [("prefill", 0.5), ("draft", 0.1), ("draft", 0.1), ("verify", 0.2), ("accept", 0.01),
               ("verify", 0.2), ("accept", 0.02)]
    rows = {r["phase"]: r for r in phase_rows(timings, [[1, 2], [3]], 5, variant="s", acceptance_prob=0.5)}
    assert rows["decode"]["steps"] == 2 and rows["decode"]["tokens"] == 8
    assert rows["decode"]["seconds"] == pytest.approx(0.63) and rows["decode"]["step_p50"] == pytest.approx(0.315)
    assert rows["decode"]["acceptance_prob"] == 0.5 and "acceptance_prob" not in rows["prefill"]


def test_lockstep_decodings_give_their_own_tokens_and_clocks(tokenizer):
    """Decodings advanced in turn (bench's lockstep) give the tokens each gives alone, and each clock counts only
    its own steps: a decoding beside one whose gates sleep 20 ms per layer does not take on that time."""
    import time

    from conftest import prompts, tiny_model
    from skipbench.engine.decode import decoding, generate
    from skipbench.engine.protocol import Policy
    from skipbench.experiments.bench import Variant, lockstep
    from skipbench.models import wrap_model
    from skipbench.policies import make_policy

    class Sleepy(Policy):
        static = True

        def gate(self, layer, hidden):
            time.sleep(0.02)
            return True

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    ps = prompts(tokenizer, 3)

    def variant(name, policy):
        def start(p):
            timings = []
            return decoding(lm, p, policy, 6, stop_at_eos=False, timings=timings), lambda gen: (timings, gen)
        return Variant(name, None, "policy", start=start)

    # alone first: a per-token policy under `auto` measures its layer cost table on first need (once per shape and
    # machine), which must not land on a clock compared below
    alone = {name: generate(lm, ps, policy, 6, stop_at_eos=False)
             for name, policy in (("fast", make_policy("random-token:3", 6, seed=1)), ("slow", Sleepy(6)))}
    out = lockstep([variant("fast", make_policy("random-token:3", 6, seed=1)), variant("slow", Sleepy(6))], ps)
    for name in ("fast", "slow"):
        timings, gen = out[name]
        assert gen.tokens == alone[name].tokens and gen.layers == alone[name].layers
        assert [p for p, _ in timings] == ["prefill"] + ["decode"] * 5
    assert min(t for p, t in out["slow"][0] if p == "decode") >= 6 * 0.02
    assert max(t for _, t in out["fast"][0]) < 6 * 0.02  # the slow one's steps are not on the fast one's clock


def test_weight_bytes_add_up_to_the_model(tiny_dirs):
    """Every weight a full-depth decode step reads: L layers, the final norm and the head (the embedding too
    when it is the head's own matrix; otherwise the lookup reads one row and is left out)."""
    for family in ("llama", "opt"):
        lm = load_model(str(tiny_dirs[family]), "cpu", "float32")
        w, model = lm.adapter.weight_bytes(), lm.model
        total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix once
        embed = model.get_input_embeddings().weight
        tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        others = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if ".layers." not in n and "lm_head" not in n and "embed_tokens" not in n)  # norms, OPT's positions
        assert lm.num_layers * w["layer"] + w["head"] + (0 if tied else embed.numel() * 4) + others == total, family
        assert w["attention"] + w["mlp"] == w["layer"] and 0 < w["kv"] < w["attention"]


def test_the_read_rate_is_measured_once_and_kept(tmp_path, monkeypatch):
    """Like the layer cost tables: measured once per machine and dtype, then read from the cache; a damaged record
    is measured again with a note, and --recalibrate measures again."""
    import torch

    from skipbench.engine import costs

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(costs, "RATE_BYTES", 4 * 2**20)  # a small matrix: this tests the caching, not the machine
    costs._READ.clear()
    first = costs.read_rate(torch.device("cpu"), torch.float32)
    assert first.bytes_per_s > 0 and first.dtype == "float32"
    costs._READ.clear()
    monkeypatch.setattr(costs, "measure_read_rate", lambda *a: pytest.fail("measured again"))
    assert costs.read_rate(torch.device("cpu"), torch.float32) == first  # from the cache file
    (record,) = (tmp_path / "read-rate").iterdir()
    record.write_text("{not json")
    costs._READ.clear()
    monkeypatch.setattr(costs, "measure_read_rate", lambda *a: costs.ReadRate(1.0, (1, 1), "float32"))
    assert costs.read_rate(torch.device("cpu"), torch.float32).bytes_per_s == 1.0
    costs._READ.clear()
