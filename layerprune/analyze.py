"""analyze: CKA between the representations of every pair of layers, and where the late block starts.

checkpoint + task data -> hidden states of layers 0..L -> cka.cka_matrix -> clustering.find_blocks
-> run directory (analysis.json, cka.png).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from . import cka as cka_math
from .artifacts import (
    AnalysisReport,
    AnalysisTimings,
    MetricValue,
    Representation,
    UndefinedLayer,
    atomic_dir,
    library_versions,
)
from .clustering import find_blocks
from .data import Examples, load_examples
from .errors import DataError, LayerpruneError
from .files import ANALYSIS_FILE, CKA_PLOT
from .hidden import Batch, forward_all_layers, make_batches, pool
from .models import load_classifier, resolve_checkpoint, total_layers
from .options import AnalyzeOptions  # options are declared once, with their CLI flags
from .plots import plot_cka
from .scoring import compute_metric
from .tasks import TaskConfig



def analyze(checkpoint: str, task: TaskConfig, out: Path, opts: AnalyzeOptions = AnalyzeOptions()) -> AnalysisReport:
    """Analyze `checkpoint` on `task`: one forward pass over the examples, CKA between every pair of layers, the
    layers clustered into blocks and the boundary of the late block; writes the run directory `out`.

    checkpoint: a fine-tuned sequence-classification checkpoint, a local folder or a hub id.
    task: the task it was fine-tuned on (`tasks.load_task`); its examples are what the layers are compared on.
    out: the run directory to write (analysis.json, cka.png); export reads it.
    opts: the analysis's options (`AnalyzeOptions`: the CLI's flags, with the same names and defaults).
    Returns the report written to analysis.json. Raises LayerpruneError (one line) for bad input."""
    started = time.perf_counter()
    split = opts.split or task.eval_split
    examples = _load_examples(task, split, opts)
    model, tokenizer = load_classifier(
        checkpoint,
        num_labels=task.num_labels,
        trust_remote_code=opts.trust_remote_code,
        device=opts.device,
    )
    sort = opts.cka_estimator != "minibatch"  # minibatch HSIC wants batches that are samples of the data
    batches = make_batches(
        tokenizer, examples, batch_size=opts.batch_size, max_length=opts.max_length, sort_by_length=sort
    )
    loaded = time.perf_counter()

    total = total_layers(model.config)
    passed = _forward(model, batches, len(examples), total, opts)
    forwarded = time.perf_counter()

    if passed.minibatch is not None:
        matrix = passed.minibatch.result()
    else:
        matrix = cka_math.cka_matrix(passed.reps, opts.cka_estimator)
    measured = time.perf_counter()
    defined = int((~np.isnan(np.diag(matrix))).sum())  # the layers find_blocks can cluster
    if defined == 0:
        raise DataError(f"every layer's representation is the same for all {len(examples)} examples of the "
                        f"'{split}' split of {task.name} (are its texts all alike?); CKA needs texts that differ")
    if opts.clusters is not None and opts.clusters > defined:
        raise LayerpruneError(f"--clusters {opts.clusters} asks for more blocks than the {defined} layers whose CKA "
                              "is defined")

    blocks = find_blocks(matrix, n_clusters=opts.clusters, max_clusters=opts.max_clusters)
    clustered = time.perf_counter()

    metric = compute_metric(task.metric, examples.labels, passed.logits, regression=task.is_regression)
    report = AnalysisReport(
        model=resolve_checkpoint(checkpoint),  # absolute, so later stages find it from any folder
        model_type=model.config.model_type,
        total_layers=total,
        task=task.name,
        task_config=task,
        glue_dir=str(opts.glue_dir) if opts.glue_dir else None,
        split=split,
        n_examples=len(examples),
        n_representations=passed.n_rows,
        representation=opts.representation,
        cka_estimator=opts.cka_estimator,
        cka=[[None if np.isnan(v) else round(float(v), 6) for v in row] for row in matrix],
        undefined_layers=_undefined_layers(matrix, opts.representation),
        clusters=blocks.labels,
        n_clusters=blocks.n_clusters,
        clusters_chosen_by=blocks.chosen_by,
        laplacian_eigenvalues=[round(float(v), 6) for v in blocks.eigenvalues],
        boundary=blocks.boundary,
        metric=MetricValue(name=task.metric, value=metric),
        timings=AnalysisTimings(
            load_s=loaded - started,
            forward_s=forwarded - loaded,
            cka_s=measured - forwarded,
            clustering_s=clustered - measured,
            total_s=time.perf_counter() - started,
        ),
        device=str(next(model.parameters()).device),
        versions=library_versions(),
    )
    write_run_dir(report, matrix, out)
    return report


def write_run_dir(report: AnalysisReport, matrix: np.ndarray, out: Path) -> None:
    """analysis.json and cka.png, written atomically."""
    with atomic_dir(out, ANALYSIS_FILE) as tmp:
        report.save(tmp / ANALYSIS_FILE)
        plot_cka(matrix, report, tmp / CKA_PLOT)


def _load_examples(task: TaskConfig, split: str, opts: AnalyzeOptions) -> Examples:
    if opts.max_examples is not None and opts.max_examples < 2:
        raise LayerpruneError("--max-examples must be at least 2: CKA compares examples with each other")
    examples = load_examples(task, split, glue_dir=opts.glue_dir)
    if opts.max_examples is not None:
        examples = examples.head(opts.max_examples)
    if len(examples) < 2:
        raise DataError(f"the '{split}' split of {task.name} has {len(examples)} example(s); CKA needs at least 2")
    return examples


@dataclass
class _Pass:
    logits: np.ndarray  # (n, num_labels) in example order
    reps: list[np.ndarray]  # per layer 0..L, (n_rows, d) in example order; empty for minibatch
    minibatch: cka_math.MinibatchCKA | None  # running CKA sums that do not grow with n
    n_rows: int


def _forward(model: PreTrainedModel, batches: list[Batch], n: int, total: int, opts: AnalyzeOptions) -> _Pass:
    """Logits for every example and each layer's representation rows (or minibatch CKA sums)."""
    take = _token_budget(batches, n, opts.max_tokens) if opts.representation == "tokens" else None
    minibatch = cka_math.MinibatchCKA(total + 1) if opts.cka_estimator == "minibatch" else None
    logits: np.ndarray | None = None
    n_rows = 0
    rows: list[dict[int, np.ndarray]] = [{} for _ in range(total + 1)]
    for batch, batch_logits, hidden_states in forward_all_layers(model, batches, desc="hidden states"):
        if logits is None:
            logits = np.zeros((n, batch_logits.shape[-1]), dtype=np.float32)
        logits[batch.indices] = batch_logits.float().cpu().numpy()
        mask = batch.encoding["attention_mask"]
        per_layer = [pool(h, mask, opts.representation) for h in hidden_states]
        if take is not None:
            per_layer = [[r[: take[i]] for r, i in zip(layer, batch.indices)] for layer in per_layer]
        n_rows += sum(len(r) for r in per_layer[0]) if take is not None else len(batch.indices)
        if minibatch is not None:
            minibatch.update([_stack(layer, opts.representation) for layer in per_layer])
        else:
            for store, layer in zip(rows, per_layer):
                store.update(zip(batch.indices.tolist(), layer))
    reps = [] if minibatch is not None else [_stack([s[i] for i in range(n)], opts.representation) for s in rows]
    return _Pass(logits, reps, minibatch, n_rows)


def _stack(rows: list[np.ndarray], representation: Representation) -> np.ndarray:
    return np.concatenate(rows) if representation == "tokens" else np.stack(rows)


def _token_budget(batches: list[Batch], n: int, max_tokens: int) -> np.ndarray:
    """Tokens to keep per example: examples in their original order until max_tokens are taken."""
    lengths = np.zeros(n, dtype=np.int64)
    for batch in batches:
        lengths[batch.indices] = batch.lengths.numpy()
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.clip(max_tokens - before, 0, lengths)


def _undefined_layers(matrix: np.ndarray, representation: Representation) -> list[UndefinedLayer]:
    reason = "representation is constant across examples, so CKA is undefined (0/0)"
    undefined = []
    for layer in np.flatnonzero(np.isnan(np.diag(matrix))):
        why = reason
        if layer == 0 and representation == "cls":
            why = "the embedding output of the first token is the same for every input, so CKA is undefined"
        undefined.append(UndefinedLayer(layer=int(layer), reason=why))
    return undefined
