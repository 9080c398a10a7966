"""GGUF files for llama.cpp: `save_gguf(model, path, outtype=...)`.

The file holds what llama.cpp's own converter (`convert_hf_to_gguf.py`, as vendored in llama-cpp-python 0.3.36)
writes for the same model exported with `save_hf_checkpoint`: the same tensors (names, shapes, types, values) and
metadata, so llama.cpp runs it as it runs IBM's releases. Architectures: `granitehybrid` when the model has Mamba
layers, else `granite` (dense) or `granitemoe` (routed experts).

How the tensors differ from the HF ones (GGUF lists shapes innermost first, so {in, out} below is HF's [out, in]):
- Mamba: `conv1d` [C, 1, K] is squeezed to [C, K]; `A_log` becomes `ssm_a = -exp(A_log)` [nh, 1]; `D` is
  [nh, 1]; the gated norm's weight is [groups, d_inner / groups].
- Attention: the rows of q and k (and their biases) are permuted within each head from the half-split RoPE
  layout to the interleaved one llama.cpp's `granite*` rope uses; q·k is unchanged, so NoPE layers are too.
- Experts: `input_linear` [E, 2I, H] splits into `ffn_gate_exps` and `ffn_up_exps` (gate first); the shared MLP
  likewise into `ffn_{gate,up}_shexp`, or into plain `ffn_{gate,up,down}` for a dense model (no routed experts).
- Kept F32 whatever the outtype, as the converter and llama.cpp's quantizer do: 1-D tensors, norms, the conv,
  `ssm_a`/`ssm_d`, biases and the router. A tensor whose rows do not split into quantization blocks falls back to
  F16. `q4_k_m` is llama.cpp's own quantizer (llama-cpp-python) run over a lossless intermediate file.

Where the converter would write a file that llama.cpp runs wrongly or not at all, this writes what the model
computes instead (identical for every released configuration): `feed_forward_length` of a dense model is its MLP
width (`shared_intermediate_size`; the converter writes `intermediate_size`, equal in the releases); RoPE is
on iff `position_embedding_type == "rope"` (the converter decides by "has no Mamba layers"); the number of
experts used is 0 without experts; the token list is not padded to a multiple of 8 (the releases' 100352 is one).
Configurations llama.cpp cannot run are refused (ValueError): Mamba `expand` other than 2, Mamba projection
biases, an explicit `head_dim` other than hidden_size / heads, a `time_step_limit` clamp.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import tempfile

import numpy as np

from granite_jax.config import MAMBA, ModelConfig
from granite_jax.formats.hf import hf_tensors

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# The split regex of cl100k-style byte-level BPE tokenizers (Granite 4.0's): llama.cpp's "dbrx" pre-tokenizer.
_CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")  # the ones llama.cpp has metadata keys for
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def save_gguf(model, path: str | os.PathLike, *, outtype: str = "f32", tokenizer_dir: str | os.PathLike | None = None,
              name: str | None = None) -> str:
    """Write `model` (a `GraniteForCausalLM`) to the GGUF file `path` for llama.cpp; returns the path.

    outtype: "f32", "f16", "bf16", "q8_0" (quantized here, with the `gguf` package) or "q4_k_m" (llama.cpp's
    quantizer; needs llama-cpp-python). tokenizer_dir: a Hugging Face tokenizer directory (`tokenizer.json`,
    `tokenizer_config.json`, optional `chat_template.jinja`), written as llama.cpp's gpt2 (byte-level BPE)
    vocabulary with its merges, special tokens and chat template; without one the file has no vocabulary
    (llama.cpp then takes token ids only). name: `general.name` (default: the file name without extension).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}: expected one of {', '.join(OUTTYPES)}")
    import gguf  # the `gguf` package (pip install gguf); imported here so that granite_jax does not need it

    config: ModelConfig = model.config
    _check_supported(config)
    path = os.fspath(path)
    name = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    directory = os.path.dirname(os.path.abspath(path))
    if outtype != "q4_k_m":
        with _replacing(path) as partial:
            _write(gguf, model, partial, outtype, tokenizer_dir, name)
        return path
    # llama.cpp quantizes from a GGUF file: one in the parameters' own precision (nothing lost on the way).
    lossless = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[config.param_dtype]
    with tempfile.TemporaryDirectory(dir=directory, prefix=".gguf-") as scratch:
        source = os.path.join(scratch, "source.gguf")
        _write(gguf, model, source, lossless, tokenizer_dir, name)
        with _replacing(path) as partial:
            _llama_cpp_quantize(source, partial, "q4_k_m")
    return path


# --------------------------------------------------------------------------------------------- checks
def _architecture(config: ModelConfig) -> str:
    if config.num_mamba_layers:
        return "granitehybrid"
    return "granitemoe" if config.is_moe else "granite"


def _check_supported(config: ModelConfig) -> None:
    if config.head_dim is not None and config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"head_dim={config.head_dim} differs from hidden_size / num_attention_heads = "
                         f"{config.hidden_size} / {config.num_attention_heads}: llama.cpp's Granite models derive "
                         "the head width from those, so the file would compute another model")
    if config.num_mamba_layers:
        if config.mamba_expand != 2:
            raise ValueError(f"mamba_expand={config.mamba_expand}: llama.cpp's granitehybrid supports only 2")
        if config.mamba_proj_bias:
            raise ValueError("mamba_proj_bias=True: llama.cpp's granitehybrid has no Mamba projection biases")
        if tuple(config.time_step_limit) != (0.0, float("inf")):
            raise ValueError(f"time_step_limit={tuple(config.time_step_limit)}: llama.cpp does not clamp the "
                             "Mamba time step")


# ----------------------------------------------------------------------------------------------- tensors
def _permute_rope_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection (or bias), per head, from the half-split RoPE layout [x0..x(d/2-1), y0..] to the
    interleaved one [x0, y0, x1, y1, ...]."""
    d = a.shape[0] // heads
    return a.reshape(heads, 2, d // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _gguf_tensors(model, config: ModelConfig):
    """(GGUF name, float32 array in HF's [out, in] layout) for every tensor, in the converter's order."""
    moe = config.is_moe
    for hf_name, value in hf_tensors(model):
        a = np.asarray(value, np.float32)
        if hf_name == "model.embed_tokens.weight":
            yield "token_embd.weight", a
            continue
        if hf_name == "model.norm.weight":
            yield "output_norm.weight", a
            continue
        if hf_name == "lm_head.weight":
            yield "output.weight", a
            continue
        match = _LAYER.fullmatch(hf_name)
        if match is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        i, rest = int(match.group(1)), match.group(2)
        blk = f"blk.{i}."
        if rest == "input_layernorm.weight":
            yield blk + "attn_norm.weight", a
        elif rest == "post_attention_layernorm.weight":
            yield blk + "ffn_norm.weight", a
        elif rest.startswith("mamba."):
            yield from _mamba_tensor(blk, rest[len("mamba."):], a, config)
        elif rest.startswith("self_attn."):
            yield from _attention_tensor(blk, rest[len("self_attn."):], a, config)
        elif rest == "block_sparse_moe.router.layer.weight":
            yield blk + "ffn_gate_inp.weight", a
        elif rest == "block_sparse_moe.input_linear.weight":  # (E, 2I, H): gate rows first
            gate, up = np.split(a, 2, axis=-2)
            yield blk + "ffn_gate_exps.weight", gate
            yield blk + "ffn_up_exps.weight", up
        elif rest == "block_sparse_moe.output_linear.weight":
            yield blk + "ffn_down_exps.weight", a
        elif rest == "shared_mlp.input_linear.weight":
            gate, up = np.split(a, 2, axis=-2)
            yield blk + ("ffn_gate_shexp.weight" if moe else "ffn_gate.weight"), gate
            yield blk + ("ffn_up_shexp.weight" if moe else "ffn_up.weight"), up
        elif rest == "shared_mlp.output_linear.weight":
            yield blk + ("ffn_down_shexp.weight" if moe else "ffn_down.weight"), a
        else:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def _mamba_tensor(blk: str, leaf: str, a: np.ndarray, config: ModelConfig):
    if leaf == "in_proj.weight":
        yield blk + "ssm_in.weight", a
    elif leaf == "conv1d.weight":  # (C, 1, K) -> (C, K)
        yield blk + "ssm_conv1d.weight", a[:, 0, :]
    elif leaf == "conv1d.bias":
        yield blk + "ssm_conv1d.bias", a
    elif leaf == "dt_bias":
        yield blk + "ssm_dt.bias", a
    elif leaf == "A_log":
        yield blk + "ssm_a", (-np.exp(a.astype(np.float64))).astype(np.float32).reshape(-1, 1)
    elif leaf == "D":
        yield blk + "ssm_d", a.reshape(-1, 1)
    elif leaf == "norm.weight":
        yield blk + "ssm_norm.weight", a.reshape(config.mamba_n_groups, -1)
    elif leaf == "out_proj.weight":
        yield blk + "ssm_out.weight", a
    else:
        raise ValueError(f"no GGUF name for Mamba tensor {leaf!r}")


def _attention_tensor(blk: str, leaf: str, a: np.ndarray, config: ModelConfig):
    projection, kind = leaf.rsplit(".", 1)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    if projection not in names:
        raise ValueError(f"no GGUF name for attention tensor {leaf!r}")
    if projection == "q_proj":
        a = _permute_rope_rows(a, config.num_attention_heads)
    elif projection == "k_proj":
        a = _permute_rope_rows(a, config.num_key_value_heads)
    yield f"{blk}{names[projection]}.{kind}", a


def _tensor_type(gguf, name: str, a: np.ndarray, outtype: str):
    """The GGML type of tensor `name` in an `outtype` file (F32 for what llama.cpp keeps in float32)."""
    Q = gguf.GGMLQuantizationType
    if a.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if name.endswith(("ffn_gate_inp.weight", "ssm_conv1d.weight")):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# ------------------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _replacing(path: str):
    """A temporary name next to `path` that becomes `path` when the block succeeds (and is removed if not)."""
    partial = f"{path}.partial"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _write(gguf, model, path: str, outtype: str, tokenizer_dir, name: str) -> None:
    config: ModelConfig = model.config
    arch = _architecture(config)
    # Tensors are spooled to a temporary file as they are made, so host memory holds one at a time.
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
    try:
        for tensor_name, a in _gguf_tensors(model, config):
            qtype = _tensor_type(gguf, tensor_name, a, outtype)
            try:
                data = gguf.quants.quantize(a, qtype)
            except gguf.QuantError:  # rows not a whole number of blocks
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(a, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
        _add_hyperparameters(gguf, writer, config, outtype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_dir is not None:
            _add_tokenizer(gguf, writer, os.fspath(tokenizer_dir), config)
        else:
            writer.add_tokenizer_model("none")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_hyperparameters(gguf, writer, config: ModelConfig, outtype: str) -> None:
    """The model's metadata, in the order the converter writes it."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings if config.uses_rope else 2**20)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size if config.is_moe else config.shared_intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv([config.num_key_value_heads if kind != MAMBA else 0 for kind in config.layer_types])
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok if config.is_moe else 0)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[outtype]])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    # Written when non-zero, as the converter does (llama.cpp reads 0 as "no scaling").
    for add, value in ((writer.add_attention_scale, config.attention_multiplier),
                       (writer.add_embedding_scale, config.embedding_multiplier),
                       (writer.add_residual_scale, config.residual_multiplier),
                       (writer.add_logit_scale, config.logits_scaling),
                       (writer.add_expert_shared_feed_forward_length, config.shared_intermediate_size)):
        if value:
            add(value)
    # The converter writes the Mamba fields for the all-attention models too (llama.cpp ignores them there).
    writer.add_ssm_conv_kernel(config.mamba_d_conv)
    writer.add_ssm_state_size(config.mamba_d_state)
    writer.add_ssm_group_count(config.mamba_n_groups)
    writer.add_ssm_inner_size(config.mamba_d_inner)
    writer.add_ssm_time_step_rank(config.mamba_n_heads)
    # llama.cpp's Granite models use rope.scaling.finetuned as the RoPE switch (false = NoPE).
    writer.add_rope_scaling_finetuned(config.uses_rope)


# ---------------------------------------------------------------------------------------------- tokenizer
def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pre_tokenizer(tokenizer: dict, path: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the converter recognises it by hashing the ids of a
    probe text; this reads the pre-tokenizer itself)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == _CL100K_SPLIT
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return "dbrx"  # Granite 4.0's tokenizer, as llama.cpp names it
    raise ValueError(f"{path}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp's gpt2 vocabulary "
                     "supports here (byte-level GPT-2, or the cl100k split of Granite 4.0)")


def _token_text(tokenizer_obj, content: str) -> str:
    """An added token as llama.cpp expects it (pre-normalized): encoded and decoded back."""
    ids = tokenizer_obj.encode(content, add_special_tokens=False).ids
    return tokenizer_obj.decode(ids, skip_special_tokens=False)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")) \
        or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<unused") and token.endswith(">"))


def _add_tokenizer(gguf, writer, directory: str, config: ModelConfig) -> None:
    from tokenizers import Tokenizer

    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{directory!r} has no tokenizer.json (a byte-level BPE tokenizer is expected)")
    tokenizer = _read_json(tokenizer_path)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_path}: model type {model.get('type')!r}; only BPE tokenizers are supported")
    config_path = os.path.join(directory, "tokenizer_config.json")
    tokenizer_config = _read_json(config_path) if os.path.isfile(config_path) else {}
    pre = _pre_tokenizer(tokenizer, tokenizer_path)

    tokenizer_obj = Tokenizer.from_file(tokenizer_path)
    vocab = tokenizer_obj.get_vocab(with_added_tokens=True)
    added = {entry["content"]: entry for entry in tokenizer.get("added_tokens", [])}
    if vocab and max(vocab.values()) >= config.vocab_size:
        raise ValueError(f"{tokenizer_path}: token id {max(vocab.values())} is outside the model's vocabulary "
                         f"of {config.vocab_size}")
    by_id = {i: token for token, i in vocab.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif token in added:
            entry = added[token]
            if not entry.get("normalized", False):
                token = _token_text(tokenizer_obj, token)
            if entry.get("special", False) or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):  # [left, right] pairs (tokenizers >= 0.20); spaces as U+0120
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    writer.add_token_merges(merges)

    # Special tokens: by tokenizer_config.json's strings (only added tokens count), then config.json's ids.
    special_ids = {}
    for kind in _SPECIAL_TYPES:
        entry = tokenizer_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in added:
            special_ids[kind] = added[content]["id"]
    hf_config = config.to_hf()
    for kind in _SPECIAL_TYPES:
        if kind not in special_ids and isinstance(hf_config.get(f"{kind}_token_id"), int):
            special_ids[kind] = hf_config[f"{kind}_token_id"]
    for kind, token_id in special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)

    add_special = {}
    post = tokenizer.get("post_processor") or {}
    for processor in post.get("processors", [post]) if post else []:
        if processor.get("type") == "ByteLevel":
            add_special.setdefault("bos", False)
            add_special.setdefault("eos", False)
        elif processor.get("type") is not None:
            raise ValueError(f"{tokenizer_path}: post-processor {processor['type']!r} is not supported (a "
                             "byte-level BPE tokenizer adds no tokens)")
    for kind in ("bos", "eos", "sep"):
        if isinstance(tokenizer_config.get(f"add_{kind}_token"), bool):
            add_special.setdefault(kind, tokenizer_config[f"add_{kind}_token"])
    for kind, value in add_special.items():
        getattr(writer, f"add_add_{kind}_token")(value)

    template = tokenizer_config.get("chat_template")
    if template is None:
        jinja_path, json_path = (os.path.join(directory, f) for f in ("chat_template.jinja", "chat_template.json"))
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(json_path):
            template = _read_json(json_path).get("chat_template")
    if isinstance(template, (str, list)):
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------------- llama.cpp
def _llama_cpp_quantize(source: str, destination: str, outtype: str) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`) from the GGUF file `source` to `destination`."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"outtype={outtype!r} uses llama.cpp's quantizer: pip install "
                          "llama-cpp-python (see requirements-test.txt)") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[outtype]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(source.encode(), destination.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {outtype} (status {status})")
