"""`t2r train`: attention transfer, then fine-tuning, through Hugging Face accelerate.

The same code runs in one CPU process, in several (`accelerate launch --num_processes 2 -m t2r
train ...`, gloo on CPU) and on GPUs (DDP, bf16). Each optimizer step reads a batch that is a pure
function of (seed, step), so a run resumed from a checkpoint replays exactly the batches an
uninterrupted run would have seen: in fp32 on a CPU the per-step losses are bit-identical.

Under an FSDP2 launch (configs/accelerate/fsdp.yaml) the objective and the student inside it are
sharded across processes; the teacher stays whole on each. A sharded module cannot be sharded again,
so such a launch trains one stage; checkpoints and the final model are gathered whole, in the same
format as an unsharded run's.

Layout of `--out`:
    manifest.json      the run: settings, seeds, data files with hashes, git commit, versions
    metrics.jsonl      one JSON line per step and per validation
    checkpoints/       checkpoint-NNNNNNN (see t2r.training.checkpoint)
    model/             the final converted model (LoRA merged), loadable by every t2r command
    summary.json       validation perplexity, KL and agreement with the teacher, tokens, wall time
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from t2r.data.blocks import batch_indices
from t2r.errors import T2RError, UsageError
from t2r.evaluation.perplexity import EvalResult, evaluate_blocks
from t2r.modeling.model import T2RForCausalLM
from t2r.training.activation_memory import choose_recomputation
from t2r.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from t2r.training.compiled_attention import compile_attention
from t2r.training.config import Interrupted, TrainConfig
from t2r.training.data import TrainingData
from t2r.training.distributed import (
    WholeOptimizer,
    gathered,
    gathered_student,
    load_sharded_optimizer,
    make_accelerator,
)
from t2r.training.lora import add_lora, has_lora, merge_lora
from t2r.training.objectives import AttentionTransfer, Finetune, record_attention
from t2r.training.provenance import git_commit, versions
from t2r.training.sharing import share_frozen_weights
from t2r.training.stop_flag import StopFlag

STAGES = ("transfer", "finetune")


def warmup_cosine(steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, round(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Runs the stages of one training run in one process of an accelerate launch."""

    def __init__(
        self,
        student: T2RForCausalLM,
        teacher: nn.Module,
        data: TrainingData,
        config: TrainConfig,
        out: Path,
        run_settings: dict[str, Any],
        progress: bool = True,
    ) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = make_accelerator()
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if self.fsdp and config.transfer_steps > 0 and config.finetune_steps > 0:
            one = "run --finetune-steps 0, then train its model with --transfer-steps 0"
            raise UsageError(f"under FSDP a launch trains one stage: {one}")
        self.objective: nn.Module | None = None  # the stage's objective as prepared (sharded under FSDP)
        self.student = student
        self.teacher = teacher.to(self.accelerator.device).eval().requires_grad_(False)
        if config.share_weights and not config.full:  # --full trains every weight: nothing to share
            self.shared_bytes = share_frozen_weights(student, self.teacher)
        self.data = data
        self.config = config
        tokens, main = config.batch_size // config.grad_accum * config.seq_len, self.accelerator.is_main_process
        self.recompute = choose_recomputation(config.checkpoint_layers, student, tokens, main)  # or the saved run's
        self.compiled = compile_attention(student, config.compile, self.accelerator)
        self.out = out
        self.run_settings = run_settings
        self.progress = progress and self.accelerator.is_main_process
        self.metrics_path = out / "metrics.jsonl"
        self.checkpoints = out / "checkpoints"
        self.tokens = 0
        self.started = time.perf_counter()
        self.earlier_seconds = 0.0  # training time of the runs this one resumes

    def elapsed(self) -> float:
        """Seconds of training so far, across resumed runs."""
        return self.earlier_seconds + time.perf_counter() - self.started

    # ------------------------------------------------------------------ bookkeeping

    def manifest(self) -> dict[str, Any]:
        return {
            "settings": self.run_settings,
            "train_config": dataclasses.asdict(self.config),
            "t2r_config": self.student.config.to_dict(),
            "data": self.data.sources,
            "blocks": {"train": len(self.data.blocks), "valid": len(self.data.valid)},
            "processes": self.accelerator.num_processes,
            "recompute_layers": self.recompute,  # the choice a resumed run keeps
            "compiled_attention": self.compiled,
            "distributed_type": self.accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP, ...
            "git_commit": git_commit(),
            "versions": versions(),
        }

    def log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, stage: str, step: int) -> None:
        """Drop log lines of steps after the checkpoint a resumed run restarts from."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        stage_index = STAGES.index(stage)
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            record = json.loads(line)
            earlier_stage = STAGES.index(record["stage"]) < stage_index
            # steps and periodic validations up to the checkpoint stay (the stage's last validation is redone)
            same_stage_done = record["stage"] == stage and record["step"] <= step
            if earlier_stage or same_stage_done:
                kept.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in kept))

    # ------------------------------------------------------------------ batches

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's blocks [b, T] of optimizer step `step`, and their ce_rows [b]."""
        processes = self.accelerator.num_processes
        indices = batch_indices(len(self.data.blocks), step, self.config.batch_size * processes, self.config.seed)
        mine, device = indices[self.accelerator.process_index :: processes], self.accelerator.device
        return self.data.blocks[mine].to(device), self.data.ce_rows[mine].to(device)

    # ------------------------------------------------------------------ stages

    def set_trainable(self, stage: str) -> None:
        """Transfer trains the feature maps (for a map without parameters, ELU+1 or fixed random
        features, the attention's own projections instead); fine-tuning trains the feature maps and
        LoRA adapters, or everything with `full`."""
        names = [name for name, _ in self.student.named_parameters()]
        learned_maps = any("feature_map" in name for name in names)
        for name, parameter in self.student.named_parameters():
            mixing = "window_logit" in name  # the hybrid's softmax/linear share, learned with the maps
            if stage == "transfer":
                parameter.requires_grad_(mixing or ("feature_map" in name if learned_maps else ".projections." in name))
            elif self.config.full:
                parameter.requires_grad_(True)
            else:
                parameter.requires_grad_(mixing or "feature_map" in name or "lora_" in name)

    def run(self, resume: bool) -> dict[str, Any]:
        config = self.config
        checkpoint = latest_checkpoint(self.checkpoints) if resume else None
        resumed_stage, resumed_step = None, -1
        if checkpoint is not None:
            saved = json.loads((checkpoint / "trainer.json").read_text())
            resumed_stage, resumed_step = saved["stage"], saved["stage_step"]
        manifest = json.loads(json.dumps(self.manifest()))  # as saved (tuples become lists)
        manifest_path = self.out / "manifest.json"
        if resume and manifest_path.is_file():
            saved = json.loads(manifest_path.read_text())
            # Recomputing activations or keeping them gives the same losses (tested): unless told, a resumed
            # run keeps the saved run's choice (runs before the choice was automatic saved it as the setting).
            settings = saved.get("train_config")
            settings = settings if isinstance(settings, dict) else {}
            settings.pop("compile", None)  # speed alone: a run may resume with or without it
            earlier = settings.pop("checkpoint_layers", None)
            earlier = saved.get("recompute_layers", earlier)
            if self.config.checkpoint_layers is None and earlier is not None:
                self.recompute = manifest["recompute_layers"] = earlier
            for key in ("train_config", "t2r_config", "data", "processes"):
                mine, theirs = manifest[key], saved.get(key)
                if key == "train_config" and isinstance(theirs, dict):  # settings newer than the run: not compared
                    mine = {name: value for name, value in mine.items() if name in theirs}
                if theirs != mine:
                    raise UsageError(f"--resume: this run's {key.replace('_', ' ')} differs from the saved run's")
            manifest["resumes"] = saved.get("resumes", 0) + 1
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if checkpoint is None and self.metrics_path.exists():
                self.metrics_path.unlink()  # no checkpoint to resume from: the run starts over
            manifest_path.write_text(json.dumps(manifest, indent=2))
        plan = [("transfer", config.transfer_steps), ("finetune", config.finetune_steps)]
        evaluations: dict[str, Any] = {}
        with StopFlag() as self.stop:
            self.run_stages(plan, checkpoint, resumed_stage, resumed_step, evaluations)
        return evaluations

    def run_stages(
        self,
        plan: list[tuple[str, int]],
        checkpoint: Path | None,
        resumed_stage: str | None,
        resumed_step: int,
        evaluations: dict[str, Any],
    ) -> None:
        config = self.config
        for stage, steps in plan:
            if steps == 0:
                continue
            if resumed_stage is not None and STAGES.index(stage) < STAGES.index(resumed_stage):
                continue  # finished before the checkpoint
            if stage == "finetune" and not config.full and config.lora_rank > 0 and not has_lora(self.student):
                torch.manual_seed(config.seed)  # LoRA's A matrices draw from the global generator
                add_lora(self.student, config.lora_rank)
            resume_from = checkpoint if stage == resumed_stage else None
            self.run_stage(stage, steps, resume_from, resumed_step if resume_from else -1)
            result = self.validate(stage, steps)
            evaluations[stage] = result.to_dict()

    def run_stage(self, stage: str, steps: int, checkpoint: Path | None, done_step: int) -> None:
        config = self.config
        accelerator = self.accelerator
        self.set_trainable(stage)
        if stage == "transfer":
            objective: nn.Module = AttentionTransfer(self.student, self.recompute)
            lr = config.lr_transfer
        else:
            teacher, adapter = self.teacher, self.student.adapter
            objective = Finetune(
                self.student, config.ce_weight, config.distill_weight, config.temperature, config.loss_chunk,
                lambda normed: adapter.logits(teacher, normed), self.recompute,
            )  # fmt: skip
            lr = config.lr_finetune
        parameters = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, config.warmup))
        trainer_state: dict[str, Any] = {}
        if checkpoint is not None:
            # Under FSDP the optimizer's state is sharded after prepare, below.
            trainer_state = load_checkpoint(checkpoint, self.student, None if self.fsdp else optimizer)
            scheduler.load_state_dict(trainer_state["scheduler"])
            self.tokens = trainer_state["tokens"]
            self.earlier_seconds = trainer_state.get("seconds", 0.0)
            self.started = time.perf_counter()
            self.truncate_metrics(stage, done_step)
        inner = optimizer  # prepare wraps it and, under FSDP, points it at the parameters' shards
        objective, optimizer = accelerator.prepare(objective, optimizer)
        self.objective = objective
        if checkpoint is not None and self.fsdp:
            state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
            load_sharded_optimizer(inner, state)
        start = done_step + 1
        tokens_per_step = config.batch_size * config.seq_len * accelerator.num_processes
        bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not self.progress)
        stage_started, stage_tokens = time.perf_counter(), 0
        stop = self.stop
        for step in range(start, steps):
            record = self.train_step(stage, step, objective, optimizer)
            scheduler.step()
            self.tokens += tokens_per_step
            stage_tokens += tokens_per_step
            rate = stage_tokens / (time.perf_counter() - stage_started)
            seconds = round(self.elapsed(), 3)
            record.update(stage=stage, step=step, lr=scheduler.get_last_lr()[0], tokens=self.tokens, seconds=seconds)
            self.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{rate:.0f}")
            bar.update(1)
            last = step == steps - 1
            if config.eval_every and (step + 1) % config.eval_every == 0 and not last:  # a held-out loss curve
                self.validate(stage, step + 1)
            due = (step + 1) % config.checkpoint_every == 0
            if due or last or stop.raised is not None:
                self.save(stage, step, optimizer, scheduler)
            if stop.raised is not None and not last:
                bar.close()
                raise Interrupted(f"stopped by signal {stop.raised} after {stage} step {step}")
        bar.close()

    def train_step(self, stage: str, step: int, objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        config, accelerator = self.config, self.accelerator
        blocks, ce_rows = self.batch(step)
        micro = config.batch_size // config.grad_accum
        total = 0.0
        parts: dict[str, float] = {}
        for index in range(config.grad_accum):
            ids = blocks[index * micro : (index + 1) * micro]
            rows = ce_rows[index * micro : (index + 1) * micro]
            mask = torch.ones_like(ids)
            syncing = index == config.grad_accum - 1
            with torch.no_grad():
                if stage == "transfer":
                    with record_attention(self.teacher, self.student.adapter) as records:
                        # The base model: no [B, T, V] logits (Gemma 3: 262k columns) that nobody reads.
                        self.teacher.base_model(input_ids=ids, attention_mask=mask)
                elif config.distill_weight == 0:
                    teacher_out = None
                elif config.loss_chunk > 0:  # normed hidden states: the loss makes logits chunk by chunk
                    teacher_out = self.teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                else:
                    teacher_out = self.teacher(input_ids=ids, attention_mask=mask).logits
            context = accelerator.no_sync(objective) if not syncing else contextlib.nullcontext()
            with context:
                if stage == "transfer":
                    loss, per_layer = objective(records, mask)
                    parts["worst_layer"] = int(per_layer.argmax())
                else:
                    loss, more = objective(ids, mask, rows, teacher_out)
                    for key, value in more.items():
                        parts[key] = parts.get(key, 0.0) + value / config.grad_accum
                self.check_finite(loss, stage, step)
                accelerator.backward(loss / config.grad_accum)
            total += loss.item() / config.grad_accum
        norm = accelerator.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": float(norm), **parts}

    def check_finite(self, loss: torch.Tensor, stage: str, step: int) -> None:
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        finite = self.accelerator.reduce(finite, reduction="mean") if self.accelerator.num_processes > 1 else finite
        if finite.item() < 1.0:
            last = latest_checkpoint(self.checkpoints)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise T2RError(f"the loss became non-finite at {stage} step {step}; stopped ({where})")

    def save(self, stage: str, step: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.accelerator.wait_for_everyone()
        main = self.accelerator.is_main_process
        with self.whole():  # every process takes part in gathering the shards; the main one writes
            saved: Any = WholeOptimizer(optimizer, keep=main) if self.fsdp else optimizer
            if main:
                trainer = {
                    "stage": stage,
                    "stage_step": step,
                    "scheduler": scheduler.state_dict(),
                    "tokens": self.tokens,
                    "seconds": self.elapsed(),
                }
                order = STAGES.index(stage) * 10_000_000 + step  # checkpoint names sort across stages
                save_checkpoint(self.checkpoints, order, self.student, saved, trainer, self.config.keep)
        self.accelerator.wait_for_everyone()

    def sharded(self) -> bool:
        return self.fsdp and self.objective is not None

    def whole(self) -> contextlib.AbstractContextManager:
        """Under FSDP, the student's parameters are whole tensors inside; elsewhere nothing happens."""
        return gathered(self.objective if self.sharded() else None)

    def unsharded_student(self) -> T2RForCausalLM | None:
        """The student as an ordinary module on the main process (None elsewhere)."""
        if not self.sharded():
            return self.student if self.accelerator.is_main_process else None
        lora_rank = self.config.lora_rank if has_lora(self.student) else 0
        return gathered_student(self.objective, self.student, lora_rank, self.accelerator.is_main_process)

    def validate(self, stage: str, steps: int) -> EvalResult:
        blocks = self.data.valid[: self.config.eval_blocks].to(self.accelerator.device)
        training, _ = self.student.training, self.student.eval()
        # one block at a time: validation's [batch, seq, vocab] logits would otherwise set the run's peak memory
        with self.whole():
            result = evaluate_blocks(self.student, blocks, self.teacher, batch_size=1)
        self.student.train(training)
        self.log({"stage": stage, "step": steps - 1, "validation": result.to_dict()})
        return result

    def finish(self, tokenizer: Any, evaluations: dict[str, Any]) -> dict[str, Any]:
        from t2r.hub import save_converted

        summary = {"tokens": self.tokens, "minutes": self.elapsed() / 60, "validation": evaluations}
        student = self.unsharded_student()
        if student is not None:  # the main process
            if has_lora(student):
                merge_lora(student)
            student.requires_grad_(False)
            training = {"settings": self.run_settings, **summary}  # for the model card
            save_converted(student, tokenizer, self.out / "model", overwrite=True, training=training)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.accelerator.wait_for_everyone()
        return summary
