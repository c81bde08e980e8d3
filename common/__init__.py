"""What every layer shares: the error every CLI prints as one line, file writes that never leave
half a file, the YAML config schema, and the few tensor helpers both stages need.

Layers: common <- shards <- featurize <- caption (tests/test_layers.py keeps it so).
"""
