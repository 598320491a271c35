"""Training recipes of the routing scenarios: the forecaster that goes with each labelled stream
(`datasets.scenarios`), its recall curriculum, and the two learned routers the benchmarks compare.

- `anomalies`: the `debug` forecaster, 300 steps.
- `programs`: the `debug` forecaster without RoPE, by a recall curriculum: 2,000 steps all in
  attention mode on `recall_stream` (waveforms played several times in a row), so that attention
  learns to look the past up, then 2,000 mixed-mode steps on telemetry whose program runs repeat often.
- `daily`: the `debug` forecaster with 16 key dims and RoPE base 100 for 3,000 mixed-mode steps,
  half the chunks in attention mode, on telemetry whose jobs cover 30% of the steps.

`LOOKUP_RECIPES` are the larger forecasters trained on a GPU for the look-up (`benchmarks/train_lookup.py`):
the same tokenizer and head, a wider and deeper block, a time budget instead of a step count, and a
recall curriculum whose look-up guided attention forms (`oryx_ts.guide`): for the program runs the
scenario's own kind of telemetry (`curriculum_plays`), for the daily jobs random-walk plays with
curriculum blocks among distractors, some repeating on part of the channels only, inside the
telemetry phase (`mix`), so that the look-up survives it.

The router's target from the forecaster itself (`RouterConfig.target = "gain"`): `attention_gain`
runs the frozen forecaster over a window both all-recurrent and all-attention and takes, per
token, how much lower its own forecast loss is in attention; `gain_targets` turns that into
positives; `train_gain_router` fits the router's logits to them (and to the surprise targets,
with `surprise_weight`) by cross-entropy. The targets read the future; the router only its
token's causal features.

Legend: B windows, T tokens, L raw steps, C channels, Hz horizon, Q quantiles.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oryx_ts.config import BudgetConfig, OryxConfig, RouterConfig, preset
from oryx_ts.datasets.labels import LabelWindow, mask_from_windows
from oryx_ts.datasets.recall import recall_plays
from oryx_ts.datasets.scenarios import CURRICULUM_SEED_BASE, SCENARIOS, recurring_plays
from oryx_ts.guide import Guide, guide_targets
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.features import surprise_targets
from oryx_ts.routers.learned import LearnedRouter
from oryx_ts.train import RouterTrainResult, batch_targets, router_inputs, router_windows, train, train_router

__all__ = ["LOOKUP_RECIPES", "RECIPES", "ForecasterRecipe", "attention_gain", "curriculum_plays", "gain_targets", "mix_streams", "mixed_blocks", "mixed_guide_targets", "train_forecaster",
           "train_gain_router", "train_label_free", "train_routers"]

DEFAULT_RECALL: Mapping[str, Any] = {"period": 128, "repeats": 8}  # the curriculum's `recall_stream`: plays back to back
GUIDE_KEYS = frozenset({"weight", "heads", "steps", "ahead"})  # a recipe's `guide`: `Guide`'s settings and `guide_targets`' ahead


@dataclass(frozen=True, kw_only=True)
class ForecasterRecipe:
    """How a scenario's forecaster is trained: changes to the `debug` preset and the recall curriculum's length."""

    block: Mapping[str, Any] = field(default_factory=dict)  # changes to the `debug` preset's block
    train: Mapping[str, Any] = field(default_factory=dict)  # changes to the `debug` preset's training
    recall_steps: int = 0  # all-attention steps on `recall_stream` before the telemetry (0: none)
    recall: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_RECALL))  # that curriculum's `recall_stream` settings
    mix: float = 0.0  # share of the telemetry phase's stream replaced by curriculum blocks (`mix_streams`)
    mix_recall: Mapping[str, Any] | None = None  # `recall_stream` settings of those blocks (None: `recall`'s)
    seconds: float | None = None  # a time budget for both phases together, split by their steps (None: the step counts)
    recall_train: Mapping[str, Any] = field(default_factory=dict)  # changes to the curriculum phase's training (lr, keep_best, ...)
    guide: Mapping[str, Any] | None = None  # guided attention in the curriculum: `Guide` settings and `ahead` (None: none)
    mix_guide: float = 0.0  # the guide's weight in the telemetry phase, on its curriculum blocks (0: none)
    telemetry_guide: float = 0.0  # the guide's weight in the telemetry phase, on the telemetry's own repeats (0: none; needs `train_plays`)

    def __post_init__(self) -> None:
        if self.recall_steps < 0:
            raise ValueError(f"recall_steps must be >= 0, got {self.recall_steps}")
        if not 0.0 <= self.mix < 1.0:
            raise ValueError(f"mix must be in [0, 1), got {self.mix}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if self.guide is not None and not set(self.guide) <= GUIDE_KEYS:
            raise ValueError(f"guide takes {sorted(GUIDE_KEYS)}, got {sorted(self.guide)}")
        if self.mix_guide < 0 or (self.mix_guide > 0 and (self.mix == 0 or self.guide is None)):
            raise ValueError(f"mix_guide must be >= 0 and needs mix > 0 and a guide, got {self.mix_guide} (mix {self.mix})")
        if self.telemetry_guide < 0 or (self.telemetry_guide > 0 and (self.guide is None or self.mix_guide > 0)):
            raise ValueError(f"telemetry_guide must be >= 0 and needs a guide and mix_guide 0, got {self.telemetry_guide} "
                             f"(mix_guide {self.mix_guide})")

    def config(self, *, block: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None) -> OryxConfig:
        """The `debug` preset with this recipe's changes, then `block` and `train` on top of them."""
        return preset("debug", block={**self.block, **(block or {})}, train={**self.train, **(train or {})})

    def fit(self, train_values: np.ndarray, *, config: OryxConfig | None = None, seconds: float | None = None,
            device: str | torch.device | None = None, progress: bool = True,
            check: Callable[[OryxForecaster], dict] | None = None,
            train_plays: Sequence[Sequence[LabelWindow]] | None = None) -> tuple[OryxForecaster, dict]:
        """`train_forecaster` under this recipe (`config`, default `self.config()`; `seconds`, default
        `self.seconds`; `check` between the phases; `train_plays`: the plays of `train_values`' recurring
        patterns, which `telemetry_guide` needs, e.g. `Scenario.train_plays`); returns the model and what
        ran (`train_forecaster`'s record)."""
        if self.telemetry_guide > 0 and train_plays is None:
            raise ValueError("telemetry_guide needs the training stream's plays (train_plays)")
        record: dict = {}
        model = train_forecaster(config or self.config(), train_values, recall_steps=self.recall_steps, recall=self.recall, mix=self.mix,
                                 mix_recall=self.mix_recall, max_seconds=self.seconds if seconds is None else seconds, device=device,
                                 progress=progress, record=record, recall_train=self.recall_train, guide=self.guide,
                                 mix_guide=self.mix_guide, check=check,
                                 train_plays=train_plays if self.telemetry_guide > 0 else None, telemetry_guide=self.telemetry_guide)
        return model, record


RECIPES: dict[str, ForecasterRecipe] = {
    "anomalies": ForecasterRecipe(train={"steps": 300}),
    "programs": ForecasterRecipe(block={"rope": False}, train={"steps": 2000}, recall_steps=2000),
    # looking a fixed distance back wants keys whose rotary angles resolve single tokens at 36 tokens:
    # 16 key dims at rope base 100 (at base 10,000 the same model learns much less of it; docs/RESULTS.md)
    "daily": ForecasterRecipe(block={"head_dim_k": 16, "rope_base": 100.0}, train={"steps": 3000, "attention_fraction": 0.5}),
}


# the larger forecaster for the look-up: 4 layers of width 128, key and value heads of 32 (equal widths: the routed
# attention kernel's fp32 backward), trained on a GPU in 32-window batches; about 3.4 MB of fp32 weights
_LOOKUP_BLOCK = {"d_model": 128, "n_layers": 4, "n_heads": 4, "head_dim_k": 32, "head_dim_v": 32, "chunk_size": 64}
_LOOKUP_TRAIN = {"steps": 50_000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100, "val_every": 250, "attention_fraction": 0.5,
                 "full_mode_fraction": 0.3}
# plays of 128 steps among 0-384 steps of distractors, half the blocks repeating on part of the channels
_DISTRACTED = {"period": 128, "repeats": 4, "max_gap": 384, "gap_step": 8, "partial": 0.5}
_BACK_TO_BACK = {"period": 128, "repeats": 4}
_UNALIGNED = {"period": 128, "repeats": 4, "max_gap": 128, "gap_step": 1}  # plays after 0-128 steps of distractors
_DISTRACTED_UNALIGNED = {**_DISTRACTED, "gap_step": 1}
_GUIDED_TRAIN = {"keep_best": False, "lr": 2e-3}
_PROGRAM_RUNS = {"recurring": dict(SCENARIOS["programs"].train_recurring)}  # program runs on 37% of the steps, 4 repeats each
LOOKUP_RECIPES: dict[str, ForecasterRecipe] = {
    # the committed checkpoints (`benchmarks/checkpoints/<name>-lookup`, docs/RESULTS.md "Look-up"):
    # program runs: a curriculum of the program runs' own telemetry (`curriculum_plays`; seed 1005, the telemetry phase's
    # kind of stream) in which guided attention (`oryx_ts.guide`, two heads) forms the look-up, with the curriculum's own
    # lr and its last weights (its validation cannot see a look-up), three quarters of the time budget; then the telemetry
    # at lr 1e-3 (trained two side by side on one GPU)
    "programs": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3}, recall_steps=150_000,
                                 recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0, "heads": 2}, seconds=440.0),
    # daily jobs: the earlier run found by its content, as the program runs' (one guided head, plays of 128 steps)
    "daily": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3}, recall_steps=25_000,
                              recall=_BACK_TO_BACK, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0}, mix=0.3,
                              mix_recall=_DISTRACTED, seconds=240.0),
    # the variants measured beside them (docs/BENCHMARKS.md, "look-up forecasters with guided attention"):
    # the program-run checkpoint before (2026-12-02, 33.6%): a curriculum of random-walk plays back to back whose 125-step
    # period puts each repeat at another phase of the patch grid, half the time budget; then telemetry with 30% curriculum
    # blocks among distractors
    "programs-b2b": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3}, recall_steps=50_000,
                                     recall={**_BACK_TO_BACK, "period": 125}, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0, "heads": 2},
                                     mix=0.3, mix_recall=_DISTRACTED_UNALIGNED, seconds=240.0),
    # random walks: one guided head, plays on the patch grid; the same with telemetry at lr 3e-4; two heads, half the time
    # in a curriculum among distractors
    "programs-guided": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                        recall_steps=25_000, recall=_BACK_TO_BACK, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0},
                                        mix=0.3, mix_recall=_DISTRACTED, seconds=240.0),
    "programs-guided-lr3e4": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 3e-4},
                                              recall_steps=25_000, recall=_BACK_TO_BACK, recall_train=_GUIDED_TRAIN,
                                              guide={"weight": 1.0}, mix=0.3, mix_recall=_DISTRACTED, seconds=240.0),
    "programs-guided-long": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                             recall_steps=50_000, recall={**_DISTRACTED, "max_gap": 128}, recall_train=_GUIDED_TRAIN,
                                             guide={"weight": 1.0, "heads": 2}, mix=0.3, mix_recall=_DISTRACTED, seconds=240.0),
    # plays after 0-128 steps of distractors, at any step: one head / two heads, half the time / the same with half the
    # telemetry in curriculum blocks and three quarters of its chunks in attention
    "programs-unaligned": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                           recall_steps=25_000, recall=_UNALIGNED, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0},
                                           mix=0.3, mix_recall=_DISTRACTED_UNALIGNED, seconds=240.0),
    "programs-unaligned-long": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                                recall_steps=50_000, recall=_UNALIGNED, recall_train=_GUIDED_TRAIN,
                                                guide={"weight": 1.0, "heads": 2}, mix=0.3, mix_recall=_DISTRACTED_UNALIGNED,
                                                seconds=240.0),
    "programs-unaligned-mix50": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False},
                                                 train={**_LOOKUP_TRAIN, "lr": 1e-3, "attention_fraction": 0.75}, recall_steps=50_000,
                                                 recall=_UNALIGNED, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0, "heads": 2},
                                                 mix=0.5, mix_recall=_DISTRACTED_UNALIGNED, seconds=240.0),
    # the program runs' own telemetry as the curriculum (`curriculum_plays`; seed 1005, the telemetry phase's kind of stream):
    # two guided heads, half the time; the same with telemetry at lr 3e-4; three quarters of the time in the curriculum with three
    # guided heads (with two: `programs`); the same as the first with the guide kept on in the telemetry phase, on its own repeats; that
    # guide alone, no curriculum; `programs-b2b` with that guide in its telemetry phase
    "programs-runs": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3}, recall_steps=50_000,
                                      recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN, guide={"weight": 1.0, "heads": 2}, seconds=240.0),
    "programs-runs-lr3e4": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 3e-4},
                                            recall_steps=50_000, recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN,
                                            guide={"weight": 1.0, "heads": 2}, seconds=240.0),
    "programs-runs-long-3h": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                              recall_steps=150_000, recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN,
                                              guide={"weight": 1.0, "heads": 3}, seconds=240.0),
    "programs-runs-guided": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                             recall_steps=50_000, recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN,
                                             guide={"weight": 1.0, "heads": 2}, telemetry_guide=1.0, seconds=240.0),
    "programs-telemetry-guided": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                                  guide={"weight": 1.0, "heads": 2}, telemetry_guide=1.0, seconds=240.0),
    "programs-b2b-guided": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                            recall_steps=50_000, recall={**_BACK_TO_BACK, "period": 125}, recall_train=_GUIDED_TRAIN,
                                            guide={"weight": 1.0, "heads": 2}, mix=0.3, mix_recall=_DISTRACTED_UNALIGNED,
                                            telemetry_guide=1.0, seconds=240.0),
    # three guided heads (whose look-up the plain telemetry phase unlearns) with the curriculum kept in the telemetry
    # phase: 30% of its blocks program runs of another curriculum seed, the guide on at them (7.8%: it breaks the look-up)
    "programs-mix-3h": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train={**_LOOKUP_TRAIN, "lr": 1e-3},
                                        recall_steps=150_000, recall=_PROGRAM_RUNS, recall_train=_GUIDED_TRAIN,
                                        guide={"weight": 1.0, "heads": 3}, mix=0.3, mix_recall=_PROGRAM_RUNS, mix_guide=1.0,
                                        seconds=440.0),
    # before guided attention (the checkpoints of 2026-12-01): a curriculum among distractors without a guide; the
    # daily job by its fixed distance (RoPE base 100: keys that resolve 36 tokens), telemetry only
    "programs-unguided": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope": False}, train=_LOOKUP_TRAIN, recall_steps=25_000,
                                          recall={**_DISTRACTED, "max_gap": 128}, mix=0.3, mix_recall=_DISTRACTED, seconds=240.0),
    "daily-rope": ForecasterRecipe(block={**_LOOKUP_BLOCK, "rope_base": 100.0}, train=_LOOKUP_TRAIN, seconds=240.0),
}
MIX_BLOCK = 8192  # steps per block of `mix_streams`: 8 training windows of the `debug` tokenizer


def mixed_blocks(length: int, share: float, *, block: int = MIX_BLOCK, seed: int = 0) -> np.ndarray:
    """The indices of the blocks of `block` steps (of a stream of `length`) that `mix_streams` replaces."""
    if not 0.0 <= share <= 1.0 or block < 1:
        raise ValueError(f"need share in [0, 1] and block >= 1, got {share}, {block}")
    return np.flatnonzero(np.random.default_rng(seed).random(-(-length // block)) < share)


def mix_streams(values_LC: np.ndarray, other_LC: np.ndarray, share: float, *, block: int = MIX_BLOCK, seed: int = 0) -> np.ndarray:
    """`values_LC` with about `share` of its blocks of `block` steps replaced by the same steps of
    `other_LC` (as long, as many channels), the blocks drawn at random (`seed`; `mixed_blocks`). `share=0`: a copy."""
    if values_LC.shape != other_LC.shape:
        raise ValueError(f"streams must have the same shape, got {values_LC.shape} and {other_LC.shape}")
    out = np.array(values_LC, copy=True)
    for b in mixed_blocks(len(out), share, block=block, seed=seed):
        out[b * block : (b + 1) * block] = other_LC[b * block : (b + 1) * block]
    return out


def mixed_guide_targets(targets_T: np.ndarray, blocks: np.ndarray, patch_len: int, *, block: int = MIX_BLOCK) -> np.ndarray:
    """`guide_targets` of the curriculum stream kept where `mix_streams` put it (`blocks`, `mixed_blocks`): a
    token keeps its target when both lie in the same replaced block; -1 elsewhere. `block` must be
    a multiple of `patch_len`."""
    if block % patch_len:
        raise ValueError(f"block {block} is not a multiple of the patch length {patch_len}")
    per = block // patch_len
    t = np.arange(len(targets_T))
    keep = np.isin(t // per, blocks) & (targets_T >= 0) & (targets_T // per == t // per)
    return np.where(keep, targets_T, -1)


def curriculum_plays(length: int, channels: int, settings: Mapping[str, Any], seed: int) -> tuple[np.ndarray, list[list[LabelWindow]]]:
    """A recall curriculum's `(stream (length, channels) float32, plays per block)`: `recall_plays` under
    `settings`, or, when `settings` holds only `recurring` (`SyntheticConfig` recurring fields), the
    project's synthetic telemetry with those recurring events (`datasets.scenarios.recurring_plays`):
    a curriculum of the scenario's own kind of repeats instead of random walks, drawn at seed
    `CURRICULUM_SEED_BASE + seed`, apart from every evaluation stream's seed."""
    if "recurring" in settings:
        if set(settings) != {"recurring"}:
            raise ValueError(f"a telemetry curriculum takes only 'recurring', got {sorted(settings)}")
        return recurring_plays(length, channels, CURRICULUM_SEED_BASE + seed, settings["recurring"])
    return recall_plays(length, channels, **settings, seed=seed)


def train_forecaster(config: OryxConfig, train_values: np.ndarray, *, recall_steps: int = 0, recall: Mapping[str, Any] | None = None,
                     mix: float = 0.0, mix_recall: Mapping[str, Any] | None = None, max_seconds: float | None = None,
                     device: str | torch.device | None = None, progress: bool = True, record: dict | None = None,
                     recall_train: Mapping[str, Any] | None = None, guide: Mapping[str, Any] | None = None,
                     mix_guide: float = 0.0, check: Callable[[OryxForecaster], dict] | None = None,
                     train_plays: Sequence[Sequence[LabelWindow]] | None = None, telemetry_guide: float = 0.0) -> OryxForecaster:
    """Train a forecaster on the `(L, C)` telemetry `train_values` under `config`.

    With `recall_steps > 0`, the recall curriculum first: that many all-attention steps on a
    `recall_stream` as long as `train_values` (settings `recall`, default period 128 and 8 plays
    back to back; seed 5; `curriculum_plays`: or telemetry with recurring events); then the mixed-mode training of `config` on the telemetry, from those
    weights. With `mix > 0`, that share of the telemetry is replaced by blocks of another
    curriculum stream (`mix_recall`, default `recall`'s settings; seed 6; `mix_streams`).
    `max_seconds`: a time budget for both phases, shared in proportion to their steps (each phase
    then stops at its share, `train`'s `max_seconds`). `device`: where it trains; the model is
    returned there. `record`, when given, receives what each phase ran (`steps`, `seconds`,
    `time_budget`, `best_val_loss`), so that the run can be repeated by its step counts.

    `recall_train`: changes to the curriculum phase's training settings (e.g. its own `lr`, or
    `keep_best` off: its validation, on the fixed 1-in-4 mode schedule, cannot see a look-up).
    `guide`: guided attention in the curriculum (`oryx_ts.guide`; keys `weight`, `heads`, `steps`
    and `ahead`), towards each repeat's earlier play; `mix_guide > 0`: the same guide, at that
    weight, in the telemetry phase on the curriculum blocks mixed in (needs `mix > 0`);
    `telemetry_guide > 0`: the guide at that weight in the telemetry phase on the telemetry's own
    repeats, `train_plays` (per recurring pattern its plays in order, `recurring_plays`), outside
    the blocks `mix` replaced (not with `mix_guide`). `check`:
    called on the model between the phases (e.g. to measure its look-up before the telemetry can
    unlearn it); what it returns goes to `record["recall"]["check"]`.
    """
    model, C, P = None, config.tokenizer.channels, config.tokenizer.patch_len
    phases = recall_steps + config.train.steps
    share = (lambda steps: None) if max_seconds is None else (lambda steps: max_seconds * steps / phases)  # noqa: E731
    settings = dict(recall or DEFAULT_RECALL)
    g = dict(guide or {})
    ahead = g.pop("ahead", 2)
    if recall_steps:
        curriculum = config.replace(train={"steps": recall_steps, "attention_fraction": 1.0, "full_mode_fraction": 0.0,
                                           **(recall_train or {})})
        stream, plays = curriculum_plays(len(train_values), C, settings, seed=5)
        how = Guide(guide_targets(plays, len(stream), P, ahead=ahead), **g) if guide is not None else None
        result = train(curriculum, stream, progress=progress, device=device, max_seconds=share(recall_steps), guide=how)
        model = result.model
        if record is not None:
            record["recall"] = _phase(result)
        if check is not None:
            checked = check(model)
            model.train()
            if record is not None:
                record["recall"]["check"] = checked
    if telemetry_guide > 0 and (guide is None or mix_guide > 0 or train_plays is None):
        raise ValueError("telemetry_guide needs a guide, the training stream's plays (train_plays) and mix_guide 0")
    values, how, blocks = train_values, None, np.zeros(0, np.int64)
    if mix > 0:
        other, plays = curriculum_plays(len(train_values), C, dict(mix_recall or settings), seed=6)
        values = mix_streams(np.asarray(train_values, np.float32), other, mix, seed=7)
        blocks = mixed_blocks(len(other), mix, seed=7)
        if mix_guide > 0:
            targets = mixed_guide_targets(guide_targets(plays, len(other), P, ahead=ahead), blocks, P)
            how = Guide(targets, **{**g, "weight": mix_guide, "steps": None})
    if telemetry_guide > 0:
        own = guide_targets(train_plays, len(train_values), P, ahead=ahead)
        replaced = np.isin(np.arange(len(own)) // (MIX_BLOCK // P), blocks)  # the tokens in the blocks `mix` replaced
        keep = ~replaced & ~replaced[own.clip(0)]
        how = Guide(np.where(keep & (own >= 0), own, -1), **{**g, "weight": telemetry_guide, "steps": None})
    result = train(config, values, model=model, progress=progress, device=device, max_seconds=share(config.train.steps), guide=how)
    if record is not None:
        record["telemetry"] = _phase(result)
    return result.model


def _phase(result) -> dict:
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "time_budget": result.time_budget,
            "best_val_loss": result.validation.get("best_val_loss")}


def train_label_free(model: OryxForecaster, train_values: np.ndarray, *, router: RouterConfig | None = None,
                     progress: bool = True) -> LearnedRouter:
    """The label-free learned router for the frozen `model` on the `(L, C)` stream `train_values`, under
    `router` (default `model.config.router`): `train_gain_router` when its `target` is `"gain"`, else
    `train_router` (forecast loss plus the self-supervised surprise objective)."""
    rc = router or model.config.router
    fit = train_gain_router if rc.target == "gain" else train_router
    torch.manual_seed(rc.seed)  # the router's initial weights, as the fit would draw them itself
    return fit(model, train_values, router=LearnedRouter(model.config.block.d_model, rc), progress=progress).router


def train_routers(model: OryxForecaster, train_values: np.ndarray, train_windows: Sequence[LabelWindow], events: Sequence[str], *,
                  router: RouterConfig | None = None, progress: bool = True) -> tuple[LearnedRouter, LearnedRouter]:
    """`(label-free, label-fitted)` learned routers for the frozen `model` on the `(L, C)` stream `train_values`.

    The first is `train_label_free` under `router`; the second is `train_router` under the same
    settings with `label_weight` 1 and the surprise objective, fitting also the tokens of `train_windows` whose kind is in `events`.
    """
    free = train_label_free(model, train_values, router=router, progress=progress)
    labelled = dataclasses.replace(router or model.config.router, label_weight=1.0, target="surprise")
    supervised = train_router(model, train_values, router=LearnedRouter(model.config.block.d_model, labelled),
                              label_mask=mask_from_windows(train_windows, len(train_values), kind=events), progress=progress).router
    return free, supervised


def token_losses(model: OryxForecaster, x_BLC: torch.Tensor, modes: float) -> torch.Tensor:
    """`(B, T)` float64: each token's quantile loss (normalized units) over its observed targets with
    every token in mode `modes` (0 all-recurrent, 1 all-attention); NaN where it has no target."""
    with torch.no_grad():
        B, T = x_BLC.shape[0], x_BLC.shape[1] // model.config.tokenizer.patch_len
        pred, mean, std = model.forward_normalized(x_BLC, torch.full((B, T), float(modes)))
        target = model.targets_normalized(x_BLC, mean, std)
    q = torch.as_tensor(model.config.head.quantiles, dtype=torch.float64)
    valid = ~torch.isnan(target)
    diff = torch.where(valid, target, 0.0).double()[..., None] - pred.double()
    loss = torch.maximum(q * diff, (q - 1) * diff).mean(-1) * valid
    n = valid.sum((2, 3))
    return torch.where(n > 0, loss.sum((2, 3)) / n.clamp_min(1), float("nan"))


def attention_gain(model: OryxForecaster, x_BLC: torch.Tensor, lookahead: int = 0) -> torch.Tensor:
    """`(B, T)` float64: how much lower each token's own forecast loss is all-attention than all-recurrent,
    averaged with the next `lookahead` tokens' gains (as many as the window holds); NaN without a target.

    Both are forwards of the frozen `model` over the whole window, one per mode.
    """
    gain = token_losses(model, x_BLC, 0.0) - token_losses(model, x_BLC, 1.0)
    if lookahead == 0:
        return gain
    ok = ~torch.isnan(gain)
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], lookahead)], 1).unfold(1, lookahead + 1, 1).sum(-1)  # noqa: E731
    total, count = pad(torch.where(ok, gain, 0.0)), pad(ok.double())
    return torch.where(ok, total / count.clamp_min(1), float("nan"))


def gain_targets(gain_BT: torch.Tensor, fraction: float) -> torch.Tensor:
    """`(B, T)` float32 router targets: 1 where the gain is among the `fraction` largest of the whole batch
    (pooled: a window where attention never pays may hold no positive) and above zero.

    Raises `ValueError` for a fraction outside (0, 1].
    """
    flat = gain_BT.reshape(1, -1)
    ok = ~torch.isnan(flat[0])
    hot = surprise_targets(torch.where(ok[None], flat, -torch.inf), ok, fraction=fraction)
    return (hot.bool() & (flat > 0)).float().reshape(gain_BT.shape)


def train_gain_router(model: OryxForecaster, values: np.ndarray | torch.Tensor, *, router: LearnedRouter | None = None,
                      budget: BudgetConfig | None = None, progress: bool = True) -> RouterTrainResult:
    """Fit a learned router to where attention pays on the frozen `model`, on the training part of a `(L, C)` stream.

    Per batch of windows (`train.window_tokens`, drawn as `train_router` draws them): the router's
    logits from causal features (`router_inputs`), a cross-entropy towards `gain_targets` of
    `attention_gain` (the budget's `fraction`, default `model.config.budget`; `gain_lookahead`),
    plus `surprise_weight` times the cross-entropy towards the surprise targets (`batch_targets`).
    Settings from `router.config` when a router is given, else `model.config.router`. The forecaster
    is not changed. Raises `ValueError` for a stream of the wrong shape or a fraction of 0.
    """
    config = model.config
    rc, fraction, sampler = router_windows(model, values, router, budget)
    torch.manual_seed(rc.seed)
    generator = torch.Generator().manual_seed(rc.seed)
    router = router or LearnedRouter(config.block.d_model, rc)
    router.train()
    opt = torch.optim.AdamW(router.parameters(), lr=rc.lr, weight_decay=0.0)
    was_training = model.training
    model.eval()
    result = RouterTrainResult(router=router)
    try:
        for step in tqdm(range(1, rc.steps + 1), desc="router (gain)", disable=not progress, dynamic_ncols=True):
            x = sampler.windows_at(sampler.starts[torch.randint(len(sampler.starts), (rc.batch_size,), generator=generator)])
            inputs = router_inputs(model, x)
            targets = gain_targets(attention_gain(model, x, rc.gain_lookahead), fraction)
            logits = router.logits(inputs)
            gain_loss = F.binary_cross_entropy_with_logits(logits, targets)
            loss = gain_loss
            record = {"gain_loss": gain_loss.item(), "positives": targets.mean().item()}
            if rc.surprise_weight > 0:
                surprise_loss = F.binary_cross_entropy_with_logits(logits, batch_targets(inputs, fraction, rc.surprise_lookahead))
                loss = loss + rc.surprise_weight * surprise_loss
                record["surprise_loss"] = surprise_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.history.append({"step": step, "rate": torch.sigmoid(logits).mean().item(), **record})
    finally:
        model.train(was_training)
    router.eval()
    return result
