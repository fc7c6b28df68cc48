"""Settings of a training run: a frozen dataclass, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from t2r.errors import UsageError


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (saved in the manifest; a resumed run must match them).

    batch_size counts blocks of seq_len tokens per optimizer step on each process, split into
    grad_accum micro-batches. The defaults are sized for about an hour on 2 CPU cores with the
    default window-64 hybrid (what a step costs: BENCHMARKS.md, the recipes); the recipes
    (scripts/recipe.py) set their own step counts. Fine-tuning is distillation from the teacher's logits alone
    (ce_weight 0), which serves fidelity to the teacher best; --ce-weight adds next-token loss.
    """

    transfer_steps: int = 200
    finetune_steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    lr_transfer: float = 1e-2
    lr_finetune: float = 2e-4  # 1e-3 diverged with the window-64 hybrid (BENCHMARKS.md, recipe notes)
    warmup: float = 0.05
    clip: float = 1.0
    ce_weight: float = 0.0
    distill_weight: float = 1.0
    temperature: float = 1.0
    lora_rank: int = 8
    full: bool = False
    checkpoint_every: int = 50
    keep: int = 2
    eval_blocks: int = 16
    eval_every: int = 0  # validate every N steps of a stage too (0: at each stage's end only)
    seed: int = 0
    # Memory: the distillation and CE losses are made this many positions at a time (0: the whole
    # [B, T, V] logits at once), the student shares the teacher's frozen tensors, and each layer's
    # activations are recomputed in backward rather than kept (True: one layer's exist at a time),
    # kept (False), or, with None, kept where they fit in memory (t2r.training.activation_memory).
    loss_chunk: int = 256
    share_weights: bool = True
    checkpoint_layers: bool | None = None
    # Speed: the chunked attention through torch.compile where the machine can (t2r.training.compiled_attention).
    compile: bool = True

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise UsageError(f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}")
        if self.transfer_steps < 0 or self.finetune_steps < 0:
            raise UsageError("step counts must be >= 0")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved."""
