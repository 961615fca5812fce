"""A vision-language model: vision tower -> projector -> image features placed at the image-token positions ->
decoder, each part chosen from the config (`TOWERS`, `PROJECTORS`, `DECODERS`).

`feature_index` [B, T] (built on the host from `jaxflow.geometry.image_layout`) says, per sequence position,
which image feature fills it (-1: a text token keeps its embedding). One gather serves LLaVA-1.5 (features
in order), LLaVA-NeXT anyres packing (base crop, unpadded grid rows, one `image_newline` per row) and
LLaVA-OneVision, whose downsampled grid cells are first blended from four projected patch features each
(`taps`, `tap_weights`: torch's bilinear resize written as a gather) and appended after the newline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.config import ModelConfig
from jaxflow.nn.decoder import Decoder
from jaxflow.nn.layers import Linear, param
from jaxflow.nn.vision import VisionTower


class MlpProjector(nnx.Module):
    """LLaVA's projector: linear -> GELU -> linear, from the selected tower states (concatenated) to the decoder's
    width."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs):
        d_in = cfg.vision.hidden_size * len(cfg.projector.feature_layers)
        d, bias = cfg.text.hidden_size, cfg.projector.bias
        self.linear_1 = Linear(d_in, d, bias=bias, dtype=dtype, rngs=rngs, axes=(None, "embed"))
        self.linear_2 = Linear(d, d, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "embed"))

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


# the module class of each part, by the config's kind (VisionConfig.kind, ProjectorConfig.kind,
# TextConfig.model_type)
TOWERS = {"clip": VisionTower, "siglip": VisionTower}
PROJECTORS = {"mlp": MlpProjector}
DECODERS = {"llama": Decoder, "mistral": Decoder, "qwen2": Decoder}


class VisionLanguageModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.vision_tower = TOWERS[cfg.vision.kind](cfg.vision, cfg.vision_layers_needed(), dtype=dtype, rngs=rngs)
        self.projector = PROJECTORS[cfg.projector.kind](cfg, dtype=dtype, rngs=rngs)
        self.image_newline = param(jnp.zeros((cfg.text.hidden_size,), dtype), ("embed",)) if cfg.image.anyres else None
        self.language_model = DECODERS[cfg.text.model_type](cfg.text, tie_word_embeddings=cfg.tie_word_embeddings,
                                                            dtype=dtype, rngs=rngs)

    def image_features(self, crops):
        """crops [N, C, S, S] -> projected features [N, F, D] (F = features per crop)."""
        states = self.vision_tower(crops)  # [Lv + 1, N, 1 + g*g, Dv]
        n = self.cfg.vision.num_layers
        selected = [states[layer % (n + 1)] for layer in self.cfg.projector.feature_layers]
        if self.cfg.projector.select_strategy == "default":
            selected = [s[:, 1:] for s in selected]
        return self.projector(jnp.concatenate(selected, axis=-1))

    def embed(self, input_ids, crops, feature_index, taps=None, tap_weights=None, features=None):
        """input_ids, feature_index [B, T] -> input embeddings [B, T, D]. feature_index points into
        [crop features (N * F), image_newline, downsampled cells (M)]; taps [M, 4] int, tap_weights [M, 4]:
        each cell's four source features and bilinear weights. features: `image_features(crops)` when the
        caller has them already."""
        text = self.language_model.embed_tokens(jnp.where(feature_index >= 0, 0, input_ids))
        if crops is None:
            return text
        feats = self.image_features(crops) if features is None else features
        feats = feats.reshape(-1, feats.shape[-1])  # [N * F, D]
        table = [feats.astype(text.dtype)]
        if self.image_newline is not None:
            table.append(self.image_newline[...][None].astype(text.dtype))
        if taps is not None and taps.shape[0]:
            cells = jnp.einsum("mk,mkd->md", tap_weights.astype(feats.dtype), jnp.take(feats, taps, axis=0))  # [M, D]
            table.append(cells.astype(text.dtype))
        image = jnp.take(jnp.concatenate(table), jnp.maximum(feature_index, 0), axis=0)  # [B, T, D]
        return jnp.where((feature_index >= 0)[..., None], image, text)
