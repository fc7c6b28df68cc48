"""The converted model: its config, feature maps, attention modules, architecture adapters, the
conversion of a teacher, weight formats for decoding and the in-place decode step.

Imports `t2r.ops` (the maths) and transformers' model code; nothing above it (hub, data, training,
inference, evaluation, cli).
"""
