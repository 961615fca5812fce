"""The PyTorch reference procedure (transformers, eager attention): the numerical oracle for tests
and the baseline of the sweep benchmark. Needs torch (the `test` extra).

transformers takes one attention mask for all layers, so per-layer knockouts run the decoder
layer by layer, each layer with its own additive float mask (0 / finfo.min): the study's
procedure without its attention-forward patching. A boolean 4D mask would be *added* under
eager attention and block nothing (REFERENCE.md), hence float masks.
"""

from __future__ import annotations

import numpy as np


def embeddings(hf, input_ids, pixel_values, image_sizes=None):
    """The decoder's input embeddings exactly as transformers builds them (image features merged)."""
    import torch

    args = {"input_ids": torch.as_tensor(input_ids), "pixel_values": torch.as_tensor(pixel_values),
            "output_hidden_states": True}
    if image_sizes is not None:
        args["image_sizes"] = torch.as_tensor(image_sizes)
    with torch.no_grad():
        return hf(**args).hidden_states[0]


def dense_cut(source, target, layers, heads, batch: int, seq_len: int, num_layers: int, num_heads: int):
    """[L, B, H, T, T] bool (True = cut) of one knockout given as position / layer / head lists."""
    cut = np.zeros((num_layers, batch, num_heads, seq_len, seq_len), bool)
    for layer in range(num_layers) if layers is None else layers:
        for h in range(num_heads) if heads is None else heads:
            cut[layer, :, h][np.ix_(range(batch), list(target), list(source))] = True
    return cut


def run_layers(hf, embeds, cuts, return_weights: bool = True):
    """Runs transformers' decoder layer by layer; layer i masks causality (and a sliding window, if the
    text config has one for that layer) plus cuts[i] [B, H|1, T, T] (True = cut).
    Returns (logits [B, T, V], attention weights [L, B, H, T, T] or None)."""
    import torch

    lm = hf.model.language_model
    b, t, _ = embeds.shape
    pos = torch.arange(t)[None].expand(b, t)
    pe = lm.rotary_emb(embeds, pos)
    causal_block = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    text = hf.config.text_config
    types = getattr(text, "layer_types", None) or ["sliding_attention"] * len(lm.layers)  # Mistral: every layer
    window = getattr(text, "sliding_window", None)
    back = torch.arange(t)[:, None] - torch.arange(t)[None]  # [T, T] query minus key position
    h, weights = embeds, []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            blocked = causal_block | torch.as_tensor(cuts[i])
            if window is not None and types[i] == "sliding_attention":  # transformers' sliding-window overlay
                blocked = blocked | (back >= window)
            mask = torch.zeros(blocked.shape, dtype=embeds.dtype).masked_fill(blocked, torch.finfo(embeds.dtype).min)
            a, w = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask,
                                   position_embeddings=pe, position_ids=pos)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if return_weights:
                weights.append(w.numpy())
        logits = hf.lm_head(lm.norm(h)).float().numpy()
    return logits, (np.stack(weights) if return_weights else None)
