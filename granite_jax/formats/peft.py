"""LoRA adapters ⇄ a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained(base, DIR)` puts on transformers' `GraniteMoeHybridForCausalLM`.

Names: our adapter on `model.layers.3.self_attn.q_proj` is PEFT's `base_model.model.model.layers.3.self_attn.
q_proj.lora_A.weight` (r, in) = our `lora_a` (in, r) transposed, and `.lora_B.weight` (out, r) = `lora_b` (r, out)
transposed; PEFT scales by lora_alpha / r as we do. `target_modules` lists the full module names that were
adapted, not the bare target names: PEFT matches a name `t` against every module whose name is `t` or ends in
`.t`, so a bare `input_linear` would also pick the routed experts' `block_sparse_moe.input_linear`, which are
not `nn.Linear` layers and which we never adapt.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from granite_jax.formats.hf import _NUMPY_DTYPES, _resolve_dtype, _umask, hf_tensor_name, remove_stale_weights
from granite_jax.model.lora import adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_module_name(path: tuple) -> str:
    """transformers' module name of the projection at our module `path` (its weight's HF name less `.weight`)."""
    return hf_tensor_name((*path, "kernel"))[0].removesuffix(".weight")


def adapter_config(model, *, rank: int, alpha: float, dropout: float, base_model_name_or_path: str | None) -> dict:
    """The PEFT `LoraConfig` (as `adapter_config.json` holds it) of `model`'s adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": [peft_module_name(path) for path, _ in adapters(model)],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as LoRALinear
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def adapter_tensors(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} of `model`'s adapters, A as (r, in) and B as (out, r)."""
    np_dtype = _NUMPY_DTYPES[_resolve_dtype(dtype)]
    tensors = {}
    for path, module in adapters(model):
        prefix = f"base_model.model.{peft_module_name(path)}"
        for name, variable in (("lora_A", module.lora.lora_a), ("lora_B", module.lora.lora_b)):
            value = np.asarray(jax.device_get(variable[...]))
            tensors[f"{prefix}.{name}.weight"] = np.ascontiguousarray(value.T).astype(np_dtype)
    return tensors


def save_peft_adapter(model, directory: str | os.PathLike, *, rank: int, alpha: float, dropout: float,
                      base_model_name_or_path: str | None, dtype: str | None = None) -> list[str]:
    """Write `model`'s adapters (its `LoRALinear`s) as a PEFT adapter directory; returns the written paths.
    `dtype`: tensor dtype on disk (default: the adapters' own). As `save_hf_checkpoint` does, other safetensors
    files and an index left in `directory` are removed (they would contradict this save); nothing else is."""
    from safetensors.numpy import save_file

    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to export")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    dtype = dtype or found[0][1].lora.lora_a[...].dtype
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    save_file(adapter_tensors(model, dtype), weights, metadata={"format": "pt"})
    os.chmod(weights, 0o666 & ~_umask())  # safetensors writes 0600
    remove_stale_weights(directory, {ADAPTER_WEIGHTS})
    config = os.path.join(directory, ADAPTER_CONFIG)
    with open(config, "w") as f:
        json.dump(adapter_config(model, rank=rank, alpha=alpha, dropout=dropout,
                                 base_model_name_or_path=base_model_name_or_path), f, indent=2)
    return [config, weights]
