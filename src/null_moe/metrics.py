"""Layer extras -> flat dicts of scalars for levanter.tracker / W&B.

Everything returned is wrapped in ``jax.lax.stop_gradient``: logging from inside a differentiated function
must not put IO callbacks on the JVP path (stock Levanter's Mixtral crashes there with aux losses on).
"""

from __future__ import annotations

import haliax as hax
import jax
import jax.numpy as jnp

#: Scalar extras logged per layer and as a mean over layers.
SCALAR_KEYS = (
    "null_frac",
    "experts_per_token",
    "all_null_frac",
    "load_violation_max",
    "routing_entropy",
    "load_balancing_loss",
    "router_z_loss",
    "dropped_frac",
    "null_bias",  # only under null_control="bias": the null-fraction controller's bias this step selected with
)


def _raw(value) -> jax.Array:
    return jax.lax.stop_gradient(value.array if isinstance(value, hax.NamedArray) else jnp.asarray(value))


def moe_log_dict(extras: dict, prefix: str = "moe/") -> dict[str, jax.Array]:
    """One layer's extras -> {prefix+name: scalar}, with expert{j}_load and real_per_token_{c} entries."""
    out = {f"{prefix}{name}": _raw(extras[name]) for name in SCALAR_KEYS if name in extras}
    if "expert_loads" in extras:
        for j, load in enumerate(_raw(extras["expert_loads"])):
            out[f"{prefix}expert{j}_load"] = load
    if "real_per_token_hist" in extras:
        for c, frac in enumerate(_raw(extras["real_per_token_hist"])):
            out[f"{prefix}real_per_token_{c}"] = frac
    return out


def stacked_moe_log_dict(extras: dict, Layers: hax.Axis, prefix: str = "moe/") -> dict[str, jax.Array]:
    """Extras stacked over ``Layers`` (a scanned stack) -> moe/layer{i}/<stat> plus means over layers at moe/<stat>.

    Per-expert loads and the real-experts histogram are logged per layer; their layer means are logged too.
    """
    out: dict[str, jax.Array] = {}
    for i in range(Layers.size):
        layer_extras = {name: value[Layers, i] if isinstance(value, hax.NamedArray) and value.has_axis(Layers.name) else value
                        for name, value in extras.items() if name in SCALAR_KEYS or name in ("expert_loads", "real_per_token_hist")}
        out.update(moe_log_dict(layer_extras, prefix=f"{prefix}layer{i}/"))
    means = {
        name: hax.mean(value, axis=Layers.name) if isinstance(value, hax.NamedArray) and value.has_axis(Layers.name) else value
        for name, value in extras.items()
        if name in SCALAR_KEYS or name in ("expert_loads", "real_per_token_hist")
    }
    out.update(moe_log_dict(means, prefix=prefix))
    return out
