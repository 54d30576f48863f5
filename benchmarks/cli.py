"""`python -m benchmarks`: list the registry, run one entry, or run them all (`make results`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from layerprune.errors import LayerpruneError, first_line

from . import harness
from .registry import NEEDS, Entry, lookup, matching

USAGE = """usage: python -m benchmarks [list [WORD...] | NAME [FLAGS] | all [WORD...]]

  list         the registry (WORD: a benchmark's name, an entry's NAME-VARIANT, or a model: minilm, mpnet)
  NAME         run one entry: NAME --help for its flags; the table goes to benchmarks/results/NAME.md
  all          run every entry WORD picks (all of them without one), each in its own process, as `make results`"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else ("list", [])
    try:
        if command in ("-h", "--help"):
            print(USAGE)
            return 0
        if command == "list":
            print(listing(matching(rest)))
            return 0
        if command == "all":
            return run_all(matching(rest))
        entry = lookup(command)
    except LayerpruneError as exc:
        print(f"benchmarks: error: {first_line(exc)}", file=sys.stderr)
        return exc.exit_code
    return harness.run(entry, rest)


def listing(entries: list[Entry]) -> str:
    """The entries, grouped by benchmark: the question once, then each entry's arguments and duration."""
    lines, seen = [], set()
    for entry in entries:
        if entry.name not in seen:
            seen.add(entry.name)
            lines += ["", f"{entry.name}: {entry.module}.run", textwrap.fill(
                entry.question, 110, initial_indent="  ", subsequent_indent="  ")]
        lines.append(f"    {entry.key:<24} ~{entry.minutes:>3} min  after {NEEDS[entry.model]:<13} "
                     f"{' '.join(entry.args)}")
    total = sum(e.minutes for e in entries)
    lines += ["", f"{len(entries)} entries, about {total / 60:.1f} h in all on 2 cores "
                  "(`python -m benchmarks all WORD...` runs a subset)."]
    return "\n".join(lines).lstrip("\n")


def run_all(entries: list[Entry]) -> int:
    """Each entry in a process of its own (a long run's memory is given back before the next), one after the
    other; every entry runs whatever an earlier one did. Exit 1 if any failed, naming them."""
    failed = []
    for i, entry in enumerate(entries, 1):
        print(f"== {i}/{len(entries)} python -m benchmarks {entry.key} (~{entry.minutes} min)", flush=True)
        if subprocess.run([sys.executable, "-m", "benchmarks", entry.key], cwd=harness.ROOT).returncode != 0:
            failed.append(entry.key)
    if failed:
        print(f"benchmarks: {len(failed)} of {len(entries)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
