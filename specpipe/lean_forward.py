"""A packed forward written out for Llama- and Qwen2-architecture models: the same arithmetic as
the model's own layers, without transformers' module calls, wrappers and mask builders around each op.

Why: a small model's forward is mostly that overhead. The demo draft (one layer, width 128), one
thread, a forward over a 100-token cache: one row 0.62 -> 0.40 ms, two rows 0.79 -> 0.58 ms
(bit-identical logits); the demo target (20 layers, width 192), one thread, interleaved, column-major
weights, a 60-token cache: 1 token 6.64 -> 5.50 ms, 2 tokens 8.01 -> 6.62 ms, 9 tokens 11.3 -> 9.55 ms.
Queries and keys are rotated in one go, with rotate_half as a roll (the sign on sin), and a float32
norm takes its weight in the same op: the same logits bit for bit, about ten ops fewer per layer
(demo target, one thread, interleaved, on the Intel Xeon of 2026-12-02: 1 token
1.06x, 9 tokens 1.03x; served, one autoregressive client 1.05x, one greedy specbranch client 1.03x).
Both workers run it (the draft's step bounds how soon a block is ready after a rejection nothing
foresaw; the target's forward is every mode's critical path).

`lean_forward(model)` returns the function, or None when the model is not one it reproduces: not
the Llama or Qwen2 classes (Qwen2 is Llama with biased q/k/v projections, which the code takes as
they come), rotary embeddings other than the static kinds, an activation other than SiLU, biased
MLPs, a layer with a sliding window. model_check.prepare_model keeps it only where a packed forward
through it gives the model's own logits (its start-up check). Each projection is called through its
own `forward`, so a Linear that picks between weight layouts by token count (models.TwoLayoutLinear)
still does. Attention and the KV writes are kv_store's own (slot_attention, PackedCache, passed in),
so the store's layout has one owner. Knows nothing of workers or sockets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rotary kinds whose inverse frequencies are fixed at load (no update per forward) and whose
# cos / sin are not rescaled.
STATIC_ROPE_TYPES = {"default", "llama3", "linear"}
# The causal LM classes it writes out, with their base model's.
FAMILIES = {"LlamaForCausalLM": "LlamaModel", "Qwen2ForCausalLM": "Qwen2Model"}


def lean_forward(model):
    """fn(layout, input_ids [T], keep [K], cache, attend) -> logits [K, vocab], or None (see the
    module doc). `cache` and `attend` are the packed forward's PackedCache and attention function
    (kv_store's: this module does not import it)."""
    config = model.config
    base = getattr(model, "model", None)
    if FAMILIES.get(type(model).__name__) != type(base).__name__:
        return None
    rotary = base.rotary_emb
    if (
        getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES
        or getattr(rotary, "attention_scaling", 1.0) != 1.0
        or config.hidden_act != "silu"
        or getattr(config, "mlp_bias", False)
        or any(getattr(layer.self_attn, "sliding_window", None) for layer in base.layers)
    ):
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    half, eps = head_dim // 2, config.rms_norm_eps
    layers, lm_head = base.layers, model.lm_head

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # (the weight taken by the same op: the same values, one op fewer)
            return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight

    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:  # x [T, heads, head_dim]
        # x·cos + rotate_half(x)·sin, rotate_half(x) = (-x2, x1): (x2, x1) is x rolled by half, and the
        # sign rides on sin's first half (exact: a product's sign flips either way)
        return x * cos + x.roll(half, -1) * signed_sin

    def forward(layout, input_ids: torch.Tensor, keep: torch.Tensor, cache, attend) -> torch.Tensor:
        tokens = input_ids.shape[0]
        hidden = F.embedding(input_ids, base.embed_tokens.weight)  # [T, hidden]
        freqs = layout.positions[:, None].float() * rotary.inv_freq.float()
        angles = torch.cat((freqs, freqs), -1)
        sin = angles.sin()
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), -1).to(hidden.dtype)[:, None]  # [T, 1, d]
        cos = angles.cos().to(hidden.dtype)[:, None]
        for index, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = norm(hidden, layer.input_layernorm.weight)
            # Queries and keys side by side: one rotation for both (its ops cost per call, not per head).
            query_key = torch.cat((attention.q_proj.forward(x), attention.k_proj.forward(x)), -1)
            query_key = rotate(query_key.view(tokens, heads + kv_heads, head_dim), cos, signed_sin)
            query, key = query_key[:, :heads], query_key[:, heads:]
            value = attention.v_proj.forward(x).view(tokens, kv_heads, head_dim)
            keys, values = cache.update(key.transpose(0, 1)[None], value.transpose(0, 1)[None], index)
            out, _ = attend(
                attention,
                query.transpose(0, 1)[None],
                keys,
                values,
                None,
                scaling=attention.scaling,
                specpipe_layout=layout,
            )  # [1, T, heads, head_dim]
            hidden = hidden + attention.o_proj.forward(out.reshape(tokens, heads * head_dim))
            x = norm(hidden, layer.post_attention_layernorm.weight)
            gated = F.silu(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x)
            hidden = hidden + mlp.down_proj.forward(gated)
        return lm_head.forward(norm(hidden[keep], base.norm.weight))

    return forward
