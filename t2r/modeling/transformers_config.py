"""The transformers config of a converted folder (config.json, model_type "t2r"), and what that
file carries for the Auto classes.

It imports transformers' configuration code only (no model classes, no torch.distributed), so that
AutoConfig learns the model type the moment transformers' own `configuration_auto` loads
(`t2r.modeling.auto_registration`), whatever imported it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers.configuration_utils import PretrainedConfig

if TYPE_CHECKING:
    from t2r.modeling.model import T2RForCausalLM

# The folder format t2r writes (t2r.modeling.saved reads every version up to it).
FORMAT_VERSION = 2
ARCHITECTURE = "T2RModelForCausalLM"  # the class in t2r.modeling.transformers_model
# Where `trust_remote_code=True` finds the classes: the folder's modeling_t2r.py, which imports t2r's.
AUTO_MAP = {
    "AutoConfig": "modeling_t2r.T2RPretrainedConfig",
    "AutoModelForCausalLM": f"modeling_t2r.{ARCHITECTURE}",
}
# Generic token and vocabulary fields of the teacher's config that generate() and pipelines read.
MIRRORED_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class T2RPretrainedConfig(PretrainedConfig):
    """model_type "t2r". t2r: the T2RConfig as a dict; base_config: the teacher's config as a dict."""

    model_type = "t2r"

    def __init__(
        self,
        t2r: dict[str, Any] | None = None,
        base_config: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.use_cache = use_cache
        self.t2r = dict(t2r or {})
        self.base_config = dict(base_config or {})
        self.format_version = format_version
        for field in MIRRORED_FIELDS:
            if field in self.base_config:
                kwargs.setdefault(field, self.base_config[field])
        # The wrapped model owns its weights (tied ones included): nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_model(cls, model: T2RForCausalLM) -> T2RPretrainedConfig:
        return cls(t2r=model.config.to_dict(), base_config=model.base.config.to_dict())

    def to_saved_dict(self) -> dict[str, Any]:
        """config.json of a folder: this config, with what makes it load through the Auto classes."""
        values = self.to_dict()
        values.update(
            format_version=FORMAT_VERSION,
            architectures=[ARCHITECTURE],
            auto_map=dict(AUTO_MAP),
            model_type=self.model_type,
        )
        return values


def config_from_saved(saved: dict[str, Any]) -> T2RPretrainedConfig:
    """The transformers config of a folder's config.json (format 1 or 2)."""
    fields = {key: value for key, value in saved.items() if key not in ("model_type", "auto_map", "architectures")}
    fields.pop("transformers_version", None)
    return T2RPretrainedConfig(**fields)


__all__ = ["ARCHITECTURE", "AUTO_MAP", "FORMAT_VERSION", "T2RPretrainedConfig", "config_from_saved"]
