"""Batched knockout evaluation: every (flow, layer) configuration of a batch in one jitted call.

Two methods give the probability of each sample's answer token at its last position under each
knockout configuration:

- `full`: the whole decoder reruns for every configuration (vmap over configurations);
- `incremental`: exact partial recomputation. A cut with targets starting at position t0 and a
  layer window starting at l0 cannot change positions before t0 (causality) nor anything below
  layer l0. So each configuration reruns only the suffix [t0, T) from layer l0 up, attending to
  the uncut run's keys/values for positions before t0. Configurations are grouped by how many
  positions they recompute (a flow into the last position recomputes one; see `suffix_bucket`).
  Within a group, configurations that start at the same layer and position and cut the same edges
  in every layer so far are one row of recomputation until they differ (`share_rows`: the windows
  0-4, 0-5, ... of one flow run as one row through layers 0-4), so no compute is spent below a
  window, past a suffix, or twice on the same states. The last layer runs only the last
  position's query (the answer's), over the suffix's keys.

Activation patches (`PatchMasks`, with the source run's activations) ride along with the knockouts: a patch at
layer l on positions P changes nothing before min(P) nor below layer l, so it starts its configuration's suffix
and window there just as a cut does; configuration k applies knockout k and patch k.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow import sharding
from jaxflow.knockout import KnockoutMasks
from jaxflow.model import ModelInputs, Prefill, embed_inputs, patch_edits, prefill_forward
from jaxflow.nn.decoder import KVCache
from jaxflow.nn.vlm import VisionLanguageModel
from jaxflow.patching import PatchMasks


@contextlib.contextmanager
def count_compiles():
    """Within the block, counts XLA compilations per jitted function name (e.g. 'jit(knockout_incremental)')
    and their backend compile seconds: yields (counts, seconds), two Counters."""
    counts, seconds = collections.Counter(), collections.Counter()

    def listen(event: str, duration: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[str(kwargs.get("fun_name"))] += 1
            seconds[str(kwargs.get("fun_name"))] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts, seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


BaseRun = Prefill  # the uncut forward of a batch (with its hidden states): what the incremental method reuses


def _at_last(x, last):
    """x [..., B, T, D], last [B] -> [..., B, D]."""
    idx = jnp.broadcast_to(last[:, None, None], x.shape[:-3] + (x.shape[-3], 1, x.shape[-1]))
    return jnp.take_along_axis(x, idx, axis=-2)[..., 0, :]


def _answer_prob(lm, h, token):
    """h [..., B, D] final-normed -> (p of token [..., B], top-1 token [..., B])."""
    probs = jax.nn.softmax(lm.unembed(h).astype(jnp.float32), axis=-1)
    idx = jnp.broadcast_to(token[:, None], probs.shape[:-1] + (1,))
    return jnp.take_along_axis(probs, idx, axis=-1)[..., 0], jnp.argmax(probs, axis=-1)


def base_run(module: VisionLanguageModel, inputs: ModelInputs, last, offset=None) -> BaseRun:
    """The uncut forward with hidden states, keys and values; the prefill that `Model.generate` continues from.
    offset [B, T, D]: added to the input embeddings (a `Noise` on the target)."""
    return prefill_forward(module, inputs, jnp.asarray(last), collect_hidden=True, offset=offset)


@nnx.jit(graph=False)
def knockout_full(module: VisionLanguageModel, inputs: ModelInputs, knock: KnockoutMasks, last, token,
                  patch: PatchMasks | None = None, source: dict | None = None, offset=None):
    """knock (and patch, from `source`'s activations site -> [L, B, T, ...]) with a leading axis K -> (p [K, B],
    top1 [K, B]) by full recomputation; offset [B, T, D] is added to the input embeddings."""
    lm = module.language_model
    x = embed_inputs(module, inputs, offset)
    slots = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [B, T]

    def one(k, p):
        out = lm(x, inputs.position_ids, inputs.attention_mask, knock=k, edits=patch_edits(lm, p, source, slots))
        return _answer_prob(lm, _at_last(out.hidden, last), token)

    return jax.vmap(one)(knock, patch)


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Host side, static: the rows of recomputation of K configurations. reps[r] is row r's representative
    configuration (whose cut and suffix the row runs: a row keeps its index and representative from the
    layer it starts at). parents[l] gives, for each row at layer l, the row of layer l - 1 it continues (-1:
    it starts here, from the uncut run): rows that continue come first, in their order, then forks, then
    fresh starts. out[c]: configuration c's row after the last layer."""

    reps: tuple[int, ...]
    parents: tuple[tuple[int, ...], ...]
    out: tuple[int, ...]

    @property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the representatives of its rows."""
        return tuple(self.reps[:len(p)] for p in self.parents)


def share_rows(knock: KnockoutMasks, starts: np.ndarray, t0: np.ndarray, patch: PatchMasks | None = None) -> RowPlan:
    """Host side: configurations (window starts `starts` [K], suffix starts t0 [K, B]) share a row while
    they started at the same layer and position and cut the same edges (source, target, heads) and patch the
    same activations (site, positions, heads) in every layer so far; a row forks where they first differ."""
    layers = np.asarray(knock.layers)
    arrays = [np.asarray(a) for a in (knock.source, knock.target, knock.heads)]
    ids, origins = {}, {}  # equal ids: the same edges where they cut; the same start layer and positions
    cut = [ids.setdefault(tuple(a[c].tobytes() for a in arrays), len(ids)) for c in range(len(starts))]
    origin = [origins.setdefault((int(starts[c]), t0[c].tobytes()), len(origins)) for c in range(len(starts))]
    patched, what = np.zeros_like(layers), [0] * len(starts)
    if patch is not None:
        patched = np.asarray(patch.layers)
        arrays = [np.asarray(a) for a in (patch.site, patch.positions, patch.heads)]
        what = [ids.setdefault(tuple(a[c].tobytes() for a in arrays), len(ids)) for c in range(len(starts))]
    members: list[list[int]] = []  # the configurations of each row; members[r][0] is its representative
    parents = []
    for layer in range(layers.shape[1]):

        def edges(c, layer=layer):
            return cut[c] if layers[c, layer] else -1, what[c] if patched[c, layer] else -1

        kept, forks = [], []
        for i, group in enumerate(members):
            classes = {}
            for c in group:
                classes.setdefault(edges(c), []).append(c)
            first, *rest = classes.values()
            kept.append((i, first))
            forks += [(i, g) for g in rest]
        fresh = {}
        for c in np.flatnonzero(starts == layer):
            fresh.setdefault((origin[c], edges(c)), []).append(int(c))
        step = kept + forks + [(-1, g) for g in fresh.values()]  # a kept class holds its row's representative
        members = [g for _, g in step]
        parents.append(tuple(i for i, _ in step))
    out = {c: r for r, g in enumerate(members) for c in g}
    return RowPlan(tuple(g[0] for g in members), tuple(parents), tuple(out[c] for c in range(len(starts))))


def _take(a, idx: np.ndarray):
    """a[idx] along the leading axis for static indices: a slice when they are a contiguous range."""
    if len(idx) and (idx == np.arange(idx[0], idx[0] + len(idx))).all():
        return a[int(idx[0]):int(idx[0]) + len(idx)]
    return a[idx]


@functools.partial(nnx.jit, graph=False, static_argnames=("plan",))
def knockout_incremental(module: VisionLanguageModel, base: BaseRun, valid, knock: KnockoutMasks, q_pos, q_valid,
                         last_in_suffix,
                         token, plan: RowPlan, patch: PatchMasks | None = None, source: dict | None = None):
    """Exact partial recomputation (see the module docstring).

    knock (and patch, from `source`'s activations site -> [L, B, T, ...]): K configurations run in the rows of
    `plan` (`share_rows`); q_pos, q_valid [K, B, S]: the suffix positions each configuration recomputes
    (q_pos[..., 0] = t0); last_in_suffix [K, B]: index of the last position within the suffix; valid [B, T].
    """
    lm = module.language_model
    t = valid.shape[1]
    slots = jnp.broadcast_to(jnp.arange(t), valid.shape)  # [B, T]
    x = None  # [rows, B, S, D]
    for layer_idx, layer in enumerate(lm.layers):
        parents = np.asarray(plan.parents[layer_idx], int)
        reps = np.asarray(plan.reps[:len(parents)], int)
        if not len(reps):
            continue
        parts = [] if x is None else [x]  # the rows that continue, in order
        forks = parents[0 if x is None else x.shape[0]:]
        forks = forks[forks >= 0]  # then the rows that fork here: copies of their parents' states
        if len(forks):
            parts.append(_take(x, forks))
        new = reps[parents < 0]
        if len(new):  # rows that start here take the uncut input of this layer
            parts.append(jnp.take_along_axis(base.hidden[layer_idx][None], _take(q_pos, new)[..., None], axis=2))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts)  # [rows, B, S, D]

        def one(xk, qk, qvk, kk, lk, pk, layer_idx=layer_idx, layer=layer):
            edits = {} if pk is None else pk.edits(layer_idx, qk, source)  # site -> SiteEdit over [B, S]
            if "resid_pre" in edits:
                xk = edits.pop("resid_pre")(xk)
            (cos, sin), own, (pre,) = lm.masks(qk, qvk, [KVCache(None, None, slots, valid & (slots < qk[:, :1]))])
            own = own & ~kk.cut(layer_idx, qk, qk)  # [B, H, S, S]: causal within the suffix
            pre = pre & ~kk.cut(layer_idx, qk, slots)  # [B, H, S, T]: the uncut run's keys before t0
            k_base, v_base = base.k[layer_idx], base.v[layer_idx]
            if layer_idx < len(lm.layers) - 1 or xk.shape[1] == 1:
                return layer(xk, cos, sin, own, [(k_base, v_base, pre)], edits=edits)[0]
            # the last layer matters only at the last position: its query alone, the suffix's keys before it
            # as a second prefix block (the rows after the last are padding, masked by `own`)
            at = lambda a: jnp.take_along_axis(a, lk[:, None, None], axis=1)  # [B, S, X] -> [B, 1, X]  # noqa: E731
            row = lambda m: jnp.take_along_axis(m, lk[:, None, None, None], axis=2)  # [B, H, S, X] -> [B, H, 1, X]  # noqa: E731
            k, v = layer.self_attn.keys(layer.input_layernorm(xk), cos, sin)  # [B, K, S, hd]
            before = row(own) & (jnp.arange(xk.shape[1]) < lk[:, None])[:, None, None]  # [B, H, 1, S]
            q_last = jnp.take_along_axis(qk, lk[:, None], axis=1)  # [B, 1]
            self_edge = ~kk.cut(layer_idx, q_last, q_last)  # [B, H, 1, 1]: the last position's own key
            edits = jax.tree.map(lambda a: a[jnp.arange(a.shape[0]), lk][:, None], edits)  # at the last position
            out = layer(at(xk), at(cos), at(sin), self_edge, [(k_base, v_base, row(pre)), (k, v, before)],
                        edits=edits)[0]
            return jnp.broadcast_to(out, xk.shape)  # [B, S, D]: only the last row is read

        sub, qk, qvk, lk, pk = jax.tree.map(lambda a, reps=reps: _take(a, reps),
                                            (knock, q_pos, q_valid, last_in_suffix, patch))
        x = jax.vmap(one)(x, qk, qvk, sub, lk, pk)
    x = _take(x, np.asarray(plan.out, int))  # [K, B, S, D]
    h = jnp.take_along_axis(x, last_in_suffix[..., None, None], axis=2)[:, :, 0]  # [K, B, D]
    return _answer_prob(lm, lm.norm(h), token)


@nnx.jit(graph=False)
def logit_lens(module: VisionLanguageModel, hidden, last, tokens):
    """hidden (L + 1 x [B, T, D], `Prefill.hidden`), tokens [B, N] -> probabilities [2, L + 1, B, N]: raw
    (no final norm, as the study did) and with the final norm."""
    lm = module.language_model
    h = jnp.stack([_at_last(x, last) for x in hidden])  # [L + 1, B, D]

    def probs(x):
        p = jax.nn.softmax(lm.unembed(x).astype(jnp.float32), axis=-1)  # [L + 1, B, V]
        return jnp.take_along_axis(p, jnp.broadcast_to(tokens, p.shape[:2] + tokens.shape[-1:]), axis=-1)

    return jnp.stack([probs(h), probs(lm.norm(h))])


def window_starts(knock: KnockoutMasks, patch: PatchMasks | None = None) -> np.ndarray:
    """First cut (or patched) layer of each configuration [K] (num_layers for one that changes nothing)."""
    layers = np.asarray(knock.layers) | (False if patch is None else np.asarray(patch.layers))
    return np.where(layers.any(-1), layers.argmax(-1), layers.shape[-1])


def suffix_starts(knock: KnockoutMasks, lengths: np.ndarray,
                  patch: PatchMasks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host side: t0 [K, B], the first position each configuration changes (its first target or patched
    position; the last position when it has none), and span [K], the positions it recomputes (max over the
    batch)."""
    target = np.asarray(knock.target) | (False if patch is None else np.asarray(patch.positions))  # [K, B, T]
    last = lengths - 1
    t0 = np.minimum(np.where(target.any(-1), target.argmax(-1), last[None]), last[None])
    return t0, (last[None] - t0).max(axis=1) + 1


def suffix_bucket(span: int, t: int) -> int:
    """The suffix length `span` positions are padded to: a power of two up to 8, then a multiple of 8 (at
    most t), so the configurations of a task file fall into a handful of shapes."""
    return min(t, 1 << (span - 1).bit_length() if span <= 8 else _round_up(span, 8))


def suffix_plan(t0: np.ndarray, lengths: np.ndarray, size: int, t: int):
    """Host side: the suffix of `size` positions from t0 [K, B] in a batch of t positions. Returns q_pos,
    q_valid [K, B, size] and last_in_suffix [K, B]."""
    last = lengths - 1
    q = t0[..., None] + np.arange(size)  # [K, B, S]
    return np.minimum(q, t - 1).astype(np.int32), q <= last[None, :, None], (last[None] - t0).astype(np.int32)


def memory_budget() -> int:
    """Bytes the knockout activations may use: 60% of the accelerator's free memory, or half the
    host's available memory on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(0.6 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def configuration_bytes(module: VisionLanguageModel, batch: int, t: int, suffix: int | None) -> int:
    """Memory one configuration of a knockout call may need, as `auto_chunk` budgets it: the activations of one
    layer over the recomputed queries (all T, or the suffix), its attention scores and the answer's logits, twice
    over."""
    cfg = module.cfg.text
    itemsize = module.language_model.embed_tokens.embedding.dtype.itemsize
    q = t if suffix is None else suffix
    keys = t if suffix is None else t + suffix
    per = batch * q * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * itemsize
    per += batch * cfg.num_heads * q * keys * (4 + 4 + itemsize)  # f32 scores, masked scores, weights
    per += batch * cfg.vocab_size * (itemsize + 4)  # the last position's logits and their f32 softmax
    return 2 * per  # headroom for XLA's temporaries


def auto_chunk(module: VisionLanguageModel, batch: int, t: int, suffix: int | None, k: int,
               budget: int | None = None) -> int:
    """Configurations per call (at most k) that fit `budget` bytes (default `memory_budget()`)."""
    budget = memory_budget() if budget is None else budget
    return int(max(1, min(k, budget // configuration_bytes(module, batch, t, suffix))))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _chunks(k: int, chunk: int):
    for start in range(0, k, chunk):
        idx = np.arange(start, start + chunk)
        yield np.minimum(idx, k - 1), min(chunk, k - start)  # pad the last chunk: one shape, one compile


def knockout_probs(module: VisionLanguageModel, inputs: ModelInputs, knock: KnockoutMasks | None, last, token, *,
                   method="incremental", chunk: int | None = None, budget: int | None = None,
                   base: BaseRun | None = None, mesh: jax.sharding.Mesh | None = None,
                   patch: PatchMasks | None = None, source: dict | None = None, offset=None):
    """p(token) and top-1 under each of K configurations: arrays [K, B] (numpy).

    knock: KnockoutMasks with leading axis K (no dense masks), or None with K patches. patch: PatchMasks with
    leading axis K (`Model.interventions` pairs it with knock), replacing activations by `source`'s (site -> [L,
    B, T, ...], `Model.source_activations`); offset [B, T, D]: added to the target's input embeddings (a `Noise`;
    a given `base` must be that run's). The incremental method runs the
    configurations grouped by suffix bucket; `chunk` bounds how many run at once (default: as many of a
    group as fit `budget` bytes, see `auto_chunk`);
    `base` is reused by the incremental method. With a mesh, each call's configurations are
    split over its `data` axis (the parameters carry their own `model` sharding).
    """
    if knock is None:
        knock = uncut(patch, module.cfg.text.num_heads)
    if knock.dense is not None:
        raise ValueError("knockouts: sweeps take compact knockouts only (no DenseKnockout)")
    k = np.asarray(knock.layers).shape[0]
    more = {"patch": patch, "source": source, "offset": offset}
    if method == "incremental":
        call = knockout_incremental
        calls = incremental_calls(module, inputs, knock, last, token, chunk=chunk, budget=budget, base=base, mesh=mesh,
                                  **more)
    elif method == "full":
        call = knockout_full
        calls = full_calls(module, inputs, knock, last, token, chunk=chunk, budget=budget, mesh=mesh, **more)
    else:
        raise ValueError(f"method: {method!r} is not 'full' or 'incremental'")
    pending = [(sel, *call(*args)) for sel, args in calls]  # all queued before any is read: no host sync between
    return _gather(pending, k, len(token))


def uncut(patch: PatchMasks, num_heads: int) -> KnockoutMasks:
    """KnockoutMasks that cut nothing, one per configuration of `patch`."""
    k, b, t = np.asarray(patch.positions).shape
    empty = np.zeros((k, b, t), bool)
    return KnockoutMasks(empty, empty, np.zeros_like(np.asarray(patch.layers)), np.zeros((k, num_heads), bool))


def full_calls(module: VisionLanguageModel, inputs: ModelInputs, knock: KnockoutMasks, last, token, *,
               chunk: int | None = None,
               budget: int | None = None, mesh: jax.sharding.Mesh | None = None, patch: PatchMasks | None = None,
               source: dict | None = None, offset=None):
    """The `knockout_full` calls of `knockout_probs(method="full")`, as `incremental_calls` gives them."""
    k = np.asarray(knock.layers).shape[0]
    last, token = sharding.replicate((jnp.asarray(last), jnp.asarray(token)), mesh)
    data = 1 if mesh is None else mesh.shape["data"]
    b, t = inputs.input_ids.shape
    chunk = _round_up(chunk or auto_chunk(module, b, t, None, k, budget), data)
    for idx, n in _chunks(k, chunk):
        sub, sub_patch = sharding.shard_leading(jax.tree.map(lambda a, idx=idx: np.asarray(a)[idx], (knock, patch)),
                                                mesh)
        yield idx[:n], (module, inputs, sub, last, token, sub_patch, source, offset)


def incremental_calls(module: VisionLanguageModel, inputs: ModelInputs, knock: KnockoutMasks, last, token, *,
                      chunk: int | None = None, budget: int | None = None, base: BaseRun | None = None,
                      mesh: jax.sharding.Mesh | None = None, patch: PatchMasks | None = None,
                      source: dict | None = None, offset=None):
    """The `knockout_incremental` calls of `knockout_probs(method="incremental")`, in order: yields
    (configurations [n] the call answers for, its arguments). Its first n result rows are theirs."""
    last, token = sharding.replicate((jnp.asarray(last), jnp.asarray(token)), mesh)
    data = 1 if mesh is None else mesh.shape["data"]
    b, t = inputs.input_ids.shape
    if base is None:
        base = base_run(module, inputs, last, offset)
    lengths = np.asarray(last) + 1
    num_layers = np.asarray(knock.layers).shape[-1]
    starts = np.minimum(window_starts(knock, patch), num_layers - 1)
    t0, spans = suffix_starts(knock, lengths, patch)
    sizes = np.array([suffix_bucket(int(span), t) for span in spans])
    for size in np.unique(sizes):  # one group per suffix bucket, sorted by window start within (rows: mostly slices)
        group = np.flatnonzero(sizes == size)
        group = group[np.argsort(starts[group], kind="stable")]
        n_chunk = _round_up(chunk or auto_chunk(module, b, t, int(size), len(group), budget), data)
        for idx, n in _chunks(len(group), n_chunk):
            sel = group[idx]
            sub, sub_patch = jax.tree.map(lambda a, sel=sel: np.asarray(a)[sel], (knock, patch))
            rows = share_rows(sub, starts[sel], t0[sel], sub_patch)
            sub, sub_patch, *suffix = sharding.shard_leading((sub, sub_patch, *suffix_plan(t0[sel], lengths, int(size),
                                                                                           t)), mesh)
            yield sel[:n], (module, base, inputs.attention_mask, sub, *suffix, token, rows, sub_patch, source)


def _gather(pending, k: int, b: int):
    """The results of dispatched calls [(rows, p, top)] -> (p [K, B], top1 [K, B]) numpy."""
    ps, tops = np.zeros((k, b), np.float32), np.zeros((k, b), np.int64)
    for rows, p, top in pending:
        ps[rows], tops[rows] = np.asarray(p)[: len(rows)], np.asarray(top)[: len(rows)]
    return ps, tops
