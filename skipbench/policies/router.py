"""A prompt-level router: predict every configuration's score of an item from its prompt alone, then assign
configurations under a mean-layer budget with the oracle's exact knapsack solver (the question Glavas et al. leave
open, Sec. 3.3: what a decision made from the prompt, without hindsight, captures of the oracle's gain).

Features of a prompt (`Features.kind`):

* `hidden`: the full-depth prompt's residual stream at chosen states (state a enters layer a, L leaves the last;
  `fidelity.CONVENTION`), mean-pooled over the prompt's tokens and at its last token, plus log prompt length.
  Cached per (model, states, prompt cut) in one file per dataset, each item computed once.
* `tfidf`: TF-IDF of the prompt's words and word pairs (vocabulary and idf from the train split), plus log length:
  the surface baseline, so a user sees whether the model's states carry more than the words.
* `length`: log prompt length alone.

The regressor is ridge regression from scikit-learn, one per configuration on standardised features, its
penalty chosen per configuration on the validation split by squared error; the test split's scores are never
read. Why ridge: a few hundred training items against thousands of features want a penalised linear model with a
closed-form fit and one tuned number. Why scikit-learn (a core dependency, pure wheels): its Ridge and its
TF-IDF are the maintained versions of both halves, where hand-written numpy would duplicate them. The fitted
router is stored as numbers (config.json + weights.safetensors, the checkpoint layout), not pickles.

`assign(predicted, costs, budget)` is the one assignment path: the oracle is `assign(true scores, ...)`.
`price_for(...)` is the per-prompt alternative: the knapsack's price per layer, set on the validation items, so
each item takes argmax predicted score - price x cost on its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skipbench.errors import SkipbenchError, note
from skipbench.store.distributed import tensor_parallel
from skipbench.analysis.knapsack import Instance, solve

KIND = "router"
FEATURES = ("hidden", "tfidf", "length")
ALPHAS = tuple(10.0 ** k for k in range(-2, 6))  # ridge penalties tried on the validation split
VERSION = 1  # of the hidden-state cache: bump when the computation changes
SPLIT_ORDER = ("train", "validation", "test")


@dataclass(frozen=True)
class Features:
    kind: str
    states: tuple[int, ...] = ()  # hidden: residual-stream states read (0..L)
    max_prompt_tokens: int = 1024

    def check(self, num_layers: int) -> "Features":
        if self.kind not in FEATURES:
            raise SkipbenchError(f"--features must be one of {', '.join(FEATURES)}, got '{self.kind}'")
        if self.kind == "hidden":
            bad = [s for s in self.states if not 0 <= s <= num_layers]
            if not self.states or bad:
                raise SkipbenchError(f"--states must lie in 0..{num_layers} (0: the embeddings, {num_layers}: after the "
                                     f"last layer), got {list(self.states)}")
        return self

    @property
    def layers_run(self) -> int:
        """Layers the prompt must run for these features (a state a needs layers 0..a-1)."""
        return max(self.states) if self.kind == "hidden" else 0


def default_states(num_layers: int) -> tuple[int, ...]:
    """The middle of the stack and after its last layer."""
    return (num_layers // 2, num_layers)


def split_items_of(data) -> dict[str, list]:
    """train / validation / test -> their items: the split `evaluate --split` takes of the dataset (data.DataSpec;
    its split and limit are ignored), through the same loader, so a mix such as `text,arith` is split per dataset as
    there. An id in two splits is an error (a repeated prompt would otherwise put a test item into training)."""
    from dataclasses import replace

    from skipbench.data import load_items

    out = {split: load_items(replace(data, split=split, limit=None)) for split in SPLIT_ORDER}
    for split, items in out.items():
        if len({it.item_id for it in items}) < len(items):
            raise SkipbenchError(f"the {split} split repeats a prompt; remove the copies")
    assert_disjoint({split: [it.item_id for it in items] for split, items in out.items()})
    return out


def splits_of(data) -> dict[str, str]:
    """item id -> train | validation | test (split_items_of)."""
    return {it.item_id: split for split, items in split_items_of(data).items() for it in items}


def assert_disjoint(ids_by_split: dict[str, list[str]]) -> None:
    """Train, validation and test share no item id (checked wherever a router is fit or scored)."""
    seen: dict[str, str] = {}
    for split, ids in ids_by_split.items():
        for i in ids:
            if seen.setdefault(i, split) != split:
                raise SkipbenchError(f"item {i} is in both the {seen[i]} and the {split} split")


# ---- features -------------------------------------------------------------------------------------------------
def prompt_ids(lm, items, max_prompt_tokens: int) -> list[list[int]]:
    from skipbench.data.prompts import encode_items

    return encode_items(lm, items, max_prompt_tokens)[0]


def hidden_features(lm, items, feats: Features, source: str) -> np.ndarray:
    """[n, 2 * len(states) * d]: per state, the mean over the prompt's tokens and the last token. Cached in one
    file per (model, states, prompt cut, source): items not in it are computed and added."""
    from skipbench.store import readers
    from skipbench.models.loading import cache_dir, model_fingerprint
    from skipbench.store.results import atomic_path

    key = json.dumps({"model": lm.name, "fingerprint": model_fingerprint(lm.name), "dtype": str(lm.dtype),
                      "states": list(feats.states), "max_prompt_tokens": feats.max_prompt_tokens, "source": source,
                      "version": VERSION}, sort_keys=True, default=str)
    path = cache_dir() / "route-features" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    cached: dict[str, np.ndarray] = {}
    if path.exists() and not tensor_parallel():  # under --tp every rank computes, its collectives in step
        try:
            saved = readers.npz_file(path, "route feature cache")
            cached = dict(zip(saved["ids"].tolist(), saved["x"]))
        except (readers.Unreadable, KeyError) as exc:
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'route feature cache {str(path)!r} is incomplete'}"
                 ": computing it again")
    todo = [it for it in items if it.item_id not in cached]
    if todo:
        for it, x in zip(todo, _states(lm, todo, feats)):
            cached[it.item_id] = x
        ids = sorted(cached)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=np.array(ids), x=np.stack([cached[i] for i in ids]))
    return np.stack([cached[it.item_id] for it in items])


def _states(lm, items, feats: Features) -> list[np.ndarray]:
    import torch

    from skipbench.engine import Engine

    engine = Engine(lm.adapter, "fill")
    span = range(0, feats.layers_run) if feats.layers_run < lm.num_layers else None
    out = []
    for ids in prompt_ids(lm, items, feats.max_prompt_tokens):  # one prompt at a time: no padding in the means
        ids = torch.tensor([ids], device=lm.device)
        present = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            res = engine.forward(ids, engine.prompt_cache(present, ids.shape[1]), keep_hidden=True, span=span)
        h = [res.hidden[s][0].float() for s in feats.states]  # [T, d] each
        out.append(torch.cat([torch.cat([x.mean(0), x[-1]]) for x in h]).cpu().numpy())
    return out


def log_lengths(lm, items, max_prompt_tokens: int) -> np.ndarray:
    return np.log1p(np.array([len(p) for p in prompt_ids(lm, items, max_prompt_tokens)], dtype=np.float64))[:, None]


def tfidf(vocabulary: list[str] | None = None, idf: np.ndarray | None = None):
    """The TF-IDF of the `tfidf` features: words and word pairs, sublinear counts; fitted on train prompts, or
    rebuilt from a saved vocabulary and idf."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if vocabulary is None:
        return TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=5000, sublinear_tf=True)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=vocabulary)
    vec.idf_ = idf
    return vec


# ---- the router -------------------------------------------------------------------------------------------------
@dataclass
class Router:
    features: Features
    configs: list[str]  # configuration labels (policy specs), in the order of the columns
    costs: list[float]  # nominal layers per token of each
    num_layers: int
    mean: np.ndarray  # [D] standardisation
    scale: np.ndarray  # [D]
    coef: np.ndarray  # [K, D]
    intercept: np.ndarray  # [K]
    alphas: list[float]
    vocabulary: list[str] = field(default_factory=list)  # tfidf
    idf: np.ndarray | None = None
    meta: dict = field(default_factory=dict)  # what it was trained on (model, dataset, items, validation)

    def design(self, lm, items, source: str) -> np.ndarray:
        """The feature matrix of `items` (prompts), unstandardised."""
        return design(self.features, lm, items, source, tfidf(self.vocabulary, self.idf) if self.vocabulary else None)

    def predict_from(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != self.mean.shape[0]:
            raise SkipbenchError(f"the router reads {self.mean.shape[0]} features, this model's prompts give "
                                 f"{x.shape[1]}: it was trained on another model ({self.meta.get('model')})")
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def check_model(self, lm, folder: str) -> None:
        """Features are the model's own (hidden states, its tokenizer's lengths): a router serves the model it was
        trained on."""
        if self.meta.get("model") != lm.name or self.num_layers != lm.num_layers:
            raise SkipbenchError(f"'{folder}' routes prompts of {self.meta.get('model')} ({self.num_layers} layers); "
                                 f"this run's model is {lm.name} ({lm.num_layers} layers)")

    @property
    def blind(self) -> np.ndarray:
        """[K] what a router knowing no prompt predicts for every item: each configuration's mean train score."""
        return np.array([float(self.meta["train_means"][c]) for c in self.configs])

    def predict(self, lm, items, source: str) -> np.ndarray:
        """[n, K] predicted scores."""
        return self.predict_from(self.design(lm, items, source))


def design(feats: Features, lm, items, source: str, vectorizer=None) -> np.ndarray:
    parts = [log_lengths(lm, items, feats.max_prompt_tokens)]
    if feats.kind == "hidden":
        parts.append(hidden_features(lm, items, feats, source).astype(np.float64))
    elif feats.kind == "tfidf":
        parts.append(vectorizer.transform([it.prompt for it in items]).toarray())
    return np.concatenate(parts, axis=1)


def fit(feats: Features, lm, train, validation, y_train: np.ndarray, y_val: np.ndarray, configs: list[str],
        costs: list[float], source: str, meta: dict) -> Router:
    """One ridge regressor per configuration on the train items, its penalty the one of ALPHAS with the least
    validation squared error."""
    from sklearn.linear_model import Ridge

    assert_disjoint({"train": [it.item_id for it in train], "validation": [it.item_id for it in validation]})
    vec = None
    if feats.kind == "tfidf":
        vec = tfidf()
        try:
            vec.fit([it.prompt for it in train])
        except ValueError:  # every word in fewer than two prompts
            raise SkipbenchError("the train prompts share no word: TF-IDF has no vocabulary") from None
    x_tr, x_val = design(feats, lm, train, source, vec), design(feats, lm, validation, source, vec)
    mean = x_tr.mean(0)
    scale = x_tr.std(0)
    scale[scale < 1e-12] = 1.0
    z_tr, z_val = (x_tr - mean) / scale, (x_val - mean) / scale
    coef, intercept, alphas, val_mse, const_mse = [], [], [], [], []
    for k in range(len(configs)):
        best = None
        for alpha in ALPHAS:
            m = Ridge(alpha=alpha).fit(z_tr, y_train[:, k])
            mse = float(np.mean((m.predict(z_val) - y_val[:, k]) ** 2))
            if best is None or mse < best[0] - 1e-15:
                best = (mse, alpha, m)
        mse, alpha, m = best
        coef.append(m.coef_)
        intercept.append(float(m.intercept_))
        alphas.append(alpha)
        val_mse.append(mse)
        const_mse.append(float(np.mean((y_train[:, k].mean() - y_val[:, k]) ** 2)))
    meta = meta | {"validation_mse": dict(zip(configs, val_mse)), "validation_mse_constant": dict(zip(configs, const_mse)),
                   "train_means": dict(zip(configs, y_train.mean(0).tolist()))}
    return Router(features=feats, configs=list(configs), costs=[float(c) for c in costs], num_layers=meta["num_layers"],
                  mean=mean, scale=scale, coef=np.array(coef), intercept=np.array(intercept), alphas=alphas,
                  vocabulary=vec.get_feature_names_out().tolist() if vec is not None else [],
                  idf=vec.idf_ if vec is not None else None, meta=meta)


def save(router: Router, folder: str) -> Path:
    """config.json + weights.safetensors, written together (checkpoint layout: `route:DIR` reads it, the part keys
    fingerprint it)."""
    import torch
    from safetensors.torch import save_file

    from skipbench.store.results import atomic_dir

    config = {"kind": KIND, "features": router.features.kind, "states": list(router.features.states),
              "max_prompt_tokens": router.features.max_prompt_tokens, "configs": router.configs, "costs": router.costs,
              "num_layers": router.num_layers, "alphas": router.alphas, "vocabulary": router.vocabulary, **router.meta}
    tensors = {"mean": router.mean, "scale": router.scale, "coef": router.coef, "intercept": router.intercept}
    if router.idf is not None:
        tensors["idf"] = router.idf
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in tensors.items()},
                  str(tmp / "weights.safetensors"))
    return Path(folder)


REQUIRED = ("model", "metric", "dataset", "train_ids", "validation_ids", "counts", "train_means")


def load(folder: str) -> Router:
    from skipbench.store.checkpoints import load_checkpoint

    meta, weights = load_checkpoint(folder, KIND)
    try:
        feats = Features(meta["features"], tuple(meta["states"]), int(meta["max_prompt_tokens"])).check(int(meta["num_layers"]))
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise KeyError(missing[0])
        w = {k: v.double().numpy() for k, v in weights.items()}
        router = Router(features=feats, configs=list(meta["configs"]), costs=[float(c) for c in meta["costs"]],
                        num_layers=int(meta["num_layers"]), mean=w["mean"], scale=w["scale"], coef=w["coef"],
                        intercept=w["intercept"], alphas=list(meta["alphas"]), vocabulary=list(meta["vocabulary"]),
                        idf=w.get("idf"), meta=meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise SkipbenchError(f"'{folder}' is not a complete router (missing or bad {exc}); train it again with "
                             "skipbench route train") from None
    k, d = router.coef.shape if router.coef.ndim == 2 else (0, 0)
    idf_ok = (router.idf is None and not router.vocabulary) or (router.idf is not None and router.idf.shape == (len(router.vocabulary),))
    if k != len(router.configs) or router.mean.shape != (d,) or router.intercept.shape != (k,) or not idf_ok:
        raise SkipbenchError(f"'{folder}/weights.safetensors' does not match its config.json; train it again")
    return router


# ---- assignment -------------------------------------------------------------------------------------------------
def assign(scores: np.ndarray, costs, budget: float) -> np.ndarray:
    """The configuration of each item that maximises the mean of `scores` with mean cost <= budget: the exact
    multiple-choice knapsack of the oracle (skipbench.analysis.knapsack.solve). Given true scores this is the oracle; given a
    router's predictions, the router."""
    return solve(Instance(scores, costs), budget).choice


def price_for(router: Router, lm, budget: float) -> float:
    """The price per cost unit at which the validation items, each choosing alone (argmax predicted score - price x
    cost), meet the mean budget: the knapsack's Lagrange multiplier on predictions (knapsack.price)."""
    from skipbench.data import DataSpec, load_items
    from skipbench.analysis.knapsack import price

    data = DataSpec(**router.meta["dataset"])
    ids = set(router.meta["validation_ids"])
    items = [it for it in load_items(data) if it.item_id in ids]
    inst = Instance(router.predict(lm, items, data.name), router.costs)
    return price(inst, inst.capacity(budget))


def check_budget(budget: float, costs, who: str) -> None:
    if not math.isfinite(budget) or budget < min(costs) - 1e-9:
        raise SkipbenchError(f"{who}: the budget must be at least the cheapest configuration's cost ({min(costs):g} "
                             f"layers), got {budget:g}")
