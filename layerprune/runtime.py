"""Running an exported bundle (its ONNX graph, config and tokenizer: the files its manifest names) with onnxruntime.

Torch-free on purpose: the server imports this module. Importing anything from `transformers`
imports torch (4.57: even `from transformers import AutoTokenizer`), so the tokenizer is the bundle's
tokenizer.json run by the `tokenizers` library directly, configured as transformers' fast tokenizer
would be (special tokens from the post-processor, longest-first truncation, right padding).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from .architectures import position_offset
from .errors import LayerpruneError, first_line
from .fallback import unsure
from .files import CONFIG_FILE, MODEL_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

if TYPE_CHECKING:
    from .artifacts import BundleParts

LOGITS = "logits"  # a classifier graph's first output (optimum's name)
STATES = "hidden_states"  # a graph's token states at a cut: the bundle's second output, the continuation's input
_MAX_LENGTH_CAP = 512
_ENCODE_CHUNK = 16  # texts encoded at once before they are cut: bounds the memory of their uncut encodings
_DEFAULT_TOKENIZER_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class OnnxClassifier:
    """A bundle's ONNX graph + tokenizer, run with onnxruntime.

    input_names: what the session takes (DistilBERT, MPNet and RoBERTa-likes take no token_type_ids);
    max_length: the longest token sequence the model can see; id2label: from config.json.
    """

    def __init__(
        self, model_dir: Path, *, max_length: int | None = None, providers: list[str] | None = None,
        threads: int | None = None, spinning: bool = True, memory_arena: bool = True,
        labels: list[str] | None = None, parts: BundleParts | None = None, original: Path | None = None,
        continuation: Path | None = None, below: float | None = None,
    ) -> None:
        """max_length: tokens per input (a bundle's manifest says which it was validated at); default the
        model's own limit. providers: default CUDA when this onnxruntime build offers it, else CPU (CPU always
        last, as the fallback for ops CUDA lacks, e.g. int8 MatMulInteger). threads: intra-op threads.
        spinning: idle intra-op threads busy-wait for the next run (never beside a fallback's second session).
        memory_arena: False frees each run's memory after it (a server's peak stays that of one run).
        labels: one name per output (a bundle's manifest resolved them at export); default from config.json.
        parts: a bundle manifest's file names for the graph, config and tokenizer; default the names export
        writes (a bare ONNX folder). original or continuation, and below: the fallback (layerprune.fallback),
        which answers the rows whose top-class probability under this graph is below `below`: the original
        model's ONNX graph restarts them from their tokens; a continuation graph (layerprune.continuation) goes
        on from the states this graph outputs as `hidden_states` through the original's layers above them."""
        self.model_dir = Path(model_dir)
        names = (parts.model, parts.config, parts.tokenizer) if parts else (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE)
        self.model_path, config_path, self.tokenizer_path = (self.model_dir / name for name in names)
        for path in (self.model_path, config_path, self.tokenizer_path):
            if not path.is_file():
                raise LayerpruneError(f"{self.model_dir} has no {path.name}; is it an exported bundle?")
        self.config = _read_json(config_path)
        tokenizer_config = _read_json(self.model_dir / TOKENIZER_CONFIG_FILE, missing_ok=True)
        second = original if continuation is None else continuation
        if (second is None) != (below is None) or None not in (original, continuation):
            raise LayerpruneError("a fallback needs one second graph (the original's or a continuation) and the "
                                  "threshold below which it answers")
        # Two sessions take turns on the same cores: one's threads spinning after its run slow the other's (the
        # cascade ran at 0.6x on 2 cores with spinning, docs/archive.md, "The fallback, served").
        spinning = spinning and second is None
        self.session = _session(self.model_path, providers, threads, spinning, memory_arena)
        self.below = below
        self.sent_on = 0  # rows the second graph answered, since this runner was made (served texts: /metrics)
        self.fallback = None if second is None else _session(Path(second), providers, threads, spinning, memory_arena)
        self.continues = continuation is not None  # the second graph goes on from this graph's hidden_states
        self.input_names: list[str] = [i.name for i in self.session.get_inputs()]
        self._fallback_inputs = [] if self.fallback is None else [i.name for i in self.fallback.get_inputs()]
        self.output_name: str = self.session.get_outputs()[0].name
        self._fetch = [self.output_name]
        if self.continues:
            self._check_continuation()
            self._fetch = [LOGITS, STATES]
        self.id2label: dict[int, str] = _id2label(self.config, self.session, labels)
        limit = model_max_length(self.config, tokenizer_config)
        if max_length is not None and not 2 <= max_length <= limit:
            raise LayerpruneError(f"max_length must be between 2 and {limit} for this model, got {max_length}")
        self.max_length: int = max_length or limit
        try:
            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:  # tokenizers raises a plain Exception on a malformed file
            raise LayerpruneError(f"cannot read {self.tokenizer_path}: {first_line(exc)}") from exc
        self._tokenizer.no_padding()  # padding is done per batch below, in numpy
        self._truncation_side = tokenizer_config.get("truncation_side", "right")
        self._pad_id = _pad_id(self._tokenizer, tokenizer_config)
        emitted = tokenizer_config.get("model_input_names") or _DEFAULT_TOKENIZER_INPUTS
        # A tokenizer saved without token_type_ids gives the model zeros, as transformers does.
        self._emits_token_types = "token_type_ids" in emitted
        self._lock = threading.Lock()  # the Tokenizer's truncation setting is shared state
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise LayerpruneError(f"{self.model_path} takes inputs the runtime cannot make: {sorted(unknown)}")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def labels(self) -> list[str]:
        """Label names in output order."""
        return [self.id2label[i] for i in range(self.num_labels)]

    def encode(
        self, texts: list[str], pairs: list[str] | None = None, *, max_length: int | None = None,
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """The session's inputs for `texts` (and second texts `pairs`): int64, padded to the longest row."""
        return self.pad(self.tokenize(texts, pairs, max_length=max_length, truncation=truncation))

    def pad(self, rows: Sequence[TokenRow]) -> dict[str, np.ndarray]:
        """Token rows from `tokenize` as the session's inputs: int64, right-padded to the longest row with the
        tokenizer's pad id. The one padding step: a server groups rows by length, then pads each group here."""
        return _pad(rows, self._pad_id, self.input_names, self._emits_token_types)

    def logits(
        self, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 32,
        max_length: int | None = None,
    ) -> np.ndarray:
        """(n, num_labels) float32 logits in input order. Rows are batched by token length (sort, batch,
        un-sort), so a batch pads to similar lengths instead of to the longest text of the input."""
        if batch_size < 1:
            raise LayerpruneError(f"batch_size must be at least 1, got {batch_size}")
        rows = self.tokenize(texts, pairs, max_length=max_length)
        out = np.zeros((len(rows), self.num_labels), dtype=np.float32)
        order = np.argsort([len(row.ids) for row in rows], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.run(self.pad([rows[i] for i in idx]))
        return out

    def run(self, encoding: dict[str, np.ndarray]) -> np.ndarray:
        """One session.run on an encoded batch -> its logits as float32."""
        missing = [name for name in self.input_names if name not in encoding]
        if missing:
            raise LayerpruneError(f"the model needs inputs {missing}, the encoding has {sorted(encoding)}")
        feeds = {name: np.asarray(encoding[name], dtype=np.int64) for name in self.input_names}
        logits, *states = self.session.run(self._fetch, feeds)
        logits = np.asarray(logits, dtype=np.float32)
        if self.fallback is not None:
            rows = unsure(logits, self.below)
            if rows.any():  # the rows sent on go as one sub-batch, cut to their longest row
                given = _rows({**feeds, STATES: states[0]} if states else feeds, rows)
                logits[rows] = self.fallback.run(None, {name: given[name] for name in self._fallback_inputs})[0]
                with self._lock:
                    self.sent_on += int(rows.sum())
        return logits

    def _check_continuation(self) -> None:
        """This graph's outputs are the logits, then the states a continuation goes on from; the continuation
        takes those states and inputs this graph takes too."""
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != [LOGITS, STATES]:
            raise LayerpruneError(f"{self.model_path} outputs {outputs}, not {[LOGITS, STATES]}: it has no states "
                                  "for a continuation to go on from")
        takes = self._fallback_inputs
        if STATES not in takes or not set(takes) <= {STATES, *self.input_names}:
            raise LayerpruneError(f"the continuation graph takes {takes}: it must take {STATES} and only inputs "
                                  f"the bundle's graph takes ({self.input_names})")

    def tokenize(
        self, texts: list[str], pairs: list[str] | None = None, *, max_length: int | None = None,
        truncation: bool = True,
    ) -> list[TokenRow]:
        """Token rows (.ids, .type_ids, .attention_mask) without padding, special tokens added, cut to
        max_length (default the model's) as transformers' fast tokenizer cuts them (longest_first, the
        tokenizer's truncation side). truncation=False: TooManyTokens for the first row too long.

        Memory stays linear in the input: each text is encoded alone, without special tokens and without
        truncation (no overflow pieces), cut to what longest_first can keep, and only then post-processed
        with truncation on. The tokenizer's own truncation of a long pair builds every overflow piece of
        both texts and then every combination of the two: thousands of encodings for two 10,000-character
        texts."""
        texts = _strings(texts, "texts")
        if pairs is not None:
            pairs = _strings(pairs, "pairs")
            if len(pairs) != len(texts):
                raise LayerpruneError(f"{len(texts)} texts but {len(pairs)} pairs")
        # The model cannot see more positions than it has, whatever the caller asks for.
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        special = self._tokenizer.num_special_tokens_to_add(pairs is not None)
        if limit < max(2, special):
            raise LayerpruneError(f"max_length must be at least {max(2, special)} (the special tokens of an input), "
                                  f"got {max_length}")
        rows: list[TokenRow] = []
        with self._lock:  # the Tokenizer's truncation setting is shared state
            for start in range(0, len(texts), _ENCODE_CHUNK):  # the uncut encodings of a few texts at a time
                chunk = slice(start, start + _ENCODE_CHUNK)
                rows += self._tokenize_chunk(texts[chunk], None if pairs is None else pairs[chunk], limit, truncation)
                too_long = next((i for i in range(start, len(rows)) if len(rows[i].ids) > limit), None)
                if too_long is not None and not truncation:
                    raise TooManyTokens(too_long, len(rows[too_long].ids), limit)
        return rows

    def _tokenize_chunk(self, texts: list[str], pairs: list[str] | None, limit: int,
                        truncation: bool) -> list[TokenRow]:
        tok = self._tokenizer
        tok.no_truncation()
        firsts = tok.encode_batch(texts, add_special_tokens=False)
        seconds = [None] * len(firsts) if pairs is None else tok.encode_batch(pairs, add_special_tokens=False)
        if truncation:
            budget = limit - tok.num_special_tokens_to_add(pairs is not None)  # what the texts may keep
            for first, second in zip(firsts, seconds):
                _cut_to_budget(first, second, budget, self._truncation_side)
            tok.enable_truncation(limit, strategy="longest_first", direction=self._truncation_side)
        return [TokenRow.of(tok.post_process(first, second, add_special_tokens=True))
                for first, second in zip(firsts, seconds)]


class TooManyTokens(LayerpruneError):
    """An input longer than the model takes, with truncation off."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"text {index} has {tokens} tokens, the model takes at most {limit}; pass truncation=True")
        self.index, self.tokens, self.limit = index, tokens, limit


@dataclass(frozen=True)
class TokenRow:
    """One input's tokens as the model takes them, unpadded: ids, segment ids and mask (int64). Only these
    are kept of a tokenizers.Encoding: its offsets, token strings and overflow pieces are dropped."""

    ids: np.ndarray
    type_ids: np.ndarray
    attention_mask: np.ndarray

    @classmethod
    def of(cls, encoding: Encoding) -> TokenRow:
        return cls(*(np.array(values, dtype=np.int64) for values in
                     (encoding.ids, encoding.type_ids, encoding.attention_mask)))


def _cut_to_budget(first: Encoding, second: Encoding | None, budget: int, direction: str) -> None:
    """Cut uncut encodings (no special tokens) so that longest_first truncation to `budget` tokens keeps
    exactly what it keeps of the whole texts. tokenizers' rule (utils/truncation.rs) looks only at which
    text is longer (a tie cuts the first text to budget // 2) and at the shorter's length up to the budget,
    so the shorter is cut to the budget and the longer to one more, which keeps the longer strictly longer.
    A single text is cut to one more than the budget too: the tokenizer then cuts that last token itself,
    and its one overflow piece is a single token."""
    if second is None:
        _cut(first, budget + 1, direction)
        return
    longer_first = len(first) > len(second)
    _cut(first, budget + 1 if longer_first else budget, direction)
    _cut(second, budget if longer_first else budget + 1, direction)


def _cut(encoding: Encoding, length: int, direction: str) -> None:
    if len(encoding) > length:
        encoding.truncate(length, direction=direction)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it; CPU always, as the fallback."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str] | None, threads: int | None, spinning: bool = True,
             memory_arena: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    if not spinning:  # idle intra-op threads sleep instead of busy-waiting: leaves the cores to a server's own work
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ENABLE_ALL also on bundles optimized at export: re-applying the rewrites is idempotent and cheap.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no "some nodes were not assigned" chatter
    if threads is not None:
        if threads < 1:
            raise LayerpruneError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers or default_providers())
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise LayerpruneError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc


def model_max_length(config: dict, tokenizer_config: dict) -> int:
    """tokenizer's model_max_length, capped by the position embeddings (minus the offset of
    RoBERTa-like models) and by 512."""
    limits = [_MAX_LENGTH_CAP]
    model_max = tokenizer_config.get("model_max_length")
    if isinstance(model_max, (int, float)) and model_max > 0:
        limits.append(int(min(model_max, _MAX_LENGTH_CAP)))
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions - position_offset(config))
    return min(limits)


def _id2label(config: dict, session: ort.InferenceSession, labels: list[str] | None = None) -> dict[int, str]:
    """The labels given (checked against the model's output width), else config.json's; transformers leaves
    out the default two (LABEL_0, LABEL_1), so without them the names are the defaults for as many labels
    as the model outputs."""
    width = session.get_outputs()[0].shape[-1]
    if labels is not None:
        if isinstance(width, int) and len(labels) != width:
            raise LayerpruneError(f"{len(labels)} labels given for a model with {width} outputs")
        return dict(enumerate(labels))
    if config.get("id2label"):
        return {int(k): str(v) for k, v in config["id2label"].items()}
    count = width if isinstance(width, int) else int(config.get("num_labels", 2))
    return {i: f"LABEL_{i}" for i in range(count)}


def _pad_id(tokenizer: Tokenizer, tokenizer_config: dict) -> int:
    """The pad token's id; 0 when the tokenizer names none (harmless: padded positions are masked)."""
    token = tokenizer_config.get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return int(tokenizer.token_to_id(token))
    return 0


def _pad(rows: Sequence[TokenRow], pad_id: int, input_names: list[str], token_types: bool) -> dict[str, np.ndarray]:
    """Right-pad token rows to the longest into int64 arrays; only the names the model takes."""
    width = max((len(row.ids) for row in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.ids)
        ids[i, :n], mask[i, :n] = row.ids, row.attention_mask
        if token_types:
            types[i, :n] = row.type_ids
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name] for name in input_names if name in arrays}


def _rows(feeds: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of the `rows` only, cut to their longest (right padding: the columns past it are all padding)."""
    width = int(feeds["attention_mask"][rows].sum(axis=1).max())
    return {name: value[rows, :width] for name, value in feeds.items()}


def _strings(values: list[str], what: str) -> list[str]:
    values = list(values)
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise LayerpruneError(f"{what}[{bad}] is a {type(values[bad]).__name__}, not a string")
    return values


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerpruneError(f"cannot read {path}: {exc}") from exc
