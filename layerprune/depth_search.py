"""The depth search: which depth export keeps, each depth healed as asked and forecast on calibration.

Fixed N, or auto: from the CKA boundary, down while the gate forecast passes (a fixed-sequence test: each step at
the walk's alpha), else up until it does (those share alpha: Bonferroni). With --fallback, each depth is scored as
it would be served: the original answers the share of texts the cut is least sure of (layerprune.fallback). With
--fallback auto, each depth is forecast at every share of options.SHARES, each share walked as a fixed share is
(down while it passes at every depth so far), and of the (depth, share) that pass the one whose served cost a text
(layerprune.cost) is least is kept. Walking down reuses work: a whole-model heal at depth d starts from the heal of
depth d + 1 with its top layer dropped, which is already close to the original, rather than from the truncated
original. The error budget splits export's alpha between the depth walk and the int8 variants (docs/export.md).
With --min-agreement, a (depth, share) passes only where its agreement's lower bound clears it too
(GateForecast.admissible). With --fallback auto and int8, the int8 candidates walk the depths the walk passed, from
the boundary down, each variant and share a fixed-sequence test of its own (Depths.int8_depths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from transformers import PreTrainedModel

from .artifacts import (
    DepthReport, DepthScore, ExportCandidate, GateForecast, HealMode, HealStats, LayerCosts, ShareScore,
)
from .continuation import cut_layer
from .cost import text_cost
from .fallback import cascade, threshold
from .heal import Heal, NoHeal, TextStates, WholeHeal, heal_at
from .models import total_layers
from .options import ExportOptions
from .prune import depth_logits
from .scoring import compute_metric
from .tasks import TaskConfig
from .validate import forecast


@dataclass
class ExportTexts:
    """What the original model computed on the texts export looks at (the holdout excepted)."""

    calibration: TextStates
    calibration_labels: np.ndarray
    heal: TextStates | None
    heal_labels: np.ndarray | None  # None: unlabeled heal texts; -1 (NaN for regression): a text without one
    agreement: TextStates | None

    def served(self, calibration: np.ndarray, agreement: np.ndarray | None,
               share: float) -> tuple[np.ndarray, np.ndarray | None]:
        """A cut's logits on the calibration and agreement texts as served with --fallback `share`: the original's
        where the cut is below its `share`-quantile of calibration confidence (layerprune.fallback); 0: its own."""
        if not share:
            return calibration, agreement
        below = threshold(calibration, share)
        return (cascade(calibration, self.calibration.logits, below),
                None if agreement is None else cascade(agreement, self.agreement.logits, below))


class Depths:
    """Each depth looked at: healed as asked (once), scored on calibration, and its gate forecast (once)."""

    def __init__(self, original: PreTrainedModel, task: TaskConfig, texts: ExportTexts, heal: HealMode,
                 opts: ExportOptions, n_holdout: int, trained: dict[int, Heal] | None = None,
                 costs: LayerCosts | None = None):
        self.original, self.task, self.texts, self.heal_mode, self.opts = original, task, texts, heal, opts
        self.costs = costs  # with --fallback auto: what a text costs the original on this CPU (layerprune.cost)
        self.trained = {} if trained is None else trained  # heals trained by depth, here or by an earlier export
        self.n_holdout = n_holdout
        self.total = total_layers(original.config)
        self.raw = [self._metric(logits) for logits in depth_logits(original, texts.calibration.first)]
        self.full = self._metric(texts.calibration.logits)
        self.heals: dict[int, Heal] = {}
        self.scores: dict[int, DepthScore] = {}
        self.alive: dict[int, list[float]] = {}  # by depth: the shares whose walk still passes there
        self.probed: list[int] = []

    def passes(self, depth: int, alpha: float) -> bool:
        """Whether the gate is forecast to pass the model truncated at `depth` (healed as asked), at error
        rate `alpha`, at some share sent on that also passed at the depth above, where that was looked at
        first (each share's walk down is a fixed-sequence test of its own); each depth is forecast once."""
        if depth not in self.probed:
            self.probed.append(depth)
        if depth not in self.scores:
            self.scores[depth] = self._score(depth, alpha)
            above = self.alive.get(depth + 1)
            self.alive[depth] = [s for s in self._passing(depth) if above is None or s in above]
        return bool(self.alive[depth])

    def _passing(self, depth: int) -> list[float]:
        score, least = self.scores[depth], self.opts.min_agreement
        if score.shares:
            return [s.share for s in score.shares if s.forecast.admissible(least)]
        return [self.opts.fallback] if score.forecast.admissible(least) else []

    def cost(self, depth: int, share: float) -> float:
        """The served cost a text at `depth` sending on `share`, the full original's = 1 (layerprune.cost)."""
        cut = cut_layer(depth, self.heal_mode, self.opts.top.heal_layers)
        return text_cost(self.costs, self.total, depth, share, cut)

    def cheapest(self, depths: list[int], fallback: int) -> tuple[int, float]:
        """Of the (depth, share) among `depths` whose walk passed, the one whose served cost is least (the smaller
        share on a tie); none: `fallback` at the largest share, the closest to the original."""
        passing = [(self.cost(d, s), s, d) for d in depths for s in self.alive.get(d, [])]
        if not passing:
            return fallback, max(self.opts.shares)
        _, share, depth = min(passing)
        return depth, share

    def int8_depths(self, probed: list[int], depth: int) -> list[int]:
        """The depths the int8 candidates are scored at, in order: with --fallback auto and auto depth, every depth
        of the walk (`probed`, in its order) that passed at some share, from the boundary down, so that an int8
        bundle may keep more layers than the fp32 walk's cheapest `depth` where that costs less a text (each int8
        variant and share walks them down as a fixed share does: candidates.pick_candidate); else `depth` alone."""
        if self.costs is None or self.opts.keep_layers != "auto":
            return [depth]
        return [d for d in probed if d < self.total and self.alive.get(d)] or [depth]

    def heal(self, depth: int) -> Heal:
        """The heal of `depth`, trained the first time any export sharing `trained` asks for it."""
        if depth not in self.heals:
            if depth == self.total or self.heal_mode == "none":
                self.heals[depth] = NoHeal(depth, self.original)
            else:
                if depth not in self.trained:
                    above = self.heals.get(depth + 1)
                    self.trained[depth] = heal_at(
                        self.heal_mode, self.original, depth, self.texts.heal, self.texts.heal_labels,
                        regression=self.task.is_regression, top=self.opts.top, whole=self.opts.whole,
                        head=self.opts.head, start=above if isinstance(above, WholeHeal) else None)
                self.heals[depth] = self.trained[depth]
        return self.heals[depth]

    def _score(self, depth: int, alpha: float) -> DepthScore:
        heal = self.heal(depth)
        own = heal.logits(self.texts.calibration)
        own_agreement = None if self.texts.agreement is None else heal.logits(self.texts.agreement)
        scored = []  # (share, calibration logits as served, forecast)
        for share in self.opts.shares:
            calibration, agreement = self.texts.served(own, own_agreement, share)
            scored.append((share, calibration, self._forecast(calibration, agreement, alpha)))
        shares = [] if self.costs is None else [ShareScore(share=s, forecast=f, cost=self.cost(depth, s))
                                                for s, _, f in scored]
        passing = [(c.cost, i) for i, c in enumerate(shares) if c.forecast.admissible(self.opts.min_agreement)]
        _, calibration, forecast = scored[min(passing)[1] if passing else -1]
        healed = None if heal.stats is None else self._metric(calibration)
        return DepthScore(depth=depth, metric=self.raw[depth], metric_healed=healed, forecast=forecast, shares=shares)

    def _forecast(self, calibration: np.ndarray, agreement: np.ndarray | None, alpha: float) -> GateForecast:
        unlabeled = None if agreement is None else (self.texts.agreement.logits, agreement)
        return forecast(self.task, self.texts.calibration_labels, self.texts.calibration.logits, calibration,
                        self.opts.tolerance, self.n_holdout, unlabeled, alpha)

    def _metric(self, logits: np.ndarray) -> float:
        return compute_metric(self.task.metric, self.texts.calibration_labels, logits,
                              regression=self.task.is_regression)

    @property
    def heal_runs(self) -> list[HealStats]:
        return [h.stats for h in self.heals.values() if h.stats is not None]

    def report(self, boundary: int, depth: int, share: float, probed: list[int], calibration_name: str,
               candidates: list[ExportCandidate], note: str | None) -> DepthReport:
        scores = [self.scores.get(d) or DepthScore(depth=d, metric=self.raw[d]) for d in range(1, self.total + 1)]
        heal, agreement = self.texts.heal, self.texts.agreement
        return DepthReport(
            search="auto" if self.opts.keep_layers == "auto" else "fixed", heal=self.heal_mode,
            heal_layers=self.opts.top.heal_layers, fallback=share, shares=list(self.opts.shares), costs=self.costs,
            boundary=boundary, total_layers=self.total, depth=depth,
            tolerance=self.opts.tolerance, full_metric=self.full, metric_name=self.task.metric,
            calibration=calibration_name, n_calibration=self.texts.calibration.n, n_heal=heal.n if heal else 0,
            heal_labelled=self.texts.heal_labels is not None, n_agreement=agreement.n if agreement else 0,
            probed=probed, scores=scores, heal_runs=self.heal_runs, candidates=candidates,
            min_agreement=self.opts.min_agreement,
            note="\n".join(filter(None, [note, self._ruled_out(depth, share, candidates)])) or None,
        )

    def _ruled_out(self, depth: int, share: float, candidates: list[ExportCandidate]) -> str | None:
        """One line on what --min-agreement ruled out: of the configurations looked at (the walk's cuts at each
        share, the export candidates at each depth they were scored at) whose gate forecast passed, those whose
        agreement fell short, and the cheapest of them, what the forecast alone would have allowed (by cost, else
        the deeper cut, then the faster candidate); and where the configuration kept (`share` sent on) falls short
        too (a fixed --keep-layers, or nothing cleared it), its bound. None where it ruled out nothing."""
        least = self.opts.min_agreement
        if least is None:
            return None
        looked = [(c.depth, c.name, c.share, c.cost, c.forecast) for c in candidates if not c.chosen]
        for d, score in sorted(self.scores.items()):
            if d < self.total:  # at full depth nothing is sent on: the full original, the one to fall back on
                looked += ([(d, "fp32", s.share, s.cost, s.forecast) for s in score.shares] if score.shares
                           else [(d, "fp32", self.opts.fallback, None, score.forecast)])
        out = [(np.inf if cost is None else cost, d, i, name, sent, f)
               for i, (d, name, sent, cost, f) in enumerate(looked)
               if f.passes and not f.admissible(least) and not (d, name, sent) == (depth, "fp32", share)]
        kept = self._kept(depth, share, candidates)
        short = kept is not None and not kept.admissible(least)
        if not out and not short:
            return None
        line = f"--min-agreement {least:g}"
        if out:
            _, d, _, name, sent, f = min(out, key=lambda row: row[:3])
            line += (f" ruled out {len(out)} configuration{'s' if len(out) > 1 else ''} the gate's forecast passed, "
                     f"the cheapest {d} layers in {name} with {sent:.0%} sent on (agreement's 95% lower "
                     f"bound {f.agreement_lower:.2%})")
        if short:
            line += (f"{';' if out else ':'} the bundle kept falls short of it (agreement's 95% lower bound "
                     f"{kept.agreement_lower or 0:.2%})")
        return line

    def _kept(self, depth: int, share: float, candidates: list[ExportCandidate]) -> GateForecast | None:
        """The forecast of the configuration export kept: the chosen candidate's, else the walk's at `share`."""
        chosen = next((c.forecast for c in candidates if c.chosen), None)
        score = self.scores.get(depth)
        if chosen is not None or score is None:
            return chosen
        return next((s.forecast for s in score.shares if s.share == share), score.forecast)


@dataclass(frozen=True)
class ErrorBudget:
    depth: float  # for the depth walk
    per_variant: float  # for each int8 variant
    variants: int


def error_budget(opts: ExportOptions, variants: int = 2) -> ErrorBudget:
    """Split the export's error rate over its forecasts (Bonferroni): export keeps the first int8 variant that
    passes, so each variant is another chance to ship a bundle the gate refuses. With --quantize int8, half
    of alpha goes to the depth walk and half is shared by the int8 variants; without, all of it to the depth.
    With --fallback auto each share is another such chance, at every depth and for every variant: each part is
    shared by the shares of options.SHARES."""
    shares = len(opts.shares)
    if not opts.quantize:
        return ErrorBudget(depth=opts.alpha / shares, per_variant=0.0, variants=0)
    return ErrorBudget(depth=opts.alpha / 2 / shares, per_variant=opts.alpha / 2 / variants / shares,
                       variants=variants)


def choose_depth(passes: Callable[[int, float], bool], boundary: int, total: int,
                 keep_layers: int | Literal["auto"], alpha: float) -> int:
    """Fixed N, or auto: from the CKA boundary, down while the forecast passes (a fixed-sequence test: each
    step at `alpha`), else up until it does. Going up, every depth tried is another chance for a wrong yes,
    so those share `alpha` (Bonferroni over the depths between the boundary and the full model, which
    always passes)."""
    if keep_layers != "auto":
        passes(keep_layers, alpha)
        return keep_layers
    depth = min(max(boundary, 1), total)
    if passes(depth, alpha):
        while depth > 1 and passes(depth - 1, alpha):
            depth -= 1
        return depth
    step = alpha / max(total - depth - 1, 1)
    while depth < total and not passes(depth, step):
        depth += 1
    passes(depth, step)  # scored for the report, the full model included
    return depth
