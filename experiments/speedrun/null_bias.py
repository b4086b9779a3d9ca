"""The null-fraction controller's update inside Levanter's training step (``null_control: bias``).

Where the bias lives: each MoE layer's ``null_bias`` is a leaf of the model (a 0-d float32 array, stacked to
[layers] by Levanter's layer scan). So Levanter shards (replicates) it with the model, writes it into every
checkpoint and restores it on resume, with no state of its own next to the model.

How it is updated, exactly: the model adds each layer's ``null_bias_signal`` to the training loss. That term is 0
in value and its gradient with respect to the layer's ``null_bias`` is the layer's control error, realized null
fraction - p, measured on the step's own training batch: the routing statistics are taken over the global token
arrays, so under any data / FSDP / expert-parallel sharding every device gets the same error of the whole batch,
and Levanter's microbatching averages the equal microbatches' errors into that same figure.
``wrap_optimizer`` then wraps the run's optimizer (any optax transformation Levanter builds): the inner optimizer
sees every other gradient unchanged and a zero in place of each bias's gradient g, so gradient clipping's global
norm, Adam's moments, weight decay and the learning-rate schedule are those of a model without the bias; the
bias's update is replaced by -rate * g. After the step:

    b <- b + rate (p - realized null fraction)          (null_moe.routing.null_bias_update)

Why not leave the bias to the optimizer: Adam would normalize the error away (its step is about lr whatever the
error's size), the schedule would scale it with the learning rate (0 during warmup) and weight decay would pull the
bias to 0. Why not state outside the model: Levanter 1.2's train step has no hook that can write into the model,
and a second copy of the state would need its own sharding and checkpointing.

The training CLI (``experiments/speedrun/train.py``) installs the wrapper (``install``) whenever the model config
says ``null_control: bias``; code that calls ``levanter.main.train_lm`` itself must call ``install(config)`` first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["BIAS_FIELD", "install", "is_null_bias_path", "null_bias_mask", "wrap_optimizer"]

#: The attribute of ``null_moe.NullRoutedMoE`` that holds the controller's bias.
BIAS_FIELD = "null_bias"


def is_null_bias_path(path) -> bool:
    """Whether a pytree key path runs through a MoE layer's ``null_bias`` attribute."""
    return any(isinstance(key, jax.tree_util.GetAttrKey) and key.name == BIAS_FIELD for key in path)


def null_bias_mask(tree) -> Any:
    """A tree of bools with ``tree``'s structure: True at the leaves of every ``null_bias``."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_null_bias_path(path), tree)


def wrap_optimizer(inner: optax.GradientTransformation, rate: float) -> optax.GradientTransformationExtraArgs:
    """``inner`` for every parameter but the null biases, whose update is exactly ``-rate * gradient``.

    The state is ``inner``'s own (same structure: Levanter's learning-rate logging and checkpoints see no
    difference); ``inner`` receives zeros for the biases' gradients, so it behaves as if they were not there.
    """
    rate = float(rate)

    def update(updates, state, params=None, **extra_args):
        mask = null_bias_mask(updates)
        others = jax.tree_util.tree_map(lambda g, m: jnp.zeros_like(g) if m else g, updates, mask)
        if isinstance(inner, optax.GradientTransformationExtraArgs):
            new_updates, state = inner.update(others, state, params, **extra_args)
        else:
            new_updates, state = inner.update(others, state, params)
        new_updates = jax.tree_util.tree_map(
            lambda u, g, m: (-rate * g).astype(u.dtype) if m else u, new_updates, updates, mask
        )
        return new_updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def install(config) -> bool:
    """If ``config.model`` asks for ``null_control: bias``, makes ``config.optimizer.build`` return the wrapped
    optimizer (set on the instance: the config's fields, what Levanter logs and saves, do not change). Returns
    whether it did."""
    model = config.model
    if getattr(model, "null_control", "loss") != "bias":
        return False
    rate = model.null_bias_rate
    optimizer_config = config.optimizer
    base_build = optimizer_config.build

    def build(num_train_steps):
        return wrap_optimizer(base_build(num_train_steps), rate)

    object.__setattr__(optimizer_config, "build", build)
    return True
