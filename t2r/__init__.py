"""t2r: turn a pretrained transformer language model into a linear-attention RNN."""

__version__ = "0.1.0"
