"""The lm-evaluation-harness backend on tiny models: scoring equals transformers (full depth, and a static plan's
physically smaller model with a full-depth context), scores follow the policy, generation stops at stop strings,
and `skipbench lm-eval` runs end to end on a shipped offline task and resumes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, tiny_model

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from skipbench.cli import app  # noqa: E402
from skipbench.evaluation.lmeval_model import SkipbenchLM, request_key  # noqa: E402
from skipbench.models import wrap_model  # noqa: E402
from skipbench.models.loading import remove_layers  # noqa: E402
from skipbench.policies import make_policy  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request, tokenizer, device):
    return wrap_model(tiny_model(request.param, len(tokenizer)), tokenizer, f"tiny-{request.param}", device)


def requests_of(tokenizer, n: int = 4) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists of different lengths (continuations of 1 to 6 tokens)."""
    out = []
    for i, text in enumerate(CORPUS[:n]):
        ids = tokenizer(text)["input_ids"]
        cut = len(ids) - 1 - (i * 5) % 6 if i else len(ids) - 1  # the first: a one-token continuation
        out.append((ids[:cut], ids[cut:]))
    return out


def score(model: SkipbenchLM, reqs) -> list[tuple[float, bool]]:
    return model._loglikelihood_tokens([((None, None), ctx, cont) for ctx, cont in reqs])


def logprobs(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    lp = torch.log_softmax(logits.float(), -1)
    t = torch.tensor(targets)
    return float(lp[torch.arange(len(t)), t].sum()), bool((logits.argmax(-1) == t).all())


@pytest.mark.lane
def test_full_loglikelihood_equals_transformers(lm, tokenizer):
    model = SkipbenchLM(model="tiny", lm=lm, policy="full", batch_size=3)
    reqs = requests_of(tokenizer)
    ctx = reqs[1][0]  # and a continuation of the model's own greedy tokens: is_greedy must be True for it
    own = lm.model.generate(torch.tensor([ctx], device=lm.device), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)[0, len(ctx):]
    reqs.append((ctx, own.tolist()))
    ours = score(model, reqs)
    for (ctx, cont), (lp, greedy) in zip(reqs, ours):
        logits = lm.model(torch.tensor([ctx + cont], device=lm.device)).logits[0, len(ctx) - 1 : -1].cpu()
        ref_lp, ref_greedy = logprobs(logits, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert ours[-1][1] is True


def _hf_smaller_with_full_context(lm, keep, ctx, cont):
    """transformers only: the full model runs the context (its cache), the model with only `keep` continues from the
    kept layers' cache entries; the first continuation token is scored by the full model's last context logits."""
    full = lm.model(torch.tensor([ctx]), use_cache=True)
    cache = DynamicCache()
    for new, old in enumerate(keep):
        layer = full.past_key_values.layers[old]
        cache.update(layer.keys, layer.values, new)
    logits = [full.logits[0, -1:]]
    if len(cont) > 1:
        smaller = remove_layers(lm.model, keep, share_weights=False)
        positions = torch.arange(len(ctx), len(ctx) + len(cont) - 1)[None]
        logits.append(smaller(torch.tensor([cont[:-1]]), past_key_values=cache, position_ids=positions,
                              use_cache=True).logits[0])
    return logprobs(torch.cat(logits), cont)


@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("spec", ["uniform:3", "early-exit:2", "layers:0,2,5"])
def test_static_plan_scores_equal_the_smaller_model_with_a_full_depth_context(lm, tokenizer, spec, kv_mode):
    model = SkipbenchLM(model="tiny", lm=lm, policy=spec, kv_mode=kv_mode, batch_size=4)
    keep = make_policy(spec, lm.num_layers).executed_layers()
    reqs = requests_of(tokenizer)
    for (ctx, cont), (lp, greedy) in zip(reqs, score(model, reqs)):
        ref_lp, ref_greedy = _hf_smaller_with_full_context(lm, keep, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    # the layers counted: continuation tokens fed back, each through the plan's layers (and their attention)
    assert model._pending == [(len(cont) - 1, (len(cont) - 1) * len(keep), (len(cont) - 1) * len(keep)) for _, cont in reqs]


def test_prompt_depth_policy_scores_equal_the_smaller_model(lm, tokenizer):
    model = SkipbenchLM(model="tiny", lm=lm, policy="uniform:3", prompt_depth="policy", batch_size=4)
    keep = make_policy("uniform:3", lm.num_layers).executed_layers()
    smaller = remove_layers(lm.model, keep, share_weights=False)
    reqs = requests_of(tokenizer)
    for (ctx, cont), (lp, _) in zip(reqs, score(model, reqs)):
        logits = smaller(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
        assert lp == pytest.approx(logprobs(logits, cont)[0], abs=1e-4)
    # a single-token continuation, scored from the context alone, now depends on the policy
    one = [r for r in reqs if len(r[1]) == 1]
    full = SkipbenchLM(model="tiny", lm=lm, policy="full")
    assert one and score(model, one)[0][0] != pytest.approx(score(full, one)[0][0], abs=1e-3)


def test_scores_differ_between_policies_and_not_with_the_batch(lm, tokenizer):
    reqs = requests_of(tokenizer)
    scores = {}
    for spec in ("full", "early-exit:2", "uniform:3", "random:3", "random-token:3"):
        together = score(SkipbenchLM(model="tiny", lm=lm, policy=spec, batch_size=4), reqs)
        alone = [score(SkipbenchLM(model="tiny", lm=lm, policy=spec, batch_size=1), [r])[0] for r in reqs]
        for (a, ga), (b, gb) in zip(together, alone):  # a request's draw depends on its context, not its batch
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
        scores[spec] = [s for s, _ in together]
    multi = [i for i, (_, cont) in enumerate(reqs) if len(cont) > 1]
    for a in scores:
        for b in scores:
            if a < b:
                assert any(abs(scores[a][i] - scores[b][i]) > 1e-3 for i in multi), (a, b)


def test_rolling_loglikelihood_under_full_depth_equals_transformers(lm, tokenizer):
    model = SkipbenchLM(model="tiny", lm=lm, policy="full", max_length=64)
    text = CORPUS[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    inst = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0, metadata=("t", 0, 1))
    ours = model.loglikelihood_rolling([inst])[0]
    whole = [model.prefix_token_id] + ids
    logits = lm.model(torch.tensor([whole])).logits[0, :-1]
    assert ours == pytest.approx(logprobs(logits, ids)[0], abs=1e-4)
    # short windows: each scored as a continuation of its own context, every token once, each under the policy
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, model.prefix_token_id, 5, 1)]
    assert len(windows) > 2 and sum(len(c) for _, c in windows) == len(ids)
    ref = sum(logprobs(lm.model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1], cont)[0] for ctx, cont in windows)
    five = SkipbenchLM(model="tiny", lm=lm, policy="full", max_length=5, batch_size=2)
    assert five.loglikelihood_rolling([inst])[0] == pytest.approx(ref, abs=1e-4)
    short = SkipbenchLM(model="tiny", lm=lm, policy="uniform:3", max_length=5)
    short.loglikelihood_rolling([inst])
    assert short.usage[-1].task == "t" and short.usage[-1].layer_passes == 3 * short.usage[-1].tokens
    assert short.usage[-1].tokens == len(ids) - len(windows)  # each window's last token is not fed back


def test_generate_until_stops_at_the_stop_string(lm, tokenizer):
    model = SkipbenchLM(model="tiny", lm=lm, policy="uniform:4", batch_size=2)
    ctxs = CORPUS[:2]

    def ask(until):
        reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, {"until": until, "max_gen_toks": 24}),
                         idx=0, metadata=("gen", i, 1)) for i, c in enumerate(ctxs)]
        return model.generate_until(reqs), [u.tokens for u in model.usage[-len(ctxs):]]

    free, free_tokens = ask([])
    stop = free[0][len(free[0]) // 2 : len(free[0]) // 2 + 2]  # a string from the middle of the first output
    assert stop.strip() and free[0].index(stop) > 0
    cut, cut_tokens = ask([stop])
    assert cut[0] == free[0].split(stop)[0]
    assert cut_tokens[0] < free_tokens[0]  # it stopped generating, not only cut the text
    assert cut[1] == free[1].split(stop)[0]
    assert max(free_tokens) <= 23  # max_gen_toks bounds it (24 new tokens, 23 fed back)
    # lm-eval's rules for settings: do_sample false is greedy whatever the temperature; unknown settings refused
    reqs = [Instance(request_type="generate_until", doc={}, idx=0, metadata=("gen", 0, 1),
                     arguments=(ctxs[0], {"until": [], "max_new_tokens": 24, "do_sample": False, "temperature": 0.7}))]
    assert model.generate_until(reqs) == free[:1]
    from skipbench.errors import SkipbenchError

    with pytest.raises(SkipbenchError, match="num_beams"):
        model.generate_until([Instance(request_type="generate_until", doc={}, idx=0, metadata=("gen", 0, 1),
                                       arguments=(ctxs[0], {"until": [], "num_beams": 4}))])


def test_registered_model_args_and_bad_arguments(lm, tokenizer, tiny_dirs):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from skipbench.errors import SkipbenchError
    from skipbench.evaluation.lmeval_model import TASKS_DIR

    assert get_model("skipbench") is SkipbenchLM
    res = lm_eval.simple_evaluate(model="skipbench", model_args=f"model={tiny_dirs['llama']},policy=uniform:3",
                                  tasks=["skipbench_choice"], limit=2, batch_size="auto", max_batch_size=3,
                                  task_manager=TaskManager(include_defaults=False, include_path=str(TASKS_DIR)))
    direct = lm_eval.simple_evaluate(model=SkipbenchLM(model=str(tiny_dirs["llama"]), policy="uniform:3"),
                                     tasks=["skipbench_choice"], limit=2, bootstrap_iters=0,
                                     task_manager=TaskManager(include_defaults=False, include_path=str(TASKS_DIR)))
    assert res["results"]["skipbench_choice"]["acc,none"] == direct["results"]["skipbench_choice"]["acc,none"]
    assert res["config"]["batch_size"] == "auto"
    model = SkipbenchLM.create_from_arg_string(
        f"model={tiny_dirs['llama']},policy=confidence:0.9,policy_options=min-layers=2;measure=state", {"batch_size": 2})
    assert model.spec.label == "confidence:0.9[measure=state;min-layers=2]" and model.batch_size == 2
    model = SkipbenchLM.create_from_arg_string(f"model={tiny_dirs['llama']},policy=layers:0;2;5",
                                               {"batch_size": "auto", "max_batch_size": 3})
    assert model.spec.label == "layers:0,2,5" and model.batch_size == 3
    with pytest.raises(SkipbenchError, match="unknown argument"):
        SkipbenchLM(model="tiny", lm=lm, polcy="uniform:3")
    with pytest.raises(SkipbenchError, match="names 2 points"):
        SkipbenchLM(model="tiny", lm=lm, policy="uniform:2;3")
    assert request_key([1, 2, 3]) == request_key([1, 2, 3]) != request_key([1, 2, 4])


def test_shipped_tasks_use_evaluates_items_and_splits():
    from skipbench.data import DataSpec, load_items
    from skipbench.tasks import utils

    for split in ("train", "test"):
        ids = {it.item_id for it in load_items(DataSpec(name="text", split=split)) if it.subtask == "qa"}
        assert set(utils.text_qa()[split]["item_id"]) == ids
    choice = utils.choice()
    from skipbench.data.synthetic import text

    paragraphs = {it.prompt.split("\n\n")[1] for it in text()}  # no choice paragraph is a text item's
    assert not paragraphs & {doc["paragraph"] for s in utils.SPLITS for doc in choice[s]}
    splits = {s: set(choice[s]["item_id"]) for s in utils.SPLITS}
    assert not (splits["train"] & splits["test"]) and not (splits["validation"] & splits["test"])
    assert len(splits["test"]) == 150
    for doc in choice["test"]:
        first_words = {c.split(" in ")[0] for c in doc["choices"]}
        assert len(set(doc["choices"])) == 4 and len(first_words) == 1  # decided by later tokens


def test_lm_eval_command_end_to_end_and_resumes(tiny_dirs, tmp_path):
    out = tmp_path / "lm.parquet"
    args = ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", "skipbench_choice,skipbench_text_qa",
            "--policy", "uniform:3", "--policy", "early-exit:2", "--limit", "4", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out)
    assert set(rows["task"]) == {"skipbench_choice", "skipbench_text_qa"}
    assert set(rows["policy_spec"]) == {"full", "uniform:3", "early-exit:2"}
    assert {"acc", "acc_norm", "exact_match", "rougeL"} <= set(rows["metric"])
    choice = rows[(rows["task"] == "skipbench_choice") & (rows["metric"] == "acc")].set_index("policy_spec")
    assert choice["n"].tolist() == [4, 4, 4]
    assert choice.loc["uniform:3", "layers_mean"] == 3 and choice.loc["full", "layers_mean"] == 6
    assert choice.loc["early-exit:2", "layers_mean"] == 2
    for label in ("full", "uniform_3", "early-exit_2"):  # lm-eval's own results, per point
        raw = json.loads((tmp_path / "lm-lmeval" / f"{label}.json").read_text())
        assert set(raw["results"]) == {"skipbench_choice", "skipbench_text_qa"}
        assert raw["results"]["skipbench_choice"]["acc,none"] == choice.loc[label.replace("_", ":"), "value"]
    assert (tmp_path / "lm.png").stat().st_size > 0
    # the per-document scores: their means are lm-eval's results, and the paired tests read them
    docs = pd.read_parquet(tmp_path / "lm-docs.parquet")
    means = docs.groupby(["task", "metric", "filter", "policy_spec"])["value"].mean()
    for r in rows[rows["filter"] == "none"].itertuples():
        if (r.task, r.metric, r.filter, r.policy_spec) in means.index:
            assert means[(r.task, r.metric, r.filter, r.policy_spec)] == pytest.approx(r.value)
    from scipy.stats import binomtest

    from skipbench.analysis.lmeval_tables import summarise, with_paired_tests

    s = with_paired_tests(summarise(rows), docs).set_index(["task", "policy_spec"])
    acc = docs[(docs["task"] == "skipbench_choice") & (docs["metric"] == "acc")].pivot(
        index="doc_id", columns="policy_spec", values="value")
    only_full = int(((acc["full"] == 1) & (acc["uniform:3"] == 0)).sum())
    only_uniform = int(((acc["full"] == 0) & (acc["uniform:3"] == 1)).sum())
    mcnemar = 1.0 if only_full + only_uniform == 0 else binomtest(only_full, only_full + only_uniform).pvalue
    got = s.loc[("skipbench_choice", "uniform:3")]
    assert got["paired_test"] == "McNemar exact" and got["p_vs_full"] == pytest.approx(min(1.0, mcnemar))
    assert got["diff_vs_full"] == pytest.approx(acc["uniform:3"].mean() - acc["full"].mean())
    assert got["diff_lo"] <= got["diff_vs_full"] <= got["diff_hi"] and got["paired_docs"] == 4
    (tmp_path / "lm.parquet").rename(tmp_path / "lmeval-lm.parquet")  # the report reads lmeval-*.parquet
    (tmp_path / "lm.json").rename(tmp_path / "lmeval-lm.json")
    (tmp_path / "lm.png").rename(tmp_path / "lmeval-lm.png")
    for name in ("lm-docs.parquet", "lm-docs.json"):
        (tmp_path / name).rename(tmp_path / name.replace("lm-", "lmeval-lm-"))
    assert CliRunner().invoke(app, ["report", "--results", str(tmp_path)]).exit_code == 0
    page = (tmp_path / "REPORT.md").read_text()
    assert "## lm-evaluation-harness tasks (`lmeval-lm.parquet`)" in page and "![lmeval-lm](lmeval-lm.png)" in page
    assert "skipbench_text_qa" in page and "early-exit:2" in page
    out = tmp_path / "lmeval-lm.parquet"
    args[-1] = str(out)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "6 finished part(s) reused" in again.output.replace("\n", " ")
    pd.testing.assert_frame_equal(pd.read_parquet(out).drop(columns="run_id"), rows.drop(columns="run_id"))


def test_a_users_task_yaml_is_loaded_by_its_path(tiny_dirs, tmp_path):
    """A task file outside the package: lm-eval loads it by path (its `!function utils.*` beside it); here a copy of
    the shipped text_qa under another name gives the shipped task's rows."""
    import shutil

    from skipbench.evaluation.lmeval_model import TASKS_DIR

    mine = tmp_path / "mytasks"
    mine.mkdir()
    shutil.copy(TASKS_DIR / "utils.py", mine / "utils.py")
    text = (TASKS_DIR / "text_qa.yaml").read_text().replace("task: skipbench_text_qa", "task: my_qa")
    (mine / "my_qa.yaml").write_text(text.replace("tag: [skipbench, skipbench_text]", "tag: [mine]"))
    res = CliRunner().invoke(app, ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks",
                                   f"skipbench_text_qa,{mine / 'my_qa.yaml'}", "--policy", "uniform:3", "--limit", "3",
                                   "--out", str(tmp_path / "lm.parquet")])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(tmp_path / "lm.parquet").set_index(["task", "metric", "policy_spec"])["value"]
    assert len(rows) == 8
    for metric in ("exact_match", "rougeL"):
        for spec in ("full", "uniform:3"):
            assert rows["my_qa", metric, spec] == rows["skipbench_text_qa", metric, spec]


def test_lm_eval_bad_input_is_one_line(tiny_dirs, tmp_path):
    runner = CliRunner()
    for tasks, message in (("nosuch_task", "unknown lm-eval task"), (str(tmp_path / "missing.yaml"), "does not exist"),
                           ("arc_easy", "task 'arc_easy' cannot be loaded")):  # a hub task without the hub
        res = runner.invoke(app, ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", tasks,
                                  "--out", str(tmp_path / "x.parquet")])
        assert res.exit_code == 1 and message in res.output
        assert "Traceback" not in res.output and not (tmp_path / "x.parquet").exists()
    for length, message in (("100000", "leaves no room for a prompt"), ("-1", "max-gen-toks")):
        res = runner.invoke(app, ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", "skipbench_text_qa",
                                  "--max-gen-toks", length, "--out", str(tmp_path / "x.parquet")])
        assert res.exit_code == 1 and message in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "x.parquet").exists()


def test_lm_eval_missing_says_how_to_install(tiny_dirs, tmp_path, monkeypatch):
    import sys

    import skipbench

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    import skipbench.evaluation

    monkeypatch.delitem(sys.modules, "skipbench.evaluation.lmeval_model", raising=False)
    monkeypatch.delattr(skipbench.evaluation, "lmeval_model", raising=False)
    res = CliRunner().invoke(app, ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", "skipbench_choice",
                                   "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 1 and "pip install 'skipbench[lmeval]'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.parquet").exists()


def test_tok_encode_adds_bos_where_the_tokenizer_does(tokenizer):
    """As lm-eval's HF backend: the tokenizer's own default (here a BOS), except for text already beginning with it."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 2)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<unk>")
    model = SkipbenchLM(model="tiny", lm=wrap_model(tiny_model("llama", len(tokenizer)), with_bos, "tiny-bos"))
    plain = tokenizer("Copy the paragraph", add_special_tokens=False)["input_ids"]
    assert model.tok_encode("Copy the paragraph") == [2, *plain]
    assert model.tok_encode("<unk>Copy the paragraph") == [2, *plain]  # no second BOS
    assert model.tok_encode("Copy the paragraph", add_special_tokens=False) == plain


def test_torchrun_padding_requests_are_not_counted(lm, tokenizer):
    """lm-eval pads a rank's requests with copies of its last one; the copies' cost is not the task's."""
    model = SkipbenchLM(model="tiny", lm=lm, policy="uniform:3")
    ctx, cont = CORPUS[0][:20], CORPUS[0][20:]
    inst = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0, metadata=("t", 0, 1))
    other = Instance(request_type="loglikelihood", doc={}, arguments=(CORPUS[1][:9], CORPUS[1][9:]), idx=0,
                     metadata=("t", 1, 1))
    out = model.loglikelihood([other, inst, inst, inst])
    assert out[1] == out[2] == out[3] and len(model.usage) == 2


def test_the_logits_budget_splits_batches_without_changing_scores(lm, tokenizer, monkeypatch):
    import skipbench.evaluation.lmeval_model as backend

    reqs = requests_of(tokenizer)
    whole = score(SkipbenchLM(model="tiny", lm=lm, policy="random:3", batch_size=4), reqs)
    vocab = lm.model.config.vocab_size
    monkeypatch.setattr(backend, "LOGITS_BUDGET", 3 * vocab)  # 3 continuation tokens' logits per batch
    model = SkipbenchLM(model="tiny", lm=lm, policy="random:3", batch_size=4)
    seen = []
    real = model._score
    model._score = lambda batch: seen.append([len(c) for _, c in batch]) or real(batch)
    assert [s for s, _ in score(model, reqs)] == pytest.approx([s for s, _ in whole], abs=1e-4)
    assert all(len(b) == 1 or len(b) * max(b) <= 3 for b in seen) and len(seen) > 1
    assert all(b == sorted(b, reverse=True) for b in seen)  # longest continuation first: the first row sets the width


def test_max_length_and_generation_settings(lm, tokenizer):
    from skipbench.errors import SkipbenchError

    model = SkipbenchLM(model="tiny", lm=lm)
    assert model.max_length == lm.model.config.max_position_embeddings  # lm-eval's HF backend's default
    with pytest.raises(SkipbenchError, match="max_length"):
        SkipbenchLM(model="tiny", lm=lm, max_length=lm.model.config.max_position_embeddings + 1)
    assert model._generation_kwargs({"do_sample": True})[2].temperature == 1.0  # transformers' default
    assert model._generation_kwargs({"do_sample": False, "temperature": 0.5, "num_beams": 1})[2].temperature == 0.0
    with pytest.raises(SkipbenchError, match="new tokens"):
        model._generation_kwargs({"max_gen_toks": model.max_length})


def test_summary_intervals_and_one_filter_per_task():
    from skipbench.analysis.lmeval_tables import interval, summarise

    assert interval("acc", 1.0, 0.0, 150) == pytest.approx((0.97503, 1.0), abs=1e-4)  # Wilson
    assert interval("acc", 0.5, 0.1, 10, group=True) == pytest.approx((0.304, 0.696))  # a group: +- 1.96 stderr
    assert interval("rougeL", 0.4, 0.05, 20) == pytest.approx((0.302, 0.498))
    rows = pd.DataFrame([{"task": "gsm8k", "metric": "exact_match", "filter": f, "policy_spec": "full", "cost": 30,
                          "layers_mean": 30.0, "value": v, "stderr": 0.1, "n": 10, "group": False}
                         for f, v in (("flexible-extract", 0.5), ("strict-match", 0.3))])
    s = summarise(rows)
    assert len(s) == 1 and s["value"].item() == 0.3


def test_figure_places_one_token_tasks_at_their_cost(tmp_path, monkeypatch):
    """Under a full-depth context a task of one-token answers gates no token (layers_mean NaN): drawn at its cost."""
    import matplotlib.pyplot as plt

    from skipbench.analysis.plots import lmeval_figure

    s = pd.DataFrame([{"task": "mmlu", "metric": "acc", "policy_spec": p, "cost": c, "layers_mean": float("nan"),
                       "value": v, "lo": v - 0.1, "hi": v + 0.1} for p, c, v in (("full", 6, 0.6), ("uniform:3", 3, 0.4),
                                                                                 ("uniform:4", 4, 0.5))])
    seen = []
    real = plt.Axes.errorbar
    monkeypatch.setattr(plt.Axes, "errorbar", lambda ax, x, y, **kw: seen.append(list(x)) or real(ax, x, y, **kw))
    assert lmeval_figure(s, 6, tmp_path / "f.png").stat().st_size > 0
    assert seen == [[3.0, 4.0]]


def test_attention_passes_under_routed_attention(tokenizer, tmp_path):
    """MindSkip skips attention, not layers: the scoring pass counts every layer and, apart, the attention
    sub-layers the gated tokens ran, as the engine recorded them; generation the same, with the prompt's."""
    from conftest import prompts as some_prompts
    from skipbench.engine import Engine, generate
    from skipbench.policies import parse_policies
    from skipbench.policies.mindskip import MindSkip

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    m = MindSkip(64, 6, [1, 2, 3, 4])
    torch.manual_seed(1)
    with torch.no_grad():
        for r in m.routers.values():
            r.weight.normal_(0, 0.3)
    from test_mindskip import save

    spec = parse_policies(f"mindskip:{save(m, tmp_path / 'm')}")[0]
    model = SkipbenchLM(model="tiny", lm=lm, policy=spec, batch_size=1, prompt_depth="policy")
    (ctx, cont), = requests_of(tokenizer, 1)
    score(model, [(ctx, cont)])
    tokens, passes, attention = model._pending[0]
    policy = spec.build(6, lm)
    e = Engine(lm.adapter, "none")
    ids = torch.tensor([ctx + cont[:-1]])
    out = e.forward(ids, e.prompt_cache(torch.ones_like(ids, dtype=torch.bool), ids.shape[1]), policy, record=True)
    assert (tokens, passes) == (ids.shape[1], 6 * ids.shape[1])
    assert attention == 6 * ids.shape[1] - int(out.attention_skips.sum()) and attention < passes

    prompt = some_prompts(tokenizer, 1)
    inst = Instance(request_type="generate_until", doc={}, idx=0, metadata=("t", 0, 1),
                    arguments=(tokenizer.decode(prompt[0]), {"until": [], "max_gen_toks": 6, "do_sample": False}))
    model.generate_until([inst])
    gen = generate(lm, [model.tok_encode(inst.args[0])], policy, 6, prompt_depth="policy")
    ran = sum(map(len, gen.layers[0])) + gen.prompt_passes[0]
    skipped = sum(gen.attention_skips[0]) + gen.prompt_passes[0] - gen.prompt_attention_passes[0]
    assert (model.usage[-1].layer_passes, model.usage[-1].attention_passes) == (ran, ran - skipped) and skipped > 0


def test_a_router_trained_on_the_scored_items_is_refused(tiny_dirs, tmp_path):
    """A FlexiDepth router trained on every item of the text suite (--split all) is scored by `evaluate` only on
    held-out items; lm-eval's shipped text tasks score the suite's test split, so they refuse it too (compare runs
    through the same sweep), while a task on other documents (choice) accepts it."""
    runner = CliRunner()
    model, router = str(tiny_dirs["llama"]), tmp_path / "flexi"
    res = runner.invoke(app, ["flexidepth", "train", "--model", model, "--dataset", "text", "--split", "all", "--limit",
                              "0", "--steps", "1", "--max-new-tokens", "4", "--out", str(router)])
    assert res.exit_code == 0, res.output
    for tasks in ("skipbench_text", "skipbench_text_qa"):
        res = runner.invoke(app, ["lm-eval", "--model", model, "--tasks", tasks, "--policy", f"flexidepth:{router}",
                                  "--limit", "2", "--out", str(tmp_path / "x.parquet")])
        assert res.exit_code == 1 and "were used to train" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "x.parquet").exists()
    res = runner.invoke(app, ["lm-eval", "--model", model, "--tasks", "skipbench_choice", "--policy",
                              f"flexidepth:{router}", "--limit", "2", "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 0, res.output


def test_the_shipped_tasks_map_to_their_suites():
    """lmeval_sweep's map of what each shipped task scores agrees with the task YAMLs."""
    import yaml

    from skipbench.evaluation.lmeval_model import TASKS_DIR
    from skipbench.evaluation.lmeval_sweep import SHIPPED_SUITES, SHIPPED_TAGS

    names, tags = set(), {}
    for path in TASKS_DIR.glob("*.yaml"):
        text = "\n".join(line for line in path.read_text().splitlines() if "!function" not in line)
        doc = yaml.safe_load(text)
        names.add(doc["task"])
        assert doc["test_split"] == "test"
        for tag in [doc["tag"]] if isinstance(doc["tag"], str) else doc["tag"]:
            tags.setdefault(tag, set()).add(doc["task"])
    assert names == set(SHIPPED_SUITES) and {t: set(v) for t, v in SHIPPED_TAGS.items()} == tags


def test_the_public_name_registers_the_model_for_lm_eval():
    """The README's `import skipbench.lmeval`: lm-eval then finds the model by the name `skipbench`, and the shipped
    tasks' folder is the package's."""
    import importlib
    from pathlib import Path

    from lm_eval.api.registry import get_model

    public = importlib.import_module("skipbench.lmeval")
    assert get_model("skipbench") is public.SkipbenchLM is SkipbenchLM
    assert Path(public.TASKS_DIR).is_dir() and any(Path(public.TASKS_DIR).glob("*.yaml"))


def test_max_gen_toks_sets_every_generation_tasks_length_and_keys_the_parts(tiny_dirs, tmp_path):
    """--max-gen-toks reaches lm-eval as --gen_kwargs (its results record the length), bounds the answers, and keys
    the parts: a run at another length computes them again, the same length reuses them."""
    out = tmp_path / "lm.parquet"
    args = ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", "skipbench_text_qa", "--limit", "2",
            "--max-gen-toks", "3", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    raw = json.loads((tmp_path / "lm-lmeval" / "full.json").read_text())
    assert raw["configs"]["skipbench_text_qa"]["generation_kwargs"]["max_gen_toks"] == 3
    rows = pd.read_parquet(out)
    # at most 3 new tokens per answer, the last never fed back: at most 2 gated tokens per request
    assert (rows["max_gen_toks"] == 3).all() and (rows["gated_tokens"] <= 2 * rows["requests"]).all()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "1 finished part(s) reused" in again.output.replace("\n", " ")
    from skipbench.evaluation.lmeval_sweep import LmEvalConfig, part_path
    from skipbench.policies import parse_policies

    full = parse_policies("full")[0]
    unset = LmEvalConfig(model="m", tasks=("t",), out=str(tmp_path / "o.parquet"))
    assert part_path(unset, "t", full, "") != part_path(LmEvalConfig(**{**unset.__dict__, "max_gen_toks": 3}), "t", full, "")
    longer = CliRunner().invoke(app, args[:-3] + ["5", "--out", str(out)])
    assert longer.exit_code == 0 and "0 finished part(s) reused" in longer.output.replace("\n", " ")
    raw = json.loads((tmp_path / "lm-lmeval" / "full.json").read_text())
    assert raw["configs"]["skipbench_text_qa"]["generation_kwargs"]["max_gen_toks"] == 5
    assert (pd.read_parquet(out)["gated_tokens"] <= 4 * rows["requests"]).all()
