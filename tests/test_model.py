"""Model level, on tiny random models of every supported family: the three forms agree, padding is
invisible, the state does not grow, save -> load is bit-identical, the teacher's weights are untouched."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from t2r.hub import load_converted, save_converted
from t2r.modeling.adapters import adapter_for
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.ops.state import HybridAttentionState, KVCacheState
from tests.conftest import FAMILIES, MORE_FAMILIES, VOCAB, tiny_model, tiny_tokenizer

# Logits of the tiny models are O(1)-O(10); two forms of the same model (parallel, chunked, one step
# at a time) sum the same products in another order, ~1e-6 apart in fp32 per layer; 1e-4 absolute
# leaves ~100x for the layers compounding and another machine's BLAS (AVX-512 vs AVX2 kernels).
TOLERANCE = 1e-4


WINDOWS = [0, 5]  # pure linear, and a hybrid whose window is shorter than the test sequences


def trained_looking_model(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter: maps and shares that are not the identity init."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def converted(family: str, feature_map: str = "t2r", **kwargs) -> torch.nn.Module:
    kwargs.setdefault("window", 5)
    kwargs.setdefault("rotary_features", kwargs["window"] == 0)
    kwargs.setdefault("half_life", 3 if kwargs["window"] else 0)  # forgets fast: the decay is tested
    kwargs.setdefault("sinks", 3 if kwargs["window"] else 0)  # left padding puts row 1's sinks later
    return convert(tiny_model(family), T2RConfig(feature_map=feature_map, chunk_size=16, **kwargs))


def state_tensors(layer_state) -> list[torch.Tensor]:
    """Every tensor of one layer's state (linear, hybrid or KV cache), in a fixed order."""
    if isinstance(layer_state, HybridAttentionState):
        linear = layer_state.linear
        window = [layer_state.keys, layer_state.values, layer_state.linear_keys]
        tensors = [linear.kv, linear.k_sum, *window, layer_state.sink_keys, layer_state.sink_values]
        return [x for x in tensors if x.numel()]  # a layer with no linear part (or no sinks) has empty ones
    if isinstance(layer_state, KVCacheState):
        return [layer_state.keys, layer_state.values]
    return [layer_state.kv, layer_state.k_sum]


def left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 40 and 27 tokens, the second left-padded with token 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 40), generator=generator)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0
    ids[1, :13] = 0
    return ids, mask


def softmax_logits_through_adapter(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's own softmax attention, driven by the adapter's pieces: must equal HF's forward."""
    adapter = adapter_for(model.config.model_type)
    positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
    hidden = adapter.embed(model, input_ids, positions)
    rotary = adapter.rotary(model, hidden, positions)
    for layer in adapter.layers(model):
        attention = adapter.attention(layer)

        def attend(x: torch.Tensor, attention=attention) -> torch.Tensor:
            q, k, v = adapter.project(attention, x, rotary)
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            slots = torch.arange(q.shape[2])
            allowed = slots[None, :] <= slots[:, None]
            window = adapter.sliding_window(attention)
            if window is not None:  # the teacher's local layers
                allowed = allowed & (slots[None, :] > slots[:, None] - window)
            scores = q @ k.transpose(-1, -2) * adapter.softmax_scale(attention)
            cap = adapter.softcap(attention)
            scores = scores if cap is None else torch.tanh(scores / cap) * cap  # Gemma 2
            out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
            return adapter.output(attention, out.transpose(1, 2).flatten(2))

        hidden = adapter.block(layer, hidden, attend)
    return adapter.head(model, hidden)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_adapter_reproduces_the_teacher(family: str) -> None:
    teacher = tiny_model(family)
    ids = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    expected = teacher(ids).logits
    assert (softmax_logits_through_adapter(teacher, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_non_attention_weights_stay_bit_identical(family: str) -> None:
    teacher = tiny_model(family)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    model = convert(teacher, T2RConfig())
    after = {
        name.removeprefix("base.").replace(".projections.", "."): tensor
        for name, tensor in model.state_dict().items()
        if ".feature_map_" not in name and not name.endswith(".window_logit")
    }
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("feature_map", ["elu", "rfa", "t2r", "hedgehog"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_full_forward_equals_prefill_then_decode(family: str, feature_map: str, window: int) -> None:
    model = converted(family, feature_map, tie_qk=feature_map != "hedgehog", window=window)
    assert_prefill_then_decode_equals_full_forward(model, prefix=17)


@pytest.mark.parametrize("feature_map", ["elu", "rfa", "t2r", "hedgehog"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_linear_state_per_kv_head_runs_every_form_alike(family: str, feature_map: str) -> None:
    """--linear-heads kv: the three forms agree, and the state's linear part has G heads (H / G
    times fewer bytes than per query head, the rest of the state the same)."""
    model = converted(family, feature_map, tie_qk=feature_map != "hedgehog", linear_heads="kv")
    assert_prefill_then_decode_equals_full_forward(model, prefix=17)
    per_query = converted(family, feature_map, tie_qk=feature_map != "hedgehog")
    shape = model.attentions[0].shape
    for kv_layer, query_layer in zip(model.init_state(1).layers, per_query.init_state(1).layers, strict=True):
        assert kv_layer.linear.kv.shape[1] == shape.kv_heads
        assert kv_layer.linear.nbytes() * shape.query_heads == query_layer.linear.nbytes() * shape.kv_heads
        assert kv_layer.nbytes() - kv_layer.linear.nbytes() == query_layer.nbytes() - query_layer.linear.nbytes()


@torch.no_grad()
def test_with_a_linear_state_per_kv_head_a_query_reads_its_groups_state() -> None:
    """Query head h goes through map head h // (H / G), the map of its key/value head (the ops
    tests check that it then reads that head's state)."""
    model = trained_looking_model(converted("llama", "hedgehog", tie_qk=False, linear_heads="kv"))
    attention = model.attentions[0]
    assert attention.feature_map_q.heads == attention.shape.kv_heads == 2
    q = torch.randn(1, 4, 3, attention.shape.head_dim, generator=torch.Generator().manual_seed(0))
    phi_q = attention.query_features(q)
    for h in range(4):
        own = attention.feature_map_q(q[:, h : h + 1].expand(1, 2, 3, -1))[:, h // 2]
        assert torch.allclose(phi_q[:, h], own, atol=1e-6)
        other = attention.feature_map_q(q[:, h : h + 1].expand(1, 2, 3, -1))[:, 1 - h // 2]
        assert (phi_q[:, h] - other).abs().max() > 1e-3


@torch.no_grad()
def test_decode_fills_the_sinks_a_short_prompt_left_empty() -> None:
    """Row 1 has one real token in the prefill; decoding takes its next two tokens as sinks."""
    assert_prefill_then_decode_equals_full_forward(converted("qwen2", "hedgehog", tie_qk=False), prefix=14)


ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox")
SHORT_CONTEXT = 24  # a teacher context the 40-token test batch runs past


def with_teacher_context(model: torch.nn.Module, context: int) -> torch.nn.Module:
    model.base.config.max_position_embeddings = context
    return model


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
@torch.no_grad()
def test_forms_agree_past_the_teacher_context(family: str) -> None:
    """Past the context the sinks are scored from capped positions: still one computation in every form."""
    model = with_teacher_context(converted(family, "hedgehog", tie_qk=False), SHORT_CONTEXT)
    assert_prefill_then_decode_equals_full_forward(model, prefix=17)


@torch.no_grad()
def test_sinks_are_scored_from_the_last_position_of_the_teacher_context() -> None:
    """With the whole share on the softmax part, a token past the context sees its window (relative
    offsets) and the sinks at the capped offset only: how far past the context it is cannot matter.
    Two streams, same 3 sink tokens and same 10-token tail after 30 or 40 filler tokens, must give
    the same last logits (and do not when nothing is capped)."""
    generator = torch.Generator().manual_seed(4)
    head, tail = (
        torch.randint(3, VOCAB, (1, 3), generator=generator),
        torch.randint(3, VOCAB, (1, 10), generator=generator),
    )
    streams = [torch.cat([head, torch.full((1, filler), 7), tail], 1) for filler in (30, 40)]  # tails past 24
    model = converted("llama", "hedgehog", tie_qk=False)
    for attention in model.attentions:
        attention.window_logit.fill_(30.0)  # sigmoid -> 1.0 in fp32: the linear part weighs exactly 0
    last = []
    for context in (SHORT_CONTEXT, 10**6):
        with_teacher_context(model, context)
        last.append([model(ids, form="chunked")[0][0, -1] for ids in streams])
    capped, uncapped = last
    assert (capped[0] - capped[1]).abs().max() <= 1e-5
    assert (uncapped[0] - uncapped[1]).abs().max() > 1e-3


def assert_prefill_then_decode_equals_full_forward(model: torch.nn.Module, prefix: int) -> None:
    ids, mask = left_padded_batch()
    full, full_state = model(ids, mask, form="parallel")
    chunked, _ = model(ids, mask, form="chunked")
    assert (chunked - full)[mask.bool()].abs().max() <= TOLERANCE

    logits, state = model(ids[:, :prefix], mask[:, :prefix], form="chunked")
    steps = [logits]
    for t in range(prefix, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state, mask[:, t])
        steps.append(step_logits[:, None])
    decoded = torch.cat(steps, 1)
    assert (decoded - full)[mask.bool()].abs().max() <= TOLERANCE
    for a, b in zip(state.layers, full_state.layers, strict=True):
        for x, y in zip(state_tensors(a), state_tensors(b), strict=True):
            assert (x - y).abs().max() <= TOLERANCE * max(1.0, y.abs().max().item())
    assert torch.equal(state.seen, mask.sum(1))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_softmax_layers_are_exact_and_decode_with_a_cache(family: str) -> None:
    """Layers kept as softmax: all of them reproduce the teacher; some of them decode exactly."""
    ids, mask = left_padded_batch()
    teacher = tiny_model(family)
    everything = converted(family, softmax_layers=(0, 1))
    assert (everything(ids[:1])[0] - teacher(ids[:1]).logits).abs().max() <= 1e-5

    model = converted(family, "hedgehog", tie_qk=False, softmax_layers=(1,))
    full, _ = model(ids, mask, form="parallel")
    logits, state = model(ids[:, :17], mask[:, :17], form="chunked")
    steps = [logits]
    for t in range(17, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state, mask[:, t])
        steps.append(step_logits[:, None])
    assert (torch.cat(steps, 1) - full)[mask.bool()].abs().max() <= TOLERANCE
    cache = state.layers[1]
    assert isinstance(cache, KVCacheState) and cache.keys.shape[2] == ids.shape[1]
    shape = model.attentions[1].shape
    assert state.bytes_per_token() == 2 * shape.kv_heads * shape.head_dim * 4 + 1


def test_softmax_layer_out_of_range_is_refused() -> None:
    from t2r.errors import UsageError

    with pytest.raises(UsageError, match="the model has 2 layers"):
        converted("llama", softmax_layers=(2,))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
@pytest.mark.parametrize("window", WINDOWS)
def test_left_padding_is_invisible(family: str, window: int) -> None:
    """The padded row gives the same logits as the same tokens run alone, unpadded."""
    model = converted(family, window=window)
    ids, mask = left_padded_batch()
    batch_logits, _ = model(ids, mask)
    alone, _ = model(ids[1:, 13:])
    assert (batch_logits[1, 13:] - alone[0]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("window", [0, 64])
@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "gpt2"])
@torch.no_grad()
def test_state_size_does_not_depend_on_context(family: str, window: int) -> None:
    """Same bytes after 256 and 32,768 tokens (GPT-2's learned positions stop at 1,024)."""
    model = converted(family, window=window)
    generator = torch.Generator().manual_seed(2)
    sizes = []
    for length in (256, 32768):
        _, state = model(torch.randint(3, VOCAB, (1, length), generator=generator))
        _, state = model.step(torch.tensor([5]), state)
        sizes.append(state.nbytes())
        assert [t.shape for t in state_tensors(state.layers[0])] == [t.shape for t in state_tensors(state.layers[-1])]
    assert sizes[0] == sizes[1] == model.init_state(1).nbytes()
    assert state.bytes_per_token() == 0


# Every family: a load builds the model without initialising its parameters (each comes from the
# file), so a buffer or a tie that only the initialisation would have made shows up here.
@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
@torch.no_grad()
def test_save_load_round_trip_is_bit_identical(family: str, tmp_path: Path) -> None:
    model = converted(family, "hedgehog", tie_qk=False)
    # Make every feature-map parameter non-default, as after training.
    for name, parameter in model.named_parameters():
        if "feature_map" in name:
            parameter.add_(torch.randn_like(parameter) * 0.01)
    save_converted(model, tiny_tokenizer(), tmp_path / "model")
    loaded, tokenizer = load_converted(tmp_path / "model")
    assert tokenizer("hello world").input_ids == tiny_tokenizer()("hello world").input_ids
    original, loaded_state = model.state_dict(), loaded.state_dict()
    assert original.keys() == loaded_state.keys()
    assert all(torch.equal(original[key], loaded_state[key]) for key in original)
    ids, mask = left_padded_batch()
    assert torch.equal(model(ids, mask)[0], loaded(ids, mask)[0])
    assert loaded.config == model.config


def test_tied_feature_map_is_one_module() -> None:
    model = converted("llama", "t2r", tie_qk=True)
    assert all(attention.feature_map_k is None for attention in model.attentions)
    untied = converted("llama", "t2r", tie_qk=False)
    attention = untied.attentions[0]
    assert not torch.equal(attention.feature_map_q.weight, attention.feature_map_k.weight)


def test_conversion_is_deterministic_by_seed() -> None:
    a, b = converted("llama", "rfa", seed=3), converted("llama", "rfa", seed=3)
    c = converted("llama", "rfa", seed=4)
    omega = [m.attentions[0].feature_map_q.omega for m in (a, b, c)]
    assert torch.equal(omega[0], omega[1]) and not torch.equal(omega[0], omega[2])


def test_gradients_flow_to_feature_maps_through_chunked_form() -> None:
    model = converted("llama", "t2r")
    ids, mask = left_padded_batch()
    logits, _ = model(ids, mask, form="chunked")
    logits.logsumexp(-1).mean().backward()
    for parameter in (model.attentions[0].feature_map_q.weight, model.attentions[0].window_logit):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_unsupported_architecture_is_refused() -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    from t2r.errors import UsageError

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UsageError, match="'bloom' is not supported; supported: gemma, gemma2, gemma3_text, gpt2"):
        convert(copy.deepcopy(bloom), T2RConfig())


def test_interrupted_save_leaves_nothing_that_loads(tmp_path: Path) -> None:
    """A save that dies part-way (here: while writing the tokenizer) leaves no folder at all."""
    model = converted("llama")

    class DyingTokenizer:
        def save_pretrained(self, folder: str) -> None:
            (Path(folder) / "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_converted(model, DyingTokenizer(), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_model_in_one_step(tmp_path: Path) -> None:
    first, second = converted("llama", seed=1), converted("llama", seed=2)
    save_converted(first, tiny_tokenizer(), tmp_path / "model")
    save_converted(second, tiny_tokenizer(), tmp_path / "model", overwrite=True)
    loaded, _ = load_converted(tmp_path / "model")
    assert loaded.config.seed == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_gpt2_refuses_positions_past_its_table() -> None:
    from t2r.errors import T2RError

    model = converted("gpt2")
    limit = model.base.config.n_positions
    _, state = model(torch.randint(3, VOCAB, (1, 4)))
    far = dataclasses.replace(state, seen=torch.tensor([limit]))
    with pytest.raises(T2RError, match="learned positions"):
        model.step(torch.tensor([5]), far)
