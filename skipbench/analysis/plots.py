"""Figures (matplotlib, headless): readable at a glance — labelled axes with units, legends, CI bands."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def oracle_figures(result, metric: str, stem: Path) -> list[Path]:
    """Figure 2 (oracle vs budget with selection shares) and Figure 8 (ULS vs greedy oracle vs oracle)."""
    t = result.table
    oracle = t[t["method"] == "oracle"].sort_values("budget")
    greedy = t[t["method"] == "greedy"].sort_values("budget")
    singles = t[t["method"].str.startswith("single:")].drop_duplicates("method")
    n_layers = max(result.costs)
    paths = []

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(oracle["budget"], oracle["value"], "-", color="C3", label="oracle (exact knapsack)")
    top.scatter(singles["mean_cost"], singles["value"], color="k", zorder=3, label="single configurations")
    for r in singles.itertuples():
        top.annotate(r.method.removeprefix("single:"), (r.mean_cost, r.value), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if result.star is not None:
        full_value = float(singles.loc[singles["method"] == f"single:{result.full}", "value"].iloc[0])
        top.scatter([result.star], [full_value], marker="*", s=250, color="gold", edgecolor="k", zorder=4,
                    label=f"oracle reaches full model at {result.star:.2f} layers ({100 * result.star / n_layers:.1f}%)")
    top.set_ylabel(f"mean {metric}")
    top.set_title("Sequence-level oracle (cf. Glavas et al. Fig. 2)")
    top.legend(fontsize=8, loc="center right")
    top.grid(alpha=0.3)
    shares = [c for c in oracle.columns if c.startswith("share:")]
    bottom.stackplot(oracle["budget"], *[oracle[c] for c in shares], labels=[c.removeprefix("share:") for c in shares], alpha=0.8)
    bottom.set_xlabel("budget: mean executed layers per token")
    bottom.set_ylabel("share of items")
    bottom.legend(fontsize=7, loc="upper left", ncol=2)
    bottom.set_ylim(0, 1)
    paths.append(_save(fig, stem.with_name(stem.name + "-fig2.png")))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    uls = singles[~singles["method"].str.startswith("single:full")].sort_values("mean_cost")
    ax.plot(uls["mean_cost"], uls["value"], "o-", color="k", label="single configurations (ULS)")
    ax.plot(greedy["budget"], greedy["value"], "-", color="C0", label="greedy oracle (no budget trading)")
    ax.plot(oracle["budget"], oracle["value"], "-", color="C3", label="oracle")
    ax.set_xlabel("budget: mean executed layers per token")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title("Where the oracle's gain comes from (cf. Glavas et al. Fig. 8)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, stem.with_name(stem.name + "-fig8.png")))
    return paths


def _save(fig, path: Path) -> Path:
    from skipbench.store.results import writes

    fig.tight_layout()
    if writes():  # tensor parallelism's other ranks draw what rank 0 writes
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


STRATEGY_STYLE = {"early-exit": ("C0", "early exit (EE)"), "uniform": ("C3", "uniform skipping (ULS)"),
                  "random": ("C2", "random skipping (RLS)"), "confidence": ("C1", "confidence exit (CALM)"),
                  "block-influence": ("C4", "block influence (ShortGPT)"), "angular": ("C5", "angular distance"),
                  "controller": ("C6", "skip controllers"), "flexidepth": ("C8", "FlexiDepth")}


def quality_figure(points, oracle, num_layers: int, path: Path, title: str) -> Path:
    """Quality against mean executed layers, one line per strategy with 95% CI bars (points: strategy, layers,
    value, lo, hi), and the oracle's curve over the same configurations (oracle: budget, value; may be empty)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    controls = points["matched_to"].notna() if "matched_to" in points else points["layers"] != points["layers"]
    for strategy, g in points[~controls].groupby("strategy", sort=False):
        g = g.sort_values("layers")
        color, label = STRATEGY_STYLE.get(strategy, ("C7", strategy))
        ax.errorbar(g["layers"], g["value"], yerr=[g["value"] - g["lo"], g["hi"] - g["value"]], fmt="o-",
                    color=color, label=label, capsize=3, markersize=4)
    for n, (_, c) in enumerate(points[controls].iterrows()):  # each control beside its learned point, joined
        ax.errorbar([c["layers"]], [c["value"]], yerr=[[c["value"] - c["lo"]], [c["hi"] - c["value"]]], fmt="s",
                    mfc="none", color="k", capsize=3, markersize=6,
                    label="random, same realized layers (matched control)" if n == 0 else None)
        for learned in str(c["matched_to"]).split(";"):
            mine = points[points["config"] == learned]
            if len(mine):
                ax.plot([mine["layers"].iloc[0], c["layers"]], [mine["value"].iloc[0], c["value"]], "k:", lw=1)
    if len(oracle):
        ax.plot(oracle["budget"], oracle["value"], "k--", label="oracle (per item, hindsight)")
    ax.set_xlabel(f"mean executed layers per generated token (of {num_layers})")
    ax.set_ylabel("ROUGE-L vs the full model's output")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def cosine_figure(agg, num_layers: int, path: Path, model: str) -> Path:
    """Figure 1a of Glavas et al.: final-state and layerwise cosine similarity vs cost, 95% CI bands."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    final = "cos_final_normed" if "cos_final_normed" in agg.columns else "cos_final"
    for ax, measure, title in zip(axes, (final, "cos_layerwise"),
                                  ("final hidden state" + (" (after the final norm)" if final != "cos_final" else ""),
                                   "layerwise (states K/V come from)")):
        x = "layers" if "layers" in agg.columns else "cost"  # a threshold's point sits at the layers it ran
        for strategy, g in agg.groupby("strategy"):
            g = g.sort_values(x)
            color, label = STRATEGY_STYLE.get(strategy, ("C7", strategy))
            ax.plot(g[x], g[measure], "o-", color=color, label=label)
            ax.fill_between(g[x], g[f"{measure}_lo"], g[f"{measure}_hi"], color=color, alpha=0.2)
        ax.set_title(f"cosine to the full model: {title}", fontsize=10)
        ax.set_xlabel(f"executed layers per token (of {num_layers})")
        ax.set_ylabel("cosine similarity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: hidden-state fidelity of skipping (cf. Glavas et al. Fig. 1a); bands: 95% CI", fontsize=10)
    return _save(fig, path)


INPUT_STYLE = {"hidden": ("C3", "-", "hidden-state input"), "constant": ("C0", "--", "constant input"),
               # each input's matched random controls (random-token skipping of the layers its runs realized)
               "random (hidden)": ("#e8a0a0", ":", "random, matched to hidden"),
               "random (constant)": ("#9cc3e6", ":", "random, matched to constant")}


def controller_figures(agg, layers, num_layers: int, stem: Path) -> list[Path]:
    """Figure 1b (cost vs quality per input, 95% CI over seeds) and Figure 6 (per-layer skip ratio)."""
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("full_rougeL", "kl"), ("ROUGE-L vs the full model's output", "KL(full || controlled), nats/token")):
        for input_kind, g in agg.groupby("input"):
            g = g[g[metric].notna()].sort_values("layers_mean")  # a control has no KL (the controllers' pass)
            if g.empty:
                continue
            color, style, name = INPUT_STYLE.get(input_kind, ("C7", "-", input_kind))
            ax.errorbar(g["layers_mean"], g[metric], xerr=[g["layers_mean"] - g["layers_mean_lo"], g["layers_mean_hi"] - g["layers_mean"]],
                        yerr=[g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]], fmt="o" + style,
                        color=color, capsize=3, label=name)
            for r in g.itertuples():
                ax.annotate(f"α={r.alpha:g}", (r.layers_mean, getattr(r, metric)), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"mean executed layers per token (of {num_layers})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Skip controllers: hidden state vs constant input (cf. Glavas et al. Fig. 1b); bars: 95% CI over seeds", fontsize=10)
    paths.append(_save(fig, stem.with_name(stem.name + "-fig1b.png")))

    fig, ax = plt.subplots(figsize=(8, 4))
    mean = layers.groupby(["input", "alpha", "layer"])["skip_ratio"].mean().reset_index()
    alphas = sorted(mean["alpha"].unique())
    cmap = plt.get_cmap("viridis", max(2, len(alphas)))
    for (input_kind, alpha), g in mean.groupby(["input", "alpha"]):
        _, style, name = INPUT_STYLE.get(input_kind, ("C7", "-", input_kind))
        ax.plot(g["layer"], g["skip_ratio"], style, color=cmap(alphas.index(alpha)), label=f"{name}, α={alpha:g}")
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("share of tokens skipping the layer")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Per-layer skip ratio of trained controllers (cf. Glavas et al. Fig. 6)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, stem.with_name(stem.name + "-fig6.png")))
    return paths


def depthmap_png(texts: list[str], used: list, num_layers: int, path: Path) -> Path:
    """Generated tokens as coloured boxes, wrapped into lines (the HTML page's picture)."""
    from matplotlib import colormaps

    vals = [u for u in used if u is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0, num_layers)
    cmap = colormaps["RdYlGn_r"]
    fig = plt.figure(figsize=(10, 1 + 0.35 * (1 + sum(len(t) for t in texts) // 90)))
    renderer = fig.canvas.get_renderer()
    x, y, line = 0.01, 0.95, 0.09 * 5 / max(5, fig.get_figheight() * 2)
    for text, u in zip(texts, used):
        shown = "".join(c if c.isprintable() else "·" for c in text.replace("\n", "⏎"))
        colour = "#dddddd" if u is None else cmap(0.1 + 0.8 * (0 if hi == lo else (u - lo) / (hi - lo)))
        t = fig.text(x, y, shown, fontsize=9, family="monospace", va="top",
                     bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
        width = t.get_window_extent(renderer).width / fig.bbox.width
        x += width + 0.004
        if x > 0.93:
            x, y = 0.01, y - line
    fig.text(0.01, 0.01, f"colour: layers used (of {num_layers}), green = fewer; grey = never fed back", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speedup_figure(summary, num_layers: int, path: Path) -> Path:
    """Decode speedup over full depth: realized (markers) vs the layer-count ideal (line), per batch size."""
    import numpy as np

    d = summary[(summary["phase"] == "decode") & ~summary["kind"].isin(["baseline", "speculative"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, (batch, g) in enumerate(d.groupby("batch_size")):
        color = f"C{j}"
        ideal = g.dropna(subset=["ideal_speedup"]).sort_values("layers_mean")
        ax.plot(ideal["layers_mean"], ideal["ideal_speedup"], "-", color=color, alpha=0.5, label=f"ideal, batch {batch}")
        for r in g.itertuples():
            marker = "s" if r.kind == "bound" else ("x" if "[mask]" in r.variant else "o")
            ax.scatter(r.layers_mean, r.speedup, marker=marker, color=color, zorder=3)
            ax.annotate(r.variant, (r.layers_mean, r.speedup), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel(f"mean executed layers per token (of {num_layers})")
    ax.set_ylabel("decode tokens/s relative to full depth")
    ax.set_title("Realized (markers: o skipbench, x --impl mask, ■ layers removed) vs ideal speedup", fontsize=9)
    ax.set_xlim(0, num_layers + 1)
    ax.set_ylim(0, max(1.5, float(np.nanmax(d[["speedup", "ideal_speedup"]].to_numpy())) * 1.1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def speculative_figure(summary, path: Path) -> Path:
    """Self-speculative decoding: realized decode speedup over full depth against alpha (the per-token acceptance
    probability, comparable across K), one colour per draft policy, one marker per batch size, K annotated; the
    formula's prediction hollow beside each."""
    d = summary[(summary["phase"] == "decode") & (summary["kind"] == "speculative")]
    drafts = list(dict.fromkeys(v.split(" k=")[0].removeprefix("spec ") for v in d["variant"]))
    markers = dict(zip(sorted(d["batch_size"].unique()), "osD^v"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in d.itertuples():
        name, k = r.variant.removeprefix("spec ").split(" k=")
        color, marker = f"C{drafts.index(name) % 10}", markers[r.batch_size]
        ax.scatter(r.acceptance_prob, r.speedup, color=color, marker=marker, zorder=3)
        ax.scatter(r.acceptance_prob, r.predicted_speedup, facecolors="none", edgecolors=color, marker=marker, zorder=3)
        ax.annotate(f"K={k}", (r.acceptance_prob, r.speedup), textcoords="offset points", xytext=(4, 3), fontsize=6)
    for j, name in enumerate(drafts):
        ax.scatter([], [], color=f"C{j % 10}", label=name)
    for batch, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"batch {batch} (hollow: predicted)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("per-token acceptance probability (Leviathan et al.'s alpha)")
    ax.set_ylabel("decode tokens/s relative to full depth")
    ax.set_title("Self-speculative decoding: speedup against acceptance (output = full depth's)", fontsize=9)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def track_figure(summary, path: Path) -> Path:
    """The self-speculative track: each method's mean speedup over full depth against its mean tokens per round
    (Spec-Bench's two figures), with 95% intervals over the prompts as bars; hollow where some prompt's output
    differed from full depth's."""
    d = summary[(summary["category"] == "all") & (summary["method"] != "full")]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, r in enumerate(d.itertuples()):
        n, total = (int(x) for x in r.lossless.split("/"))
        color = f"C{j % 10}"
        ax.errorbar(r.tokens_per_round, r.speedup, xerr=[[r.tokens_per_round - r.tokens_per_round_lo],
                                                         [r.tokens_per_round_hi - r.tokens_per_round]],
                    yerr=[[r.speedup - r.speedup_lo], [r.speedup_hi - r.speedup]], fmt="o", color=color,
                    mfc=color if n == total else "none", capsize=3, label=r.method + ("" if n == total else
                                                                                      f" (lossless on {n}/{total})"))
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("mean tokens per round (accepted drafts + the verifier's)")
    ax.set_ylabel("mean speedup over full depth (wall clock)")
    ax.set_title("Self-speculative methods on the same prompts (batch 1, greedy)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def lmeval_figure(summary, num_layers: int, path: Path) -> Path:
    """Each task's main metric against mean executed layers, one panel per task, one line per strategy, with 95%
    intervals as bars (summary: task, metric, policy_spec, layers_mean, value, lo, hi)."""
    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = summary[summary["task"] == task].assign(strategy=lambda f: f["policy_spec"].str.split(":").str[0])
        # a task whose answers are one token gates none under a full-depth context: its points sit at their cost
        at_cost = g["layers_mean"].isna().any()
        g = g.assign(layers_mean=g["layers_mean"].fillna(g["cost"].astype(float)))
        full = g[g["strategy"] == "full"]
        for strategy, s in g[g["strategy"] != "full"].groupby("strategy", sort=False):
            s = s.sort_values("layers_mean")
            color, label = STRATEGY_STYLE.get(strategy, ("C7", strategy))
            bars = [(s["value"] - s["lo"]).clip(lower=0), (s["hi"] - s["value"]).clip(lower=0)]  # Wilson at 0 or 1: ~1e-17
            ax.errorbar(s["layers_mean"], s["value"], yerr=bars, fmt="o-",
                        color=color, label=label, capsize=3, markersize=4)
        if len(full):
            ax.axhline(full["value"].iloc[0], color="k", ls="--", lw=1, label="full depth")
        ax.set_xlim(0, num_layers + 0.5)
        ax.set_xlabel(f"mean executed layers per gated token (of {num_layers})" if not at_cost else
                      f"layers (of {num_layers}; no token gated: the cost)")
        ax.set_ylabel(g["metric"].iloc[0])
        ax.set_title(f"{task} (bars: 95% intervals)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def compare_figure(summary, num_layers: int, path: Path) -> Path:
    """Retain % against the skip each method realized, one line per method, with approximate 95% intervals; the
    full model at 100%."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (method, g) in enumerate(summary.groupby("method", sort=False)):
        g = g.sort_values("skipped")
        unit = " (attention sub-layers)" if (g["skipped_unit"] == "attention").all() else ""
        bars = [(g["retain_pct"] - g["retain_lo"]).clip(lower=0), (g["retain_hi"] - g["retain_pct"]).clip(lower=0)]
        ax.errorbar(g["skipped"], g["retain_pct"], yerr=bars, fmt="o-", color=f"C{k}", capsize=3, label=method + unit)
        for r in g.itertuples():
            ax.annotate(f"K={r.skip}", (r.skipped, r.retain_pct), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(100, color="k", ls="--", lw=1, label="full model")
    ax.set_xlabel(f"realized skip per token (of {num_layers} layers)")
    ax.set_ylabel("Retain % (mean over tasks of score / full score)")
    ax.set_title("Methods at the same number of skipped layers (bars: approximate 95% intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def route_figure(table, path: Path, metric: str, num_layers: int) -> Path:
    """The oracle curve (cf. Glavas et al. Fig. 2) with the routers' curves, a random assignment and the single
    configurations; the reported budgets carry the routers' 95% bootstrap intervals."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"oracle": ("C3", "-", "oracle (exact knapsack, hindsight)"), "greedy": ("C0", "--", "greedy oracle"),
              "random": ("0.5", ":", "random assignment"),
              "blind": ("0.3", "-.", "no prompt read (the configurations' train means)")}
    table = table[table["kind"] != "difference"] if "kind" in table else table  # paired differences: not curves
    routers = sorted(m for m in table["method"].unique() if m.startswith("router:"))
    for k, name in enumerate(routers):
        styles[name] = (f"C{2 + 2 * k}", "-", name.removeprefix("router:") + " router (prompt only)")
    for method, (color, line, label) in styles.items():
        t = table[table["method"] == method].sort_values("budget")
        x = t["mean_cost"] if method == "random" else t["budget"]  # random scores may leave budget unspent
        ax.plot(x, t["value"], line, color=color, label=label + (" (at its mean cost)" if method == "random" else ""))
        if method.startswith("router:") and "value_lo" in t:
            r = t[t["reported"] & t["value_lo"].notna()]
            ax.errorbar(r["budget"], r["value"], yerr=[r["value"] - r["value_lo"], r["value_hi"] - r["value"]],
                        fmt="o", color=color, capsize=3)
    singles = table[table["method"].str.startswith("single:")].drop_duplicates("method")
    ax.scatter(singles["mean_cost"], singles["value"], color="k", zorder=3, label="single configurations")
    for r in singles.itertuples():
        ax.annotate(r.method.removeprefix("single:"), (r.mean_cost, r.value), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.set_xlabel(f"budget: mean executed layers per token (of {num_layers})")
    ax.set_ylabel(f"mean {metric} on the test items")
    ax.set_title("A prompt-level router against the oracle")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)
