"""NullRoutedMoE: a Mixtral sparse-MoE block whose router may send any of a token's k slots to null.

The module holds the parameters (router, null logit, experts) and composes the pure stages: routing.py (who
goes where) -> experts.expert_mlp (dispatch.py sorting, grouped matmuls from gmm.py, combine; fused on the
tiled backend). Under a mesh whose axis mapping puts "experts" on a mesh axis that also shards the tokens, the
experts run expert-parallel (transport.py): only real rows travel to the device that owns their expert.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Optional

import equinox as eqx
import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
from haliax import NamedArray
from haliax.jax_utils import named_call
from jax.sharding import PartitionSpec

from . import routing as R
from .config import ACTIVATIONS, NullMoEConfig
from .experts import expert_mlp, expert_path
from .gmm import resolve_backend
from .transport import block_capacity, ep_expert_mlp, resolve_transport, send_traffic, shard_map_unchecked


class ExpertMlp(eqx.Module):
    """N gated experts, laid out as Levanter's ``MixtralMoEMlp`` so its weights drop in unchanged.

    w1 (gate_proj) and w3 (up_proj): Experts x Embed -> Mlp; w2 (down_proj): Experts x Mlp -> Embed.
    """

    w1: hnn.MoELinear
    w2: hnn.MoELinear
    w3: hnn.MoELinear

    @staticmethod
    def init(config: NullMoEConfig, *, key) -> "ExpertMlp":
        k1, k2, k3 = jax.random.split(key, 3)
        E, D, F = config.Experts, config.Embed, config.Mlp
        w1 = hnn.MoELinear.init(Experts=E, In=D, Out=F, key=k1, use_bias=False)
        w2 = hnn.MoELinear.init(Experts=E, In=F, Out=D, key=k2, use_bias=False)
        w3 = hnn.MoELinear.init(Experts=E, In=D, Out=F, key=k3, use_bias=False)
        return ExpertMlp(w1, w2, w3)

    def raw_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(w1 [E, D, F], w2 [E, F, D], w3 [E, D, F]) as raw arrays for the kernels."""

        def raw(lin: hnn.MoELinear):
            return lin.weight.rearrange((lin.Experts, lin.In, lin.Out)).array

        return raw(self.w1), raw(self.w2), raw(self.w3)


def _current_mesh():
    try:
        return hax.partitioning._resolve_mesh()
    except Exception:  # pragma: no cover - no mesh machinery available
        return None


def _token_partition(token_axes) -> Optional[object]:
    """Mesh axes the flattened token dim is sharded over, or None to run unsharded.

    Only the leading token axis may be sharded (batch over data, as Levanter does): then flattening keeps each
    device's tokens contiguous and every device can route and dispatch its own tokens.
    """
    if _current_mesh() is None:
        return None
    specs = [hax.partitioning.physical_axis_name(ax) for ax in token_axes]
    if specs and specs[0] is not None and all(s is None for s in specs[1:]):
        return specs[0]
    return None


def _as_tuple(spec) -> tuple:
    return (spec,) if isinstance(spec, str) else tuple(spec)


class _ExpertParallel(NamedTuple):
    """How the experts are split: over mesh axes ``axes`` (a subset of the tokens' ``token_spec``), size ``ep``."""

    axes: tuple
    ep: int
    token_spec: object

    @property
    def axis_name(self):
        return self.axes[0] if len(self.axes) == 1 else self.axes


def _expert_parallel(token_axes, experts: hax.Axis) -> Optional[_ExpertParallel]:
    """Expert parallelism is on when the axis mapping puts "experts" on mesh axes that also shard the tokens."""
    token_spec = _token_partition(token_axes)
    phys = hax.partitioning.physical_axis_name(experts)
    if token_spec is None or phys is None:
        return None
    axes = _as_tuple(phys)
    if not set(axes) <= set(_as_tuple(token_spec)):
        return None
    mesh_shape = dict(_current_mesh().shape)
    ep = math.prod(mesh_shape[a] for a in axes)
    if ep == 1:
        return None
    if experts.size % ep:
        raise ValueError(
            f"n_routed_experts={experts.size} must be divisible by the expert-parallel size {ep} (mesh axes {axes})"
        )
    return _ExpertParallel(axes, ep, token_spec)


def _per_token(fn, token_axes, *arrays):
    """fn on flat [T, ...] arrays whose every output is per token: each device runs it on its own tokens when the
    tokens are sharded. (GSPMD would otherwise gather every token's logits onto every device for top-k.)"""
    spec = _token_partition(token_axes)
    if spec is None:
        return fn(*arrays)
    out_shape = jax.eval_shape(fn, *arrays)
    specs = lambda tree: jax.tree.map(lambda a: PartitionSpec(spec, *(None,) * (a.ndim - 1)), tree)
    return shard_map_unchecked(fn, mesh=_current_mesh(), in_specs=specs(arrays), out_specs=specs(out_shape))(*arrays)


@contextlib.contextmanager
def _experts_unmapped():
    """Router outputs carry tokens and "experts": with tokens sharded over the experts' mesh axis as well, that
    sharding cannot be expressed (DuplicateSpecError), and top-k needs every expert of a token anyway, so the
    router runs with "experts" unmapped."""
    mapping = hax.partitioning.current_thread_local_mapping()
    if not mapping or mapping.get("experts") is None:
        yield
        return
    with hax.axis_mapping({name: spec for name, spec in mapping.items() if name != "experts"}):
        yield


class NullRoutedMoE(eqx.Module):
    """Mixtral sparse MoE with null routing (docs/DESIGN.md, "Semantics").

    Parameters: ``gate`` Embed -> Experts, ``null_gate`` Embed -> NullLogit (one logit shared by the M null
    copies), ``experts`` (w1, w2, w3). Input x: any axes plus "embed"; every other axis is a token axis.
    Under ``null_control="bias"`` also ``null_bias``, the null-fraction controller's bias (a 0-d float32 array,
    0 at init; None under "loss"): it moves the null copies' selection scores only, carries no gradient of the
    layer's output, and is updated between steps by the rule of ``null_moe.routing.null_bias_update``.
    """

    config: NullMoEConfig = eqx.field(static=True)
    gate: hnn.Linear
    null_gate: hnn.Linear
    experts: ExpertMlp
    null_bias: Optional[NamedArray] = None

    @staticmethod
    def init(config: NullMoEConfig, *, key) -> "NullRoutedMoE":
        k_gate, k_null, k_experts = jax.random.split(key, 3)
        gate = hnn.Linear.init(config.Embed, config.Experts, key=k_gate, use_bias=False)
        null_gate = hnn.Linear.init(config.Embed, config.NullLogit, key=k_null, use_bias=False)
        null_bias = hax.zeros((), dtype=jnp.float32) if config.null_control == "bias" else None
        return NullRoutedMoE(config, gate, null_gate, ExpertMlp.init(config, key=k_experts), null_bias)

    @property
    def backend(self) -> str:
        """The grouped-matmul backend that runs on this platform for ``config.gmm_backend``."""
        return resolve_backend(self.config.gmm_backend)

    @property
    def expert_path(self) -> str:
        """"fused" when the backend's fused expert kernels run (tiled on CPU, triton on GPU, with
        ``config.fused_experts``), else "unfused" (dispatch -> three grouped matmuls -> combine)."""
        return expert_path(self.backend, self.config.fused_experts)

    @property
    def transport(self) -> str:
        """The expert-parallel exchange that runs on this platform for ``config.ep_transport`` (used only when
        the layer runs expert-parallel)."""
        return resolve_transport(self.config.ep_transport)

    # --- routing -------------------------------------------------------------------------------------------
    def _token_axes(self, x: NamedArray):
        """x's axes other than "embed", after checking x against the config (before any Haliax op sees it)."""
        Embed = self.config.Embed
        if not isinstance(x, NamedArray):
            raise TypeError(f"NullRoutedMoE expects a haliax NamedArray with an '{Embed.name}' axis, got {type(x).__name__}")
        if not x.has_axis(Embed.name):
            raise ValueError(f"input must have an '{Embed.name}' axis of size hidden_dim={Embed.size}, got axes {x.axes}")
        size = x.resolve_axis(Embed.name).size
        if size != Embed.size:
            raise ValueError(f"input '{Embed.name}' axis has size {size}, but the layer's hidden_dim is {Embed.size}")
        token_axes = tuple(ax for ax in x.axes if ax.name != Embed.name)
        if math.prod(ax.size for ax in token_axes) == 0:
            raise ValueError(f"input has no tokens: token axes {token_axes} have a zero size")
        return token_axes

    def router_logits(self, x: NamedArray) -> jax.Array:
        """[T, N] real router logits in f32 (routing decides in f32 whatever the compute dtype); tokens are x's
        non-embed axes flattened in order."""
        token_axes = self._token_axes(x)
        with _experts_unmapped():
            z = self.gate(x).rearrange(token_axes + (self.config.Experts,))
        return z.array.reshape(-1, self.config.n_routed_experts).astype(jnp.float32)

    def _raw_null_bias(self) -> Optional[jax.Array]:
        """The null-fraction controller's bias as a raw scalar (None under null_control="loss")."""
        if self.config.null_control != "bias":
            return None
        if self.null_bias is None:
            raise ValueError("null_control='bias' but the layer has no null_bias (build it with NullRoutedMoE.init)")
        return self.null_bias.array if isinstance(self.null_bias, NamedArray) else jnp.asarray(self.null_bias)

    @named_call
    def route(self, x: NamedArray) -> R.Routing:
        """Learned routing: top-k over N real logits and M copies of the learned null logit (under
        null_control="bias", the copies' selection scores shifted by the layer's null_bias)."""
        cfg = self.config
        z = self.router_logits(x)
        u = None
        if cfg.num_null:
            with _experts_unmapped():
                u = self.null_gate(x).rearrange(self._token_axes(x) + (cfg.NullLogit,)).array.reshape(-1)
            u = u.astype(jnp.float32)
        route = functools.partial(
            R.learned_routing,
            k=cfg.num_experts_per_tok,
            num_null=cfg.num_null,
            take_until_null=cfg.take_until_null,
            renormalize_real=cfg.renormalize_real,
        )
        if u is None:
            return _per_token(lambda z: route(z, None), self._token_axes(x), z)
        bias = self._raw_null_bias()
        if bias is None:
            return _per_token(route, self._token_axes(x), z, u)
        # one copy of the (replicated) bias per token, so that each device routes its own tokens as before
        per_token_bias = jnp.broadcast_to(jax.lax.stop_gradient(bias).astype(jnp.float32), u.shape)
        return _per_token(lambda z, u, b: route(z, u, null_bias=b), self._token_axes(x), z, u, per_token_bias)

    @named_call
    def route_forced(
        self,
        x: NamedArray,
        *,
        key=None,
        null_frac: float = 0.0,
        mode: R.NullMode = "independent",
        renormalize_real: Optional[bool] = None,
        null_mask: Optional[jax.Array] = None,
    ) -> R.Routing:
        """Benchmark routing: stock top-k over the real logits, then a random mask sends ``null_frac`` to null.

        The mask is drawn with :func:`null_moe.routing.forced_null_mask` from ``key``; or pass ``null_mask``
        ([T, k] bool, tokens flattened in x's axis order) to reuse one compiled step across null fractions.
        """
        cfg = self.config
        renorm = cfg.renormalize_real if renormalize_real is None else renormalize_real
        z = self.router_logits(x)
        if null_mask is None:
            if key is None:
                raise ValueError("route_forced needs a key (or an explicit null_mask)")
            null_mask = R.forced_null_mask(key, z.shape[0], cfg.num_experts_per_tok, null_frac, mode)
        elif null_mask.shape != (z.shape[0], cfg.num_experts_per_tok):
            raise ValueError(f"null_mask must have shape {(z.shape[0], cfg.num_experts_per_tok)}, got {null_mask.shape}")
        route = functools.partial(R.routing_with_null_mask, renormalize_real=renorm)
        return _per_token(route, self._token_axes(x), z, null_mask)

    # --- experts ---------------------------------------------------------------------------------------------
    @named_call
    def apply(self, x: NamedArray, routing: R.Routing):
        """Run dispatch, experts and combine for a given routing; returns (y, extras) like ``__call__``."""
        cfg = self.config
        token_axes = self._token_axes(x)
        w1, w2, w3 = self.experts.raw_weights()
        x_tok = x.rearrange(token_axes + (cfg.Embed.name,)).array
        token_shape = x_tok.shape[:-1]
        ids = routing.expert_ids.reshape(token_shape + (cfg.num_experts_per_tok,))
        wts = routing.weights.reshape(token_shape + (cfg.num_experts_per_tok,))
        kernel = dict(
            act=ACTIVATIONS[cfg.activation], backend=self.backend, tile_rows=cfg.tile_rows, fused=cfg.fused_experts
        )
        dropped_frac = jnp.zeros((), jnp.float32)
        ep = _expert_parallel(token_axes, cfg.Experts)
        spec = _token_partition(token_axes)
        if ep is not None:
            tok_spec = PartitionSpec(ep.token_spec, *(None,) * len(token_shape))
            w_spec = PartitionSpec(ep.axis_name, None, None)
            body = functools.partial(
                _ep_local,
                ep=ep,
                n_experts=cfg.n_routed_experts,
                null_frac=cfg.null_route_frac,
                capacity_factor=cfg.capacity_factor,
                dedup=cfg.ep_dedup,
                transport=self.transport,
                **kernel,
            )
            y_tok, dropped = shard_map_unchecked(
                body,
                mesh=_current_mesh(),
                in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, w_spec),
                out_specs=(tok_spec, PartitionSpec()),
            )(x_tok, ids, wts, w1, w2, w3)
            real = jnp.sum(routing.expert_ids < cfg.n_routed_experts, dtype=jnp.float32)
            dropped_frac = jax.lax.stop_gradient(dropped.astype(jnp.float32) / jnp.maximum(real, 1.0))
        elif spec is None:
            y_tok = _local_experts(x_tok, ids, wts, w1, w2, w3, **kernel)
        else:
            tok_spec = PartitionSpec(spec, *(None,) * len(token_shape))
            y_tok = shard_map_unchecked(
                functools.partial(_local_experts, **kernel),
                mesh=_current_mesh(),
                in_specs=(tok_spec, tok_spec, tok_spec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
                out_specs=tok_spec,
            )(x_tok, ids, wts, w1, w2, w3)
        y = hax.named(y_tok.astype(x.dtype), token_axes + (cfg.Embed,)).rearrange(x.axes)
        extras = self.routing_extras(x, routing)
        extras["dropped_frac"] = hax.named(dropped_frac, ())
        return y, extras

    def ep_traffic(self, x: NamedArray, routing: R.Routing):
        """Under expert parallelism: what each device packs for each destination, read from its send buffers.

        Returns a dict of [devices, EP] int arrays (``rows``, ``real_slots``, ``null_rows``, ``padding_rows``;
        devices in the order of the tokens' shards) and the block ``capacity``; None when EP is off.
        """
        cfg = self.config
        token_axes = self._token_axes(x)
        ep = _expert_parallel(token_axes, cfg.Experts)
        if ep is None:
            return None
        token_shape = tuple(ax.size for ax in token_axes)
        k = cfg.num_experts_per_tok
        ids = routing.expert_ids.reshape(token_shape + (k,))
        wts = routing.weights.reshape(token_shape + (k,))
        shards = math.prod(dict(_current_mesh().shape)[a] for a in _as_tuple(ep.token_spec))
        tokens_local = math.prod(token_shape) // shards
        capacity = block_capacity(
            tokens_local, k, cfg.n_routed_experts, ep.ep,
            null_frac=cfg.null_route_frac, capacity_factor=cfg.capacity_factor, dedup=cfg.ep_dedup,
        )

        def body(ids, wts):
            traffic = send_traffic(
                ids.reshape(-1, k), wts.reshape(-1, k),
                n_experts=cfg.n_routed_experts, ep=ep.ep, capacity=capacity, dedup=cfg.ep_dedup,
            )
            return tuple(v[None] for v in traffic)

        tok_spec = PartitionSpec(ep.token_spec, *(None,) * len(token_shape))
        out = shard_map_unchecked(
            body,
            mesh=_current_mesh(),
            in_specs=(tok_spec, tok_spec),
            out_specs=(PartitionSpec(ep.token_spec),) * 4,
        )(ids, wts)
        return dict(zip(("rows", "real_slots", "null_rows", "padding_rows"), out), capacity=capacity)

    def balance_groups(self, x: NamedArray) -> int:
        """How many groups the load-balancing loss splits x's tokens into (``config.balance_scope``): 1 for
        "batch"; for "sequence", the size of x's leading token axis when x has more than one token axis."""
        token_axes = self._token_axes(x)
        if self.config.balance_scope == "sequence" and len(token_axes) > 1:
            return token_axes[0].size
        return 1

    def routing_extras(self, x: NamedArray, routing: R.Routing) -> dict[str, NamedArray]:
        """The aux losses and routing statistics of ``routing`` (made for ``x``): what ``apply`` returns as
        extras, minus ``dropped_frac``, without running any expert (for a caller that runs them its own way)."""
        cfg = self.config
        groups = self.balance_groups(x)
        with jax.named_scope("aux_losses"):
            lbl = (R.load_balancing_loss(routing, cfg.n_routed_experts, cfg.lbl_coef, groups, cfg.balance_pool)
                   if cfg.lbl_coef is not None else jnp.zeros(()))
            rzl = R.router_z_loss(routing, cfg.rzl_coef) if cfg.rzl_coef is not None else jnp.zeros(())
            stats = R.routing_stats(routing.expert_ids, cfg.n_routed_experts)
        extras = {name: hax.named(value, ()) for name, value in stats.items() if value.ndim == 0}
        extras["expert_loads"] = hax.named(stats["expert_loads"], (cfg.Experts,))
        extras["real_per_token_hist"] = hax.named(stats["real_per_token_hist"], (cfg.RealCount,))
        extras["load_balancing_loss"] = hax.named(lbl, ())
        extras["router_z_loss"] = hax.named(rzl, ())
        return extras

    @named_call
    def __call__(self, x: NamedArray, *, key=None):
        """y, extras = layer(x): learned null routing. y has x's axes; extras per null_moe's API.

        Under null_control="bias" the extras also hold ``null_bias`` (the bias this call selected with) and
        ``null_bias_signal``: 0 in value, with gradient (realized null fraction - p) for ``null_bias``
        (``null_moe.routing.null_bias_signal``); add it to the training loss so that the optimizer receives the
        control error as the bias's gradient.
        """
        del key  # no dropout in the MoE block
        y, extras = self.apply(x, self.route(x))
        b = self._raw_null_bias()
        if b is not None:
            realized = extras["null_frac"].array
            extras["null_bias"] = hax.named(jax.lax.stop_gradient(b).astype(jnp.float32), ())
            extras["null_bias_signal"] = hax.named(
                R.null_bias_signal(b, realized, self.config.null_route_frac), ()
            )
        return y, extras


def _local_experts(x_tok, ids, wts, w1, w2, w3, *, act, backend, tile_rows, fused):
    """Per-device body: this device's tokens (any leading token dims) through dispatch, experts, combine."""
    lead = x_tok.shape[:-1]
    y = expert_mlp(
        x_tok.reshape(-1, x_tok.shape[-1]),
        ids.reshape(-1, ids.shape[-1]),
        wts.reshape(-1, wts.shape[-1]),
        w1,
        w2,
        w3,
        act=act,
        backend=backend,
        tile_rows=tile_rows,
        fused=fused,
    )
    return y.reshape(lead + (y.shape[-1],))


def _ep_local(x_tok, ids, wts, w1, w2, w3, *, ep, n_experts, null_frac, capacity_factor, dedup, transport, act,
              backend, tile_rows, fused):
    """Per-device body under expert parallelism: my tokens' real rows out to their experts' devices, my experts
    on what arrives, results back. Returns (y, dropped real slots summed over all devices)."""
    lead = x_tok.shape[:-1]
    k = ids.shape[-1]
    x = x_tok.reshape(-1, x_tok.shape[-1])
    capacity = block_capacity(
        x.shape[0], k, n_experts, ep.ep, null_frac=null_frac, capacity_factor=capacity_factor, dedup=dedup
    )
    y, dropped = ep_expert_mlp(
        x,
        ids.reshape(-1, k),
        wts.reshape(-1, k),
        w1,
        w2,
        w3,
        act,
        axis_name=ep.axis_name,
        ep=ep.ep,
        n_experts=n_experts,
        capacity=capacity,
        dedup=dedup,
        transport=transport,
        backend=backend,
        tile_rows=tile_rows,
        fused=fused,
    )
    dropped = jax.lax.psum(jax.lax.stop_gradient(dropped), _as_tuple(ep.token_spec))
    return y.reshape(lead + (y.shape[-1],)), dropped
