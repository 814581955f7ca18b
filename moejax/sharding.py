"""Device mesh, the logical axis table, and sharded placement of parameters, optimiser state and batches.

Mesh axes (`MESH_AXES`), any of which may have size 1:
  data    data parallel: batch split, parameters replicated;
  fsdp    data parallel with parameters and optimiser state split along `embed` (ZeRO-3 / FSDP);
  expert  expert parallel (GShard sec. 3): routed experts split by expert, tokens sent to the devices that
          hold their experts and back (moejax.moe, moejax.dispatch); every other layer treats it as data;
  tensor  Megatron tensor parallel: attention heads, FFN hidden units (`mlp`) and the vocabulary split.

`RULES` is the one table from logical axis names (what modules annotate: parameters carry an `axes`
metadata tuple; activations call `constrain`) to mesh axes. In a spec a mesh axis is used once: it is
dropped from a later dimension that maps to it again (activations [batch, length, embed] are split over
batch only). A parameter dimension whose size the mesh axes do not divide is left whole.

Modules read the mesh that `use(mesh)` makes current (jax.set_mesh); without one everything runs unsharded
on the default device. This file imports only jax, so the modules may import it (a layer below the
DESIGN.md placement of sharding.py in the system layer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch
RULES = {
    "batch": BATCH_AXES,
    "length": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "expert": ("expert",),
    "vocab": ("tensor",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape: devices along data, fsdp, expert, tensor; one of them may be -1 (the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        for name, size in zip(MESH_AXES, sizes):
            if not (size >= 1 or size == -1):
                raise ValueError(f"MeshConfig.{name}={size} is invalid; allowed: an integer >= 1, or -1 for the "
                                 f"remaining devices")
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig={self} is invalid; allowed: at most one axis of size -1")

    def shape(self, n_devices: int) -> tuple[int, ...]:
        """The four axis sizes for `n_devices` devices, -1 resolved; ValueError if they do not multiply out."""
        sizes = dataclasses.astuple(self)
        fixed = math.prod(s for s in sizes if s != -1)
        shown = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        if -1 in sizes:
            if n_devices % fixed:
                raise ValueError(f"mesh ({shown}) does not fit {n_devices} devices: {n_devices} is not divisible by "
                                 f"the product {fixed} of the fixed axes")
            return tuple(n_devices // fixed if s == -1 else s for s in sizes)
        if fixed != n_devices:
            raise ValueError(f"mesh ({shown}) has {fixed} devices but {n_devices} are available; allowed: axis "
                             f"sizes whose product is {n_devices} (or one axis -1)")
        return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
    """A Mesh over `devices` (default: all, every process) with axes MESH_AXES (Auto sharding).

    Devices come in the order jax.experimental.mesh_utils chooses for the platform's interconnect
    (TPU: physical topology; else process-major), so the innermost axes (expert, tensor) get the
    closest devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = config.shape(len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # shapes the topology helper cannot lay out
        grid = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh() -> jax.sharding.Mesh:
    """A mesh of the first device (every axis size 1): the unsharded run, through the same code path."""
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh):
    """Make `mesh` current for tracing and running (modules read it via jax.sharding.get_abstract_mesh)."""
    with jax.set_mesh(mesh):
        yield mesh


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The current (abstract) mesh, or None outside `use`."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def axis_size(name: str, mesh=None) -> int:
    """Size of mesh axis `name` in `mesh` (default: the current mesh); 1 without a mesh or axis."""
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None or name not in mesh.axis_names:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes))[name]


def mesh_axes(logical: str | None, mesh=None) -> tuple[str, ...]:
    """Mesh axes (present in the mesh) that a logical axis name maps to under RULES."""
    if logical is None:
        return ()
    if logical not in RULES:
        raise ValueError(f"logical axis {logical!r} is not in sharding.RULES; allowed: {tuple(RULES)}")
    mesh = mesh if mesh is not None else current_mesh()
    names = mesh.axis_names if mesh is not None else MESH_AXES
    return tuple(a for a in RULES[logical] if a in names)


def spec(axes, shape=None, mesh=None) -> P:
    """PartitionSpec of logical `axes` (one name or None per dimension) under RULES. A mesh axis is used
    once (by the first dimension naming it); with `shape`, a dimension keeps only the leading mesh axes
    whose product divides its size."""
    used, out = set(), []
    for i, name in enumerate(axes):
        kept, prod = [], 1
        for a in mesh_axes(name, mesh):
            size = axis_size(a, mesh)
            if a in used or (shape is not None and shape[i] % (prod * size)):
                continue
            kept.append(a)
            prod *= size
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else kept[0] if kept else None)
    return P(*out)


def constrain(x: jax.Array, axes) -> jax.Array:
    """with_sharding_constraint to logical `axes` under the current mesh; identity without one (or inside a
    shard_map, where the axes are manual)."""
    mesh = current_mesh()
    if mesh is None or not mesh.are_all_axes_auto:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh)))


def _varying(a) -> set:
    """The manual mesh axes an array varies over inside a shard_map (`.vma` in older JAX)."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    return set(mat.varying if mat is not None else getattr(t, "vma", ()))


def vary_like(tree, ref: jax.Array):
    """tree's arrays marked varying over every manual mesh axis that ref varies over (inside a shard_map), so
    that loop carries and custom-VJP cotangents computed from both have ref's type; outside one, tree as is.
    The transpose of the cast sums the cotangent over those axes, as autodiff does for an invariant input."""
    want = _varying(ref)

    def cast(a):
        extra = tuple(sorted(want - _varying(a)))
        return jax.lax.pcast(a, extra, to="varying") if extra else a

    return jax.tree.map(cast, tree) if want else tree


def batch_shards(mesh=None) -> int:
    """Number of batch shards: the product of the BATCH_AXES sizes."""
    return math.prod(axis_size(a, mesh) for a in BATCH_AXES)


def platform(mesh=None) -> str:
    """Platform ('cpu', 'gpu', 'tpu') of the mesh's devices (AOT: the target TPU), else the default backend."""
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is not None:
        device = mesh.abstract_device if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.devices.flat[0]
        if device is not None:
            return device.platform
    return jax.default_backend()


# ----- parameters, optimiser state and batches -------------------------------------------------------


def param_axes(variable) -> tuple:
    """The logical axes a parameter was annotated with (`nnx.Param(..., axes=(...))`); () if none."""
    return tuple(variable.get_metadata().get("axes", ()) or ())


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedShardings for a state pytree: every nnx Variable by its `axes` metadata (optimiser moments are
    Variables that keep their parameter's metadata), everything else replicated."""
    from flax import nnx

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = param_axes(x)
            shape = x.get_value().shape
            if axes and len(axes) != len(shape):
                raise ValueError(f"parameter of shape {shape} is annotated with {len(axes)} axes {axes}")
            return x.replace(NamedSharding(mesh, spec(axes or (None,) * len(shape), shape, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (for orbax restore and ahead-of-time lowering)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch array: B over BATCH_AXES."""
    return NamedSharding(mesh, spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def require_batch(batch_size: int, mesh: jax.sharding.Mesh, grad_accum: int = 1, where: str = "data.batch_size"):
    """ValueError unless the global batch splits into grad_accum micro-batches over every batch shard."""
    shards = batch_shards(mesh)
    if batch_size % (shards * grad_accum):
        sizes = " x ".join(f"{a}={axis_size(a, mesh)}" for a in BATCH_AXES)
        raise ValueError(f"{where}={batch_size} is invalid with train.grad_accum={grad_accum} on this mesh; allowed: "
                         f"a multiple of grad_accum x the batch shards ({sizes}), i.e. of {shards * grad_accum}")


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """This process's rows {name: [B / process_count, ...]} -> global jax.Arrays [B, ...] sharded by batch."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


# ----- multi-host ----------------------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """jax.distributed.initialize for multi-process runs; returns whether it was called.

    Called when any argument is given, when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID), or on a multi-host TPU VM slice (TPU_WORKER_HOSTNAMES lists several hosts), where
    jax finds everything itself. On CPU the collectives between processes use gloo."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    multi_host_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if coordinator_address is None and num_processes is None and process_id is None and not multi_host_tpu:
        return False
    if coordinator_address is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
