"""FLOP accounting for model FLOPs utilisation (MFU): what one token of training costs, counted from the config.

Conventions (MaxText's for attention, Megatron's for Mamba; matmul FLOPs only, 2 per multiply-add):
- Dense and routed weights: 2·N_active forward, 4·N_active backward, so 6·N_active per token. Routed experts
  count k/E of their weights (the expected, as-routed share); the router, embeddings lookup and norms count
  nothing except the output head, which is a matmul.
- Causal attention: q·kᵀ and p·v over the causal prefix of the token's own document (what the kernel
  computes on packed rows): 2·2·n_heads·head_dim·keys forward per token, times 3 for training, where keys is
  the batch's mean prefix length (`mean_keys_per_query`; T/2 for rows that are one document).
- SSD (chunk length Q): C·Bᵀ (2·Q·G·N), scores·x (2·Q·H·P), chunk states (2·H·P·N) and state→output
  (2·H·P·N) forward per token, times 3 for training. Q is counted in full (the implementation computes the
  whole chunk and masks).
- LoRA: the frozen base weights take no weight gradient, so 2·N forward + 2·N for the input gradients (4·N per
  token); each trained adapter weight counts 6 (the adapters sit on projections every token goes through).
- DPO: the reference model's log-probabilities are one more forward pass (2·N, attention and SSD once more).
Rematerialisation is not counted (MFU measures useful work).
"""

from __future__ import annotations

import numpy as np

from granite_jax.config import ModelConfig


def active_matmul_params(config: ModelConfig) -> float:
    """Weights a token multiplies by, forward: projections, MLPs, k/E of the routed experts, the output head."""
    H = config.hidden_size
    d, n_h, n_kv = config.attention_head_dim, config.num_attention_heads, config.num_key_value_heads
    attention = H * d * (2 * n_h + 2 * n_kv)
    mamba = H * config.mamba_in_proj_dim + config.mamba_d_inner * H + config.mamba_conv_dim * config.mamba_d_conv
    ffn = 3 * H * config.shared_intermediate_size
    if config.is_moe:
        ffn += config.num_experts_per_tok * 3 * H * config.intermediate_size + H * config.num_local_experts
    per_layer = sum(attention if kind == "attention" else mamba for kind in config.layer_types)
    return per_layer + config.num_hidden_layers * ffn + H * config.vocab_size


def training_flops_per_token(config: ModelConfig, seq_len: int, keys_per_query: float | None = None, *,
                             adapters: int | None = None, reference: bool = False) -> float:
    """Forward + backward FLOPs per token of a packed row of `seq_len` tokens. Attention counts
    `keys_per_query` keys per token (`mean_keys_per_query` of the batch); by default seq_len / 2, a row that
    is one document (the worst case). `adapters`: a LoRA run's number of trained adapter weights (the base
    frozen: 4·N + 6·adapters instead of 6·N); `reference`: DPO's extra forward pass of the reference model."""
    N_active = active_matmul_params(config)
    flops = 6.0 * N_active if adapters is None else 4.0 * N_active + 6.0 * adapters
    keys = seq_len / 2 if keys_per_query is None else keys_per_query
    attention_fwd = 2 * 2 * config.num_attention_heads * config.attention_head_dim * keys
    Q = min(config.mamba_chunk_size, seq_len)
    G, N, H, P = config.mamba_n_groups, config.mamba_d_state, config.mamba_n_heads, config.mamba_d_head
    ssd_fwd = 2 * Q * G * N + 2 * Q * H * P + 4 * H * P * N
    mixers_fwd = config.num_attention_layers * attention_fwd + config.num_mamba_layers * ssd_fwd
    flops += 3 * mixers_fwd
    if reference:
        flops += 2.0 * N_active + mixers_fwd
    return flops


def training_flops_by_component(config: ModelConfig, seq_len: int,
                                keys_per_query: float | None = None) -> dict[str, float]:
    """`training_flops_per_token` split by the part of the model that does the work (the same conventions;
    the values add up to it): per token, forward + backward, no recomputation."""
    H, L_m, L_a = config.hidden_size, config.num_mamba_layers, config.num_attention_layers
    d, n_h, n_kv = config.attention_head_dim, config.num_attention_heads, config.num_key_value_heads
    keys = seq_len / 2 if keys_per_query is None else keys_per_query
    Q = min(config.mamba_chunk_size, seq_len)
    G, N, Hm, P = config.mamba_n_groups, config.mamba_d_state, config.mamba_n_heads, config.mamba_d_head
    parts = {
        "mamba in_proj": 6.0 * L_m * H * config.mamba_in_proj_dim,
        "mamba conv": 6.0 * L_m * config.mamba_conv_dim * config.mamba_d_conv,
        "mamba SSD": 3.0 * L_m * (2 * Q * G * N + 2 * Q * Hm * P + 4 * Hm * P * N),
        "mamba out_proj": 6.0 * L_m * config.mamba_d_inner * H,
        "attention q/k/v/o": 6.0 * L_a * H * d * (2 * n_h + 2 * n_kv),
        "attention core": 3.0 * L_a * 2 * 2 * n_h * d * keys,
        "shared MLP": 6.0 * config.num_hidden_layers * 3 * H * config.shared_intermediate_size,
        "router": 0.0,
        "routed experts": 0.0,
        "head": 6.0 * H * config.vocab_size,
    }
    if config.is_moe:
        parts["router"] = 6.0 * config.num_hidden_layers * H * config.num_local_experts
        parts["routed experts"] = (6.0 * config.num_hidden_layers * config.num_experts_per_tok * 3 * H
                                   * config.intermediate_size)
    return parts


def mean_keys_per_query(segment_ids) -> float | None:
    """The mean number of keys a token's causal attention sees in a packed batch (b, T) of segment ids: a
    document of L tokens contributes L(L+1)/2 over its L tokens (the document's own causal prefix). None
    without segment ids (rows of one document each)."""
    if segment_ids is None:
        return None
    ids = np.asarray(segment_ids)
    starts = np.ones(ids.shape, bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    boundaries = np.flatnonzero(np.concatenate([starts.ravel(), [True]]))
    lengths = np.diff(boundaries).astype(np.float64)  # row starts are document starts too
    return float(np.sum(lengths * (lengths + 1) / 2) / ids.size)


# Dense bf16 matmul peak per chip, TFLOP/s (vendors' datasheets, without sparsity), by a substring of the
# device kind; the CPU figure is the measured float32 jnp.dot peak of the 2-core reference machine.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0),
               ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v6", 918.0), ("TPU v4", 275.0))
CPU_PEAK_TFLOPS = 0.08


def peak_tflops(device) -> float | None:
    """The MFU denominator for `device` (a jax Device): its dense bf16 peak, or None when it is not known."""
    if device.platform == "cpu":
        return CPU_PEAK_TFLOPS
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)
