"""One frozen, typed config tree for oryx_ts.

`OryxConfig` holds everything a model and its training need; every other part of the package
(trainer, CLI, service, sweeps) takes it instead of re-listing hyperparameters. Configs are
immutable, validated on construction, and round-trip through JSON.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

Mixer = Literal["gdn", "mamba2"]
Retention = Literal["all", "bounded"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_literals(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = get_args(hints[f.name]) if getattr(hints[f.name], "__origin__", None) is Literal else ()
        value = getattr(obj, f.name)
        _check(not choices or value in choices, f"{type(obj).__name__}.{f.name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """How a `(L, C)` stream becomes tokens: patches of `patch_len` steps of all `channels`."""

    channels: int = 4
    patch_len: int = 8
    norm_decay: float = 0.99  # per-patch decay of the causal normalization statistics
    norm_eps: float = 1e-5
    clip: float = 50.0  # normalized values are clipped to +-clip (robust to gross outliers)

    def __post_init__(self) -> None:
        _check(self.channels >= 1, f"tokenizer.channels must be >= 1, got {self.channels}")
        _check(self.patch_len >= 1, f"tokenizer.patch_len must be >= 1, got {self.patch_len}")
        _check(0.0 < self.norm_decay <= 1.0, f"tokenizer.norm_decay must be in (0, 1], got {self.norm_decay}")
        _check(self.norm_eps > 0, f"tokenizer.norm_eps must be > 0, got {self.norm_eps}")
        _check(self.clip > 0, f"tokenizer.clip must be > 0, got {self.clip}")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Shape of one Oryx block and its two mixers."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    head_dim_k: int = 8  # key/query head dim; also the recurrent state's key dim
    head_dim_v: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio * d_model
    conv_size: int = 4  # short causal convolutions on k, v and the recurrent query
    mixer: Mixer = "gdn"
    chunk_size: int = 64  # chunk length of the parallel linear mixer
    rope: bool = True
    rope_base: float = 10000.0
    retention: Retention = "all"
    window: int = 512  # bounded retention: recent tokens kept
    pinned: int = 64  # bounded retention: router-pinned tokens kept
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in ("d_model", "n_layers", "n_heads", "head_dim_k", "head_dim_v", "conv_size", "chunk_size", "window"):
            _check(getattr(self, name) >= 1, f"block.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.head_dim_k % 2 == 0, f"block.head_dim_k must be even for RoPE, got {self.head_dim_k}")
        _check(self.mlp_ratio > 0, f"block.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.pinned >= 0, f"block.pinned must be >= 0, got {self.pinned}")

    @property
    def mlp_hidden(self) -> int:
        return int(math.ceil(self.mlp_ratio * self.d_model))


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Every token forecasts the next `horizon` steps of every channel at `quantiles`."""

    horizon: int = 16
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)

    def __post_init__(self) -> None:
        _check(self.horizon >= 1, f"head.horizon must be >= 1, got {self.horizon}")
        qs = tuple(self.quantiles)
        _check(len(qs) >= 1 and all(0.0 < q < 1.0 for q in qs), f"head.quantiles must lie in (0, 1), got {qs}")
        _check(list(qs) == sorted(set(qs)), f"head.quantiles must be strictly increasing, got {qs}")
        object.__setattr__(self, "quantiles", qs)

    @property
    def median_index(self) -> int:
        """Index of the quantile nearest 0.5 (the point forecast)."""
        return min(range(len(self.quantiles)), key=lambda i: abs(self.quantiles[i] - 0.5))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Mixed-mode training on windows of a long stream.

    Validation loss is measured every `val_every` steps on fixed windows (the stream's last
    `val_fraction`, or a separate validation array); see `oryx_ts.train.fit` for early stopping.
    """

    steps: int = 300
    batch_size: int = 16
    window_tokens: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 20  # linear warm-up, at most half the run's steps (a short or time-budgeted run still decays)
    mode_chunk: int = 4  # tokens per mode chunk
    attention_fraction: float = 0.25  # chance that a chunk runs in attention mode
    full_mode_fraction: float = 0.2  # share of windows that run entirely in one mode (half each)
    val_fraction: float = 0.15  # tail of the stream held out for validation
    val_every: int = 50  # optimizer steps between validation evaluations (also one before the first and one after the last)
    patience: int = 0  # early stopping: stop after this many evaluations in a row without a new best (after warm-up); 0 = off
    keep_best: bool = True  # the trained model gets the weights of its lowest validation loss (False: the last step's)
    any_phase: bool = False  # training windows start at any step, not only on the patch grid (P times as many windows)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.patience >= 0, f"train.patience must be >= 0 (0 = no early stopping), got {self.patience}")
        for name in ("steps", "batch_size", "window_tokens", "mode_chunk", "val_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("attention_fraction", "full_mode_fraction"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        _check(0.0 < self.val_fraction < 1.0, f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.lr > 0 and self.grad_clip > 0, "train.lr and train.grad_clip must be > 0")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The learned router (a small network on the token embedding and surprise features) and its training.

    The router is trained after the forecaster, which stays frozen: modes are relaxed with logistic
    (binary Gumbel) noise at `temperature`, and a dual variable, stepped by `dual_lr`, holds the
    expected attention rate at the budget's `fraction` (`BudgetConfig`) of the attention surcharge.

    Without labels the forecast loss alone says little about where to route (where attention does
    not lower it, the router learns nothing), so a self-supervised term, weighted by
    `surprise_weight`, fits the router to the stream's own surprise: a token is a positive when its
    patch, or one of the next `surprise_lookahead` patches, is among the budget `fraction` most
    surprising of its training window under the all-recurrent forecasts (see
    `oryx_ts.routers.features.surprise_targets`). It reads no labels.

    `target` picks what the label-free router is fitted to. `"surprise"`: the forecast loss through
    the relaxed modes plus the surprise term above. `"gain"`: what attention gains, measured on the
    frozen forecaster itself: both paths run over every training window and a token is a positive
    when the drop of its forecast loss from all-recurrent to all-attention (averaged with the next
    `gain_lookahead` tokens') is among the budget `fraction` largest of its batch and above zero
    (`oryx_ts.routers.training.gain_targets`); the surprise term is added with `surprise_weight`.
    """

    hidden: int = 32
    surprise_decay: float = 0.9  # EMA of the surprise, for its trend feature
    steps: int = 150
    batch_size: int = 16
    lr: float = 3e-3
    dual_lr: float = 0.5
    temperature: float = 0.5
    surprise_weight: float = 1.0  # weight of the label-free surprise cross-entropy; 0 = forecast loss only
    surprise_lookahead: int = 0  # patches after a token whose surprise also makes it a positive
    label_weight: float = 0.0  # > 0: also fit labelled windows (binary cross-entropy) when labels are given
    seed: int = 0
    target: Literal["surprise", "gain"] = "surprise"  # what the label-free router fits (see above)
    gain_lookahead: int = 0  # tokens after a token whose attention gain is averaged into its own

    def __post_init__(self) -> None:
        for name in ("hidden", "steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"router.{name} must be >= 1, got {getattr(self, name)}")
        _check(0.0 <= self.surprise_decay < 1.0, f"router.surprise_decay must be in [0, 1), got {self.surprise_decay}")
        _check(self.lr > 0 and self.dual_lr >= 0 and self.temperature > 0, "router.lr and router.temperature must be > 0, router.dual_lr >= 0")
        _check(self.label_weight >= 0, f"router.label_weight must be >= 0, got {self.label_weight}")
        _check(self.surprise_weight >= 0, f"router.surprise_weight must be >= 0, got {self.surprise_weight}")
        _check(self.surprise_lookahead >= 0, f"router.surprise_lookahead must be >= 0, got {self.surprise_lookahead}")
        _check(self.target in ("surprise", "gain"), f"router.target must be 'surprise' or 'gain', got {self.target!r}")
        _check(self.gain_lookahead >= 0, f"router.gain_lookahead must be >= 0, got {self.gain_lookahead}")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """The expected-FLOPs budget that the router's controller holds (see `oryx_ts.routers.budget`).

    fraction: a token's allowance is its recurrent cost plus this share of what attention costs on
        top of it (the attention surcharge): 0 = all-recurrent, 1 = all-attention.
    window: W, the guarantee holds over every run of W consecutive tokens of a series.
    slack: over every window, `spent <= (1 + slack) * allowance`.
    reserve: share of a window's surcharge allowance that only spikes may spend.
    spike_z: a score is a spike when it lies this many deviations above the running mean score.
    threshold_lr: step of the controller's adaptive threshold, in deviations of the scores.
    hold: hysteresis: after a token that its score sent to attention, up to this many next tokens of
        the series run attention too, whatever their scores, as long as the window's ordinary budget
        (the part outside the reserve) allows; 0 = off.
    spike_feature: index of a surprise feature (`oryx_ts.routers.features`); a token whose value of it
        lies `spike_signal_z` deviations above its running mean is a spike too (it may spend the
        reserve), whatever its score; -1 = off.
    threshold: which ordinary tokens ask for attention. `"ema"`: a score at least the adaptive
        threshold (running mean plus `z` deviations, `z` stepped by `threshold_lr` towards the budget
        rate). `"window"`: a score within the budget rate's quantile of the last `window` scores,
        lowered by as many places as that window has attention tokens it has not run, so that a
        window running under its budget lowers the bar at once (`oryx_ts.routers.budget`).
    """

    fraction: float = 0.1
    window: int = 128
    slack: float = 0.0
    reserve: float = 0.3
    spike_z: float = 2.0
    threshold_lr: float = 0.05
    hold: int = 0
    spike_feature: int = -1
    spike_signal_z: float = 3.0
    threshold: Literal["ema", "window"] = "ema"

    def __post_init__(self) -> None:
        _check_literals(self)
        _check(0.0 <= self.fraction <= 1.0, f"budget.fraction must be in [0, 1], got {self.fraction}")
        _check(self.window >= 1, f"budget.window must be >= 1, got {self.window}")
        _check(self.slack >= 0, f"budget.slack must be >= 0, got {self.slack}")
        _check(0.0 <= self.reserve <= 1.0, f"budget.reserve must be in [0, 1], got {self.reserve}")
        _check(self.threshold_lr >= 0, f"budget.threshold_lr must be >= 0, got {self.threshold_lr}")
        _check(isinstance(self.hold, int) and self.hold >= 0, f"budget.hold must be an integer >= 0, got {self.hold}")
        _check(isinstance(self.spike_feature, int) and self.spike_feature >= -1,
               f"budget.spike_feature must be an integer >= -1 (-1 = off), got {self.spike_feature}")


@dataclass(frozen=True, kw_only=True)
class OryxConfig:
    """The whole model and training configuration."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OryxConfig":
        """Build a config from a nested dict; unknown keys raise `ValueError`."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        parts = SECTIONS
        data = _migrate(data)
        unknown = set(data) - set(parts)
        _check(not unknown, f"unknown config sections {sorted(unknown)}; expected {sorted(parts)}")
        built = {}
        for name, part in parts.items():
            section = data.get(name, {})
            names = {f.name for f in dataclasses.fields(part)}
            bad = set(section) - names
            _check(not bad, f"unknown keys {sorted(bad)} in config section {name!r}")
            if "quantiles" in section:
                section = {**section, "quantiles": tuple(section["quantiles"])}
            built[name] = part(**section)
        return cls(**built)

    @classmethod
    def from_json(cls, text: str) -> "OryxConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def replace(self, **sections: Any) -> "OryxConfig":
        """Copy with some fields changed: `cfg.replace(block={"mixer": "mamba2"})`."""
        data = self.to_dict()
        for name, changes in sections.items():
            if name not in data:
                raise ValueError(f"unknown config section {name!r}")
            data[name].update(changes)
        return OryxConfig.from_dict(data)

    def with_retention(self, retention: Retention, *, window: int | None = None, pinned: int | None = None) -> "OryxConfig":
        """Copy under another KV-cache retention: `all`, or `bounded` with `window` recent and `pinned` pinned tokens.

        Retention changes no weight's shape, so a model trained under one runs under another
        (`oryx_ts.checkpoint.with_retention`). `window` / `pinned` default to this config's; they
        apply to `bounded` only. Raises `ValueError` for an unknown retention, window or pinned
        given with `all`, or values the block refuses (window < 1, pinned < 0).
        """
        if retention not in get_args(Retention):
            raise ValueError(f"retention must be one of {', '.join(get_args(Retention))}, got {retention!r}")
        if retention == "all" and (window is not None or pinned is not None):
            raise ValueError("window and pinned apply to bounded retention only; retention 'all' keeps every token")
        block: dict[str, Any] = {"retention": retention}
        block |= {} if window is None else {"window": window}
        block |= {} if pinned is None else {"pinned": pinned}
        return self.replace(block=block)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "OryxConfig":
        return cls.from_json(Path(path).read_text())


SECTIONS: dict[str, type] = {
    "tokenizer": TokenizerConfig, "block": BlockConfig, "head": HeadConfig, "train": TrainConfig,
    "router": RouterConfig, "budget": BudgetConfig,
}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Configs written before `BudgetConfig` kept the router's budget as `router.budget_fraction`."""
    router = data.get("router")
    if isinstance(router, dict) and "budget_fraction" in router:
        router = dict(router)
        fraction = router.pop("budget_fraction")
        data = {**data, "router": router}
        if "budget" not in data:
            data["budget"] = {"fraction": fraction}
    return data


PRESETS: dict[str, OryxConfig] = {
    # trains on a 2-core CPU in well under a minute
    "debug": OryxConfig(
        tokenizer=TokenizerConfig(channels=4, patch_len=8),
        block=BlockConfig(d_model=64, n_layers=2, n_heads=4, head_dim_k=8, head_dim_v=16, chunk_size=16),
        head=HeadConfig(horizon=16, quantiles=(0.1, 0.5, 0.9)),
        train=TrainConfig(steps=300, batch_size=8, window_tokens=128),
    ),
    # real telemetry on a CPU, chosen by benchmarks/preset_sweep.py (docs/RESULTS.md), best trained univariate
    # (`oryx-ts backtest --univariate`): `debug` with patches of 16 steps and training windows at any phase
    "telemetry": OryxConfig(
        tokenizer=TokenizerConfig(channels=4, patch_len=16),
        block=BlockConfig(d_model=64, n_layers=2, n_heads=4, head_dim_k=8, head_dim_v=16, chunk_size=16),
        head=HeadConfig(horizon=16, quantiles=(0.1, 0.5, 0.9)),
        train=TrainConfig(steps=5000, batch_size=8, window_tokens=64, any_phase=True),  # with --max-minutes: fitted to the budget
    ),
    "small": OryxConfig(
        tokenizer=TokenizerConfig(channels=8, patch_len=16),
        block=BlockConfig(d_model=256, n_layers=4, n_heads=4, head_dim_k=32, head_dim_v=64, chunk_size=64),
        head=HeadConfig(horizon=64, quantiles=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)),
        train=TrainConfig(steps=5000, batch_size=32, window_tokens=256, lr=1e-3),
    ),
    "base": OryxConfig(
        tokenizer=TokenizerConfig(channels=8, patch_len=16),
        block=BlockConfig(d_model=512, n_layers=8, n_heads=8, head_dim_k=32, head_dim_v=64, chunk_size=64),
        head=HeadConfig(horizon=128, quantiles=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)),
        train=TrainConfig(steps=50000, batch_size=64, window_tokens=512, lr=6e-4, warmup_steps=1000),
    ),
}


def preset(name: str, **sections: Any) -> OryxConfig:
    """A named preset (`debug`, `small`, `base`), optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**sections) if sections else PRESETS[name]


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    """`raw` as a value of the type `hint` of field `key`; raises `ValueError` naming the field, the value and the type."""
    text = raw.strip()
    if getattr(hint, "__origin__", None) is Literal:
        choices = get_args(hint)
        if text not in choices:
            raise ValueError(f"{key}={raw!r}: expected one of {', '.join(map(str, choices))}")
        return text
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{key}={raw!r}: expected a bool (true/false, 1/0, yes/no)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected an integer") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected a number, e.g. 0.001 or 1e-3") from None
        if not math.isfinite(value):
            raise ValueError(f"{key}={raw!r}: expected a finite number")
        return value
    if getattr(hint, "__origin__", None) is tuple:
        item = get_args(hint)[0]
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        if not parts:
            raise ValueError(f"{key}={raw!r}: expected comma-separated numbers, e.g. 0.1,0.5,0.9")
        try:
            return tuple(_parse_value(key, p, item) for p in parts)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected comma-separated numbers, e.g. 0.1,0.5,0.9") from None
    if hint is str:
        return text
    raise TypeError(f"{key}: a field of type {hint} cannot be set from text")


def parse_overrides(config: OryxConfig, items: list[str]) -> OryxConfig:
    """`config` with `section.key=value` overrides applied, each value parsed by its field's type.

    bool: true/false, 1/0, yes/no (any case); int; float (`.001`, `1e-3`); a `Literal` field: one of
    its choices; a tuple of floats: `0.1,0.5,0.9`. The result is validated like any config.
    Raises `ValueError` naming the item, the field and the expected type or choices (unknown
    sections or keys list the known ones).
    """
    changes: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise ValueError(f"expected section.key=value, got {item!r}")
        if section not in SECTIONS:
            raise ValueError(f"{key}: unknown config section {section!r}; expected one of {', '.join(SECTIONS)}")
        hints = get_type_hints(SECTIONS[section])
        if name not in hints:
            raise ValueError(f"{key}: unknown key {name!r} in section {section!r}; expected one of {', '.join(hints)}")
        changes.setdefault(section, {})[name] = _parse_value(key.strip(), raw, hints[name])
    return config.replace(**changes) if changes else config


def parse_retention(text: str) -> dict[str, Any]:
    """`all` or `bounded[:WINDOW[:PINNED]]` (tokens) as keyword arguments of `OryxConfig.with_retention`.

    Raises `ValueError` naming the text and the expected form.
    """
    name, *numbers = text.strip().split(":")
    form = "expected all, bounded, bounded:WINDOW or bounded:WINDOW:PINNED (tokens), e.g. bounded:512:64"
    if name not in get_args(Retention) or len(numbers) > 2 or (name == "all" and numbers):
        raise ValueError(f"retention {text!r}: {form}")
    try:
        values = [int(n) for n in numbers]
    except ValueError:
        raise ValueError(f"retention {text!r}: WINDOW and PINNED are whole numbers of tokens; {form}") from None
    return {"retention": name} | dict(zip(("window", "pinned"), values))
