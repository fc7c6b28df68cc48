"""More Llama-shaped families through the one decoder adapter, each with the four checks: every layer
kept as softmax is the teacher, the three forms agree, the fast step is the reference step, and int8
/ int4 decoding follows it. A family the adapter does not know is refused in one line."""

from __future__ import annotations

import pytest
import torch

from t2r.modeling.fast_decode import fast_step
from t2r.modeling.quantize import with_weights
from tests.conftest import MORE_FAMILIES, VOCAB, tiny_model
from tests.test_fast_decode import INT4_TOLERANCE, assert_fast_path_matches_reference, quantised_tolerance
from tests.test_model import (
    assert_prefill_then_decode_equals_full_forward,
    converted,
    left_padded_batch,
    softmax_logits_through_adapter,
    trained_looking_model,
)


@pytest.mark.parametrize("family", MORE_FAMILIES)
@torch.no_grad()
def test_every_layer_kept_as_softmax_is_the_teacher(family: str) -> None:
    teacher = tiny_model(family)
    ids = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    expected = teacher(ids).logits
    assert (softmax_logits_through_adapter(teacher, ids) - expected).abs().max() <= 1e-5
    everything = converted(family, softmax_layers=(0, 1))
    assert (everything(ids)[0] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("family", MORE_FAMILIES)
@torch.no_grad()
def test_the_three_forms_agree(family: str, window: int) -> None:
    model = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=window))
    assert_prefill_then_decode_equals_full_forward(model, prefix=17)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_the_fast_step_is_the_reference_step(family: str) -> None:
    model = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    assert_fast_path_matches_reference(model, fast_step)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_quantized_decoding_follows_the_reference(family: str, weights: str) -> None:
    torch.manual_seed(0)
    model = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    assert_fast_path_matches_reference(with_weights(model, weights), fast_step, tolerance=quantised_tolerance(weights))


def test_a_family_the_adapter_does_not_know_is_refused_in_one_line(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    from t2r.cli import main
    from tests.conftest import tiny_tokenizer

    # BLOOM: ALiBi biases instead of positions, a fused per-head query_key_value: not Llama-shaped.
    config = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    capsys.readouterr()  # the save's own progress bar
    assert main(["convert", "--model", str(tmp_path / "teacher"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "'bloom' is not supported" in error[0]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@torch.no_grad()
def test_local_layers_kept_in_a_ring_buffer_are_the_teacher(family: str) -> None:
    """--keep-local: layer 0 (the teacher's window of 8) stays its exact softmax in a ring buffer; with
    the global layer kept as softmax too, every form reproduces the teacher over 40 tokens (5 windows)."""
    teacher = tiny_model(family)
    model = converted(family, keep_local=True, softmax_layers=(1,))
    local = model.attentions[0]
    assert local.window == 8 and local.feature_dim == 0 and local.sinks == 0
    ids = left_padded_batch()[0][:1]
    expected = teacher(ids).logits
    for form in ("parallel", "chunked", "recurrent"):
        assert (model(ids, form=form)[0] - expected).abs().max() <= 1e-5, form
    logits, state = model(ids[:, :11])
    steps = [logits]
    for t in range(11, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state)
        steps.append(step_logits[:, None])
    assert (torch.cat(steps, 1) - expected).abs().max() <= 1e-5
    assert state.layers[0].keys.shape[2] == 8  # the ring holds the window, not the 40 tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_local_layers_kept_beside_a_converted_global_layer(family: str) -> None:
    """The global layer converted (hybrid), the local one kept: forms, fast step and int4 agree, and the
    state is as big after 40 tokens as before the first."""
    model = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5, keep_local=True))
    assert model.attentions[0].feature_dim == 0 and model.attentions[1].feature_dim > 0
    with torch.no_grad():
        assert_prefill_then_decode_equals_full_forward(model, prefix=17)
        ids, mask = left_padded_batch()
        assert model(ids, mask)[1].nbytes() == model.init_state(2).nbytes()
    assert_fast_path_matches_reference(model, fast_step)
    assert_fast_path_matches_reference(with_weights(model, "int4"), fast_step, tolerance=INT4_TOLERANCE)


def test_convert_keep_local_says_what_it_kept(tmp_path, capsys) -> None:
    from t2r.cli import main
    from t2r.hub import load_converted
    from tests.conftest import save_teacher

    teacher = save_teacher(tmp_path / "teacher", "gemma3_text")
    capsys.readouterr()
    out = tmp_path / "out"
    flags = ["--feature-map", "hedgehog", "--keep-local", "--out", str(out)]
    assert main(["convert", "--model", str(teacher), *flags]) == 0
    assert "1 local kept exact over their window of 8 (ring buffer)" in capsys.readouterr().err
    model, _ = load_converted(out)  # the setting is saved: the local layer comes back as it was
    assert model.config.keep_local and model.attentions[0].feature_dim == 0 and model.attentions[1].feature_dim > 0
