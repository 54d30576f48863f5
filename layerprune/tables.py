"""Markdown tables of the artifacts, for the CLI and the demo (pasteable into a README or an issue)."""

from __future__ import annotations

from .artifacts import DepthReport, GateForecast, Manifest, ValidationReport


def candidates_table(depth: DepthReport) -> str:
    """The export candidates scored (calibration metric, forecast, speed; with --fallback auto the share sent on and
    the served cost a text, the full original's = 1; where they were scored at several depths, each one's)."""
    costed, layered = depth.costs is not None, len({c.depth for c in depth.candidates}) > 1
    lines = ["| export candidate |" + (" layers |" if layered else "") + (" sent on | cost a text |" if costed else "") +
             " calibration metric | delta | forecast lower bound | disagreement | sentences/s | |",
             "|---|" + ("---:|" if layered else "") + ("---:|---:|" if costed else "") + "---:|---:|---:|---:|---:|---|"]
    for c in depth.candidates:
        f = c.forecast
        d = "n/a" if f.disagreement is None else f"{f.disagreement:.2%}"
        verdict = "chosen" if c.chosen else _verdict(f, depth.min_agreement)
        cells = (f" {c.depth} |" if layered else "") + (f" {c.share:.0%} | {c.cost:.3f} |" if costed else "")
        lines.append(f"| {c.name} |{cells} {c.metric:.4f} | {f.delta:+.4f} | {f.lower_bound:+.4f} | {d} | "
                     f"{c.sentences_per_s:.0f} | {verdict} |")
    return "\n".join(lines)


def shares_table(depth: DepthReport) -> str:
    """With --fallback auto: each depth looked at, each share sent on's served cost a text (the full original's =
    1) and its forecast; the kept one marked."""
    lines = ["| depth |" + "".join(f" sent on {s:.0%} |" for s in depth.shares), "|---:|" + "---:|" * len(depth.shares)]
    for score in sorted((s for s in depth.scores if s.shares), key=lambda s: -s.depth):
        cells = "".join(f" {c.cost:.3f} {_verdict(c.forecast, depth.min_agreement)}"
                        f"{' (kept)' if (score.depth, c.share) == (depth.depth, depth.fallback) else ''} |"
                        for c in score.shares)
        lines.append(f"| {score.depth} |{cells}")
    return "\n".join(lines)


def _verdict(forecast: GateForecast, min_agreement: float | None) -> str:
    """What a forecast allowed: passes, fails, or passes the gate's forecast but not --min-agreement."""
    if forecast.admissible(min_agreement):
        return "passes"
    return f"agreement < {min_agreement:g}" if forecast.passes else "fails"


def _fallback_rows(report: ValidationReport, manifest: Manifest) -> list[tuple[str, str, str]]:
    rule = manifest.fallback
    if rule is None or report.sent_on is None:
        return []
    when = f"top-class probability < {rule.threshold:.4f} (--fallback {rule.share:g})"
    return [("sent on to the original", when, f"{report.sent_on:.1%}")]


def validation_table(report: ValidationReport, manifest: Manifest) -> str:
    """The validation result as a markdown table (pasteable into a README or an issue)."""
    variant = ", ".join(filter(None, [manifest.optimize, manifest.quantize])) or "fp32"
    agreement = "n/a" if report.agreement is None else f"{report.agreement:.1%}"
    parity = "n/a" if report.max_abs_logit_diff_fp32 is None else f"{report.max_abs_logit_diff_fp32:.2e}"
    low, high = report.delta_ci95
    rows = [
        ("original checkpoint", f"{manifest.total_layers} layers, PyTorch", f"{report.original:.4f}"),
        ("bundle", f"{manifest.depth} layers, ONNX {variant}, heal={manifest.heal}, max length {report.max_length}",
         f"{report.bundle:.4f}"),
        ("delta", f"95% CI [{low:+.4f}, {high:+.4f}] (paired bootstrap)", f"{report.delta:+.4f}"),
        ("prediction agreement", "", agreement),
        *_fallback_rows(report, manifest),
        ("max abs logit diff", "truncated PyTorch vs fp32 ONNX", parity),
        ("passed", f"delta >= -{report.tolerance:g}", "yes" if report.passed else "NO"),
    ]
    lines = [f"| {report.metric_name} on {report.holdout} (n={report.n_examples}) | | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
