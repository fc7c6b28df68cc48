"""`t2r train`: convert (unless the model already is) and train: attention transfer, then fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from t2r.cli.common import Formatter, bounded_float, non_negative_int, positive_int
from t2r.cli.convert import DEFAULT_MODEL, add_attention_flags, attention_settings
from t2r.errors import UsageError
from t2r.modeling.config import FEATURE_MAPS
from t2r.training.config import TrainConfig


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "train", help="attention transfer, then fine-tuning (runs under accelerate)", formatter_class=Formatter
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="teacher to convert (alias, .gguf, folder, hub id) or a converted folder to keep training",
    )
    parser.add_argument("--teacher", default=None, help="the softmax teacher (default: --model, or its base model)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics, final model")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        help="training text, repeatable: file, folder, glob, hub dataset (default: the built-in corpus)",
    )
    parser.add_argument(
        "--distill-data",
        action="append",
        default=[],
        help="text used only as the teacher's input (transfer, KL), never as CE targets (default: none)",
    )
    parser.add_argument(
        "--feature-map", choices=FEATURE_MAPS, default=None, help="for a new conversion (default: hedgehog)"
    )
    parser.add_argument(
        "--feature-dim", type=positive_int, default=None, help="feature size (default: the map's, as in convert)"
    )
    parser.add_argument(
        "--untie-qk", action="store_true", help="separate q/k maps (default: off; hedgehog always has them)"
    )
    add_attention_flags(parser)
    add_training_flags(parser)
    parser.set_defaults(run=run)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig fields, each with the dataclass's default."""
    defaults = TrainConfig()
    add = parser.add_argument
    add("--transfer-steps", type=non_negative_int, default=defaults.transfer_steps, help="attention-transfer steps")
    add("--finetune-steps", type=non_negative_int, default=defaults.finetune_steps, help="fine-tuning steps")
    add("--batch-size", type=positive_int, default=defaults.batch_size, help="blocks per step (per process)")
    add("--grad-accum", type=positive_int, default=defaults.grad_accum, help="micro-batches per step")
    add("--seq-len", type=positive_int, default=defaults.seq_len, help="tokens per block")
    add("--lr-transfer", type=bounded_float(0.0, 10.0), default=defaults.lr_transfer, help="peak lr of transfer")
    add("--lr-finetune", type=bounded_float(0.0, 10.0), default=defaults.lr_finetune, help="peak lr of fine-tuning")
    weight = bounded_float(0.0, 100.0, include_low=True)
    add("--ce-weight", type=weight, default=defaults.ce_weight, help="weight of next-token cross-entropy")
    add("--distill-weight", type=weight, default=defaults.distill_weight, help="weight of KL to the teacher")
    add("--temperature", type=bounded_float(0.0, 100.0), default=defaults.temperature, help="distillation temperature")
    add("--lora-rank", type=non_negative_int, default=defaults.lora_rank, help="LoRA rank on q/k/v/o; 0: no LoRA")
    add("--full", action="store_true", help="fine-tune all parameters instead of LoRA")
    add("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every, help="steps between checkpoints")
    add("--keep", type=positive_int, default=defaults.keep, help="checkpoints to keep")
    add("--eval-blocks", type=positive_int, default=defaults.eval_blocks, help="held-out blocks per validation")
    add("--eval-every", type=non_negative_int, default=defaults.eval_every,
        help="validate every N steps of a stage too, in metrics.jsonl (0: at each stage's end only)")  # fmt: skip
    add("--seed", type=int, default=defaults.seed, help="seeds data order, split, feature maps and LoRA")
    add("--loss-chunk", type=non_negative_int, default=defaults.loss_chunk,
        help="positions whose logits exist at once in the loss (0: the whole [batch, seq, vocab])")  # fmt: skip
    add("--no-share-weights", dest="share_weights", action="store_false",
        help="give the student its own copy of the teacher's frozen weights (more memory)")  # fmt: skip
    recompute = parser.add_mutually_exclusive_group()
    recompute.add_argument("--checkpoint-layers", dest="checkpoint_layers", action="store_const", const=True,
        help="recompute each layer's activations in backward (less memory, slower; default: only where "
        "keeping them would not fit in memory)")  # fmt: skip
    recompute.add_argument("--no-checkpoint-layers", dest="checkpoint_layers", action="store_const", const=False,
        help="keep every layer's activations for backward, not recompute them (more memory, faster; default: "
        "wherever they fit)")  # fmt: skip
    add("--no-compile", dest="compile", action="store_false",
        help="run the chunked attention eagerly (default: through torch.compile where a compiler exists)")  # fmt: skip
    add("--resume", action="store_true", help="continue from the last complete checkpoint")
    add(
        "--from-scratch",
        action="store_true",
        help="baseline: same architecture, random weights, all trained (implies --full)",
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = [
        "transfer_steps", "finetune_steps", "batch_size", "grad_accum", "seq_len", "lr_transfer", "lr_finetune",
        "ce_weight", "distill_weight", "temperature", "lora_rank", "checkpoint_every", "keep", "eval_blocks",
        "eval_every", "seed", "loss_chunk", "share_weights", "checkpoint_layers", "compile",
    ]  # fmt: skip
    return TrainConfig(**{name: getattr(args, name) for name in names}, full=args.full or args.from_scratch)


def check_out(args: argparse.Namespace) -> None:
    """Fail before any model loads if `--out` cannot hold this run."""
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"{args.out}: exists and is not a folder")
    if args.out.exists() and not args.resume and any(args.out.iterdir()):
        raise UsageError(f"{args.out} already holds a run; pass --resume to continue it, or choose a new --out")
    if args.resume and not (args.out / "manifest.json").is_file():
        raise UsageError(f"{args.out}: no run to resume (no manifest.json)")


def run(args: argparse.Namespace) -> None:
    from t2r.data.sources import resolve_sources
    from t2r.hub import load_model, load_teacher
    from t2r.training.allocator import keep_freed_memory
    from t2r.training.data import training_data
    from t2r.training.trainer import Trainer

    config = train_config(args)
    keep_freed_memory()  # a step frees and reallocates the same large blocks: keep them mapped
    check_out(args)
    resolve_sources([*args.data, *args.distill_data])  # a missing path fails before a model loads
    student, tokenizer = load_model(args.model)
    student, teacher_spec = prepare_student(args, student)
    # The global cache is training-free (LoLA): train without it, save the model with it.
    global_cache = student.config.global_cache
    student.with_global_cache(0)
    teacher, _ = load_teacher(teacher_spec)
    data = training_data(args.data, args.distill_data, tokenizer, config.seq_len, config.seed)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.pop("run", None)
    trainer = Trainer(student, teacher, data, config, args.out, settings)
    evaluations = trainer.run(resume=args.resume)
    student.with_global_cache(global_cache)
    summary = trainer.finish(tokenizer, evaluations)
    if trainer.accelerator.is_main_process:
        print(summary_table(summary, teacher_spec, args.out / "model"))


def prepare_student(args: argparse.Namespace, loaded: Any) -> tuple[Any, str]:
    """The model to train (converted here unless it already is) and the teacher's spec."""
    import torch

    from t2r.modeling.config import T2RConfig
    from t2r.modeling.convert import convert
    from t2r.modeling.model import T2RForCausalLM
    from t2r.modeling.saved import empty_model

    if isinstance(loaded, T2RForCausalLM):
        flags = (
            args.feature_map, args.feature_dim, args.window, args.half_life, args.sinks, args.softmax_layers,
            args.linear_heads, args.keep_local, args.global_cache, args.global_select,
        )  # fmt: skip
        if any(flag is not None for flag in flags) or args.untie_qk or args.from_scratch or args.rotary_features:
            raise UsageError(f"{args.model} is already converted; drop the conversion flags")
        teacher_spec = args.teacher or loaded.config.base_model
        if teacher_spec is None:
            raise UsageError("--teacher is needed: this model records no base model")
        return loaded, teacher_spec
    teacher_spec = args.teacher or args.model
    feature_map = args.feature_map or "hedgehog"
    if args.from_scratch:  # the paper's baseline: an RNN of the same shape that was never pretrained
        torch.manual_seed(args.seed)
        loaded = empty_model(loaded.config)
    config = T2RConfig(
        feature_map=feature_map,
        feature_dim=args.feature_dim,
        # Hedgehog learns separate maps for queries and keys; T2R shares one (the paper), and
        # random features must be shared to estimate the softmax kernel at all.
        tie_qk=feature_map != "hedgehog" and not args.untie_qk,
        seed=args.seed,
        base_model=teacher_spec,
        **attention_settings(args),
    )
    return convert(loaded, config), teacher_spec


def summary_table(summary: dict[str, Any], teacher: str, model: Path) -> str:
    rows = [f"{'':<22}{'perplexity':>12}{'KL':>10}{'top-1 agree':>13}"]
    for stage, result in summary["validation"].items():
        rows.append(
            f"{'after ' + stage:<22}{result['perplexity']:>12.3f}{result['kl']:>10.4f}{result['top1_agreement']:>13.4f}"
        )
    rows.append(f"validation: held-out blocks of the training data, teacher {teacher}")
    rows.append(f"tokens {summary['tokens']:,}, wall time {summary['minutes']:.1f} min; model saved to {model}")
    return "\n".join(rows)
