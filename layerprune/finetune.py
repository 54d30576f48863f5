"""finetune: a pretrained encoder + a task -> a standard Hugging Face classification checkpoint.

The transformers Trainer does the training; this module picks sane defaults (dynamic padding, batches
grouped by length, warm-up, seed) and writes the checkpoint with id2label/label2id and a training report.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .artifacts import MetricValue, TrainingReport, atomic_dir, library_versions
from .data import Examples, load_examples
from .errors import TaskError
from .files import TRAINING_REPORT_FILE
from .hidden import predict_logits, tokenize
from .models import load_classifier
from .options import FinetuneOptions  # options are declared once, with their CLI flags
from .scoring import compute_metric
from .tasks import TaskConfig



def finetune(base_model: str, task: TaskConfig, out: Path, opts: FinetuneOptions = FinetuneOptions()) -> TrainingReport:
    """Fine-tune `base_model` on `task` and save the checkpoint to `out` (atomically)."""
    if task.train_split is None:
        raise TaskError(f"task '{task.name}' has no train split; give one with --train-data FILE")
    train = load_examples(task, task.train_split, glue_dir=opts.glue_dir)
    if opts.max_train_examples is not None:
        train = train.head(opts.max_train_examples)
    evaluation = load_examples(task, task.eval_split, glue_dir=opts.glue_dir)
    # The new head's random init happens here, before the Trainer seeds anything: seed it too, or the same
    # seed gives a different checkpoint every run (MiniLM, rt-polarity: validation 0.8617 to 0.8731).
    set_seed(opts.seed)
    model, tokenizer = load_classifier(
        base_model,
        num_labels=task.num_labels,
        require_head=False,
        trust_remote_code=opts.trust_remote_code,
        device=opts.device,
        **_label_config(task),
    )
    with tempfile.TemporaryDirectory(prefix="layerprune-train-") as scratch:
        trainer = Trainer(
            model=model,
            args=_training_args(opts, scratch),
            train_dataset=_dataset(tokenizer, train, opts.max_length),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    # Our own ordered pass: the Trainer's eval sampler regroups by length when group_by_length is on.
    logits = predict_logits(model, tokenizer, evaluation, max_length=opts.max_length)
    metric = compute_metric(task.metric, evaluation.labels, logits, regression=task.is_regression)
    report = TrainingReport(
        base_model=base_model,
        task=task.name,
        train_split=task.train_split,
        eval_split=task.eval_split,
        n_train=len(train),
        n_eval=len(evaluation),
        epochs=opts.epochs,
        learning_rate=opts.learning_rate,
        batch_size=opts.batch_size,
        max_length=opts.max_length,
        seed=opts.seed,
        metric=MetricValue(name=task.metric, value=metric),
        train_seconds=round(seconds, 1),
        device=str(model.device),
        versions=library_versions(),
    )
    with atomic_dir(out, TRAINING_REPORT_FILE) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report.save(tmp / TRAINING_REPORT_FILE)
    return report


def _label_config(task: TaskConfig) -> dict[str, object]:
    if task.is_regression:
        return {"problem_type": "regression"}
    names = task.label_names or []
    return {
        "problem_type": "single_label_classification",
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "ignore_mismatched_sizes": True,  # a base checkpoint's own head (if any) is replaced
    }


def _dataset(tokenizer: PreTrainedTokenizerBase, examples: Examples, max_length: int) -> list[dict]:
    encoded = tokenize(tokenizer, examples, max_length)
    labels = examples.labels.tolist()
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": labels[i]} for i in range(len(examples))]


def _training_args(opts: FinetuneOptions, scratch: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=scratch,
        num_train_epochs=opts.epochs,
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=opts.batch_size,
        warmup_ratio=opts.warmup,
        weight_decay=opts.weight_decay,
        lr_scheduler_type="linear",
        group_by_length=True,  # batches of similar length: less padding, faster epochs
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=opts.device == "cpu" or not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,  # progress stays visible even with library logging turned down
    )
