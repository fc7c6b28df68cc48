"""Ship a trained converted model as a delta from its teacher: t2r/ready/ALIAS.{safetensors,json}.

    python scripts/make_ready_model.py --model runs/recipe-window-heavy/train/model --recipe window-heavy

The model must come from `scripts/recipe.py --recipe NAME` (its run folder's manifest.json and
summary.json are read for the record). The delta (`t2r.modeling.delta`) is what training changed
from the untrained conversion of the teacher: feature maps, window shares, and each LoRA-adapted
projection (a recipe with LoRA) as two rank-r factors. It is applied back here and the largest difference from the
model's weights recorded; the JSON keeps the teacher, the conversion settings, the recipe, the
SHA-256 of the delta file and of the model it came from. `t2r generate ALIAS` and
`hub.ready_model_folder(ALIAS)` make the model from these two files on first use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import safetensors.torch

from t2r.hub import load_converted, load_teacher
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.delta import apply_delta, make_delta, reconstruction_error

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the recipe's saved model folder")
    parser.add_argument("--recipe", required=True, help="the scripts/recipe.py recipe that trained it")
    parser.add_argument("--alias", default="t2r-smollm2-135m")
    parser.add_argument("--rank", type=int, default=8, help="the LoRA rank of the recipe")
    args = parser.parse_args()
    trained, _ = load_converted(args.model)
    settings = trained.config.to_dict()
    teacher_name = settings["base_model"]
    teacher, _ = load_teacher(teacher_name)
    untrained = convert(teacher, T2RConfig.from_dict(settings))
    delta = make_delta(untrained.state_dict(), trained.state_dict(), args.rank)
    apply_delta(untrained, delta)
    error = reconstruction_error(untrained, trained.state_dict())
    out = ROOT / "t2r" / "ready"
    out.mkdir(exist_ok=True)
    weights = out / f"{args.alias}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in delta.items()}, str(weights))
    run = args.model.parent
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    record = {
        "teacher": teacher_name,
        "t2r_config": settings,
        "sha256": sha256(weights),
        "recipe": f"python scripts/recipe.py --recipe {args.recipe}",
        "source_model_sha256": sha256(args.model / "model.safetensors"),
        "source_folder": str(args.model.resolve().relative_to(ROOT)),
        "max_abs_error": error,
        "tensors": {"whole": sum(1 for k in delta if not k.endswith((".delta_left", ".delta_right"))),
                    "factored": sum(1 for k in delta if k.endswith(".delta_left"))},
        "training": {"settings": manifest.get("settings"), **summary},
        "made_with": f"python scripts/make_ready_model.py --model {args.model} --recipe {args.recipe}",
    }  # fmt: skip
    (out / f"{args.alias}.json").write_text(json.dumps(record, indent=2))
    print(f"{weights}: {weights.stat().st_size / 2**20:.2f} MiB, {len(delta)} tensors; largest error {error:.3g}")


if __name__ == "__main__":
    main()
