"""A converted folder is a transformers model: Auto classes, generate() with a recurrent cache,
pipelines, the hub, and folders of every format t2r wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

import t2r
from t2r.errors import T2RError
from t2r.hub import load_converted, save_converted
from t2r.inference.generate import generate_batch, left_padded
from t2r.inference.sampling import Sampling
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.recurrent_cache import T2RCache
from t2r.modeling.transformers_model import T2RModelForCausalLM

from .conftest import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]  # three lengths: left padding


def varied_teacher(family: str) -> torch.nn.Module:
    """A tiny teacher whose greedy continuations vary (at the default init they repeat a token)."""
    teacher = tiny_model(family)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if parameter.ndim == 2 and not any(word in name for word in ("emb", "wte", "wpe")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return teacher


def saved_model(folder: Path, family: str = "llama", **settings) -> Path:
    settings = {"feature_map": "hedgehog", "window": 4, "sinks": 2, "half_life": 3, **settings}
    save_converted(convert(varied_teacher(family), T2RConfig(**settings)), tiny_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model(tmp_path_factory.mktemp("hf") / "llama")


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded([torch.tensor(p) for p in PROMPTS])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_emits_what_t2r_generate_emits(family: str, tmp_path: Path) -> None:
    folder = saved_model(tmp_path / family, family)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, T2RModelForCausalLM)
    ids, mask = batch()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    expected = generate_batch(model.t2r, [torch.tensor(p) for p in PROMPTS], 64, Sampling(greedy=True))
    assert out[:, ids.shape[1] :].tolist() == [result.new_tokens for result in expected]
    assert len({token for row in out.tolist() for token in row}) > 10  # the continuations vary


def test_generate_matches_the_command_line(llama_folder: Path, capfd) -> None:
    """`t2r generate --greedy` with three prompts prints exactly what generate() decodes."""
    from t2r.cli import main

    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    texts = ["It is a truth universally", "Call me", "The history of the world is"]
    argv = ["generate", str(llama_folder), "--greedy", "--max-new-tokens", "24", "--ignore-eos"]
    assert main([*argv, *(arg for text in texts for arg in ("--prompt", text))]) == 0
    printed = capfd.readouterr().out
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=None)
    for text, row in zip(texts, out[:, inputs.input_ids.shape[1] :], strict=True):
        assert f"--- {text!r}\n{text}{tokenizer.decode(row, skip_special_tokens=True)}\n" in printed


def test_compiled_and_smaller_weights_decode_inside_generate(llama_folder: Path) -> None:
    from t2r.modeling.quantize import Int4Linear

    ids, mask = batch()
    prompts = [torch.tensor(p) for p in PROMPTS]
    compiled = AutoModelForCausalLM.from_pretrained(llama_folder).compile_decode(backend="aot_eager")
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = generate_batch(compiled.t2r, prompts, 8, Sampling(greedy=True))
    assert out[:, ids.shape[1] :].tolist() == [result.new_tokens for result in expected]
    small = AutoModelForCausalLM.from_pretrained(llama_folder, weights="int4")
    assert any(isinstance(module, Int4Linear) for module in small.t2r.modules())
    out = small.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = generate_batch(small.t2r, prompts, 8, Sampling(greedy=True))
    assert out[:, ids.shape[1] :].tolist() == [result.new_tokens for result in expected]


def test_forward_equals_t2r_and_gives_a_loss(llama_folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    ids, mask = batch()
    output = model(ids, attention_mask=mask, labels=ids)
    logits, _ = model.t2r(ids, mask)
    torch.testing.assert_close(output.logits, logits, rtol=0, atol=0)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(output.loss, expected)
    assert isinstance(output.cache, T2RCache) and output.cache.get_seq_length() == ids.shape[1]


def test_the_cache_keeps_its_size(llama_folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    ids, mask = batch()

    def cache_after(new_tokens: int) -> T2RCache:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            return_dict_in_generate=True,
        )  # fmt: skip
        assert out.sequences.shape[1] == ids.shape[1] + new_tokens
        return out.cache

    short, long = cache_after(64), cache_after(512)
    assert long.get_seq_length() == ids.shape[1] + 511  # the last token is emitted, never fed
    assert short.nbytes() == long.nbytes() > 0


def test_beam_search_reorders_the_state(llama_folder: Path) -> None:
    """Beam search through the recurrent cache (rows reordered every step) finds what it finds
    without a cache (the whole sequence re-run every step)."""
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    ids, mask = batch()
    settings = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    cached = model.generate(ids, attention_mask=mask, **settings)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    assert cached.shape == (6, ids.shape[1] + 12)
    assert cached.tolist() == uncached.tolist()


def test_sampling_penalties_stop_strings_and_streaming(llama_folder: Path, capsys) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    ids, mask = batch()
    settings = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=16, eos_token_id=None)
    torch.manual_seed(3)
    first = model.generate(ids, attention_mask=mask, num_return_sequences=2, **settings)
    torch.manual_seed(3)
    again = model.generate(ids, attention_mask=mask, num_return_sequences=2, **settings)
    assert first.shape[0] == 6 and first.tolist() == again.tolist()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    penalised = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, repetition_penalty=5.0
    )
    assert penalised.tolist() != greedy.tolist()
    words = [(i, tokenizer.decode(t)) for i, t in enumerate(greedy[0, ids.shape[1] :].tolist())]
    at, stop = next((i, word) for i, word in words if i > 0 and word.strip().isalpha() and len(word.strip()) > 1)
    stopped = model.generate(
        ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer
    )
    assert stopped.shape[1] <= ids.shape[1] + at + 1 < ids.shape[1] + 16
    assert tokenizer.decode(stopped[0, ids.shape[1] :]).endswith(stop)
    streamed = model.generate(ids[:1], max_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer))
    assert tokenizer.decode(streamed[0, ids.shape[1] :]) in capsys.readouterr().out


def test_pipeline_with_chat_messages(llama_folder: Path) -> None:
    generator = pipeline("text-generation", model=str(llama_folder))
    assert isinstance(generator.model, T2RModelForCausalLM)
    reply = generator([{"role": "user", "content": "Call me Ishmael"}], max_new_tokens=8, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(generator("It is a truth", max_new_tokens=8)[0]["generated_text"], str)


def test_trust_remote_code_loads_without_importing_t2r(llama_folder: Path, tmp_path: Path) -> None:
    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(llama_folder)!r}, trust_remote_code=True)\n"
        "print(type(model).__name__, 't2r' in sys.modules)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["T2RModelForCausalLM", "True"]  # t2r came in through the folder's loader


@pytest.mark.parametrize(
    "imports",
    [
        "import t2r\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModelForCausalLM\nimport t2r",
    ],
)
def test_import_t2r_registers_before_or_after_transformers(llama_folder: Path, imports: str) -> None:
    """A fresh process: `import t2r` (which imports no transformers) before or after transformers'
    Auto classes, then the folder loads as the real class, without trust_remote_code."""
    code = (
        f"import sys\n{imports}\n"
        "lazy = 't2r.modeling.transformers_model' not in sys.modules\n"
        f"config = AutoConfig.from_pretrained({str(llama_folder)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(llama_folder)!r})\n"
        "from t2r.modeling.transformers_model import T2RModelForCausalLM\n"
        "print(type(config).__name__, type(model) is T2RModelForCausalLM, lazy)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["T2RPretrainedConfig", "True", "True"]


def test_save_pretrained_round_trip_and_card(llama_folder: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "notes.txt").write_text("kept")
    model.save_pretrained(tmp_path / "copy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "copy" / "notes.txt").read_text() == "kept"
    card = (tmp_path / "copy" / "README.md").read_text()
    assert "library_name: t2r" in card and "hedgehog" in card and "| window | 4 |" in card
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["model_type"] == "t2r" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_t2r.")


def test_push_to_hub_uploads_the_folder_and_fails_in_one_line_offline(
    llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    with pytest.raises(T2RError, match=r"cannot push 'me/tiny' to the Hugging Face Hub \(offline\?\)") as caught:
        model.push_to_hub("me/tiny")
    assert "\n" not in str(caught.value)
    uploaded: dict[str, list[str]] = {}

    class Repo:
        repo_id = "me/tiny"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs) -> None:
        uploaded[repo_id] = sorted(os.listdir(folder_path))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model.push_to_hub("me/tiny")
    assert uploaded["me/tiny"] == ["README.md", "config.json", "model.safetensors", "modeling_t2r.py"]


def test_folders_of_format_1_load_and_upgrade(llama_folder: Path, tmp_path: Path, capfd) -> None:
    """A folder as t2r wrote it before format 2 (config.json: format_version, t2r, base_config)."""
    import shutil

    from t2r.cli import main

    old = tmp_path / "old"
    shutil.copytree(llama_folder, old)
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(
        json.dumps({key: saved[key] for key in ("t2r", "base_config")} | {"format_version": 1})
    )
    for name in ("modeling_t2r.py", "README.md"):
        (old / name).unlink()
    model, _ = load_converted(old)  # t2r reads it as it is
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(old)  # transformers cannot: no model_type
    assert main(["upgrade", str(old)]) == 0
    assert "format 1 -> 2" in capfd.readouterr().out
    upgraded = AutoModelForCausalLM.from_pretrained(old)
    for (name, a), (_, b) in zip(model.state_dict().items(), upgraded.t2r.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_folders_fail_with_one_clear_message(llama_folder: Path, teacher_folder: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(T2RError, match="not a t2r model folder"):
        T2RModelForCausalLM.from_pretrained(teacher_folder)
    newer = tmp_path / "newer"
    shutil.copytree(llama_folder, newer)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(T2RError, match="newer t2r"):
        AutoModelForCausalLM.from_pretrained(newer)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama_folder, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(T2RError, match="corrupt or truncated weights"):
        AutoModelForCausalLM.from_pretrained(corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(T2RError, match=r"config\.json: unreadable"):
        T2RModelForCausalLM.from_pretrained(corrupt)
    with pytest.raises(OSError, match="not a valid JSON file"):  # transformers reads the config first
        AutoModelForCausalLM.from_pretrained(corrupt)
    with pytest.raises(T2RError, match="offline"):
        T2RModelForCausalLM.from_pretrained("someone/no-such-t2r-model")


def test_eval_keeps_its_score_in_the_model_card(llama_folder: Path, text_file: Path, tmp_path: Path) -> None:
    import shutil

    from t2r.cli import main

    folder = tmp_path / "model"
    shutil.copytree(llama_folder, folder)
    assert main(["eval", str(folder), "--data", str(text_file), "--seq-len", "32", "--max-tokens", "200"]) == 0
    scores = json.loads((folder / "eval_results.json").read_text())
    assert len(scores) == 1 and scores[0]["tokens"] > 0
    assert f"{scores[0]['perplexity']:.3f}" in (folder / "README.md").read_text()
    assert main(["eval", str(folder), "--data", str(text_file), "--seq-len", "32", "--max-tokens", "200"]) == 0
    assert len(json.loads((folder / "eval_results.json").read_text())) == 1  # a rerun replaces its entry


def test_import_t2r_registers_the_model_type() -> None:
    from transformers import AutoConfig

    assert t2r.T2RModelForCausalLM is T2RModelForCausalLM
    assert type(AutoConfig.for_model("t2r")).__name__ == "T2RPretrainedConfig"


@pytest.mark.slow
def test_generate_on_the_ready_model_emits_what_t2r_generate_emits() -> None:
    """The real default model, trained (the shipped hybrid-kv recipe's model): three chat prompts of
    different lengths, left-padded, 64 greedy tokens."""
    from t2r.hub import ready_model_folder

    folder = ready_model_folder("t2r-smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    questions = [
        "Hi!",
        "Write a haiku about rain in the mountains.",
        "List three uses of copper in electrical engineering and explain each one briefly.",
    ]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(inputs.attention_mask.sum(1).tolist())) == 3
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False, eos_token_id=None)
    prompts = [torch.tensor(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    expected = generate_batch(model.t2r, prompts, 64, Sampling(greedy=True))
    assert out[:, inputs.input_ids.shape[1] :].tolist() == [result.new_tokens for result in expected]
