"""The router registry: each router is one `Router` entry, found by the name in `MoEConfig.router`.

An entry holds the routing function (one signature: `route(inputs: RouterInputs, c: MoEConfig)` ->
`routing.Routing` or `routing.ExpertChoice`), whether the router owns a weight W_r [d, E], which of the
router options of MoEConfig it reads (`OPTIONS`; every other option must keep its default), any further
config checks, and how many routed experts a token uses on average (for active-parameter counts). The MoE
layer, config validation and `metrics.active_params` ask the entry; nothing else branches on the name.

Adding a router is one function and one `register` call (README, "Adding a router"):

    def sinkhorn(x: routers.RouterInputs, c: MoEConfig) -> routing.Routing:
        ...
    routers.register("sinkhorn", routers.Router(sinkhorn, options=("aux_loss_coef", "z_loss_coef")))

The routing math itself lives in moejax.routing (pure functions on arrays); an entry adapts it to the config.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax

from moejax import dispatch, routing

if TYPE_CHECKING:
    from moejax.model_config import MoEConfig

# Router options of MoEConfig and their defaults; a router lists those it reads in `Router.options`.
OPTIONS = {
    "score_fn": "softmax", "normalize": False, "routed_scale": 1.0, "n_groups": 1, "topk_groups": 1,
    "group_score": "top2_sum", "aux_free_bias": False, "disable_top": 0, "jitter": 0.0, "hash_salt": 0,
    "aux_loss_coef": 0.0, "device_loss_coef": 0.0, "seq_aux_loss_coef": 0.0, "z_loss_coef": 0.0,
}
BALANCE_LOSSES = ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterInputs:
    """What a router may read about B sequences of S tokens.

    logits:    [B, S, E] float32 router logits x W_r (after jitter in training); None if the router owns no W_r.
    token_ids: [B, S] int32 vocabulary ids, or None if the caller has none.
    key:       a PRNG key for the router's own randomness in training, else None.
    bias:      [E] float32 aux-loss-free bias (MoEConfig.aux_free_bias), else None.
    train:     static; True in training, False at evaluation.
    """

    logits: jax.Array | None
    token_ids: jax.Array | None
    key: jax.Array | None
    bias: jax.Array | None
    train: bool = dataclasses.field(default=False, metadata=dict(static=True))


RouteFn = Callable[[RouterInputs, "MoEConfig"], "routing.Routing | routing.ExpertChoice"]
Require = Callable[[bool, str, Any, str], None]


@dataclasses.dataclass(frozen=True)
class Router:
    """One router. route: see module docstring. learned: owns a router weight W_r [d, E] (its logits are
    passed in RouterInputs.logits). options: the OPTIONS it reads. check(c, require): further config rules
    (require(ok, field, value, allowed) raises the config's ValueError). experts_per_token(c): routed experts
    a token uses on average. needs_key: uses randomness in training beyond jitter (the layer asks for a key)."""

    route: RouteFn
    learned: bool = True
    options: tuple[str, ...] = ()
    check: Callable[["MoEConfig", Require], None] | None = None
    experts_per_token: Callable[["MoEConfig"], float] = lambda c: float(c.top_k)
    needs_key: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"Router.options={unknown} is invalid; allowed: names in routers.OPTIONS {sorted(OPTIONS)}")


_REGISTRY: dict[str, Router] = {}


def register(name: str, router: Router) -> Router:
    """Make `router` available as MoEConfig(router=name). A name is registered once (ValueError otherwise)."""
    if name in _REGISTRY:
        raise ValueError(f"router {name!r} is already registered; allowed: a new name (registered: {names()})")
    _REGISTRY[name] = router
    return router


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Router:
    if name not in _REGISTRY:
        raise ValueError(f"MoEConfig.router={name!r} is invalid; allowed: {names()}")
    return _REGISTRY[name]


def check_config(c: "MoEConfig", require: Require) -> None:
    """The router rules of MoEConfig: the router exists, the options it does not read keep their defaults,
    then its own checks."""
    require(c.router in _REGISTRY, "router", c.router, str(names()))
    r = _REGISTRY[c.router]
    for name, default in OPTIONS.items():
        if name not in r.options:
            readers = tuple(n for n, e in _REGISTRY.items() if name in e.options)
            require(getattr(c, name) == default, name, getattr(c, name),
                    f"{default!r} with router={c.router!r} (only routers {readers} read it)")
    if r.check is not None:
        r.check(c, require)


def _flat(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])  # [B, S, E] -> [T, E]


def _topk(x: RouterInputs, c: "MoEConfig") -> routing.Routing:
    return routing.topk(_flat(x.logits), c.top_k, score_fn=c.score_fn, normalize=c.normalize, scale=c.routed_scale,
                        bias=x.bias, n_groups=c.n_groups, topk_groups=c.topk_groups, group_score=c.group_score,
                        disable_top=c.disable_top)


def _check_topk(c: "MoEConfig", require: Require) -> None:
    if c.n_groups > 1:
        kept = c.topk_groups * (c.n_experts // c.n_groups)
        require(kept >= c.top_k, "topk_groups", c.topk_groups,
                f"enough groups to hold top_k={c.top_k} experts (kept groups hold {kept})")
        require(not c.disable_top, "disable_top", c.disable_top, "0 with group-limited routing (n_groups > 1)")


def _gshard(x: RouterInputs, c: "MoEConfig") -> routing.Routing:
    return routing.gshard_top2(_flat(x.logits), x.key if x.train else None, c.disable_top)


def _expert_choice(x: RouterInputs, c: "MoEConfig") -> routing.ExpertChoice:
    B, S, E = x.logits.shape
    C = min(S, dispatch.capacity(S, c.top_k, c.n_experts, c.capacity_factor))
    return jax.vmap(routing.expert_choice, (0, None))(x.logits, C)  # per sequence: token_ids [B, E, C]


def _hash(x: RouterInputs, c: "MoEConfig") -> routing.Routing:
    if x.token_ids is None:
        raise ValueError("MoEConfig.router='hash' needs token_ids [B, S]: pass token_ids= to MoE.__call__")
    return routing.hash_routing(x.token_ids.reshape(-1), c.n_experts, c.top_k, c.hash_salt)


_LEARNED = ("jitter", "z_loss_coef")
register("topk", Router(_topk, options=tuple(k for k in OPTIONS if k != "hash_salt"), check=_check_topk))
register("gshard", Router(
    _gshard, options=("disable_top",) + _LEARNED + BALANCE_LOSSES, needs_key=True,
    check=lambda c, require: require(c.top_k == 2, "top_k", c.top_k, "2 for router='gshard'")))
register("expert_choice", Router(
    _expert_choice, options=_LEARNED, experts_per_token=lambda c: c.top_k * c.capacity_factor,
    check=lambda c, require: require(c.dispatch == "capacity", "dispatch", c.dispatch,
                                     "'capacity' for router='expert_choice' (every expert takes exactly C tokens)")))
register("hash", Router(_hash, learned=False, options=("hash_salt",)))
