"""One policy spec, one grammar, one registry: how every command names a skipping strategy.

Grammar (every command, every preset): `NAME[:ARG]`, several separated by commas.

    full   early-exit:12   uniform:15   random:22   random-token:22   layers:0,3,5
    controller:DIR   flexidepth:DIR   and sweeps such as uniform:8,15,22

A comma followed by a number continues the ARG of the strategy before it: for a strategy whose argument is a
cost (or a threshold) each number is one point of a sweep; for `layers` the numbers are one set. So
`full,uniform:8,15,layers:0,3,5` is four points: full, uniform:8, uniform:15 and layers:0,3,5.

A strategy is a module that builds a `Policy` plus its entry here, which carries what a command needs to know
without importing it (no torch for `plan` or `--help`): what kind it is, what its argument means, the KV modes it
supports, whether it reads a checkpoint. Third-party strategies add entries through the entry-point group
`skipbench.policies` (the entry point loads to a `Strategy`) and then work in every command.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from skipbench.errors import SkipbenchError

KINDS = ("static", "per-sequence", "per-token", "learned", "draft")  # draft: chooses its layers between the rounds of
# self-speculative decoding, from what the verify pass computed (a draft only: `Policy.adapts`)
ARGS = {
    "none": "no argument",
    "cost": "layers executed per token (an integer; several make a sweep)",
    "layers": "0-based layer indices to execute (one set)",
    "checkpoint": "a folder written by the strategy's train command",
    "threshold": "a number (several make a sweep)",
}
KV_MODES = ("fill", "none")
ENTRY_POINT_GROUP = "skipbench.policies"


NEEDS = ("model", "data")  # what a strategy may ask of its build context beyond the depth


@dataclass(frozen=True, kw_only=True)
class Option:
    """A strategy's own setting (`--policy-option NAME=VALUE`); its type is its default's."""

    name: str
    default: Any
    help: str = ""
    choices: tuple[str, ...] = ()

    def parse(self, text: str, owner: str) -> Any:
        kind = type(self.default)
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("1", "true", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise SkipbenchError(f"policy '{owner}': option {self.name} takes a {kind.__name__}, got '{text}'") from None
        if self.choices and value not in self.choices:
            raise SkipbenchError(f"policy '{owner}': option {self.name} must be one of {', '.join(self.choices)}, got '{text}'")
        return value


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a strategy's `build` and `plan` get: the model's depth always; the loaded model and the run's dataset
    when its entry `needs` them (a calibrated plan reads the model's states on the dataset's train split)."""

    num_layers: int
    lm: Any = None  # models.LoadedModel
    data: Any = None  # data.DataSpec of the run (None: the embedded text suite)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A registry entry. `build` is `module:function` (imported only when a policy is built) or a callable
    `(spec, ctx: Context) -> Policy`; `plan` likewise `(spec, ctx) -> layers` for plans that run the same layers
    for every token; `explain` `(spec, ctx) -> rows` is the table `skipbench plan` prints beside a plan (a ranking,
    a distance table)."""

    name: str
    build: str | Callable
    kind: str  # static | per-sequence | per-token | learned
    arg: str = "none"  # none | cost | layers | checkpoint | threshold
    help: str = ""
    kv_modes: tuple[str, ...] = KV_MODES  # modes it can run under; a checkpoint may narrow this further
    default_arg: str = ""  # used when the spec names no argument (e.g. the default checkpoint folder)
    plan: str | Callable | None = None  # the plan, without torch unless the strategy needs the model
    explain: str | Callable | None = None
    options: tuple[Option, ...] = ()
    needs: tuple[str, ...] = ()  # of NEEDS: what its build context must carry
    own_model: bool = False  # its layers are new weights: its policy runs on a model of its own (Policy.lm)
    calibrates_with: str = ""  # an option that, when set, makes its build calibrate on the run's validation split
    #: how `compare` sets it to K skipped layers when its argument is not a cost: (option, "K" or "L-K"), e.g.
    #: ("skip", "K") for a threshold router, ("exit", "L-K") for an early exit on a model of its own
    skip_option: tuple[str, str] = ()
    draws: bool = False  # its layers are random draws (`cosine` repeats it over seeds)
    #: its cost counts attention sub-layers: every token runs every layer's MLP (its nominal layers are all L)
    attention_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SkipbenchError(f"strategy '{self.name}': kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if self.arg not in ARGS:
            raise SkipbenchError(f"strategy '{self.name}': arg must be one of {', '.join(ARGS)}, got '{self.arg}'")
        if set(self.needs) - set(NEEDS):
            raise SkipbenchError(f"strategy '{self.name}': needs must be among {', '.join(NEEDS)}, got {self.needs}")

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def sweeps(self) -> bool:
        return self.arg in ("cost", "threshold")

    @property
    def needs_checkpoint(self) -> bool:
        return self.arg == "checkpoint"

    def function(self, which: str = "build") -> Callable:
        target = getattr(self, which)
        if callable(target):
            return target
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


_SAMPLE = Option(name="calibration-seed", default=0, help="which calibration sample: 0 the split's first items, S > 0 "
                                                         "a seeded random sample of the same size (evaluate "
                                                         "--calibration-seeds runs several)")
_CALIBRATION = (
    Option(name="calibration", default=32, help="train-split items whose hidden states decide the plan"),
    Option(name="calibration-tokens", default=256, help="tokens per calibration item (prompt and reference)"),
    _SAMPLE,
)

# a learned router's threshold: as trained, as given, or chosen to meet a number of skips (calibration.threshold_of)
_THRESHOLD = (
    Option(name="tau", default=0.0, help="the router's threshold (0: the trained one)"),
    Option(name="skip", default=0.0, help="choose the threshold on calibration prompts so that a token skips this "
                                          "many layers (mindskip: attention sub-layers) on average (0: off)"),
    Option(name="calibration", default=64, help="validation-split items (held out from training) that choose the "
                                                "threshold (-o skip)"),
    _CALIBRATION[1],
    _SAMPLE,
)

_BUILTIN = [
    Strategy(name="full", build="skipbench.policies.static:full", plan="skipbench.policies.static:full_plan",
             kind="static", help="every layer"),
    Strategy(name="early-exit", build="skipbench.policies.static:early_exit", plan="skipbench.policies.static:early_exit_plan",
             kind="static", arg="cost", help="run the first E layers, then the head"),
    Strategy(name="reverse", build="skipbench.policies.static:reverse", plan="skipbench.policies.static:reverse_plan",
             kind="static", arg="cost", help="keep the first C layers, remove the rest (to heal with finetune --heal)"),
    Strategy(name="uniform", build="skipbench.policies.static:uniform", plan="skipbench.policies.static:uniform_plan_of",
             kind="static", arg="cost", help="U(l,c), Eq. 2 of Glavas et al.: c layers spread evenly"),
    Strategy(name="random", build="skipbench.policies.static:random", plan="skipbench.policies.static:random_plan",
             kind="per-sequence", arg="cost", draws=True, help="c random layers per sequence (layer 0 always)",
             options=(Option(name="mean", default=0.0, help="a mean M in (C-1, C]: each sequence runs C layers with "
                                                            "probability M - (C - 1), else C - 1 (0: always C); "
                                                            "evaluate --matched-random sets it"),)),
    Strategy(name="random-token", build="skipbench.policies.static:random_token", kind="per-token", arg="cost",
             draws=True, help="c random layers per token",
             options=(Option(name="mean", default=0.0, help="a mean M in (C-1, C]: each token runs C layers with "
                                                            "probability M - (C - 1), else C - 1 (0: always C); "
                                                            "evaluate --matched-random sets it"),)),
    Strategy(name="random-attention", build="skipbench.policies.static:random_attention", kind="per-token",
             arg="cost", draws=True, help="c random attention sub-layers per token, every MLP (MindSkip's control)",
             options=(Option(name="mean", default=0.0, help="a mean M in (C-1, C]: each token runs C attention "
                                                            "sub-layers with probability M - (C - 1), else C - 1 (0: "
                                                            "always C); evaluate --matched-random sets it"),
                      Option(name="kv", default="auto", choices=("auto", "fill", "none"),
                             help="auto: as the run's --kv-mode; fill: a skipped attention writes its token's K/V; "
                                  "none: it writes none (the matched control takes MindSkip's)")), attention_only=True),
    Strategy(name="skipdecode", build="skipbench.policies.skipdecode:build", kind="per-token", arg="cost",
             options=(Option(name="warmup", default=1, help="the lowest layers every token runs"),
                      Option(name="start", default=0, help="layers of the first generated token (0: the widest "
                                                           "schedule with mean C, min(L, 2C - warmup))")),
             help="SkipDecode (Del Corro et al.): layers fall linearly with the token's position to a mean of C over "
                  "--max-new-tokens; the lower layers (above the warm-up ones) are skipped, the batch shares a step's"),
    Strategy(name="layers", build="skipbench.policies.static:layers", plan="skipbench.policies.static:layers_plan",
             kind="static", arg="layers", help="an explicit set of layers"),
    Strategy(name="controller", build="skipbench.policies.controller:controller", kind="learned", arg="checkpoint",
             kv_modes=("fill",), default_arg="runs/controllers",
             help="Gumbel-softmax skip controllers (skipbench controllers train)"),
    Strategy(name="flexidepth", build="skipbench.policies.flexidepth:flexidepth", kind="learned", arg="checkpoint",
             default_arg="runs/flexidepth", options=_THRESHOLD, calibrates_with="skip", skip_option=("skip", "K"),
             help="FlexiDepth routers and adapters (skipbench flexidepth train)"),
    Strategy(name="mindskip", build="skipbench.policies.mindskip:build", kind="learned", arg="checkpoint",
             default_arg="runs/mindskip", needs=("model",), options=_THRESHOLD, calibrates_with="skip",
             skip_option=("skip", "K"),
             help="MindSkip (He et al.): per-token routers skip attention sub-layers (skipbench mindskip train)"),
    Strategy(name="layerskip", build="skipbench.policies.layerskip:build", plan="skipbench.policies.layerskip:plan",
             kind="learned", arg="checkpoint", default_arg="runs/finetune", needs=("model",), own_model=True,
             skip_option=("exit", "L-K"),
             options=(Option(name="exit", default=0, help="layers run before the shared head (0: every layer)"),),
             help="LayerSkip (Elhoushi et al.): early exit on the model `skipbench finetune --dropout-schedule exp "
                  "--early-exit-loss E` wrote"),
    Strategy(name="confidence", build="skipbench.policies.confidence:build", kind="per-token", arg="threshold",
             needs=("model",), help="CALM early exit: a token exits once its confidence reaches the threshold",
             options=(Option(name="measure", default="softmax", choices=("softmax", "state"),
                             help="softmax: top-2 probability gap through the head; state: cos of consecutive states"),
                      Option(name="min-layers", default=1, help="layers every token runs before it may exit"),
                      Option(name="decay", default=0.0, help="CALM's position decay tau of the threshold (0: none)"),
                      Option(name="decay-length", default=64, help="N of the decay: the generation length"))),
    Strategy(name="block-influence", build="skipbench.policies.block_influence:build", kind="static", arg="cost",
             plan="skipbench.policies.block_influence:plan", explain="skipbench.policies.block_influence:explain",
             needs=("model", "data"), options=_CALIBRATION,
             help="ShortGPT: the C layers of highest block influence 1 - E cos(h_in, h_out) on calibration prompts"),
    Strategy(name="angular", build="skipbench.policies.angular:build", kind="static", arg="cost",
             plan="skipbench.policies.angular:plan", explain="skipbench.policies.angular:explain",
             needs=("model", "data"), options=_CALIBRATION,
             help="Gromov et al.: remove the L-C consecutive layers of least angular distance (last layer kept)"),
    Strategy(name="laco", build="skipbench.policies.laco:build", kind="static", arg="cost",
             plan="skipbench.policies.laco:plan", explain="skipbench.policies.laco:explain", needs=("model", "data"),
             own_model=True,
             options=(Option(name="merge", default=4, help="layers merged into one per step (the paper's C)"),
                      Option(name="threshold", default=0.65, help="a merge is kept when the last hidden states' "
                                                                  "cosine similarity to the original model's exceeds this"),
                      Option(name="interval", default=2, help="layers to move down after a kept merge (the paper's I)"),
                      Option(name="lowest", default=1, help="the lowest layer a merge may start at (the paper's L_l)"),
                      Option(name="rdsc", default="paper", choices=("paper", "code"),
                             help="paper: theta_l + sum_k (theta_{l+k} - theta_l); code: the authors' notebook, which "
                                  "merges in place and so gets theta_{l+K}, the run's last layer (norms: layer l's)"),
                      Option(name="below-threshold", default="force", choices=("force", "stop"),
                             help="when no merge of a pass passes the threshold: force its most similar one (C layers "
                                  "always; rows count them, laco_forced_merges) or stop merging (the authors' rule: "
                                  "more than C layers may remain)"),
                      Option(name="calibration", default=5, help="train-split items whose last hidden states judge a "
                                                                 "merge (the paper used 5 sentences)"),
                      _CALIBRATION[1], _SAMPLE),
             help="LaCo (Yang et al.): merge runs of layers by their parameter differences until C remain; runs the "
                  "collapsed model (a folder in the cache)"),
    Strategy(name="clasp", build="skipbench.policies.clasp:build", kind="draft", arg="cost", needs=("model",),
             options=(Option(name="interval", default=16, help="verify rounds between two layer searches (the "
                                                               "paper's layer optimisation interval)"),),
             help="CLaSp (Chen et al., 2025), a self-speculative draft only: C layers, re-chosen from the verify "
                  "pass by a dynamic program (after the prompt, then every -o interval rounds)"),
    Strategy(name="del", build="skipbench.policies.dynamic_exit:build", kind="draft", needs=("model",),
             options=(Option(name="min-exit", default=0, help="the lowest exit layer considered (0: L/4)"),
                      Option(name="max-length", default=16, help="the longest draft of a round"),
                      Option(name="decay", default=0.95, help="per-round decay of the acceptance counts")),
             help="DEL (Entezari Zarch et al., 2025), a self-speculative draft only: an early exit whose layer, draft length "
                  "and confidence stop are re-chosen after every round from shadow tokens of the verified states"),
    Strategy(name="knapspec", build="skipbench.policies.knapspec:build", kind="draft", needs=("model",),
             options=(Option(name="interval", default=64, help="verify rounds between two searches"),
                      Option(name="reference", default=8, help="recent kept tokens each candidate's acceptance is "
                                                               "measured on"),
                      Option(name="max-length", default=16, help="the longest draft of a round")),
             help="KnapSpec (ICML 2026), a self-speculative draft only: attention and MLP sub-layers skipped apart, "
                  "chosen as a knapsack that maximises predicted tokens per second from a measured latency model"),
    Strategy(name="route", build="skipbench.policies.route:build", kind="learned", arg="checkpoint",
             default_arg="runs/route", needs=("model", "data"),
             options=(Option(name="budget", default=0.0, help="mean layers per token over the run's items (--budget)"),
                      Option(name="assign", default="knapsack", choices=("knapsack", "price"),
                             help="knapsack: exact budget over the run's items; price: each item alone, at the "
                                  "price per layer that meets the budget on the validation items")),
             help="a prompt-level router's configuration per item under a mean budget (skipbench route train)"),
]


class Registry:
    """Built-in strategies, then the entry points of installed packages (loaded on first use)."""

    def __init__(self, builtin: list[Strategy]) -> None:
        self._entries = {s.name: s for s in builtin}
        self._plugins_loaded = False
        self._broken: dict[str, str] = {}  # plugins that failed to load, and why

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                strategy = ep.load()
            except Exception as exc:  # a broken plugin must not break the others: named when its policy is asked for
                self._broken[ep.name] = f"cannot load skipbench plugin '{ep.name}' ({ep.value}): {exc}"
                continue
            if not isinstance(strategy, Strategy):
                self._broken[ep.name] = f"skipbench plugin '{ep.name}' ({ep.value}) is not a skipbench Strategy"
            elif strategy.name in self._entries:  # a plugin cannot replace a built-in or an earlier plugin
                self._broken[ep.name] = f"skipbench plugin '{ep.name}' reuses the name '{strategy.name}'; ignored"
            else:
                self._entries[strategy.name] = strategy

    def get(self, name: str) -> Strategy:
        if name not in self._entries:
            self._load_plugins()
        if name not in self._entries:
            if name in self._broken:
                raise SkipbenchError(self._broken[name])
            raise SkipbenchError(f"unknown policy '{name}'; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self, kind: str | None = None, include_plugins: bool = True) -> list[str]:
        if include_plugins:
            self._load_plugins()
        return [n for n, s in self._entries.items()
                if (kind is None or s.kind == kind) and (include_plugins or n in _BUILTIN_NAMES)]

    def reload_plugins(self) -> None:
        """Look at the installed entry points again (tests install one at run time)."""
        self._plugins_loaded, self._broken = False, {}
        self._load_plugins()


STRATEGIES = Registry(_BUILTIN)
_BUILTIN_NAMES = {s.name for s in _BUILTIN}


CALIBRATION_SEED = "calibration-seed"


def samples_calibration(p: "PolicySpec") -> bool:
    """Whether the point's plan depends on a calibration sample: a calibrated plan (block influence, angular, LaCo),
    or a router whose threshold is chosen on calibration prompts (-o skip)."""
    s = p.strategy
    return s.option(CALIBRATION_SEED) is not None and (s.calibrates_with != "skip" or bool(p.opt("skip")))


def calibration_point(p: "PolicySpec") -> str:
    """The point's label without its calibration seed: what the points of `with_calibration_seeds` share."""
    from dataclasses import replace

    return replace(p, options=tuple((k, v) for k, v in p.options if k != CALIBRATION_SEED)).label


def check_calibration_seeds(seeds: tuple[int, ...]) -> None:
    if any(not 0 <= s < 2**31 for s in seeds) or len(set(seeds)) < len(seeds) or len(seeds) < 2:
        raise SkipbenchError(f"--calibration-seeds takes at least two distinct integers in 0 .. 2^31 - 1 (a spread "
                             f"needs two samples), got {','.join(map(str, seeds))}")


def with_calibration_seeds(policies, seeds: tuple[int, ...]) -> tuple["PolicySpec", ...]:
    """Every point whose plan depends on a calibration sample, once per seed (`-o calibration-seed=S`; 0 is the
    split's first items, the default); the other points once. `evaluate --calibration-seeds`."""
    from dataclasses import replace

    if not seeds:
        return tuple(policies)
    check_calibration_seeds(seeds)
    out, sampled = [], 0
    for p in policies:
        if not samples_calibration(p):
            out.append(p)
            continue
        if CALIBRATION_SEED in dict(p.options):
            raise SkipbenchError(f"policy '{p.label}' sets -o {CALIBRATION_SEED}, and --calibration-seeds gives every "
                                 "calibrated point its seeds: give one of them")
        sampled += 1
        for s in seeds:
            opts = dict(p.options) | ({CALIBRATION_SEED: str(s)} if s else {})
            out.append(replace(p, options=tuple(sorted(opts.items()))))
    if not sampled:
        raise SkipbenchError("--calibration-seeds: no point depends on a calibration sample (block-influence, angular, "
                             "laco, or a flexidepth/mindskip router with -o skip)")
    return tuple(out)


def static_names() -> tuple[str, ...]:
    """The static strategies (full depth included): the same layers for every token, so their tokens are the same
    under either KV mode (what the oracle and the router may compare across modes)."""
    return tuple(STRATEGIES.names("static"))


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """One point: a strategy and its argument, plus the options a user sets beside it."""

    name: str
    arg: str = ""  # "15", "0,3,5", "runs/ctrl", "" (the strategy's default)
    seed: int = 0  # random draws and sampled gates
    gate: str = "sample"  # learned samplers (controller): sample (as in the paper) | argmax
    first_layer: bool = True  # random skipping: always run layer 0
    options: tuple[tuple[str, str], ...] = ()  # the strategy's own settings, (name, text), sorted

    @property
    def strategy(self) -> Strategy:
        return STRATEGIES.get(self.name)

    @property
    def value(self) -> str:
        """The argument in effect (the strategy's default when none was given)."""
        return self.arg or self.strategy.default_arg

    @property
    def label(self) -> str:
        """`uniform:15`; options set away from their defaults follow in brackets, `confidence:0.9[measure=state]`, so
        two points that differ only in an option never share a label (result rows and the oracle tell them apart)."""
        base = f"{self.name}:{self.value}" if self.value else self.name
        changed = [f"{k}={v}" for k, v in self.options
                   if (o := self.strategy.option(k)) is None or o.parse(v, base) != o.default]
        return base + (f"[{';'.join(changed)}]" if changed else "")

    def cost(self, num_layers: int) -> float | None:
        """The nominal layers per token: a cost argument, the size of a layer set, all layers for `full`;
        None when only a run can tell (learned and threshold policies)."""
        s = self.strategy
        if s.arg == "cost":
            return float(num_layers if s.attention_only else self.int_arg())
        if s.arg == "layers":
            return float(len(set(self.int_list())))
        if s.arg == "none" and s.kind == "static":
            return float(num_layers)
        return None

    def int_arg(self) -> int:
        try:
            value = float(self.value)
        except ValueError:
            raise SkipbenchError(f"policy '{self.label}': '{self.value}' is not a number of layers") from None
        if not value.is_integer():
            raise SkipbenchError(f"policy '{self.label}': the cost must be an integer number of layers")
        return int(value)

    def int_list(self) -> tuple[int, ...]:
        return parse_int_list(self.value, f"policy '{self.name}'")

    def checked(self, num_layers: int) -> "PolicySpec":
        """Raises the one-line error a bad argument deserves, before any model work starts."""
        s = self.strategy
        if s.arg in ("cost", "layers") and not self.value:
            what = "a cost" if s.arg == "cost" else "layer indices"
            example = f"{self.name}:15" if s.arg == "cost" else f"{self.name}:0,3,5"
            raise SkipbenchError(f"policy '{self.name}' needs {what}: {ARGS[s.arg]}, e.g. {example}")
        if s.arg == "cost":
            c = self.int_arg()
            if not 1 <= c <= num_layers:
                raise SkipbenchError(f"policy '{self.label}': the cost must be between 1 and {num_layers} "
                                     f"(the model's layers), got {c}")
        elif s.arg == "layers":
            layers = self.int_list()
            bad = [i for i in layers if not 0 <= i < num_layers]
            if not layers or bad:
                raise SkipbenchError(f"policy '{self.label}': layer indices must lie in 0..{num_layers - 1}"
                                     + (f" (got {bad})" if bad else " (none given)"))
        elif s.arg in ("checkpoint", "threshold") and not self.value:
            raise SkipbenchError(f"policy '{self.name}' needs an argument: {ARGS[s.arg]}, e.g. {self.name}:VALUE")
        elif s.arg == "none" and self.arg:
            raise SkipbenchError(f"policy '{self.name}' takes no argument, got '{self.arg}'")
        if s.arg == "threshold":
            try:
                finite = all(math.isfinite(float(x)) for x in self.value.split(","))
            except ValueError:
                finite = False
            if not finite:
                raise SkipbenchError(f"policy '{self.name}:{self.value}': the threshold must be a finite number")
        for name, _ in self.options:
            if s.option(name) is None:
                raise SkipbenchError(f"policy '{self.name}' has no option '{name}'"
                                     + (f" (its options: {', '.join(o.name for o in s.options)})" if s.options else ""))
            self.opt(name)
        return self

    def opt(self, name: str) -> Any:
        """The value of one of the strategy's options (its default unless set)."""
        option = self.strategy.option(name)
        if option is None:
            raise KeyError(f"strategy '{self.name}' declares no option '{name}'")
        text = dict(self.options).get(name)
        return option.default if text is None else option.parse(text, self.label)

    def check_held_out(self, data: Any) -> None:
        """A strategy tuned on the dataset's train split (its entry needs "data": calibration prompts) is scored on
        other items only, as learned policies are: with --split test or validation."""
        option = self.strategy.calibrates_with
        if data is None:
            return
        if option and self.opt(option) and data.split in ("all", "validation"):
            raise SkipbenchError(f"policy '{self.label}' chooses its threshold on the validation split of '{data.name}' "
                                 "(-o " + option + "); score it on other items: --split test")
        if "data" in self.strategy.needs and data.split in ("all", "train"):
            raise SkipbenchError(f"policy '{self.label}' is calibrated or trained on the train split of '{data.name}'; score it on "
                                 "held-out items: --split test (or validation)")

    def check_draft(self) -> "PolicySpec":
        """A self-speculative draft skips layers of the verifying model and shares its cache: a strategy that runs a
        model of its own cannot draft (refused before anything is built)."""
        if self.strategy.own_model:
            raise SkipbenchError(f"draft '{self.label}' runs a model of its own (new weights), so it cannot share the "
                                 "full model's cache: a self-speculative draft skips layers of the full model")
        return self

    def check_kv_mode(self, mode: str) -> None:
        """The KV mode a run resolved to must be one the strategy supports (its entry says which)."""
        if mode not in self.strategy.kv_modes:
            raise SkipbenchError(f"policy '{self.label}' runs under --kv-mode {' or '.join(self.strategy.kv_modes)} "
                                 f"only, got {mode}")

    def context(self, num_layers: int, lm: Any = None, data: Any = None) -> Context:
        """The build context, after the checks: a strategy that needs the model gets a clear error without one."""
        self.checked(num_layers)
        if "model" in self.strategy.needs and lm is None:
            raise SkipbenchError(f"policy '{self.label}' is computed from a model's hidden states: this command "
                                 "needs the model (skipbench plan: --model)")
        return Context(num_layers=num_layers, lm=lm, data=data)

    def build(self, num_layers: int, lm: Any = None, data: Any = None, draft: bool = False):
        """The Policy object (imports the strategy's module, and with it torch). `lm` and `data`: the loaded model
        and the run's dataset, for strategies that need them (others ignore them). `draft`: it will draft for
        self-speculative decoding (a strategy of kind `draft` is refused otherwise)."""
        if self.strategy.kind == "draft" and not draft:
            raise SkipbenchError(f"policy '{self.label}' chooses its layers from the verify passes of self-speculative "
                                 "decoding: give it as a draft (--draft), not as a policy")
        return self.strategy.function("build")(self, self.context(num_layers, lm, data))

    def plan(self, num_layers: int, lm: Any = None, data: Any = None) -> list[int] | None:
        """The layers a static or per-sequence plan runs (for one sequence), without building a Policy."""
        s = self.strategy
        return None if s.plan is None else list(s.function("plan")(self, self.context(num_layers, lm, data)))

    def explain(self, num_layers: int, lm: Any = None, data: Any = None) -> list[dict]:
        """The table behind a plan (a ranking, a distance table), or [] when the strategy has none."""
        s = self.strategy
        return [] if s.explain is None else list(s.function("explain")(self, self.context(num_layers, lm, data)))


_NEW = re.compile(r"^[A-Za-z][\w.-]*(:.*)?$")


def parse_policies(text: str | list[str] | tuple[str, ...], policy_options: dict[str, str] | None = None,
                   **options) -> list[PolicySpec]:
    """`full,uniform:8,15,layers:0,3,5` -> the points it names, in order, sweeps expanded. `options` (seed,
    gate, first_layer) apply to every point; `policy_options` (`--policy-option NAME=VALUE`) to every point whose
    strategy declares NAME, and one no named strategy declares is refused. `;` is accepted for `,` inside a layer
    list (older bench syntax)."""
    pieces = [text] if isinstance(text, str) else list(text)
    groups: list[tuple[str, list[str]]] = []
    for piece in pieces:
        for token in (t.strip() for t in piece.replace(";", ",").split(",")):
            if not token:
                continue
            if _NEW.match(token) and not _is_number(token):
                name, _, arg = token.partition(":")
                groups.append((name, [arg] if arg else []))
            elif groups and groups[-1][1]:
                groups[-1][1].append(token)
            else:
                raise SkipbenchError(f"cannot read policy '{text}': '{token}' follows no NAME:ARG; "
                                     "examples: full, uniform:15, uniform:8,15,22, layers:0,3,5, controller:runs/ctrl")
    specs: list[PolicySpec] = []
    policy_options = dict(policy_options or {})
    for name, args in groups:
        strategy = STRATEGIES.get(name)
        args = _canonical(strategy, args)
        own = tuple(sorted((k, v) for k, v in policy_options.items() if strategy.option(k) is not None))
        if strategy.sweeps and len(args) > 1:
            specs += [PolicySpec(name=name, arg=a, options=own, **options) for a in args]
        else:
            specs.append(PolicySpec(name=name, arg=",".join(args), options=own, **options))
    if not specs:
        raise SkipbenchError("no policy given; examples: full, uniform:15, uniform:8,15,22, layers:0,3,5")
    unused = [k for k in policy_options if not any(k == n for s in specs for n, _ in s.options)]
    if unused:
        raise SkipbenchError(f"--policy-option {', '.join(unused)}: no policy given takes it (`skipbench policies` "
                             "lists each strategy's options)")
    return specs


def from_flags(policy: str | list[str] | tuple[str, ...], *, cost=None, costs=(), exit_layer=None, keep=None, seed=0,
               per_token=False, first_layer=True, checkpoint=None, gate="sample",
               policy_options: list[str] | tuple[str, ...] | None = None) -> list[PolicySpec]:
    """The points a command's flags name: the policy grammar (`--policy`, repeatable), `-o NAME=VALUE` options, and
    the older separate flags (`--policy uniform --costs 15`, `--exit-layer`, `--keep 0,3,5`, `--per-token`,
    `--controller DIR`), which fill in the argument a spec leaves out."""
    specs = parse_policies(policy, parse_policy_options(policy_options), seed=seed, gate=gate, first_layer=first_layer)
    out = []
    for s in specs:
        name, arg = s.name, s.arg
        if name == "random" and per_token:
            name = "random-token"
        if not arg:
            given = {"cost": exit_layer if name == "early-exit" and exit_layer is not None else cost,
                     "layers": keep, "checkpoint": (checkpoint or {}).get(name)}.get(s.strategy.arg)
            arg = "" if given is None else str(given)
        out.append(replace(s, name=name, arg=arg))
    return with_costs(out, costs)


def parse_policy_options(pairs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """`["min-layers=4", "measure=state"]` -> {"min-layers": "4", "measure": "state"}."""
    out = {}
    for pair in pairs or ():
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise SkipbenchError(f"--policy-option takes NAME=VALUE, got '{pair}'")
        if out.get(name.strip(), value.strip()) != value.strip():
            raise SkipbenchError(f"--policy-option {name.strip()} given twice ({out[name.strip()]} and {value.strip()}): "
                                 "give it once")
        out[name.strip()] = value.strip()
    return out


def _canonical(strategy: Strategy, args: list[str]) -> list[str]:
    """One spelling per point: `uniform:015` is `uniform:15`, `layers:5,0,3` is `layers:0,3,5` (same label, same
    cache key). Arguments that do not parse are left for `checked` to report."""
    try:
        if strategy.arg == "cost":
            return [str(int(float(a))) if float(a).is_integer() else a for a in args]
        if strategy.arg == "layers":
            return [str(i) for i in sorted({int(a) for a in args})]
        if strategy.arg == "threshold":
            return [repr(float(a)).removesuffix(".0") if float(a).is_integer() else repr(float(a)) for a in args]
    except ValueError:
        pass
    return args


def with_costs(specs: list[PolicySpec], costs: tuple[int, ...] | list[int]) -> list[PolicySpec]:
    """The older form `--policy uniform --costs 8,15`: a strategy whose argument is a cost, named without one, takes
    each cost (threshold strategies do not: a layer count is not a threshold)."""
    out = []
    for s in specs:
        if not s.arg and s.strategy.arg == "cost" and costs:
            out += [replace(s, arg=str(c)) for c in costs]
        else:
            out.append(s)
    return out


def parse_int_list(text: str, what: str = "the list") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(";", ",").split(",") if x.strip())
    except ValueError:
        raise SkipbenchError(f"{what}: expected comma-separated integers, got '{text}'") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def describe() -> list[dict]:
    """The registry as rows (for `skipbench policies`)."""
    return [{"name": n, "kind": s.kind, "argument": ARGS[s.arg], "kv modes": ",".join(s.kv_modes),
             "options": ", ".join(f"{o.name}={o.default}" for o in s.options), "what": s.help}
            for n in STRATEGIES.names() for s in [STRATEGIES.get(n)]]
