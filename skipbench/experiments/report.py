"""`skipbench report`: a Markdown page from every result under a folder, our numbers beside the papers'.

Deterministic: the same files give the same page (no timestamps; files and rows in sorted order).
Each finding is set against the paper's claim as **agrees**, **disagrees** or **inconclusive**, decided
from a 95% interval and a stated margin (skipbench.analysis.verdicts); the page prints the interval, the margin
and the reason beside every verdict, and a table of all of them at the top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.store import readers
from skipbench.analysis import verdicts
from skipbench.analysis.spread import first_sample, retain_rankings
from skipbench.errors import SkipbenchError
from skipbench.analysis.lmeval_tables import CONTROL
from skipbench.analysis.metrics import pooled_per_token
from skipbench.store.results import COMPANIONS, check_writable, companion
from skipbench.analysis.stats import Verdict


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ADVICE = "rerun the command that wrote it, or move it out of the results folder"


def _read(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return readers.table(path, "result", ADVICE, columns=columns)


def _meta(path: Path) -> dict:
    m = path.with_suffix(".json")
    return readers.json_file(m, "manifest", ADVICE) if m.exists() else {}


def _main_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"{prefix}*.parquet")
                  if not p.stem.endswith(tuple(f"-{c}" for c in COMPANIONS)) and not p.name.startswith("."))


def _verdict_lines(found: list[Verdict]) -> list[str]:
    return [f"* {verdicts.line(v)}" for v in found] + [""]


def _model(meta: dict) -> str:
    m = meta.get("model") or {}
    return f"{m.get('name', '?')} ({m.get('family', '?')}, {m.get('num_layers', '?')} layers)"


def section_setup(folder: Path) -> tuple[list[str], list]:
    """What the preset that made these results could not match of the papers' setups (written by reproduce)."""
    record = folder / ".reproduce" / "preset.json"
    if not record.exists():
        return [], []
    preset = readers.json_file(record, "preset record", "run `skipbench reproduce` again")
    differences = preset.get("differences", [])
    lines = [f"## Setup: preset `{preset.get('name', '?')}`", ""]
    weights = _weights(folder)
    if weights:
        lines += [f"The model's weights: {weights}.", ""]
    if differences:
        lines += ["Where this preset differs from the papers' setups (each finding below is read with these in mind):", ""]
        lines += [f"* {d}" for d in differences] + [""]
    return lines, []


def _weights(folder: Path) -> str | None:
    """The weights' source as a manifest of these results records it (the model record's `weights`)."""
    for path in sorted(p.with_suffix(".json") for p in folder.glob("*.parquet")):  # the results' own manifests
        try:
            weights = (readers.json_file(path, "manifest").get("model") or {}).get("weights")
        except (readers.Unreadable, AttributeError):
            continue
        if isinstance(weights, str) and weights:
            return weights
    return None


def section_evaluate(folder: Path) -> tuple[list[str], list]:
    files = _main_files(folder, "evaluate-")
    if not files:
        return [], []
    frames = [_read(p).assign(file=p.stem) for p in files]
    # every evaluate file carries the full-depth rows of its items: count each (point, item) once
    df = pd.concat(frames, ignore_index=True)
    if "policy_spec" not in df.columns:  # files from before specs: the policy and cost name the point
        df["policy_spec"] = df["policy"].astype(str) + ":" + df["cost"].astype(str)
    df["policy_spec"] = df["policy_spec"].fillna(df["policy"].astype(str) + ":" + df["cost"].astype(str))
    df = df.drop_duplicates(["dataset", "split", "policy_spec", "cost", "item_id"])
    rows = (df.groupby(["dataset", "split", "policy", "cost", "policy_spec"]).agg(items=("item_id", "nunique"), layers=("layers_mean", "mean"),
            rougeL=("rougeL", "mean"), full_rougeL=("full_rougeL", "mean"), exact_match=("exact_match", "mean"))
            .reset_index().sort_values(["dataset", "split", "policy", "cost"]))
    lines = ["## Generation quality by policy and cost (`evaluate`)", "",
             "Mean over items; `full_rougeL` is ROUGE-L against the full model's own output (fidelity).", "",
             _table(rows), "", *_matched_lines(df), *_calibration_lines(df)]
    # a speculative point is full depth's output (evaluate --draft): not a configuration of the quality figure; a
    # calibrated point run on several samples shows its first (seed 0) there, the others in "Calibration samples"
    first = df["calibration_seed"].fillna(0) == 0 if "calibration_seed" in df else True
    for (dataset, split), g in df[(df["policy"] != "speculative") & first].groupby(["dataset", "split"]):
        if g["policy"].nunique() < 2:
            continue
        path = folder / f"quality-{dataset}-{split}.png"
        points, oracle, L = quality_points(g)
        from skipbench.analysis.plots import quality_figure

        quality_figure(points, oracle, L, path, f"{dataset} ({split}): quality against layers; bars: 95% CI over items")
        lines += [f"### Quality against executed layers — {dataset}, {split} split", "", f"![quality]({path.name})", "",
                  "Each point is one configuration: its mean executed layers per generated token and its mean ROUGE-L "
                  "against the full model's output, with a 95% t-interval over items. The dashed line is the exact "
                  "oracle over these same configurations (each item's configuration chosen with hindsight, dynamic "
                  "policies costed per item), at every whole-layer budget.", ""]
    return lines, []


def _matched_lines(df: pd.DataFrame) -> list[str]:
    """Each learned point beside its random control of the same realized layers per token (evaluate
    --matched-random): the paired difference of full_rougeL over the items both ran, with a 95% t-interval."""
    from skipbench.analysis.stats import t_interval

    if "matched_to" not in df or df["matched_to"].isna().all():
        return []
    lines = ["### Learned policies against random skipping of the same realized compute", "",
             "Each control draws, per token (per sequence for a prompt-level router), C or C - 1 random layers "
             "(layer 0 always) with the mean the learned point realized on these items, pooled over their tokens "
             "(`random-token:C[mean=M]`; for MindSkip, which skips attention only, C or C - 1 random attention "
             "sub-layers with every MLP run: `random-attention`); the difference is the learned point's full_rougeL minus the control's, per "
             "item, with a 95% t-interval over items. The quality figure joins each pair with a dotted line.", ""]
    controls = df[df["matched_to"].notna()]
    pairs = [(key, learned, g) for key, g in controls.groupby(["dataset", "split", "policy_spec", "matched_to"])
             for learned in str(key[3]).split(";")]  # one control may serve two points
    for (dataset, split, control, _), learned, g in pairs:
        mine = df[(df["dataset"] == dataset) & (df["split"] == split) & (df["policy_spec"] == learned)]
        both = mine.set_index("item_id")["full_rougeL"].to_frame("learned").join(
            g.set_index("item_id")["full_rougeL"].to_frame("control"), how="inner")
        diff, lo, hi = t_interval((both["learned"] - both["control"]).to_numpy())
        said = ("above the control" if lo > 0 else "below the control" if hi < 0 else
                "not distinguishable from the control")
        attention = str(control).startswith("random-attention")  # MindSkip's: attention sub-layers matched
        unit = "attention sub-layers" if attention else "layers"
        lines.append(f"* {dataset}/{split}: {learned} ({pooled_per_token(mine, attention):.2f} {unit} per token) against "
                     f"{control} ({pooled_per_token(g, attention):.2f}): {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] over "
                     f"{len(both)} items, {said}")
    return lines + [""]


def _calibration_lines(df: pd.DataFrame) -> list[str]:
    """The calibrated points run on several calibration samples (evaluate --calibration-seeds): their spread, and
    whether each ranking between them survives it (analysis/spread.py)."""
    from skipbench.analysis.spread import calibration_spread, rankings, references

    spread = calibration_spread(df)
    if not len(spread):
        return []
    return ["### Calibration samples", "",
            "Each calibrated point ran once per calibration sample of the same size (`-o calibration-seed`); its mean "
            "`full_rougeL` on each sample, summarised over the samples (a description of these samples, not an "
            "interval). A ranking survives when every sample of one point scores above every sample of the other.", "",
            _table(spread), "", *[f"* {line}" for line in rankings(spread, reference=references(df, spread), rows=df)], "",
            "The quality figure below shows each calibrated point on its first sample (seed 0) only, so that the "
            "oracle does not pick a calibration sample per item with hindsight.", ""]


def quality_points(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Per configuration: mean layers and full_rougeL with its interval; and the oracle curve over them."""
    from skipbench.analysis.scores import pivot
    from skipbench.analysis.knapsack import Instance, solve
    from skipbench.analysis.stats import t_interval

    rows = []
    control = df["matched_to"].notna() if "matched_to" in df else pd.Series(False, index=df.index)
    for (policy, spec), g in df.groupby(["policy", "policy_spec"], sort=False):
        value, lo, hi = t_interval(g["full_rougeL"].to_numpy())
        to = g["matched_to"].iloc[0] if "matched_to" in g and g["matched_to"].notna().any() else None
        rows.append({"strategy": "random (matched)" if to else policy, "config": spec,
                     "layers": float(g["layers_mean"].mean()), "value": value, "lo": lo, "hi": hi, "matched_to": to})
    points = pd.DataFrame(rows)
    L = int(round(points["layers"].max()))
    # a matched control is a comparison, not a configuration the oracle may pick per item with hindsight
    plain = df[~control]
    wide, _, _, _, per_item = pivot(plain.assign(config=plain["policy_spec"]), "full_rougeL")
    inst = Instance(wide.to_numpy(), per_item)
    budgets = range(int(np.ceil(inst.cheapest())), L + 1)
    oracle = pd.DataFrame([{"budget": b, "value": solve(inst, b).value} for b in budgets], columns=["budget", "value"])
    return points, oracle, L


def section_cosine(folder: Path) -> tuple[list[str], list]:
    out, found = [], []
    for path in _main_files(folder, "cosine-"):
        agg = _read(companion(path, "agg"))
        meta = _meta(path)
        L = int(meta.get("num_layers", agg["cost"].max()))
        normed = "cos_final_normed" in agg.columns  # files before it have the raw final state only
        final = "cos_final_normed" if normed else "cos_final"
        rows = _read(path, columns=["item_id", "strategy", "cost", "seed", "cos_final", "cos_layerwise",
                                    *(["cos_final_normed"] if normed else [])])
        teacher = meta.get("config", {}).get("teacher", "full")
        here = verdicts.cosine(rows, L, teacher)
        found += here
        shown = ["strategy", *(["point", "layers"] if "layers" in agg.columns else ["cost"]), "items", final,
                 f"{final}_lo", f"{final}_hi", *(["cos_final"] if normed else []), "cos_layerwise", "kl_next", "top1_agree"]
        table = agg.sort_values(["strategy", shown[2]])[shown] if "layers" in agg.columns else agg[shown]
        out += [f"## Hidden-state fidelity: EE vs ULS vs RLS (Glavas et al. Fig. 1a) — `{path.name}`", "",
                f"![cosine]({path.with_suffix('.png').name})", "",
                "Paper (OPT-1.3B, Alpaca; Sec. 3.1): ULS keeps the final hidden state closest to the full model and EE "
                "the farthest, while EE has the best layerwise (KV) similarity, which ULS matches at L/2 and 2L/3.", "",
                f"The final state here is {'after the final norm (`cos_final_normed`, as the authors compare it; the raw state is `cos_final`)' if normed else 'the raw residual state (this file predates the post-norm state)'}; "
                f"teacher: {'the references (as the authors)' if teacher == 'reference' else verdicts.TEACHER_NOTE}.", "",
                f"Ours ({_model(meta)}, {meta.get('hidden_state_convention', '')}; CI: {meta.get('confidence_interval', '')}):",
                "", _table(table), "",
                f"Verdicts (paired differences per item; the final-state and matching claims at the costs nearest L/2 "
                f"and 2L/3, {', '.join(map(str, verdicts.mid_costs(agg.loc[agg['strategy'].isin(['early-exit', 'uniform', 'random']), 'cost'], L)))} of {L}; "
                "EE's layerwise lead averaged over every cost):", "", *_verdict_lines(here)]
    return out, found


def section_oracle(folder: Path) -> tuple[list[str], list]:
    out, found = [], []
    for path in _main_files(folder, "oracle-"):
        meta = _meta(path)
        table = _read(path)
        curve = table[table["method"].isin(["oracle", "greedy"])].pivot(index="budget", columns="method", values="value").reset_index()
        L = max(meta.get("costs", [1]))
        source = meta.get("source", {})
        v = verdicts.oracle(meta.get("star_budget"), meta.get("star_interval"), L, source.get("model"),
                            source.get("datasets", []), meta.get("config_means"), meta.get("full"))
        found.append(v)
        star = meta.get("star_budget")
        ours = ("the oracle never reaches the full model's mean" if star is None else
                f"the oracle matches {meta.get('full')} at {star:.2f} of {L} layers ({100 * star / L:.1f}%)")
        lines = [f"## Sequence-level oracle (Glavas et al. Fig. 2 and 8) — `{path.name}`", "",
                 f"![oracle]({path.stem}-fig2.png)", "", f"![oracle vs greedy]({path.stem}-fig8.png)", "",
                 "Paper: the oracle matches the full model at 5.6 of 24 layers (23.3%) on OPT-1.3B/Alpaca, 5.5/24 on CNN-DM.", "",
                 f"Ours ({_model(source)}; configurations {', '.join(meta.get('configs', []))}): {ours}.", "",
                 _table(curve), "", *_verdict_lines([v])]
        lines += _length_lines(path, meta)
        out += lines
    return out, found


def _length_lines(path: Path, meta: dict) -> list[str]:
    """App. A.5.2: is the oracle's choice independent of the label's length? Statistic, dof, p and counts."""
    tests = meta.get("length_tests") or []
    if not tests:
        why = ("the runs carry no reference lengths" if "length_tests" in meta
               else "this oracle file was written by an older skipbench; run `skipbench oracle` again")
        return [f"Label-length test: not run ({why}).", ""]
    lines = ["Label-length test (App. A.5.2; chi-square test of homogeneity of the oracle's choice across label-length "
             "bins 1–15, 16–30, …, >150; where over 20% of cells expect fewer than 5 items, an exact conditional p "
             "given the table's margins instead: Fisher's exact test for 2 × 2, else a permutation p):", ""]
    counts_file = companion(path, "length")
    counts = _read(counts_file) if counts_file.exists() else pd.DataFrame()
    for t in tests:
        head = f"* budget {t['budget']:g} ({t['why']}), {t['items']} items, length in {t['unit']}: "
        if t.get("p_value") is None:
            lines.append(head + t.get("note", "nothing to test") + ".")
            continue
        note = f" ({t['note']})" if t.get("note") else ""
        test = t.get("test") or "chi-square"  # files before the exact tests ran chi-square alone
        lines.append(head + f"{test}, chi2 = {t['statistic']:.2f}, dof = {t['dof']}, p = {t['p_value']:.3g}{note}.")
    lines.append("")
    if not counts.empty:
        for budget, g in counts.groupby("budget", sort=True):
            wide = g.pivot(index="bin", columns="config", values="count")
            wide = wide.reindex(list(dict.fromkeys(g["bin"]))).reset_index()
            lines += [f"Items per label-length bin and chosen configuration at budget {budget:g}:", "", _table(wide), ""]
    return lines


def section_controllers(folder: Path) -> tuple[list[str], list]:
    out, found = [], []
    for path in _main_files(folder, "controllers-"):
        meta = _meta(path)
        agg = _read(companion(path, "agg"))
        c = meta.get("comparison", {})
        if "hidden_effect" in c and "lo" not in c:  # written before run-level intervals: no verdict from it
            c = {"test": c.get("test", "?"), "note": "this sweep was written by an older skipbench without a run-level "
                 "interval; run `skipbench controllers sweep` again (finished runs are reused)"}
        here = verdicts.controllers(c, meta.get("exception"))
        found += here
        metric = c.get("metric", "full_rougeL")  # the sweep's own (--metric): against the full output or the references
        shown = agg[["input", "alpha", "seeds", "layers_mean", metric, f"{metric}_lo", f"{metric}_hi", "kl"]]
        joint = meta.get("config", {}).get("train", {}).get("train_backbone", False)
        units = meta.get("config", {}).get("alpha_units") or meta.get("alpha_units")
        test = (f"{c['test']}: hidden-input effect {c['hidden_effect']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], "
                f"{c['runs']} runs, dof {c['dof']}" if "hidden_effect" in c else c.get("note", "no comparison"))
        out += [f"## Skip controllers: hidden state vs constant input (Glavas et al. Fig. 1b, 6) — `{path.name}`", "",
                f"![cost-quality]({path.stem}-fig1b.png)", "", f"![per-layer skip ratio]({path.stem}-fig6.png)", "",
                "Paper: no significant advantage for the hidden-state input over a constant input (Sec. 3.2), except "
                "near 16 of 24 executed layers, where it helps (App. A.4.3); controllers trained jointly with the "
                "backbone (App. A.4.1, as the authors' code).", "",
                f"Ours ({_model(meta)}; alpha in {units or 'fraction'} units; "
                f"{'trained jointly with the backbone' if joint else 'on a frozen backbone (the paper trains jointly)'}; "
                f"quality: {metric}; intervals over seeds):", "",
                _table(shown), "", f"Test: {test}.", "", *_control_lines(meta.get("versus_control")),
                *_verdict_lines(here)]
    return out, found


def _control_lines(against: dict | None) -> list[str]:
    """Each input's controllers against their matched random controls (the sweep's `random (INPUT)` rows)."""
    if not against:
        return []
    return ["Against chance: each training run beside random-token skipping of the layers per token it realized on "
            "the same items (one control per run; the difference is the run's mean over items, with a 95% t-interval "
            "over the runs):", "", *[f"* {verdicts.control_line(i, c)}." for i, c in against.items()], ""]


def section_flexidepth(folder: Path) -> tuple[list[str], list]:
    path = folder / "flexi-usage.parquet"
    if not path.exists():
        return [], []
    usage = _read(path, columns=["item_id", "subtask", "layers_used"])
    meta = _meta(path)
    found = verdicts.flexidepth(usage, meta.get("router_training"))
    split = meta.get("config", {}).get("data", {}).get("split", "?")
    out = ["## FlexiDepth: layers used per subtask — `flexi-usage.parquet`", "",
           "Paper (Llama-3-8B-Instruct, 32 layers): copy 22.0 < summarisation 28.7 < continuation 30.3; "
           "repeat 20.1 < addition 22.5 < multiplication 23.9.", "",
           f"Ours ({_model(meta)}; {split} split; mean layers per token with a 95% interval over items):", "",
           _table(verdicts.per_subtask(usage)), "", *_verdict_lines(found)]
    if (folder / "depthmap.png").exists():
        out += ["Depth map of one response ([HTML](depthmap.html)):", "", "![depth map](depthmap.png)", ""]
    return out, found


def section_bench(folder: Path) -> tuple[list[str], list]:
    path = folder / "bench.parquet"
    if not path.exists():
        return [], []
    meta = _meta(path)
    s = pd.DataFrame(meta.get("summary", []))
    if s.empty:
        return [], []
    if "kv_mode" not in s:
        s["kv_mode"] = "unrecorded (older skipbench)"
    cols = ["batch_size", "variant", "kv_mode", "tokens_per_s", "step_p50", "layers_mean", "speedup", "ideal_speedup",
            "realized_over_ideal", "ideal_batch_speedup", "realized_over_batch_ideal", "policy_share", "bound_fraction",
            "vs_generate"]
    s = s[s["phase"] == "decode"][[c for c in cols if c in s]]  # files of older skipbench lack the batch ideal
    return ["## Wall-clock speed (`bench`, decode phase)", "",
            f"Device: {meta.get('device', {}).get('cpu_model') or meta.get('device', {}).get('processor', '?')}, "
            f"{meta.get('device', {}).get('cpu_count', '?')} cores"
            f"{', ' + meta['device']['cuda_device'] if meta.get('device', {}).get('cuda_device') else ''}.", "",
            "FlexiDepth reports no wall-clock speedup; here `speedup` is measured decode tokens/s over full depth, "
            "`ideal_speedup` the layer-count bound; where present (newer files), `ideal_batch_speedup` is what the "
            "batch can actually skip (a layer part costs its dense time when any row runs it) and `policy_share` the "
            "policy's own share of a decode step; `bound_fraction` (newer files) the share of the memory bound the "
            "decode reaches: weight bytes read per step x steps/s over the machine's measured weight-read rate"
            + (f" ({meta['read_rate']['bytes_per_s'] / 1e9:.1f} GB/s, {meta['read_rate']['dtype']})"
               if meta.get("read_rate") else "") + ".", "",
            _table(s), ""], []


def section_track(folder: Path) -> tuple[list[str], list]:
    """`skipbench track`: the self-speculative methods on the same prompts (Spec-Bench's two figures)."""
    lines = []
    for path in _main_files(folder, "track"):
        meta = _meta(path)
        s = pd.DataFrame(meta.get("summary", []))
        if s.empty:
            continue
        overall = s[s["category"] == "all"].drop(columns="category")
        device = meta.get("device", {})
        lines += [f"## Self-speculative methods on the same prompts (`{path.name}`)", "",
                  f"![track]({path.stem}.png)", "",
                  f"{meta.get('prompts', '?')} prompts of `{meta.get('config', {}).get('dataset', '?')}`, batch 1, "
                  f"greedy; Spec-Bench's two figures: each method's speedup (its mean tokens/s over full depth's on "
                  f"the same prompts, each timed whole) and its tokens per round (accepted drafts + the verifier's, "
                  f"pooled over the prompts), each with a 95% paired bootstrap interval over the prompts; and on how "
                  f"many prompts its output was full depth's (`lossless`). Device: "
                  f"{device.get('cpu_model') or device.get('processor', '?')}"
                  f"{', ' + device['cuda_device'] if device.get('cuda_device') else ''}.", "",
                  _table(overall), ""]
        if meta.get("draft_search"):  # the searched set's name gives its size; its layers:
            lines += [f"`auto` is the searched layer set `{meta['draft_search']}`.", ""]
        for column, what in (("speedup", "Speedup"), ("tokens_per_round", "Tokens per round")):
            lines += [f"{what} per category:", "", _table(s[s["category"] != "all"].pivot(
                index="category", columns="method", values=column).reset_index()), ""]
    return lines, []


def section_lmeval(folder: Path) -> tuple[list[str], list]:
    """`skipbench lm-eval` results: each task's main metric per policy point, with lm-eval's standard error."""
    from skipbench.analysis.lmeval_tables import RESAMPLES, summarise, with_paired_tests

    lines = []
    for path in _main_files(folder, "lmeval-"):
        meta = _meta(path)
        s = summarise(_read(path))
        docs = companion(path, "docs")
        paired = docs.exists()  # files before the per-document scores have no paired test
        if paired:
            s = with_paired_tests(s, _read(docs))
        figure = path.with_suffix(".png")
        depth = meta.get("config", {}).get("prompt_depth", "full")
        shown = s.drop(columns=[c for c in ("stderr", "top", "paired_docs") if c in s.columns])
        lines += [f"## lm-evaluation-harness tasks (`{path.name}`)", "",
                  f"Model: {_model(meta)}; context at {depth} depth; `layers_mean` counts the tokens the policy gated; "
                  "[lo, hi]: 95% (Wilson for accuracies, else 1.96 lm-eval's stderr)"
                  + (f"; against full depth on the same documents: the difference `diff_vs_full` with a paired bootstrap "
                     f"interval ({RESAMPLES} replicates) and `p_vs_full` from the paired test named (McNemar's exact test "
                     "for 0/1 scores, else Wilcoxon's signed-rank test)" if paired else
                     "; this file predates the per-document scores: no paired tests (run `skipbench lm-eval` again)")
                  + ".", "", _table(shown), ""]
        if figure.exists():
            lines += [f"![{figure.stem}]({figure.name})", ""]
    return lines, []


def section_compare(folder: Path) -> tuple[list[str], list]:
    """`skipbench compare`: every method at K skipped layers, Retain % with paired intervals, orderings of methods
    that realized the same skip, and the talk's claim as a verdict (another model: not comparable)."""
    from skipbench.analysis.lmeval_tables import NOISY_CV
    from skipbench.analysis.papers import TALK

    lines, found = [], []
    for path in (p for p in _main_files(folder, "compare") if not p.stem.endswith(".lmeval")):
        meta = _meta(path)
        rows, agg = _read(path), _read(companion(path, "agg"))
        if "retain_replicates_dropped" not in agg.columns:  # written before paired intervals: no verdict from it
            lines += [f"## Methods at the same number of skipped layers (`compare`, `{path.name}`)", "",
                      "This file was written by an older skipbench without paired intervals; run `skipbench compare` "
                      "again (its lm-eval parts are recomputed once, to keep their per-document scores).", ""]
            continue
        pairs = _read(companion(path, "pairs"))
        tasks = list(dict.fromkeys(rows["task"]))
        here = verdicts.compare(first_sample(agg), meta.get("model"), tasks)  # no calibration sample picked later
        found += here
        s = agg[agg["skip"] > 0].copy()
        s["retain"] = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in zip(s["retain_pct"], s["retain_lo"], s["retain_hi"])]
        shown = ["method", "skip", "retain", "skipped", "skipped_unit", "tasks", "noisy_tasks"]
        if "retain_own_pct" in s.columns and s["retain_own_pct"].notna().any():
            s["retain_own"] = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" if v == v else "" for v, lo, hi in
                               zip(s["retain_own_pct"], s["retain_own_lo"], s["retain_own_hi"])]
            shown.insert(3, "retain_own")
        per_task = rows.assign(
            diff=[f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(rows["diff"], rows["diff_lo"], rows["diff_hi"])],
            full_cv=rows["full_cv"].round(2), noisy=rows["noisy_ratio"].map({True: "yes", False: ""}))
        lines += [f"## Methods at the same number of skipped layers (`compare`, `{path.name}`)", "",
                  f"Model: {_model(meta)}; tasks: {', '.join(tasks)}; the context under each policy. Retain % is 100 x the "
                  f"mean over tasks of score / full-depth score; its interval: {meta.get('interval', '?')}. `retain_own` "
                  "divides by the method's own model at full depth (LayerSkip's fine-tuned model). `skipped` is what a "
                  "token realized (MindSkip: attention sub-layers; its layers all run). `noisy_tasks` counts ratios "
                  f"whose full-depth score varies by more than {100 * NOISY_CV:.0f}% across replicates (CV > {NOISY_CV:g}).", "",
                  _table(s[shown], digits=2), "",
                  "Per task: the score, the full model's, and their paired difference with its 95% bootstrap interval:", "",
                  _table(per_task[["method", "skip", "task", "metric", "value", "full_value", "diff", "full_cv", "noisy"]]), ""]
        controls = pairs["method_a"].str.startswith(CONTROL) | pairs["method_b"].str.startswith(CONTROL)
        lines += _orderings(pairs[~controls], meta.get("matched_within", 0.5)) + _against_chance(pairs[controls])
        if companion(path, "spread").exists():  # compare --calibration-seeds
            spread = _read(companion(path, "spread"))
            lines += ["### Calibration samples", "",
                      "Each method drawn from a calibration sample ran once per sample of the same size (`compare "
                      "--calibration-seeds`; its later samples are the `[calibration-seed S]` rows above): its Retain % "
                      "over the samples (a description of these samples, not an interval), beside the methods drawn "
                      "from no sample (one value). `cost` is what a token ran, realized (L minus the realized skip, in "
                      "the unit `split` names), so methods are ranked only against those of the same realized skip. A "
                      "ranking survives when every sample of one method scores above every sample of the other; it "
                      "says nothing of document noise (the pairs table's intervals do). The pairs, the figure and the "
                      "verdict use each method's first sample.", "",
                      _table(spread, digits=2), "", *[f"* {line}" for line in retain_rankings(spread)], ""]
        figure = path.with_suffix(".png")
        if figure.exists():
            lines += [f"![{figure.stem}]({figure.name})", ""]
        lines += _verdict_lines(here) if here else []
    if lines:
        talk = pd.DataFrame([{"method": m, **{f"skip {k}": v for k, v in by.items()}} for m, by in TALK.items()])
        lines += ["The FlexiDepth talk's Retain % (Llama-3-8B-Instruct, 32 layers; MMLU, HellaSwag, WinoGrande, GSM8K, "
                  "HumanEval, CoQA), as reported there, not measured here; a run above is comparable only on that model "
                  "and those tasks (`skipbench compare --preset paper`):", "", _table(talk, digits=1), ""]
    return lines, found


def _against_chance(pairs: pd.DataFrame) -> list[str]:
    """Each learned router against its random control of the same realized compute (`compare --matched-random`):
    the paired difference of Retain % (the pairs table's), router minus control."""
    mine = pairs[pairs["method_b"] == CONTROL + pairs["method_a"]] if len(pairs) else pairs
    mine = pd.concat([mine, pairs[pairs["method_a"] == CONTROL + pairs["method_b"]]]) if len(pairs) else mine
    if mine.empty:
        return []
    out = ["Against chance: each learned router beside random skipping of the compute it realized on these tasks "
           "(`random control of METHOD`: random-token skipping of its layers per token, or random-attention "
           "skipping of MindSkip's attention sub-layers), as paired differences of Retain %, router minus control:", ""]
    for r in mine.itertuples():
        if r.method_b.startswith(CONTROL):
            router, d, lo, hi = r.method_a, r.diff_pct, r.diff_lo, r.diff_hi
        else:  # the control came first: the difference turned round
            router, d, lo, hi = r.method_b, -r.diff_pct, -r.diff_hi, -r.diff_lo
        said = "above the control" if lo > 0 else "below the control" if hi < 0 else "not distinguishable from the control"
        out.append(f"* {router} at K={r.skip}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}] points, {said}")
    return out + [""]


def _orderings(pairs: pd.DataFrame, within: float) -> list[str]:
    """What the pairs table lets one say: an ordering only for two methods that realized the same skip (both within
    `within` layers of K) and whose paired difference of Retain % excludes 0; the others are listed as not ordered."""
    if pairs.empty:
        return []
    said, open_ = [], []
    for r in pairs.itertuples():
        diff = f"{r.diff_pct:+.1f} [{r.diff_lo:+.1f}, {r.diff_hi:+.1f}] points"
        if not r.matched:
            open_.append(f"{r.method_a} vs {r.method_b} at K={r.skip}: not ordered, they realized different skips "
                         f"({r.skipped_a:.2f} and {r.skipped_b:.2f})")
        elif r.diff_lo > 0 or r.diff_hi < 0:
            hi_m, lo_m = (r.method_a, r.method_b) if r.diff_lo > 0 else (r.method_b, r.method_a)
            said.append(f"at K={r.skip}, {hi_m} retains more than {lo_m}: {r.method_a} minus {r.method_b} {diff}")
        else:
            open_.append(f"{r.method_a} vs {r.method_b} at K={r.skip}: not resolved, {diff}")
    lines = [f"Orderings (paired differences of Retain %, only between methods that realized K within ±{within:g} "
             "layers):", ""]
    lines += [f"* {x}" for x in said] or ["* none resolved"]
    return lines + [""] + [f"* {x}" for x in open_] + [""]


def _with_interval(t: pd.DataFrame, stat: str) -> list[str]:
    """`v [lo, hi]` from the columns stat, stat_lo, stat_hi (the value alone where there is no interval)."""
    none = pd.Series(np.nan, index=t.index)
    return [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else (f"{v:.3f}" if v == v else "")
            for v, lo, hi in zip(t[stat], t.get(f"{stat}_lo", none), t.get(f"{stat}_hi", none))]


def section_route(folder: Path) -> tuple[list[str], list]:
    """`skipbench route curve`: routers that see only the prompt against the oracle, at the reported budgets."""
    lines = []
    for path in _main_files(folder, "route-"):
        meta = _meta(path)
        full = _read(path)
        t = full[full["reported"] & ~full["method"].str.startswith("single:")].copy()
        diffs, t = t[t["kind"] == "difference"], t[t["kind"] != "difference"]

        shown = pd.DataFrame({"budget": t["budget"], "method": t["method"], "mean cost": t["mean_cost"],
                              meta.get("metric", "value"): _with_interval(t, "value"),
                              "share over best single": _with_interval(t, "share"),
                              "share over blind": _with_interval(t, "share_over_blind")})
        lines += [f"## A prompt-level router against the oracle (`{path.name}`)", "",
                  "Glavas et al. leave open what a decision from the prompt alone captures of the oracle's gain. Each "
                  "router predicts every configuration's score from the prompt (trained on the train split, tuned on "
                  "the validation split) and the oracle's knapsack assigns configurations from the predictions; the "
                  f"values are on the {meta.get('test_items', '?')} test items, with "
                  f"{meta.get('interval_method', 'bootstrap intervals')}. The share is (router - best single "
                  "configuration) / (oracle - best single configuration), the share over blind (router - blind) / "
                  "(oracle - blind); `blind` assigns from the configurations' train means, reading no prompt.", "",
                  _table(shown), ""]
        if len(diffs):
            lines += ["Paired differences of the mean (the same resamples):", "",
                      _table(pd.DataFrame({"budget": diffs["budget"], "difference": diffs["method"],
                                           "value": _with_interval(diffs, "value")})), ""]
        if path.with_suffix(".png").exists():
            lines += [f"![{path.stem}]({path.stem}.png)", ""]
    return lines, []


def _at_a_glance(found: list[Verdict]) -> list[str]:
    if not found:
        return []
    rows = pd.DataFrame([{"claim": v.claim, "verdict": v.outcome, "ours [95% interval]": v.interval(),
                          "margin": f"±{v.margin:g} {v.unit}"} for v in found])
    return ["## Findings at a glance", "",
            "Each paper claim against our runs: **agrees** / **disagrees** / **inconclusive**, decided from a 95% interval "
            "and the margin shown (skipbench/analysis/verdicts.py). The sections below give every interval and the reason.", "",
            _table(rows), ""]


def run(results: str, out: str | None = None) -> Path:
    """The report of a results folder, written to `out` (default <results>/REPORT.md)."""
    return write_report(results, out or str(Path(results) / "REPORT.md"))


def write_report(results: str, out: str) -> Path:
    folder = Path(results)
    if not folder.is_dir():
        raise SkipbenchError(f"--results folder not found: {results}")
    check_writable(out)
    sections = [section_setup, section_evaluate, section_cosine, section_oracle, section_controllers, section_flexidepth,
                section_bench, section_track, section_lmeval, section_compare, section_route]
    body, found = [], []
    for sec in sections:
        try:
            lines, verdict_list = sec(folder)
        except KeyError as exc:  # a result whose table or manifest lacks what its section reads
            raise SkipbenchError(f"a result under {results} lacks a column the report's "
                                 f"{sec.__name__.removeprefix('section_')} section reads ({exc.args[0]}); rerun the "
                                 "command that wrote it, or move it out of the results folder") from None
        body += lines
        found += verdict_list
    if not body:
        raise SkipbenchError(f"no skipbench results under {results}; run `skipbench reproduce` or an experiment first")
    page = ["# skipbench report", "", f"Results folder: `{folder.as_posix()}`. Figures are PNG files beside this page.", "",
            *_at_a_glance(found), *body]
    from skipbench.store.results import write_text_atomic

    return write_text_atomic(out, "\n".join(page))
