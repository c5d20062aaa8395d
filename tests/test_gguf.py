"""lfm_mlx.gguf: layouts, metadata, bad input, atomicity; parity with MLX in a real llama.cpp (slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from lfm_mlx.fsutil import atomic_dir
from lfm_mlx.gguf import (
    compute_imatrix,
    export_gguf,
    gguf_tensor_types,
    main,
    open_gguf,
    portable_chat_template,
    quantize_gguf,
)
from lfm_mlx.model.io import load, save_model_dir
from lfm_mlx.model.synthetic import PRESETS, hf_config, write_synthetic_model, write_tokenizer, write_weights

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_files", "description": "Find files by name",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
ODD_CALL = {"type": "function", "function": {"name": "search_files", "arguments": {
    "query": "it's a \\ test\nline", "limit": 5, "exact": True, "filters": {"ext": [".py", ".md"]}, "since": None}}}
# A fixed prompt set: (messages, tools, add_generation_prompt).
CHATS = [
    ([{"role": "user", "content": "What is the weather in Paris today?"}], TOOLS, True),
    ([{"role": "system", "content": "You are a careful assistant."},
      {"role": "user", "content": "Find the config file and show its path."}], TOOLS, True),
    ([{"role": "user", "content": "Weather in Paris for three days, please."},
      {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
      {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
      {"role": "assistant", "content": "It is 21 degrees and clear."}], TOOLS, False),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Search my files for the test notes."},
      {"role": "assistant", "content": "Searching now.", "tool_calls": [ODD_CALL, WEATHER_CALL]},
      {"role": "tool", "content": "[\"notes/test.md\"]"},
      {"role": "user", "content": "Thanks! Now open the first one."}], TOOLS, True),
    ([{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine, thanks."},
      {"role": "user", "content": "Show me the build status and the error log."}], None, True),
]


def write_custom(out: Path, base: str = "tiny-moe", tokenizer_vocab: int | None = None, **overrides) -> Path:
    """A synthetic HF directory with preset `base` changed by `overrides` (e.g. wider layers)."""
    spec = dict(PRESETS[base])
    spec.update(overrides)
    config = hf_config(spec)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp, tokenizer_vocab or config["vocab_size"])
        write_weights(tmp, config, seed=3)
    return out


@pytest.fixture(scope="session")
def dirs(tiny_moe_dir, tiny_dense_dir, tiny_moe_mixed_dir, tmp_path_factory) -> dict[str, Path]:
    """HF per-expert / fused-expert / dense dirs, a mixed dir, a bf16 MLX dir and an all-4-bit MLX dir."""
    from mlx_lm.utils import quantize_model

    root = tmp_path_factory.mktemp("gguf_models")
    out = {
        "moe": tiny_moe_dir,
        "moe_fused": write_synthetic_model(root / "moe_fused", "tiny-moe", seed=1, fused_experts=True),
        "dense": tiny_dense_dir,
        "mixed": tiny_moe_mixed_dir,
    }
    # "fused"-like: what load + save_model_dir writes (switch_mlp stacks, conv (D, K, 1), bf16)
    model, _, config = load(out["moe"], dtype=mx.bfloat16, return_config=True)
    with atomic_dir(root / "mlx_bf16") as tmp:
        save_model_dir(model, config, out["moe"], tmp)
    out["mlx_bf16"] = root / "mlx_bf16"
    # every linear layer 4-bit, the router 8-bit: mlx-lm's own lfm2_moe predicate
    model, _, config = load(out["moe"], dtype=mx.bfloat16, return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    with atomic_dir(root / "mlx_q4") as tmp:
        save_model_dir(model, config, out["moe"], tmp)
    out["mlx_q4"] = root / "mlx_q4"
    return out


@pytest.fixture(scope="session")
def exports(dirs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(dir name, outtype) -> exported GGUF, made on first use."""
    root = tmp_path_factory.mktemp("gguf_files")

    class Exports(dict):
        def __missing__(self, key):
            name, outtype = key
            path = root / f"{name}.{outtype}.gguf"
            export_gguf(dirs[name], path, outtype)
            self[key] = path
            return path

    return Exports()


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------- layouts and metadata


def test_hf_and_mlx_layouts_give_identical_tensors(dirs, exports):
    hf, mlx_dir = tensors(exports["moe", "f32"]), tensors(exports["mlx_bf16", "f32"])
    assert hf.keys() == mlx_dir.keys()
    for name in hf:
        np.testing.assert_array_equal(hf[name], mlx_dir[name], err_msg=name)
    # shapes llama.cpp creates (numpy order): conv 2-D (D, K), experts stacked (E, out, in)
    assert hf["blk.0.shortconv.conv.weight"].shape == (64, 3)
    assert hf["blk.2.ffn_gate_exps.weight"].shape == (8, 64, 64)
    assert hf["blk.2.ffn_down_exps.weight"].shape == (8, 64, 64)
    assert hf["blk.2.ffn_gate_inp.weight"].shape == (8, 64)
    assert "output.weight" not in hf  # tied: llama.cpp reuses token_embd
    # values: the HF conv squeezed, expert e of the stack = HF expert e, expert_bias kept exactly
    source = mx.load(str(dirs["moe"] / "model.safetensors"))
    hf_conv = np.array(source["model.layers.0.conv.conv.weight"].astype(mx.float32))
    np.testing.assert_array_equal(hf["blk.0.shortconv.conv.weight"], hf_conv[:, 0, :])
    for e in (0, 5):
        w3 = np.array(source[f"model.layers.3.feed_forward.experts.{e}.w3.weight"].astype(mx.float32))
        np.testing.assert_array_equal(hf["blk.3.ffn_up_exps.weight"][e], w3)
    bias = np.array(source["model.layers.4.feed_forward.expert_bias"])
    np.testing.assert_array_equal(hf["blk.4.exp_probs_b.bias"], bias)


def test_fused_experts_split_into_gate_and_up(dirs, exports):
    out = tensors(exports["moe_fused", "f32"])
    source = mx.load(str(dirs["moe_fused"] / "model.safetensors"))
    gate_up = np.array(source["model.layers.2.feed_forward.experts.gate_up_proj"].astype(mx.float32))
    down = np.array(source["model.layers.2.feed_forward.experts.down_proj"].astype(mx.float32))
    np.testing.assert_array_equal(out["blk.2.ffn_gate_exps.weight"], gate_up[:, :64])
    np.testing.assert_array_equal(out["blk.2.ffn_up_exps.weight"], gate_up[:, 64:])
    np.testing.assert_array_equal(out["blk.2.ffn_down_exps.weight"], down)


def test_quantized_mlx_dirs_are_dequantized(dirs, exports):
    out = tensors(exports["mixed", "f32"])
    source = mx.load(str(dirs["mixed"] / "model.safetensors"))
    p = "model.layers.5.feed_forward.switch_mlp.down_proj"
    expected = mx.dequantize(source[f"{p}.weight"], source[f"{p}.scales"].astype(mx.float32),
                             source[f"{p}.biases"].astype(mx.float32), group_size=64, bits=8)
    np.testing.assert_array_equal(out["blk.5.ffn_down_exps.weight"], np.array(expected))
    # mlx-lm quantized the router of mlx_q4 to 8 bits; the GGUF router is float again
    types = gguf_tensor_types(exports["mlx_q4", "bf16"])
    assert types["blk.2.ffn_gate_inp.weight"] == "F32"
    assert types["blk.2.ffn_gate_exps.weight"] == "BF16"


def test_metadata(exports):
    meta = fields(exports["moe", "bf16"])
    assert meta["general.architecture"] == "lfm2moe"
    assert meta["lfm2moe.attention.head_count_kv"] == [0, 0, 2, 0, 0, 0, 2, 0]  # 0 marks short-conv layers
    assert meta["lfm2moe.block_count"] == 8
    assert meta["lfm2moe.embedding_length"] == 64
    assert meta["lfm2moe.feed_forward_length"] == 128
    assert meta["lfm2moe.expert_feed_forward_length"] == 64
    assert meta["lfm2moe.expert_count"] == 8 and meta["lfm2moe.expert_used_count"] == 2
    assert meta["lfm2moe.leading_dense_block_count"] == 2
    assert meta["lfm2moe.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert meta["lfm2moe.shortconv.l_cache"] == 3
    assert meta["lfm2moe.vocab_size"] == 1024
    assert meta["lfm2moe.rope.freq_base"] == 1000000.0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "lfm2"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 7)
    assert meta["tokenizer.ggml.padding_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert len(meta["tokenizer.ggml.tokens"]) == 1024 and len(meta["tokenizer.ggml.merges"]) > 100
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)
    template = meta["tokenizer.chat_template"]
    assert "List of tools: [" in template and not re.search(r"\{%-?\s*(end)?generation", template)
    dense = fields(exports["dense", "bf16"])
    assert dense["general.architecture"] == "lfm2"
    assert dense["lfm2.attention.head_count_kv"] == [0, 0, 2, 0, 0, 2]
    assert dense["lfm2.feed_forward_length"] == 128


def test_outtypes(exports):
    sizes = {t: exports["moe", t].stat().st_size for t in ("f32", "f16", "bf16", "q8_0")}
    assert sizes["q8_0"] < sizes["bf16"] == sizes["f16"] < sizes["f32"]
    for outtype, matrix in (("bf16", "BF16"), ("f16", "F16"), ("q8_0", "Q8_0")):
        types = gguf_tensor_types(exports["moe", outtype])
        assert types["blk.2.ffn_up_exps.weight"] == types["token_embd.weight"] == matrix
        # never rounded: norms, the conv kernel, the router and the selection bias
        for name in ("blk.0.shortconv.conv.weight", "blk.2.ffn_gate_inp.weight", "blk.2.exp_probs_b.bias",
                     "blk.2.attn_q_norm.weight", "token_embd_norm.weight"):
            assert types[name] == "F32", (outtype, name)


def test_portable_chat_template_renders_the_same(dirs):
    template = json.loads((dirs["moe"] / "tokenizer_config.json").read_text())["chat_template"]
    assert "{%- generation -%}" in template
    portable = portable_chat_template(template)
    assert "generation %}" not in portable and "{%- if true -%}" in portable
    _, tokenizer = load(dirs["moe"], lazy=True)
    for messages, tools, prompt in CHATS:
        ours = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
        theirs = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt,
                                               chat_template=portable)
        assert theirs == ours


# ---------------------------------------------------------------- bad input and atomicity


def copy_dir(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_architecture(dirs, tmp_path):
    bad = copy_dir(dirs["dense"], tmp_path / "m", model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        export_gguf(bad, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_settings(dirs, tmp_path):
    bad = copy_dir(dirs["moe"], tmp_path / "m", routed_scaling_factor=2.5, conv_bias=True)
    with pytest.raises(ValueError, match="conv_bias=true.*routed_scaling_factor=2.5"):
        export_gguf(bad, tmp_path / "out.gguf")


def test_missing_tokenizer(dirs, tmp_path):
    bad = copy_dir(dirs["moe"], tmp_path / "m")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json missing"):
        export_gguf(bad, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_shape_mismatch(dirs, tmp_path):
    bad = copy_dir(dirs["moe"], tmp_path / "m", moe_intermediate_size=32)
    with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight' has shape \(64, 64\).*implies \(32, 64\)"):
        export_gguf(bad, tmp_path / "out.gguf")
    bad = copy_dir(dirs["mixed"], tmp_path / "m2", hidden_size=48)
    with pytest.raises(ValueError, match=r"embed_tokens\.weight' has shape \(1024, 64\).*implies \(1024, 48\)"):
        export_gguf(bad, tmp_path / "out.gguf")


def test_layers_that_do_not_match_config(dirs, tmp_path):
    bad = copy_dir(dirs["moe"], tmp_path / "m", num_dense_layers=3)  # layer 2 holds experts, not a dense MLP
    with pytest.raises(ValueError, match="no tensor for blk.2.ffn_gate.weight"):
        export_gguf(bad, tmp_path / "out.gguf")


def test_foreign_pre_tokenizer_warns(dirs, tmp_path):
    model_dir = copy_dir(dirs["dense"], tmp_path / "m")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.warns(UserWarning, match="not LFM2's"):
        export_gguf(model_dir, tmp_path / "out.gguf")


def test_tokenizer_larger_than_vocab(dirs, tmp_path):
    bad = copy_dir(dirs["dense"], tmp_path / "m")
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 1030, "content": "<|extra|>"})
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer has 1031 tokens but config.json vocab_size is 1024"):
        export_gguf(bad, tmp_path / "out.gguf")


def test_interrupted_export_leaves_nothing(dirs, tmp_path):
    out = tmp_path / "model.gguf"
    export_gguf(dirs["moe"], out, "f32")
    before = out.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o644

    def interrupt(i: int, n: int, name: str) -> None:
        if i == n // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(dirs["mixed"], out, "bf16", on_tensor=interrupt)
    assert out.read_bytes() == before  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left behind
    with pytest.raises(KeyboardInterrupt):
        export_gguf(dirs["moe"], tmp_path / "fresh.gguf", on_tensor=interrupt)
    assert not (tmp_path / "fresh.gguf").exists()


# ---------------------------------------------------------------- llama.cpp (real peer)


def llama(path: Path):
    pytest.importorskip("llama_cpp")
    return open_gguf(path, n_ctx=1024, n_batch=1024, n_ubatch=1024, n_threads=2, logits_all=True, verbose=False)


def test_open_gguf_turns_repacking_off_for_its_call_only(exports):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = open_gguf(exports["moe", "f32"], n_ctx=64, verbose=False)
    assert llm.model_params.use_extra_bufts is False and llm.n_vocab() == 1024
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def routing_margins(model, ids: list[int]) -> np.ndarray:
    """Per position: the smallest gap, over the MoE layers, between the last expert chosen and the
    first one left out (the sigmoid + bias scores that rank them). Where it is ~1e-5, float32
    summation order alone can swap the two."""
    from mlx_lm.models.lfm2_moe import Lfm2MoeSparseMoeBlock

    gaps = []
    original = Lfm2MoeSparseMoeBlock.__call__

    def recording(block, x):
        scores = mx.sigmoid(block.gate(x)).astype(mx.float32) + block.expert_bias
        ranked = mx.sort(scores, axis=-1)[..., ::-1]
        gaps.append(np.array(ranked[..., block.top_k - 1] - ranked[..., block.top_k])[0])
        return original(block, x)

    Lfm2MoeSparseMoeBlock.__call__ = recording
    try:
        mx.eval(model(mx.array(ids)[None]))
    finally:
        Lfm2MoeSparseMoeBlock.__call__ = original
    return np.min(gaps, axis=0) if gaps else np.full(len(ids), np.inf)


def render_all(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(m, tools=t, tokenize=False, add_generation_prompt=g) for m, t, g in CHATS]


def relative_errors(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Per position: the largest logit difference over the spread (std) of the reference logits."""
    return np.abs(ours - theirs).max(axis=-1) / ours.std(axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe", "dense", "mixed", "mlx_bf16", "mlx_q4"])
def test_llama_cpp_matches_mlx(dirs, exports, name):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tokenizer = load(dirs[name], dtype=mx.float32)
    texts = render_all(tokenizer)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ref = [mlx_logits(model, x) for x in ids]

    llm = llama(exports[name, "f32"])
    assert llm.n_vocab() == 1024 and (llm.token_bos(), llm.token_eos()) == (1, 7)
    # tokenization of chat-rendered prompts (special tokens parsed) equals ours
    for text, expected in zip(texts, ids):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected
    assert llm.tokenize(b"Hello world", add_bos=True)[0] == 1  # add_bos travels in the file
    # the embedded template, run by llama-cpp-python's Jinja2 chat formatter as its Llama does
    eos, bos = (llm._model.token_get_text(t) for t in (llm.token_eos(), llm.token_bos()))
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                    add_generation_prompt=True)
    for (messages, tools, prompt), text in zip(CHATS, texts):
        if prompt:
            assert formatter(messages=messages, tools=tools).prompt == text

    # f32: the same float32 weights; differences are summation order and llama.cpp's f16 KV cache.
    # Those can still swap a top-k routing choice where two experts tie: the int8 "mixed" model has
    # positions whose last chosen and first left-out expert are 7e-6 and 1.2e-7 apart in MLX's
    # sigmoid + bias scores (0, an exact tie, when MLX runs on OpenBLAS; the next smallest gap is
    # 2.4e-5). Measured: on the reference BLAS one of them swaps, on OpenBLAS all three (the tie
    # recurs in a shared prompt prefix). A swap moves that position by up to 0.53 of the logit
    # spread and the next two (the conv state) by 0.15 and 0.07, while every other position stays
    # below 1.4e-3. So: within 5e-3 except where MLX's own routing gap is below 1e-5 and the conv
    # window after it, and such ties are rare.
    window = 3  # conv_L_cache: a swapped position reaches the next two through the conv state
    for reference, x in zip(ref, ids):
        errors = relative_errors(reference, llama_logits(llm, x))
        ties = np.flatnonzero(routing_margins(model, x) < 1e-5)
        explained = {t + j for t in ties for j in range(window)}
        off = set(np.flatnonzero(errors >= 5e-3).tolist())
        assert off <= explained, (sorted(off - explained), errors[sorted(off - explained)], ties)
        assert len(ties) <= 0.01 * len(x), ties
    # bf16 / f16: llama.cpp's CPU kernels also round every matmul input to the weight type, so each
    # logit drifts by a multiple of that type's rounding unit (bf16 2^-8, f16 2^-11): measured
    # medians 3.5-8% (bf16) and 0.4-0.7% (f16) of the logit spread on these random models. Top-k
    # routing is discontinuous: where two experts nearly tie, the rounding flips the choice and that
    # position (and the next few, through the conv state) moves by O(1) (about 16% of positions in
    # bf16 here; MLX itself shows the same when only its weights are rounded). So: the bulk within
    # 10% / 1.5%, the error scaling with the rounding unit (a wrong tensor would not), flips bounded.
    errors, top1 = {}, {}
    for outtype in ("bf16", "f16"):
        llm = llama(exports[name, outtype])
        theirs = [llama_logits(llm, x) for x in ids]
        errors[outtype] = np.concatenate([relative_errors(r, t) for r, t in zip(ref, theirs)])
        top1[outtype] = np.mean(np.concatenate([r.argmax(-1) == t.argmax(-1) for r, t in zip(ref, theirs)]))
    assert np.median(errors["bf16"]) < 0.1 and np.median(errors["f16"]) < 0.015
    assert 4 < np.median(errors["bf16"]) / np.median(errors["f16"]) < 16  # 2^3 apart, as the formats
    assert np.mean(errors["bf16"] < 0.25) > 0.7 and np.mean(errors["f16"] < 0.25) > 0.9
    assert top1["bf16"] > 0.85 and top1["f16"] > 0.95, top1


@pytest.mark.slow
def test_llama_cpp_builtin_template_matches_plain_chats(dirs, exports):
    """llama.cpp's own C++ templating (no Jinja) sees ChatML; with the BOS it adds, that is our text."""
    import ctypes

    import llama_cpp

    _, tokenizer = load(dirs["moe"], lazy=True)
    llm = llama(exports["moe", "bf16"])
    messages = CHATS[4][0]
    array = (llama_cpp.llama_chat_message * len(messages))()
    for i, message in enumerate(messages):
        array[i].role, array[i].content = message["role"].encode(), message["content"].encode()
    buffer = ctypes.create_string_buffer(8192)
    template = llm.metadata["tokenizer.chat_template"].encode()
    n = llama_cpp.llama_chat_apply_template(template, array, len(messages), True, buffer, len(buffer))
    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(buffer.raw[:n], add_bos=True, special=True) == tokenizer.encode(ours, add_special_tokens=False)


@pytest.fixture(scope="session")
def trained(dirs, tmp_path_factory) -> Path:
    """tiny-moe briefly fine-tuned in MLX on the prompt set, saved as an MLX directory (like a fused
    model): a random model has no margin between its top logits, a trained one does."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    model, tokenizer, config = load(dirs["moe"], dtype=mx.float32, return_config=True)
    sequences = [mx.array(tokenizer.encode(t, add_special_tokens=False)) for t in render_all(tokenizer)]

    def loss_fn(m, x):
        return nn.losses.cross_entropy(m(x[None, :-1])[0], x[1:]).mean()

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=3e-3)
    for i in range(30):
        loss, grads = step(model, sequences[i % len(sequences)])
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    assert loss.item() < 1.0
    out = tmp_path_factory.mktemp("trained") / "moe_trained"
    with atomic_dir(out) as tmp:
        save_model_dir(model, config, dirs["moe"], tmp)
    return out


@pytest.mark.slow
def test_q8_0_greedy_agreement(trained, tmp_path):
    model, tokenizer = load(trained, dtype=mx.float32)
    # the training transcripts plus prompts it never saw
    texts = render_all(tokenizer) + [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tools=TOOLS, tokenize=False,
                                      add_generation_prompt=True)
        for q in ("Open the calendar and show the meeting tomorrow.", "Delete the old log files, please.")
    ]
    export_gguf(trained, tmp_path / "q8.gguf", "q8_0")
    llm = llama(tmp_path / "q8.gguf")
    agree = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        agree.append(mlx_logits(model, ids).argmax(-1) == llama_logits(llm, ids).argmax(-1))
    assert np.mean(np.concatenate(agree)) >= 0.95


@pytest.fixture(scope="session")
def wide(tmp_path_factory) -> dict[str, Path]:
    """A MoE whose rows are multiples of 256, so llama.cpp's K-quants apply (not their fallbacks)."""
    root = tmp_path_factory.mktemp("wide")
    model_dir = write_custom(root / "wide", hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                             num_hidden_layers=4, attention_layers=[1], num_experts=4, num_dense_layers=1)
    export_gguf(model_dir, root / "wide.bf16.gguf", "bf16")
    return {"dir": model_dir, "bf16": root / "wide.bf16.gguf", "root": root}


@pytest.mark.slow
def test_quantized_variants(wide):
    pytest.importorskip("llama_cpp")
    sizes = {}
    for qtype in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"):
        report = quantize_gguf(wide["bf16"], wide["root"] / f"wide-{qtype}.gguf", qtype)
        sizes[qtype] = report["bytes"]
        types = gguf_tensor_types(report["out"])
        assert types["blk.2.ffn_gate_inp.weight"] == types["blk.2.exp_probs_b.bias"] == "F32"
        assert types["blk.0.shortconv.conv.weight"] == "F32"
        llm = llama(report["out"])
        assert np.isfinite(llama_logits(llm, [1, 6, 98, 331, 212])).all()
    assert sizes["Q8_0"] > sizes["Q6_K"] > sizes["Q5_K_M"] > sizes["Q4_K_M"]
    assert gguf_tensor_types(wide["root"] / "wide-Q4_K_M.gguf")["blk.2.ffn_up_exps.weight"] == "Q4_K"
    # per-tensor overrides: embeddings and attention kept at 8 bits
    report = quantize_gguf(wide["bf16"], wide["root"] / "wide-Q4_K_M-o.gguf", "Q4_K_M",
                           tensor_types={"token_embd": "q8_0", r"attn_(q|k|v|output)": "q8_0"})
    types = gguf_tensor_types(report["out"])
    assert types["token_embd.weight"] == types["blk.1.attn_q.weight"] == types["blk.1.attn_output.weight"] == "Q8_0"
    assert types["blk.2.ffn_up_exps.weight"] == "Q4_K"
    assert report["bytes"] > sizes["Q4_K_M"]
    with pytest.raises(ValueError, match="unknown GGML type"):
        quantize_gguf(wide["bf16"], wide["root"] / "x.gguf", "Q4_K_M", tensor_types={"attn": "q7_z"})
    assert not (wide["root"] / "x.gguf").exists()


@pytest.mark.slow
def test_imatrix_from_transcripts(wide):
    pytest.importorskip("llama_cpp")
    calibration = [{"messages": m, "tools": t} for m, t, _ in CHATS]
    imatrix = compute_imatrix(wide["dir"], calibration)
    shapes = {t.name: t.shape for t in gguf.GGUFReader(str(wide["bf16"])).tensors}
    assert set(imatrix) == {n for n in shapes if n.endswith(".weight") and len(shapes[n]) >= 2
                            and "ffn_gate_inp" not in n and "shortconv.conv" not in n}
    for name, values in imatrix.items():
        columns, experts = int(shapes[name][0]), int(shapes[name][2]) if len(shapes[name]) == 3 else 1
        assert values.shape == (columns * experts,) and np.all(values > 0), name

    model, tokenizer = load(wide["dir"], dtype=mx.float32)
    held_out = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tools=TOOLS, tokenize=False,
                                              add_generation_prompt=True)
                for q in ("Check the weather in Rome.", "Find the report file and send it.")]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in held_out]
    ref = [mlx_logits(model, x) for x in ids]

    def error(path: Path) -> float:
        llm = llama(path)
        return float(np.mean([np.mean((r - llama_logits(llm, x)) ** 2) for r, x in zip(ref, ids)]))

    for qtype in ("Q3_K_M", "Q2_K"):  # where importance weighting matters most
        plain = quantize_gguf(wide["bf16"], wide["root"] / f"p-{qtype}.gguf", qtype)
        weighted = quantize_gguf(wide["bf16"], wide["root"] / f"i-{qtype}.gguf", qtype, imatrix=imatrix)
        assert weighted["imatrix_entries"] == len(imatrix)
        assert error(Path(weighted["out"])) < error(Path(plain["out"]))


@pytest.mark.slow
def test_vocab_padded_past_the_tokenizer(tmp_path):
    model_dir = write_custom(tmp_path / "padded", "tiny-dense", tokenizer_vocab=1000, vocab_size=1088)
    out = tmp_path / "padded.gguf"
    report = export_gguf(model_dir, out, "f32")
    assert report["vocab"]["tokens"] == 1000 and report["vocab"]["padded_to"] == 1088
    meta = fields(out)
    assert meta["tokenizer.ggml.tokens"][1000] == "[PAD1000]"
    assert meta["tokenizer.ggml.token_type"][1087] == int(gguf.TokenType.UNUSED)
    model, tokenizer = load(model_dir, dtype=mx.float32)
    text = tokenizer.apply_chat_template(CHATS[0][0], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    llm = llama(out)
    assert llm.n_vocab() == 1088 and llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert relative_errors(mlx_logits(model, ids), llama_logits(llm, ids)).max() < 5e-3


@pytest.mark.slow
def test_cli(dirs, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "cli" / "model.gguf"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": m, "tools": t}) + "\n" for m, t, _ in CHATS))
    assert main([str(dirs["mixed"]), str(out), "--quantize", "Q4_K_M", "--tensor-type", "token_embd=q8_0",
                 "--imatrix-from", str(rows), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["export"]["outtype"] == "bf16" and report["Q4_K_M"]["overrides"] == {"token_embd": "q8_0"}
    # 2 attention layers x 4, 6 conv x 2, 2 dense MLPs x 3, 6 expert layers x 3, the tied output
    assert report["Q4_K_M"]["imatrix_entries"] == 4 * 2 + 2 * 6 + 3 * 2 + 3 * 6 + 1
    assert (tmp_path / "cli" / "model-Q4_K_M.gguf").stat().st_size == report["Q4_K_M"]["bytes"]
    with pytest.raises(SystemExit):
        main([str(dirs["mixed"]), str(out), "--outtype", "q4"])
    with pytest.raises(SystemExit):  # requantizing a q8_0 export would stack two roundings
        main([str(dirs["mixed"]), str(out), "--outtype", "q8_0", "--quantize", "Q4_K_M"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_gguf(report["Q4_K_M"]["out"], tmp_path / "again.gguf", "Q4_K_M")


def test_unused_expert_bias_becomes_zeros(dirs, tmp_path):
    # the model ignores its stored bias, so llama.cpp must select experts without it too
    model_dir = copy_dir(dirs["moe"], tmp_path / "m", use_expert_bias=False)
    export_gguf(model_dir, tmp_path / "out.gguf", "f32")
    assert not tensors(tmp_path / "out.gguf")["blk.3.exp_probs_b.bias"].any()


def test_read_samples_names_the_bad_line(tmp_path):
    from lfm_mlx.gguf import read_samples

    path = tmp_path / "rows.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "plain"}\n{"prompt": 1}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:3: expected an object with 'messages'"):
        read_samples(path)
    path.write_text('{"text": "plain"}\n\n{"messages": []}\n')
    assert read_samples(path) == ["plain", {"messages": []}]


@pytest.mark.slow
def test_untied_output_head(dirs, tmp_path):
    # mlx-lm's LFM2 classes always tie the head; an HF checkpoint may not: output.weight is written
    model_dir = copy_dir(dirs["dense"], tmp_path / "untied", tie_word_embeddings=False)
    weights = mx.load(str(model_dir / "model.safetensors"))
    head = (0.5 * mx.random.normal((1024, 64), key=mx.random.key(7))).astype(mx.bfloat16)
    mx.save_safetensors(str(model_dir / "model.safetensors"), {**weights, "lm_head.weight": head},
                        metadata={"format": "pt"})
    export_gguf(model_dir, tmp_path / "untied.gguf", "f32")
    assert gguf_tensor_types(tmp_path / "untied.gguf")["output.weight"] == "F32"
    model, tokenizer = load(dirs["dense"], dtype=mx.float32)  # same weights but the head
    ids = tokenizer.encode(render_all(tokenizer)[1], add_special_tokens=False)
    expected = np.array(model.model(mx.array(ids)[None])[0] @ head.astype(mx.float32).T)
    tied = mlx_logits(model, ids)
    theirs = llama_logits(llama(tmp_path / "untied.gguf"), ids)
    assert relative_errors(expected, theirs).max() < 5e-3
    assert relative_errors(tied, theirs).min() > 0.5  # the tied head would give other logits


def run_cli(*args) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lfm_mlx", "gguf", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=300)


def test_cli_says_what_it_exports_a_line_a_quarter_in_a_log_and_quiet_leaves_the_end_line(dirs, tmp_path):
    out = tmp_path / "model.gguf"
    result = run_cli(dirs["mixed"], out)  # stderr is a pipe, as in a log
    assert result.returncode == 0, result.stderr
    start, *progress, wrote = result.stderr.splitlines()
    assert start == f"lfm-mlx gguf: exporting {dirs['mixed']} to {out} (bf16 matrices; norms, conv, router and expert_bias float32)"
    assert "\r" not in result.stderr and len(progress) == 4 and progress[-1].startswith("lfm-mlx gguf: 100% ("), progress
    size = f"{out.stat().st_size / 1e9:.3f} GB"
    assert wrote.startswith(f"lfm-mlx gguf: wrote {out} ({size}): {{") and result.stdout == f"gguf: wrote {out} ({size})\n"
    quiet = run_cli(dirs["mixed"], out, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


def test_cli_quantizing_keeps_llama_cpps_log_out_of_the_output(dirs, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "model.gguf"
    result = run_cli(dirs["mixed"], out, "--quantize", "Q8_0")  # llama.cpp once logged ~200 lines here
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("lfm-mlx gguf: ") for line in lines) and len(lines) == 8, result.stderr
    assert lines[-2] == "lfm-mlx gguf: quantizing to Q8_0 ..."
    assert result.stdout.startswith(f"gguf: wrote {out} (") and f", {tmp_path / 'model-Q8_0.gguf'} (" in result.stdout
