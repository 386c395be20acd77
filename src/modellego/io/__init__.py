"""Files and the descriptions they store: model info, specs, pruning plans, atomic writes.

The bottom layer: imports nothing from the pipeline stages above it.
"""
