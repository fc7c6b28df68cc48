"""Decoding from the recurrent state: sampling and (batched) generation.

Imports hub, modeling and ops; nothing of evaluation, training or the command line.
"""
