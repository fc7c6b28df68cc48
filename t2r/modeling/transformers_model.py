"""A converted model as a transformers model: `AutoModelForCausalLM`, `generate()`, pipelines, the hub.

    import t2r  # registers model_type "t2r" with AutoConfig and AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generate(ids, attention_mask=mask, max_new_tokens=64)

`T2RModelForCausalLM` wraps t2r's own explicit-state model (`model.t2r`, a `T2RForCausalLM`: its
`forward(..., state=)` and `step` stay the library's paths). Its `forward` is transformers': a
prompt is prefilled through the chunked form, and every later single token through t2r's in-place
fast decode step (compiled after `compile_decode()`), so `generate()` costs what `t2r generate`
costs. The state travels in a `T2RCache` of constant size.

Loading and saving go through t2r's own folder format (`t2r.modeling.saved`): the weights file keeps
the names of `T2RForCausalLM`, so every folder t2r ever wrote loads, bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from t2r.errors import T2RError, one_line
from t2r.modeling.fast_decode import Decoder, FastState
from t2r.modeling.model import T2RForCausalLM
from t2r.modeling.model_card import render_folder
from t2r.modeling.quantize import with_weights
from t2r.modeling.recurrent_cache import T2RCache
from t2r.modeling.saved import (
    build_config,
    empty_model,
    load_converted_model,
    read_saved_config,
    write_model_files,
)
from t2r.modeling.transformers_config import T2RPretrainedConfig, config_from_saved


class T2RModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A converted causal LM for transformers. `self.t2r` is t2r's explicit-state model."""

    config_class = T2RPretrainedConfig
    base_model_prefix = "t2r"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _is_stateful = True  # a recurrent state: generate() must not assume it can crop or re-run tokens

    def __init__(self, config: T2RPretrainedConfig, model: T2RForCausalLM | None = None) -> None:
        super().__init__(config)
        if model is None:  # an empty model of this config (random weights), as transformers builds one
            from t2r.modeling.config import T2RConfig
            from t2r.modeling.convert import convert

            model = convert(empty_model(build_config(config.base_config)), T2RConfig.from_dict(config.t2r))
        self.t2r = model
        self._decode = Decoder()

    # ------------------------------------------------------------------ t2r's own API, passed through

    def init_state(self, batch: int) -> Any:
        return self.t2r.init_state(batch)

    def step(self, input_ids: torch.Tensor, state: Any, mask: torch.Tensor | None = None) -> Any:
        return self.t2r.step(input_ids, state, mask)

    def compile_decode(self, backend: str = "inductor") -> T2RModelForCausalLM:
        """Decode single tokens through `torch.compile`d fast steps (the first step compiles)."""
        self._decode = Decoder(compile=True, backend=backend)
        return self

    def with_weights(self, weight_format: str) -> T2RModelForCausalLM:
        """A copy whose projections are stored as fp32, bf16, int8 or int4 (`t2r.modeling.quantize`)."""
        return type(self)(self.config, with_weights(self.t2r, weight_format))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.t2r.base.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.t2r.base.get_output_embeddings()

    # ------------------------------------------------------------------ transformers' forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: T2RCache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        past_key_values: T2RCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] (new tokens only once `cache` holds a state), attention_mask [B, T_all]
        (1 real, 0 pad; only its last T columns are read). Returns logits [B, T, V] (or the last
        `logits_to_keep`) and the cache after these tokens."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("t2r models take input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, T2RCache):
            raise ValueError(f"a t2r model keeps its state in a T2RCache, not a {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = T2RCache()
        tokens = input_ids.shape[1]
        mask = None if attention_mask is None else attention_mask[:, -tokens:]
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        if cache is not None and cache.state is not None and tokens == 1 and (mask is None or bool(mask.all())):
            logits = self._decode(self.t2r, input_ids[:, 0], cache.state)[:, None]  # in place
        else:
            state = None if cache is None or cache.state is None else cache.state.to_model_state()
            logits, state = self.t2r(input_ids, mask, state, form="chunked", logits_to_keep=keep)
            if cache is not None:
                cache.state = FastState.from_model_state(state)
        if cache is not None:
            cache.tokens += tokens
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # ------------------------------------------------------------------ generate()

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        if model_kwargs.get("cache") is not None:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False:
            model_kwargs["cache"] = T2RCache()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: T2RCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the state has not consumed yet go in; the mask goes whole (its tail is read)."""
        if inputs_embeds is not None:
            raise ValueError("t2r models take input_ids (inputs_embeds are not supported)")
        seen = cache.get_seq_length() if cache is not None else 0
        if seen and input_ids.shape[1] > seen:
            input_ids = input_ids[:, seen:]
        inputs = {"input_ids": input_ids.contiguous(), "cache": cache, "attention_mask": attention_mask}
        for key in ("use_cache", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    # ------------------------------------------------------------------ files and the hub

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a converted folder (or hub repo). Extra keywords: `weights` ("fp32", "bf16", "int8",
        "int4": the decode weight format) and `compile_decode` (bool); `device_map` a device
        ("cpu", "cuda", "cuda:1") or None; `dtype` None, "auto" or float32 (lower precision is
        `weights=`, which keeps the state fp32)."""
        for unsupported in ("gguf_file", "quantization_config"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"t2r models do not take {unsupported}; use weights='int8' or 'int4' to quantise")
        folder = local_folder(str(pretrained_model_name_or_path), kwargs) / (kwargs.pop("subfolder", None) or "")
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if dtype not in (None, "auto", torch.float32, "float32"):
            raise ValueError(f"t2r models load in float32; for {dtype} weights pass weights='bf16' (or int8/int4)")
        saved = read_saved_config(folder)
        model = cls(config_from_saved(saved), load_converted_model(folder))
        weights, compiled = kwargs.pop("weights", "fp32"), kwargs.pop("compile_decode", False)
        if weights != "fp32":
            model = model.with_weights(weights)
        device = kwargs.pop("device_map", None)
        if isinstance(device, dict):  # accelerate's form of one device: {"": device}
            if len(set(device.values())) != 1:
                raise ValueError("t2r models load onto one device: pass device_map='cpu', 'cuda' or 'cuda:N'")
            device = next(iter(device.values()))
            device = f"cuda:{device}" if isinstance(device, int) else device
        if device not in (None, "auto"):
            model = model.to(device)
        if compiled:
            model.compile_decode()
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, *args: Any, push_to_hub: bool = False, **kwargs: Any):
        """Write the folder t2r reads (weights, config, remote-code shim, model card); other files stay."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a folder")
        config = self.config.to_saved_dict()
        write_model_files(self.t2r, folder, config, render_folder(folder, config))
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id") or folder.name, token=kwargs.get("token"))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Upload this model's folder (with its own model card) to the hub; one line if it cannot."""
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
            with tempfile.TemporaryDirectory() as work:
                self.save_pretrained(work)
                return api.upload_folder(
                    repo_id=repo.repo_id,
                    folder_path=work,
                    commit_message=commit_message or "Upload t2r model",
                    token=token,
                    revision=revision,
                    create_pr=create_pr,
                )
        except Exception as error:  # offline, no token, network: huggingface_hub raises many kinds
            raise T2RError(f"cannot push {repo_id!r} to the Hugging Face Hub (offline?): {one_line(error)}") from None


def local_folder(name: str, kwargs: dict[str, Any]) -> Path:
    """A local folder, or the snapshot of a hub repo (downloaded once, then from the cache)."""
    for ignored in ("trust_remote_code", "config", "low_cpu_mem_usage", "use_safetensors", "_from_auto"):
        kwargs.pop(ignored, None)
    hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, **hub_kwargs))
    except Exception as error:  # offline, no such repo, network: huggingface_hub raises many kinds
        raise T2RError(f"cannot load {name!r} from the Hugging Face Hub (offline?): {one_line(error)}") from None


def register() -> None:
    """Make model_type "t2r" known to AutoConfig and AutoModelForCausalLM with the real classes (done
    when this module loads; before that, `t2r.modeling.auto_registration` has them stand in)."""
    AutoConfig.register(T2RPretrainedConfig.model_type, T2RPretrainedConfig, exist_ok=True)
    AutoModelForCausalLM.register(T2RPretrainedConfig, T2RModelForCausalLM, exist_ok=True)


register()

__all__ = ["T2RCache", "T2RModelForCausalLM", "T2RPretrainedConfig", "config_from_saved", "register"]
