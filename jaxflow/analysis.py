"""What a researcher otherwise writes by hand, on a `Sample` or `Batch` (`Model.sample`, `jaxflow.batch`): the answer's
probability and its relative change, the logit lens at any positions (the image-token lens included), attention
onto the image layer by layer, and the patch sweep (each image patch, row or region cut from a target region).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.geometry import CELL
from jaxflow.knockout import Knockout
from jaxflow.model import Model
from jaxflow.sample import Batch, Sample
from jaxflow.sweep import engine


def answer_prob(logits, sample: Sample | Batch, token) -> np.ndarray:
    """logits [..., B, T, V] (`Model.logits`, `run_with_cache`; a leading K with knockouts) -> the softmax
    probability of `token` (an int, or one per row [B]) at each row's last prompt position: [..., B] float32."""
    last = np.asarray(sample.last)  # [B]
    b = len(last)
    logits = jnp.asarray(logits)
    if logits.ndim < 3 or logits.shape[-3:-1] != (b, len(sample)):
        raise ValueError(f"logits: expected [..., {b}, {len(sample)}, V] for this sample, got {logits.shape}")
    at_last = logits[..., np.arange(b), last, :].astype(jnp.float32)  # [..., B, V]
    probs = jax.nn.softmax(at_last, axis=-1)
    token = np.broadcast_to(np.asarray(token, np.int64), (b,))
    return np.asarray(probs[..., np.arange(b), token])


def relative_change(p, p_base) -> np.ndarray:
    """The study's metric: (p - p_base) / p_base * 100, in percent."""
    p, p_base = np.asarray(p, np.float64), np.asarray(p_base, np.float64)
    return (p - p_base) / p_base * 100


def greedy_token(model: Model, sample: Sample | Batch) -> np.ndarray:
    """[B]: the token the model predicts first (greedy) at each row's last position, the sweep's answer token."""
    return np.asarray(jnp.argmax(model.prefill(sample).logits, axis=-1))


def _positions(sample: Sample | Batch, positions) -> np.ndarray:
    """"last", a region name, or positions ([P] or [B, P]) -> [B, P] int."""
    b = len(sample.last)
    if isinstance(positions, str):
        if positions == "last":
            return np.asarray(sample.last)[:, None]
        rows = []
        for i, row in enumerate(sample.rows):
            if positions not in row.regions:
                why = row.regions.undefined.get(positions, f"known: {', '.join(sorted(row.regions))}")
                raise ValueError(f"positions: row {i} has no region {positions!r} ({why})")
            rows.append(row.regions[positions])
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"positions: region {positions!r} has {[len(r) for r in rows]} positions in the rows "
                             f"of this batch; give each sample on its own")
        return np.stack(rows)
    pos = np.asarray(positions, np.int64)
    pos = np.broadcast_to(pos, (b,) + pos.shape) if pos.ndim == 1 else pos
    if pos.ndim != 2 or pos.shape[0] != b or (pos < 0).any() or (pos >= len(sample)).any():
        raise ValueError(f"positions: expected [P] or [{b}, P] positions in [0, {len(sample)}), got shape {pos.shape}")
    return pos


@dataclasses.dataclass(frozen=True)
class Lens:
    """The logit lens: what the unembedding reads from the residual stream at `positions` after each layer.
    Layer index 0 is the embeddings, l + 1 the output of decoder layer l."""

    positions: np.ndarray  # [B, P]
    probs: np.ndarray | None  # [L + 1, B, P, N] probabilities of the requested tokens (None: none requested)
    top_tokens: np.ndarray  # [L + 1, B, P, k] the k most probable tokens
    top_probs: np.ndarray  # [L + 1, B, P, k] and their probabilities
    normed: bool  # the final norm applied before the unembedding

    def top_words(self, tokenizer, layer: int, row: int = 0) -> list[str]:
        """The most probable token at each position after `layer` (index as above), decoded."""
        return [tokenizer.decode([int(t)]) for t in self.top_tokens[layer, row, :, 0]]


@nnx.jit(graph=False, static_argnames=("normed", "top"))
def _lens_layer(module, hidden, positions, tokens, normed: bool, top: int):
    """hidden [B, T, D], positions [B, P], tokens [B, N] -> probs of tokens [B, P, N], top-k probs and tokens."""
    lm = module.language_model
    x = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, P, D]
    probs = jax.nn.softmax(lm.unembed(lm.norm(x) if normed else x).astype(jnp.float32), axis=-1)  # [B, P, V]
    chosen = jnp.take_along_axis(probs, jnp.broadcast_to(tokens[:, None], probs.shape[:2] + tokens.shape[-1:]), -1)
    top_p, top_i = jax.lax.top_k(probs, top)
    return chosen, top_p, top_i


def logit_lens(model: Model, sample: Sample | Batch, tokens=None, positions="last", normed: bool = True,
               top: int = 5) -> Lens:
    """The logit lens of a Sample or Batch: after the embeddings and after every decoder layer, the unembedding of
    the residual stream at `positions` ("last", a region name such as "image" for the image-token lens, or
    positions [P] / [B, P]), with the final norm first when `normed` (the study: normed=False). tokens: ids
    ([N], or [B, N]) whose probabilities to report; the `top` most probable tokens are always reported.
    One layer at a time, so [L + 1, P, V] is never held at once."""
    pos = _positions(sample, positions)
    b = pos.shape[0]
    chosen = np.zeros((b, 0), np.int32) if tokens is None else np.asarray(tokens, np.int32)
    chosen = np.broadcast_to(chosen, (b,) + chosen.shape[-1:])
    hidden = model.prefill(sample, collect_hidden=True).hidden  # L + 1 x [B, T, D]
    out = [_lens_layer(model.module, h, jnp.asarray(pos), jnp.asarray(chosen), normed, top) for h in hidden]
    probs, top_p, top_i = (np.stack([np.asarray(o[i]) for o in out]) for i in range(3))
    return Lens(pos, None if tokens is None else probs, top_i, top_p, normed)


def attention_on_image(model: Model, sample: Sample, source="last", heads: Sequence[int] | None = None) -> np.ndarray:
    """[L, F]: the attention weight from `source` (a region name or positions) onto each image position, averaged
    over the source positions and `heads` (default all), in every layer. Draw it with `jaxflow.plot.layers_on_image`."""
    n = model.config.text.num_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n)]
    _, cache = model.run_with_cache(sample, names)
    src = _positions(sample, source)[0]
    heads = slice(None) if heads is None else np.asarray(heads)
    image = sample.image_positions
    return np.stack([np.asarray(cache[name][0][heads][:, src][:, :, image]).mean(axis=(0, 1)) for name in names])


@dataclasses.dataclass(frozen=True)
class PatchSweep:
    """Per group of image positions, the answer probability with every edge target -> group cut in `layers`."""

    values: np.ndarray  # [F] relative change (%) of each image position's group; NaN for positions in no group
    groups: list[np.ndarray]  # G x positions (sequence indices) cut together
    p: np.ndarray  # [G] the answer token's probability with group g cut
    p_base: float
    token: int
    target: str
    layers: np.ndarray  # the layers where the cuts apply


def patch_groups(sample: Sample, groups="patch") -> list[np.ndarray]:
    """Image positions grouped for a patch sweep: "patch" (each position), "row" (each patch row of each view: the
    base crop's rows, the anyres grid's full rows, OneVision's cell rows), or (rows, cols): a grid over the original
    image, a position going to the cell that holds its rectangle's centre (base and grid patches of one place
    together). Newline and padding-only positions belong to no group."""
    lay, rects, image = sample.layout, sample.image_rects, sample.image_positions
    seen = ~np.isnan(rects[:, 0])  # [F]
    if isinstance(groups, str) and groups == "patch":
        return [image[i:i + 1] for i in np.flatnonzero(seen)]
    if isinstance(groups, str) and groups == "row":
        view = np.where(lay.crop == 0, 0, np.where(lay.crop == CELL, 2, 1))
        keys = np.stack([view, lay.row], 1)
    elif not isinstance(groups, str) and len(groups) == 2:
        gh, gw = (int(g) for g in groups)
        w, h = sample.image.size
        cx, cy = (rects[:, 0] + rects[:, 2]) / 2, (rects[:, 1] + rects[:, 3]) / 2
        keys = np.stack([np.minimum(np.nan_to_num(cy) * gh // h, gh - 1), np.minimum(np.nan_to_num(cx) * gw // w,
                                                                                     gw - 1)], 1).astype(np.int64)
    else:
        raise ValueError(f"groups: expected 'patch', 'row' or (rows, cols), got {groups!r}")
    uniq, inverse = np.unique(keys[seen], axis=0, return_inverse=True)
    members = image[seen]
    return [members[inverse.ravel() == g] for g in range(len(uniq))]


def patch_sweep(model: Model, sample: Sample, target="last", layers: Sequence[int] | None = None, groups="patch",
                token: int | None = None, method: str = "incremental") -> PatchSweep:
    """Knocks out each group of image positions (`patch_groups`) -> `target` (a region name or positions) in
    `layers` (default: all), one configuration per group through the sweep engine, and measures the answer
    token's probability (`token`, default the greedy first token). `values` holds the relative change per image
    position, for `jaxflow.plot.on_image`."""
    if not isinstance(sample, Sample):
        raise TypeError("patch_sweep: expected one Sample (Model.sample)")
    n = model.config.text.num_layers
    layers = np.arange(n) if layers is None else np.asarray(list(layers), np.int64)
    if layers.size == 0 or (layers < 0).any() or (layers >= n).any():
        raise ValueError(f"layers: expected layers in [0, {n}), got {layers.tolist()}")
    members = patch_groups(sample, groups)
    target = target if isinstance(target, str) else _positions(sample, target)[0]
    knock = model.knockout_masks([Knockout(pos, target, layers) for pos in members], 1, len(sample),
                                 regions=[sample.regions])
    inputs = model.prepare(sample)
    base = engine.base_run(model.module, inputs, jnp.asarray(sample.last))
    token = int(jnp.argmax(base.logits[0])) if token is None else int(token)
    p_base = float(base.probs[0, token])
    p, _ = engine.knockout_probs(model.module, inputs, knock, sample.last, np.asarray([token]), method=method,
                                 base=base if method == "incremental" else None, mesh=model.mesh)
    change = relative_change(p[:, 0], p_base)
    values = np.full(len(sample.image_positions), np.nan)
    index = {int(pos): i for i, pos in enumerate(sample.image_positions)}
    for gi, pos in enumerate(members):
        values[[index[int(q)] for q in pos]] = change[gi]
    return PatchSweep(values, members, p[:, 0], p_base, token, target if isinstance(target, str) else "positions",
                      layers)
