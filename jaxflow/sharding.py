"""Meshes and the one table that maps logical axis names to mesh axes.

Parameters carry logical axis names (see `jaxflow.nn.layers.param`); `RULES` maps them onto a
mesh with axes `data` (samples / knockout configurations) and `model` (tensor parallel over
attention heads, MLP width and vocabulary, in the vision tower too). A dimension that does not
divide evenly by its mesh axis stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

RULES: dict[str, str] = {
    "configs": "data",  # knockout configurations of a sweep call
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "vision_heads": "model",
    "vision_mlp": "model",
}
AXES = ("data", "model")


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """'data=4,model=2' -> {'data': 4, 'model': 2}; default: every device on `data`."""
    if not spec:
        return {"data": num_devices, "model": 1}
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh {spec!r}: expected data=N,model=M")
        sizes[name.strip()] = int(value)
    if sizes["data"] * sizes["model"] != num_devices:
        raise ValueError(f"--mesh {spec!r}: {sizes['data']} x {sizes['model']} devices, but {num_devices} are "
                         "available")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: this process's devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh((sizes["data"], sizes["model"]), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def partition_spec(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, mesh: Mesh) -> PartitionSpec:
    """Logical axes -> mesh PartitionSpec by RULES, replicating dimensions that do not divide evenly."""
    if axes is None:
        return PartitionSpec()
    spec = []
    for dim, name in zip(shape, axes, strict=True):
        axis = RULES.get(name) if name else None
        spec.append(axis if axis and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Flat parameter path -> NamedSharding, from each parameter's logical axes."""
    return {path: NamedSharding(mesh, partition_spec(var.get_value().shape, var.get_metadata().get("out_sharding"),
                                                     mesh))
            for path, var in nnx.to_flat_state(state)}


def shard_leading(tree, mesh: Mesh | None, name: str = "configs"):
    """Puts every array of `tree` on `mesh`, its leading axis split by RULES[name] when it divides."""
    if mesh is None:
        return tree

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = partition_spec(x.shape[:1], (name,), mesh) if x.ndim else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins JAX's multi-process runtime (call before any computation). Without arguments JAX
    detects the cluster itself (TPU pod slices, SLURM, ...)."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
    """Waits until every process reaches `name` (a no-op in a single process). Uses the
    distributed runtime's coordination service, so no device collective is involved."""
    if jax.process_count() > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def replicate(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), tree)
