"""`skipbench report`: a Markdown page from every result under a folder, our numbers beside the papers'.

Deterministic: the same files give the same page (no timestamps; files and rows in sorted order).
Each section states the paper's finding, ours, and a one-line verdict: reproduced / not reproduced /
not comparable (and why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.errors import SkipbenchError

PAPER_STAR = {"alpaca": (5.6, 24), "cnn_dailymail": (5.5, 24)}
FLEXI_PAPER = {"copy": 22.0, "summarize": 28.7, "continue": 30.3, "repeat": 20.1, "sum": 22.5, "product": 23.9}
FLEXI_ORDERS = (("copy", "summarize", "continue"), ("repeat", "sum", "product"))


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _meta(path: Path) -> dict:
    m = path.with_suffix(".json")
    return json.loads(m.read_text()) if m.exists() else {}


def _main_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"{prefix}*.parquet")
                  if not p.stem.endswith(("-agg", "-assign", "-layers", "-length")) and not p.name.startswith("."))


def section_evaluate(folder: Path) -> list[str]:
    files = _main_files(folder, "evaluate-")
    if not files:
        return []
    frames = [pd.read_parquet(p).assign(file=p.stem) for p in files]
    # every evaluate file carries the full-depth rows of its items: count each (point, item) once
    df = pd.concat(frames, ignore_index=True).drop_duplicates(["dataset", "policy", "cost", "item_id"])
    rows = (df.groupby(["dataset", "policy", "cost"]).agg(items=("item_id", "nunique"), layers=("layers_mean", "mean"),
            rougeL=("rougeL", "mean"), full_rougeL=("full_rougeL", "mean"), exact_match=("exact_match", "mean"))
            .reset_index().sort_values(["dataset", "policy", "cost"]))
    return ["## Generation quality by policy and cost (`evaluate`)", "",
            "Mean over items; `full_rougeL` is ROUGE-L against the full model's own output (fidelity).", "",
            _table(rows), ""]


def section_cosine(folder: Path) -> list[str]:
    out = []
    for path in _main_files(folder, "cosine-"):
        agg = pd.read_parquet(path.with_name(path.stem + "-agg.parquet"))
        meta = _meta(path)
        L = int(meta.get("num_layers", agg["cost"].max()))
        table = agg[["strategy", "cost", "items", "cos_final", "cos_final_lo", "cos_final_hi", "cos_layerwise", "kl_next", "top1_agree"]]
        mids = sorted(agg["cost"].unique(), key=lambda c: abs(c - L / 2))[:2]
        piv = agg.pivot(index="cost", columns="strategy", values=["cos_final", "cos_layerwise"])
        final_ok = all(piv.loc[c, ("cos_final", "uniform")] > piv.loc[c, ("cos_final", "early-exit")] for c in mids)
        layer_ok = all(piv.loc[c, ("cos_layerwise", "early-exit")] >= piv.loc[c, ("cos_layerwise", "uniform")] for c in mids)
        verdict = "reproduced" if final_ok and layer_ok else "not reproduced"
        why = (f"at costs {', '.join(map(str, sorted(mids)))} of {L}: ULS final similarity "
               f"{'above' if final_ok else 'not above'} EE; EE layerwise similarity {'at or above' if layer_ok else 'below'} ULS")
        out += [f"## Hidden-state fidelity: EE vs ULS vs RLS (Glavas et al. Fig. 1a) — `{path.name}`", "",
                f"![cosine]({path.with_suffix('.png').name})", "",
                "Paper (OPT-1.3B, Alpaca): ULS keeps the final hidden state closest to the full model and EE the "
                "farthest, while EE has the best layerwise (KV) similarity — a trade-off.", "",
                f"Ours ({meta.get('config', {}).get('model', '?')}, {meta.get('hidden_state_convention', '')}; "
                f"CI: {meta.get('confidence_interval', '')}):", "", _table(table), "",
                f"**Verdict: {verdict}** — {why}.", ""]
    return out


def section_oracle(folder: Path) -> list[str]:
    out = []
    for path in _main_files(folder, "oracle-"):
        meta = _meta(path)
        table = pd.read_parquet(path)
        curve = table[table["method"].isin(["oracle", "greedy"])].pivot(index="budget", columns="method", values="value").reset_index()
        star, L = meta.get("star_budget"), max(meta.get("costs", [1]))
        runs = meta.get("config", {}).get("runs", [])
        dataset = next((d for d in PAPER_STAR if any(d in str(r) for r in runs)), None)
        if star is None:
            ours = f"the oracle never reaches {meta.get('full')}'s mean"
        else:
            ours = f"{star:.2f} of {L} layers ({100 * star / L:.1f}%)"
        if dataset and "opt" in json.dumps(meta.get("config", {})):
            p = PAPER_STAR[dataset]
            verdict = "reproduced" if star is not None and abs(100 * star / L - 100 * p[0] / p[1]) < 5 else "not reproduced"
        else:
            verdict = "not comparable — a different model and dataset than the paper's OPT-1.3B on Alpaca/CNN-DM"
        lt = meta.get("length_test") or {}
        length = (f"Length check at budget {lt['budget']:.2f}: chi2 = {lt['statistic']:.2f}, dof = {lt['dof']}, "
                  f"p = {lt['p_value']:.3g}." if lt.get("p_value") is not None else "Length check: not enough variation to test.")
        out += [f"## Sequence-level oracle (Glavas et al. Fig. 2 and 8) — `{path.name}`", "",
                f"![oracle]({path.stem}-fig2.png)", "", f"![oracle vs greedy]({path.stem}-fig8.png)", "",
                "Paper: the oracle matches the full model at 5.6 of 24 layers (23.3%) on OPT-1.3B/Alpaca, 5.5/24 on CNN-DM.", "",
                f"Ours: the oracle matches the full model at {ours}. {length}", "",
                _table(curve), "", f"**Verdict: {verdict}.**", ""]
    return out


def section_controllers(folder: Path) -> list[str]:
    out = []
    for path in _main_files(folder, "controllers-"):
        meta = _meta(path)
        agg = pd.read_parquet(path.with_name(path.stem + "-agg.parquet"))
        c = meta.get("comparison", {})
        shown = agg[["input", "alpha", "seeds", "layers_mean", "full_rougeL", "full_rougeL_lo", "full_rougeL_hi", "kl"]]
        if "p_value" in c:
            sig = c["p_value"] < 0.05
            verdict = "not reproduced" if sig and c["hidden_effect"] > 0 else "reproduced"
            line = (f"hidden-state effect at matched cost {c['hidden_effect']:+.4f} full_rougeL (SE {c['std_error']:.4f}), "
                    f"p = {c['p_value']:.3g} ({c['test']})")
        else:
            verdict, line = "not comparable", c.get("note", "no comparison")
        out += [f"## Skip controllers: hidden state vs constant input (Glavas et al. Fig. 1b, 6) — `{path.name}`", "",
                f"![cost-quality]({path.stem}-fig1b.png)", "", f"![per-layer skip ratio]({path.stem}-fig6.png)", "",
                "Paper: no significant advantage for the hidden-state input over a constant input.", "",
                _table(shown), "", f"Ours: {line}.", "", f"**Verdict: {verdict}.**", ""]
    return out


def section_flexidepth(folder: Path) -> list[str]:
    path = folder / "flexi-usage-agg.parquet"
    if not path.exists():
        return []
    agg = pd.read_parquet(path)
    means = dict(zip(agg["subtask"], agg["mean"]))
    agg = agg.assign(paper_layers_of_32=[FLEXI_PAPER.get(s, float("nan")) for s in agg["subtask"]])
    checks = []
    for order in FLEXI_ORDERS:
        if all(s in means for s in order):
            ok = all(means[a] < means[b] for a, b in zip(order, order[1:]))
            checks.append(f"{' < '.join(order)}: {'holds' if ok else 'does not hold'}")
    holds = checks and all(c.endswith("holds") and "not" not in c for c in checks)
    verdict = "reproduced" if holds else ("not reproduced" if checks else "not comparable — subtasks missing")
    out = ["## FlexiDepth: layers used per subtask — `flexi-usage.parquet`", "",
           "Paper (Llama-3-8B-Instruct, 32 layers): copy 22.0 < summarisation 28.7 < continuation 30.3; "
           "repeat 20.1 < addition 22.5 < multiplication 23.9.", "", _table(agg), "",
           f"Orderings: {'; '.join(checks) or 'n/a'}.", "", f"**Verdict: {verdict}.**", ""]
    if (folder / "depthmap.png").exists():
        out += ["Depth map of one response ([HTML](depthmap.html)):", "", "![depth map](depthmap.png)", ""]
    return out


def section_bench(folder: Path) -> list[str]:
    path = folder / "bench.parquet"
    if not path.exists():
        return []
    meta = _meta(path)
    s = pd.DataFrame(meta.get("summary", []))
    if s.empty:
        return []
    s = s[s["phase"] == "decode"][["batch_size", "variant", "tokens_per_s", "step_p50", "layers_mean", "speedup",
                                   "ideal_speedup", "realized_over_ideal", "vs_generate"]]
    return ["## Wall-clock speed (`bench`, decode phase)", "",
            f"Device: {meta.get('device', {}).get('processor', '?')}, {meta.get('device', {}).get('cpu_count', '?')} cores"
            f"{', ' + meta['device']['cuda_device'] if meta.get('device', {}).get('cuda_device') else ''}.", "",
            "FlexiDepth reports no wall-clock speedup; here `speedup` is measured decode tokens/s over full depth, "
            "`ideal` the layer-count bound.", "", _table(s), ""]


def write_report(results: str, out: str) -> Path:
    folder = Path(results)
    if not folder.is_dir():
        raise SkipbenchError(f"--results folder not found: {results}")
    sections = [section_evaluate, section_cosine, section_oracle, section_controllers, section_flexidepth, section_bench]
    body = [line for sec in sections for line in sec(folder)]
    if not body:
        raise SkipbenchError(f"no skipbench results under {results}; run `skipbench reproduce` or an experiment first")
    page = ["# skipbench report", "", f"Results folder: `{folder.as_posix()}`. Figures are PNG files beside this page.", "", *body]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(page))
    tmp.replace(path)
    return path
