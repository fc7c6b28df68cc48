"""`t2r train`: attention transfer, then fine-tuning; objectives, LoRA, checkpoints, the run's settings.

May import everything below it (evaluation for validation, data, hub, modeling, ops); only the
command line imports it.
"""
