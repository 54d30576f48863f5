"""The experiments worth keeping: one entry per table in benchmarks/results/, with the question it answers, the
arguments that produce it and about how long it takes.

An entry runs the benchmark module `benchmarks.NAME` (its `add_arguments(parser)` and `run(args, results)`)
with `args`, and writes benchmarks/results/NAME[-VARIANT].md. The run directories the entries read are the
demos' (`make demo`: lp-run, runs/minilm-rt; `make demo-12`: lp-run-mpnet); `minutes` is a rough duration on
2 AMD EPYC cores with AVX-512 VNNI: the entry's run in docs/results.md where there was one, else an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerprune.errors import LayerpruneError

MINILM, MPNET = "minilm", "mpnet"
NEEDS = {MINILM: "make demo", MPNET: "make demo-12"}  # what makes the run directories an entry reads
# On a 12-layer model each faithful_int8 recipe costs minutes: export's recipe only, and fewer texts timed.
MPNET_INT8 = ("--defaults-only", "--n", "512", "--n-ood", "1000")


@dataclass(frozen=True)
class Entry:
    name: str  # the benchmark: module benchmarks.NAME
    question: str
    args: tuple[str, ...] = ()
    variant: str | None = None
    model: str = MINILM
    minutes: int = 5

    @property
    def key(self) -> str:
        """The entry's name on the command line and its results file's: NAME[-VARIANT]."""
        return self.name if self.variant is None else f"{self.name}-{self.variant}"

    @property
    def module(self) -> str:
        return f"benchmarks.{self.name}"


GATE = "Does the holdout gate agree with the depth auto picks, over resamples of calibration and holdout?"
HEALS = "How deep can each model go, and with which heal: what each heal buys at each depth on texts no heal saw?"
FALLBACK = "How much agreement does each share of texts sent on to the original buy a pruned model?"
CASCADE = ("What does continuing the texts a fallback sends on, from the bundle's states through the original's "
           "layers above, save over restarting the original, in speed and CPU a text?")
INT8_CPUS = "What does dynamic int8 cost against fp32 on each x86 kind (7-bit AVX2 vs 8-bit VNNI weights)?"
PRUNED_VS_INT8 = "Does pruning earn its place: the bundle against the full model's plain int8, in speed and agreement?"
INT8_AVX2 = "Do the int8 graphs compute on AVX2 kernels (QEMU's AVX2 CPU model) what they compute here?"
INT8_METHODS = "Which int8 keeps fp32's predictions, and at what speed?"
LINEAR = "How much faster do the original's pass and a heal run with torch's linear layers through oneDNN?"

REGISTRY: tuple[Entry, ...] = (
    Entry("auto", GATE, ("--run-dir", "lp-run"), minutes=10),
    Entry("auto", GATE, ("--run-dir", "lp-run", "--fallback", "0.1"), "fallback", minutes=10),
    Entry("auto", GATE, ("--run-dir", "lp-run-mpnet", "--quantize", "none,int8"), MPNET, model=MPNET, minutes=70),
    Entry("auto", GATE, ("--run-dir", "lp-run-mpnet", "--quantize", "none", "--fallback", "0.2"), "mpnet-fallback",
          model=MPNET, minutes=80),
    Entry("heals", HEALS, ("--run-dir", "lp-run", "--depths", "4,5"), minutes=35),
    Entry("heals", HEALS, ("--run-dir", "lp-run-mpnet", "--depths", "6,8,9"), MPNET, model=MPNET, minutes=120),
    Entry("depths", "What does each kept depth buy in speed, against the transformers pipeline and ONNX at full "
          "depth (no heal)?", ("--checkpoint", "runs/minilm-rt", "--bundle", "lp-run/bundle"), minutes=10),
    Entry("fallback", FALLBACK, ("--run-dir", "lp-run"), minutes=3),
    Entry("fallback", FALLBACK, ("--run-dir", "lp-run-mpnet"), MPNET, model=MPNET, minutes=10),
    Entry("cascade", CASCADE, ("--run-dir", "lp-run", "--keep-layers", "4"), minutes=20),
    Entry("cascade", CASCADE, ("--bundle", "lp-run-mpnet/bundle"), MPNET, model=MPNET, minutes=20),
    Entry("int8_cpus", INT8_CPUS, ("--checkpoint", "lp-run/truncated", "--run-dir", "lp-run"), minutes=10),
    Entry("int8_cpus", INT8_CPUS, ("--checkpoint", "lp-run-mpnet/truncated", "--run-dir", "lp-run-mpnet"), MPNET,
          model=MPNET, minutes=40),
    Entry("int8_methods", INT8_METHODS, ("--checkpoint", "runs/minilm-rt", "--run-dir", "lp-run"), minutes=16),
    Entry("int8_avx2", INT8_AVX2, ("--checkpoint", "runs/minilm-rt", "--run-dir", "lp-run"), minutes=20),
    Entry("int8_methods", INT8_METHODS, ("--run-dir", "lp-run"), "cut", minutes=3),
    Entry("int8_methods", INT8_METHODS, ("--checkpoint", "runs/mpnet-rt", "--run-dir", "lp-run-mpnet", *MPNET_INT8),
          MPNET, model=MPNET, minutes=25),
    Entry("int8_methods", INT8_METHODS, ("--run-dir", "lp-run-mpnet", *MPNET_INT8), "mpnet-cut", model=MPNET,
          minutes=15),
    Entry("pruned_vs_int8", PRUNED_VS_INT8, ("--bundle", "lp-run/bundle"), minutes=5),
    Entry("pruned_vs_int8", PRUNED_VS_INT8, ("--bundle", "lp-run-mpnet/bundle"), MPNET, model=MPNET, minutes=20),
    Entry("linear_backends", LINEAR, ("--run-dir", "lp-run", "--depth", "5"), minutes=3),
    Entry("linear_backends", LINEAR, ("--run-dir", "lp-run-mpnet", "--depth", "6"), MPNET, model=MPNET,
          minutes=10),
    Entry("serving", "How close does the server come to offline onnxruntime on the same bundle, and at what latency?",
          ("--bundle", "lp-run/bundle", "--duration", "20", "--profile"), minutes=3),
    Entry("serving", "What does the worst request of each kind within the server's limits cost it in memory?",
          ("--bundle", "lp-run/bundle", "--memory"), "memory", minutes=1),
    Entry("analyzer", "What does `analyze` cost, and how do exact and minibatch CKA scale with the number of texts?",
          ("--checkpoint", "runs/minilm-rt"), minutes=10),
)


def lookup(key: str) -> Entry:
    """The entry named `key` (NAME or NAME-VARIANT), or a one-line refusal naming the list."""
    for entry in REGISTRY:
        if entry.key == key:
            return entry
    raise LayerpruneError(f"no benchmark named {key!r}; `python -m benchmarks list` lists them")


def matching(words: list[str]) -> list[Entry]:
    """The entries any of `words` names (an entry's name, NAME-VARIANT or model); all of them for none."""
    if not words:
        return list(REGISTRY)
    unknown = [w for w in words if not any(w in (e.name, e.key, e.model) for e in REGISTRY)]
    if unknown:
        raise LayerpruneError(f"no benchmark, entry or model named {unknown[0]!r}; `python -m benchmarks list` "
                              "lists them")
    return [e for e in REGISTRY if {e.name, e.key, e.model} & set(words)]
