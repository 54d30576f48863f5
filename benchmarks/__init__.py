"""layerprune's benchmarks: scripts that measure and print tables, not tests. One entry point:

    python -m benchmarks list            # the registry: each entry's question, arguments and rough duration
    python -m benchmarks NAME [FLAGS]    # one entry; its table and provenance go to benchmarks/results/
    python -m benchmarks all [WORD...]   # every entry (or those a name, NAME-VARIANT or model picks), `make results`

How to run and add one: docs/benchmarks.md.
"""
