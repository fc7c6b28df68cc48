"""Measuring a model: perplexity and fidelity to the teacher, long streams, pass-key retrieval, chat
fidelity, the speed bench and the regenerated sections of BENCHMARKS.md.

May import inference, data, hub, modeling and ops; never training or the command line.
"""
