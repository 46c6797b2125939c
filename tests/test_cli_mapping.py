"""The command line maps each flag to the recipe's config: the recipe's `run` is replaced by one that records the config
it gets, so a flag is checked without running a model."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.store.results import Written


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def recorder(module, name="run"):
        def fake(cfg, *args, **kwargs):
            seen["cfg"] = cfg
            return Written(rows=None, shown=[], said=[])
        monkeypatch.setattr(module, name, fake)

    return seen, recorder


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_evaluate_maps_its_flags(captured):
    import skipbench.evaluation.quality as quality

    seen, record = captured
    record(quality)
    invoke("evaluate", "--dataset", "arith", "--split", "test", "--limit", 5, "--policy", "uniform:3",
           "--policy", "random", "--costs", 2, "--seed", 7, "--data-seed", 3, "--per-token", "--max-new-tokens", 9,
           "--batch-size", 2, "--kv-mode", "none", "--impl", "gather", "-o", "min-layers=2", "--policy", "confidence:0.9",
           "--draft", "early-exit:2", "--speculate", "auto", "--draft-vocab", 64, "--out", "x/e.parquet", "--no-resume")
    cfg = seen["cfg"]
    assert [p.label for p in cfg.policies] == ["uniform:3", "random-token:2", "confidence:0.9[min-layers=2]"]
    assert {p.seed for p in cfg.policies} == {7} and cfg.seed == 7  # --seed: the random draws
    assert (cfg.data.name, cfg.data.split, cfg.data.limit, cfg.data.seed) == ("arith", "test", 5, 3)  # --data-seed
    assert (cfg.max_new_tokens, cfg.batch_size, cfg.kv_mode, cfg.impl, cfg.resume) == (9, 2, "none", "gather", False)
    assert cfg.draft.label == "early-exit:2" and cfg.speculation.adaptive and cfg.out == "x/e.parquet"
    assert cfg.speculation.draft_vocab == 64 and cfg.speculation.label == "auto/v64"
    # an -o only the draft takes goes to the draft alone
    invoke("evaluate", "--policy", "full", "-o", "min-layers=2", "--draft", "confidence:0.9")
    assert [p.label for p in seen["cfg"].policies] == ["full"] and seen["cfg"].draft.label == "confidence:0.9[min-layers=2]"


def test_bench_and_cosine_map_their_flags(captured):
    import skipbench.experiments.bench as bench
    import skipbench.experiments.cosine as cosine

    seen, record = captured
    record(bench)
    invoke("bench", "--policy", "full,uniform:3", "--batch-sizes", "1,4", "--max-new-tokens", 12, "--repeats", 2,
           "--warmup", 0, "--draft", "early-exit:2", "--speculate", "2,3", "--impl", "all", "--no-lockstep")
    cfg = seen["cfg"]
    assert [p.label for p in cfg.policies] == ["full", "uniform:3"] and [d.label for d in cfg.drafts] == ["early-exit:2"]
    assert (cfg.batch_sizes, cfg.max_new_tokens, cfg.repeats, cfg.warmup, cfg.impl, cfg.lockstep) == ((1, 4), 12, 2, 0, "all", False)
    assert [s.k for s in cfg.speculations] == [2, 3] and not cfg.draft_search
    invoke("bench", "--draft", "early-exit:2", "--speculate", "2,3", "--draft-vocab", "0,32")
    assert [(s.k, s.draft_vocab) for s in seen["cfg"].speculations] == [(2, 0), (3, 0), (2, 32), (3, 32)]
    invoke("bench", "--draft", "auto")
    assert seen["cfg"].draft_search and seen["cfg"].drafts == ()
    # an -o goes to the policies and drafts whose strategy takes it, as in evaluate and generate
    invoke("bench", "--policy", "confidence:0.9", "-o", "min-layers=2", "--draft", "early-exit:2,confidence:0.8")
    assert [p.label for p in seen["cfg"].policies] == ["confidence:0.9[min-layers=2]"]
    assert [d.label for d in seen["cfg"].drafts] == ["early-exit:2", "confidence:0.8[min-layers=2]"]
    record(cosine)
    invoke("cosine", "--policy", "uniform,random", "--policy", "confidence:0.9", "--costs", "2,4", "--num-seeds", 2,
           "--teacher", "reference", "--limit", 3)
    cfg = seen["cfg"]
    assert cfg.strategies == ("uniform", "random", "confidence:0.9") and cfg.costs == (2, 4)
    assert (cfg.num_seeds, cfg.teacher, cfg.data.limit) == (2, "reference", 3)


def test_track_runs_the_default_methods_and_the_searched_draft_unless_methods_are_given(captured):
    import skipbench.experiments.track as track

    seen, record = captured
    record(track)
    invoke("track")
    cfg = seen["cfg"]  # the defaults the 20-minute figure in docs/BENCHMARKS.md was measured with
    assert cfg.drafts is None and cfg.draft_search and (cfg.per_category, cfg.max_new_tokens) == (1, 64)
    assert cfg.out == "results/track-smollm2-135m-spec-bench.parquet"  # the report's section reads it
    invoke("track", "--draft", "auto")
    assert seen["cfg"].drafts == () and seen["cfg"].draft_search  # the searched set alone
    invoke("track", "--draft", "early-exit:3,del", "--per-category", 2, "--max-new-tokens", 128)
    cfg = seen["cfg"]
    assert [d.label for d in cfg.drafts] == ["early-exit:3", "del"] and not cfg.draft_search
    assert (cfg.per_category, cfg.max_new_tokens) == (2, 128)
    invoke("track", "--draft", "clasp:3", "--draft", "auto")
    assert [d.label for d in seen["cfg"].drafts] == ["clasp:3"] and seen["cfg"].draft_search
    invoke("track", "--draft", "del,auto,layers:0,2,3")  # auto as an item of a list; a layer list keeps its numbers
    assert [d.label for d in seen["cfg"].drafts] == ["del", "layers:0,2,3"] and seen["cfg"].draft_search


def test_compare_takes_the_presets_settings_only_where_no_flag_is_given(captured):
    import skipbench.experiments.compare as compare

    seen, record = captured
    record(compare)
    invoke("compare", "--preset", "paper", "--policy", "shortgpt", "--policy", "laco", "--skip", 4)
    cfg = seen["cfg"]
    assert cfg.methods == ("shortgpt", "laco") and cfg.skip == (4,)  # given: kept
    assert cfg.model == "meta-llama/Meta-Llama-3-8B-Instruct" and "mmlu" in cfg.tasks and cfg.chat_template is False
    assert cfg.out == "results/compare-meta-llama_Meta-Llama-3-8B-Instruct.parquet"  # the preset's model names it
    invoke("compare", "--out", "x/c.parquet")
    assert seen["cfg"].out == "x/c.parquet"


def test_controllers_sweep_maps_joint_training_and_the_metric(captured):
    import skipbench.experiments.controllers as controllers

    seen, record = captured
    record(controllers, "run_sweep")
    invoke("controllers", "sweep", "--alpha", "2,10", "--num-seeds", 2, "--metric", "rougeL", "--train-backbone",
           "--backbone-lr", "3e-5", "--train-limit", 8)
    cfg = seen["cfg"]
    assert cfg.alphas == (2.0, 10.0) and cfg.num_seeds == 2 and cfg.metric == "rougeL"
    assert cfg.train.train_backbone and cfg.train.backbone_lr == 3e-5 and cfg.train.data.limit == 8
    assert cfg.matched_random  # each run beside its random control unless asked not to
    invoke("controllers", "sweep", "--no-matched-random")
    assert not seen["cfg"].matched_random
