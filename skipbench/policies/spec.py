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
import re
from dataclasses import dataclass
from typing import Callable

from skipbench.errors import SkipbenchError

KINDS = ("static", "per-sequence", "per-token", "learned")
ARGS = {
    "none": "no argument",
    "cost": "layers executed per token (an integer; several make a sweep)",
    "layers": "0-based layer indices to execute (one set)",
    "checkpoint": "a folder written by the strategy's train command",
    "threshold": "a number (several make a sweep)",
}
KV_MODES = ("fill", "none")
ENTRY_POINT_GROUP = "skipbench.policies"


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A registry entry. `build` is `module:function` (imported only when a policy is built) or a callable
    `(spec, num_layers) -> Policy`."""

    name: str
    build: str | Callable
    kind: str  # static | per-sequence | per-token | learned
    arg: str = "none"  # none | cost | layers | checkpoint | threshold
    help: str = ""
    kv_modes: tuple[str, ...] = KV_MODES  # modes it can run under; a checkpoint may narrow this further
    default_arg: str = ""  # used when the spec names no argument (e.g. the default checkpoint folder)
    plan: str | Callable | None = None  # `(spec, num_layers) -> layers` for static plans, importable without torch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SkipbenchError(f"strategy '{self.name}': kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if self.arg not in ARGS:
            raise SkipbenchError(f"strategy '{self.name}': arg must be one of {', '.join(ARGS)}, got '{self.arg}'")

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


_BUILTIN = [
    Strategy(name="full", build="skipbench.policies.static:full", plan="skipbench.policies.static:full_plan",
             kind="static", help="every layer"),
    Strategy(name="early-exit", build="skipbench.policies.static:early_exit", plan="skipbench.policies.static:early_exit_plan",
             kind="static", arg="cost", help="run the first E layers, then the head"),
    Strategy(name="uniform", build="skipbench.policies.static:uniform", plan="skipbench.policies.static:uniform_plan_of",
             kind="static", arg="cost", help="U(l,c), Eq. 2 of Glavas et al.: c layers spread evenly"),
    Strategy(name="random", build="skipbench.policies.static:random", plan="skipbench.policies.static:random_plan",
             kind="per-sequence", arg="cost", help="c random layers per sequence (layer 0 always)"),
    Strategy(name="random-token", build="skipbench.policies.static:random_token", kind="per-token", arg="cost",
             help="c random layers per token"),
    Strategy(name="layers", build="skipbench.policies.static:layers", plan="skipbench.policies.static:layers_plan",
             kind="static", arg="layers", help="an explicit set of layers"),
    Strategy(name="controller", build="skipbench.policies.controller:controller", kind="learned", arg="checkpoint",
             kv_modes=("fill",), default_arg="runs/controllers",
             help="Gumbel-softmax skip controllers (skipbench controllers train)"),
    Strategy(name="flexidepth", build="skipbench.policies.flexidepth:flexidepth", kind="learned", arg="checkpoint",
             default_arg="runs/flexidepth", help="FlexiDepth routers and adapters (skipbench flexidepth train)"),
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

    def names(self, kind: str | None = None) -> list[str]:
        self._load_plugins()
        return [n for n, s in self._entries.items() if kind is None or s.kind == kind]

    def reload_plugins(self) -> None:
        """Look at the installed entry points again (tests install one at run time)."""
        self._plugins_loaded, self._broken = False, {}
        self._load_plugins()


STRATEGIES = Registry(_BUILTIN)


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """One point: a strategy and its argument, plus the options a user sets beside it."""

    name: str
    arg: str = ""  # "15", "0,3,5", "runs/ctrl", "" (the strategy's default)
    seed: int = 0  # random draws and sampled gates
    gate: str = "sample"  # learned samplers (controller): sample (as in the paper) | argmax
    first_layer: bool = True  # random skipping: always run layer 0

    @property
    def strategy(self) -> Strategy:
        return STRATEGIES.get(self.name)

    @property
    def value(self) -> str:
        """The argument in effect (the strategy's default when none was given)."""
        return self.arg or self.strategy.default_arg

    @property
    def label(self) -> str:
        return f"{self.name}:{self.value}" if self.value else self.name

    def cost(self, num_layers: int) -> float | None:
        """The nominal layers per token: a cost argument, the size of a layer set, all layers for `full`;
        None when only a run can tell (learned and threshold policies)."""
        s = self.strategy
        if s.arg == "cost":
            return float(self.int_arg())
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
        return self

    def check_kv_mode(self, mode: str) -> None:
        """The KV mode a run resolved to must be one the strategy supports (its entry says which)."""
        if mode not in self.strategy.kv_modes:
            raise SkipbenchError(f"policy '{self.label}' runs under --kv-mode {' or '.join(self.strategy.kv_modes)} "
                                 f"only, got {mode}")

    def build(self, num_layers: int):
        """The Policy object (imports the strategy's module, and with it torch)."""
        return self.strategy.function("build")(self.checked(num_layers), num_layers)

    def plan(self, num_layers: int) -> list[int] | None:
        """The layers a static or per-sequence plan runs (for one sequence), without building a Policy."""
        s = self.strategy
        return None if s.plan is None else list(s.function("plan")(self.checked(num_layers), num_layers))


_NEW = re.compile(r"^[A-Za-z][\w.-]*(:.*)?$")


def parse_policies(text: str | list[str] | tuple[str, ...], **options) -> list[PolicySpec]:
    """`full,uniform:8,15,layers:0,3,5` -> the points it names, in order, sweeps expanded. `options` (seed,
    gate, first_layer) apply to every point. `;` is accepted for `,` inside a layer list (older bench syntax)."""
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
    for name, args in groups:
        strategy = STRATEGIES.get(name)
        args = _canonical(strategy, args)
        if strategy.sweeps and len(args) > 1:
            specs += [PolicySpec(name=name, arg=a, **options) for a in args]
        else:
            specs.append(PolicySpec(name=name, arg=",".join(args), **options))
    if not specs:
        raise SkipbenchError("no policy given; examples: full, uniform:15, uniform:8,15,22, layers:0,3,5")
    return specs


def _canonical(strategy: Strategy, args: list[str]) -> list[str]:
    """One spelling per point: `uniform:015` is `uniform:15`, `layers:5,0,3` is `layers:0,3,5` (same label, same
    cache key). Arguments that do not parse are left for `checked` to report."""
    try:
        if strategy.arg == "cost":
            return [str(int(float(a))) if float(a).is_integer() else a for a in args]
        if strategy.arg == "layers":
            return [str(i) for i in sorted({int(a) for a in args})]
    except ValueError:
        pass
    return args


def with_costs(specs: list[PolicySpec], costs: tuple[int, ...] | list[int]) -> list[PolicySpec]:
    """The older form `--policy uniform --costs 8,15`: a strategy whose argument is a cost, named without one, takes
    each cost (threshold strategies do not: a layer count is not a threshold)."""
    out = []
    for s in specs:
        if not s.arg and s.strategy.arg == "cost" and costs:
            out += [PolicySpec(name=s.name, arg=str(c), seed=s.seed, gate=s.gate, first_layer=s.first_layer) for c in costs]
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
    return [{"name": n, "kind": s.kind, "argument": ARGS[s.arg], "kv modes": ",".join(s.kv_modes), "what": s.help}
            for n in STRATEGIES.names() for s in [STRATEGIES.get(n)]]
