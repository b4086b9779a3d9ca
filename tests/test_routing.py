"""Routing against per-token loops, forced-mask fractions, aux-loss formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe import routing as R


def _loop_route(logits, n, k, tun, renorm):
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    ids = np.zeros((len(probs), k), np.int64)
    wts = np.zeros((len(probs), k))
    for t, p in enumerate(probs):
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]
        null_seen = False
        for j, i in enumerate(order):
            null = i >= n or (tun and null_seen)
            null_seen |= null
            ids[t, j] = n if null else i
            wts[t, j] = 0.0 if null else p[i]
        if renorm and wts[t].sum() > 0:
            wts[t] /= wts[t].sum()
    return ids, wts


@pytest.mark.fast
@pytest.mark.parametrize("m,k,tun,renorm", [(0, 2, False, True), (3, 4, False, True), (3, 4, True, False), (10, 6, True, True)])
def test_learned_routing_matches_loop(m, k, tun, renorm):
    n, t = 6, 40
    z = jax.random.normal(jax.random.PRNGKey(0), (t, n))
    u = jax.random.normal(jax.random.PRNGKey(1), (t,))
    r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=tun, renormalize_real=renorm)
    logits = np.asarray(R.expand_logits(z, u, m)) if m else np.asarray(z)
    ids, wts = _loop_route(logits, n, k, tun, renorm)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(r.weights), wts, atol=1e-6)
    assert r.probs.shape == (t, n + m)


def test_learned_take_until_null_is_a_no_op_when_copies_cover_k():
    """The M null copies share one logit and tie: with M >= k, once one enters a token's top-k every later slot
    is a copy, so the flag cannot change learned routing. With M < k it can (real slots after the copies)."""
    n, t = 6, 400
    z = jax.random.normal(jax.random.PRNGKey(0), (t, n))
    u = jax.random.normal(jax.random.PRNGKey(1), (t,)) + 0.5
    for m, k in ((4, 4), (9, 3), (6, 6)):
        a = R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True)
        b = R.learned_routing(z, u, k=k, num_null=m, take_until_null=True, renormalize_real=True)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a = R.learned_routing(z, u, k=4, num_null=1, take_until_null=False, renormalize_real=True)
    b = R.learned_routing(z, u, k=4, num_null=1, take_until_null=True, renormalize_real=True)
    assert int(jnp.sum(b.expert_ids == n)) > int(jnp.sum(a.expert_ids == n))


@pytest.mark.fast
def test_take_until_null_nulls_every_later_slot():
    is_null = jnp.array([[False, True, False, False], [False, False, False, True], [True, False, False, False]])
    out = R._null_after_first_null(is_null)
    np.testing.assert_array_equal(
        np.asarray(out), [[False, True, True, True], [False, False, False, True], [True, True, True, True]]
    )


@pytest.mark.parametrize("mode", ["independent", "take_until_null"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_forced_mask_hits_target(mode, p):
    k, t = 4, 4096  # T k = 16384
    mask = R.forced_null_mask(jax.random.PRNGKey(int(p * 100)), t, k, p, mode)
    realized = float(jnp.mean(mask))
    assert abs(realized - p) <= 0.01, realized
    if mode == "take_until_null":
        later = np.asarray(R._null_after_first_null(mask))
        np.testing.assert_array_equal(np.asarray(mask), later)


@pytest.mark.fast
def test_forced_mask_k8_small_t():
    mask = R.forced_null_mask(jax.random.PRNGKey(3), 2048, 8, 0.7, "take_until_null")
    assert abs(float(jnp.mean(mask)) - 0.7) <= 0.01


@pytest.mark.fast
def test_slot_null_prob_solves_expected_fraction():
    for k in (1, 2, 4, 8):
        for p in (0.1, 0.5, 0.9):
            q = R.slot_null_prob(p, k, "take_until_null")
            assert sum(1 - (1 - q) ** (j + 1) for j in range(k)) / k == pytest.approx(p, abs=1e-9)
    assert R.slot_null_prob(0.4, 4, "independent") == 0.4
    with pytest.raises(ValueError, match="null_routing_mode"):
        R.slot_null_prob(0.4, 4, "sometimes")
    with pytest.raises(ValueError, match="null_route_frac"):
        R.slot_null_prob(1.0, 4, "independent")


def test_forced_routing_keeps_stock_topk():
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    r = R.forced_routing(z, jax.random.PRNGKey(1), k=2, null_frac=0.0, mode="independent", renormalize_real=True)
    top_p, top_i = jax.lax.top_k(jax.nn.softmax(z), 2)
    np.testing.assert_array_equal(r.expert_ids, top_i)
    np.testing.assert_allclose(r.weights, top_p / top_p.sum(-1, keepdims=True), rtol=1e-6)
    r = R.forced_routing(z, jax.random.PRNGKey(1), k=2, null_frac=0.5, mode="independent", renormalize_real=False)
    real = r.expert_ids < 8
    np.testing.assert_allclose(np.where(real, r.weights, 0), np.where(real, top_p, 0), rtol=1e-6)
    assert np.all(np.asarray(r.weights)[~np.asarray(real)] == 0)


@pytest.mark.fast
def test_aux_losses_match_levanter_formula_at_m0():
    n, k, t = 6, 2, 50
    z = jax.random.normal(jax.random.PRNGKey(0), (t, n))
    r = R.learned_routing(z, None, k=k, num_null=0, take_until_null=False, renormalize_real=True)
    counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=n)
    loads = counts / counts.sum()
    f = loads * n / k
    p = np.asarray(jax.nn.softmax(z)).mean(0)
    assert float(R.load_balancing_loss(r, n, 0.01)) == pytest.approx(0.01 * (f * p).sum(), rel=1e-5)
    lse = np.asarray(jax.nn.logsumexp(z, axis=-1))
    assert float(R.router_z_loss(r, 0.001)) == pytest.approx(0.001 * (lse**2).mean(), rel=1e-5)


def test_lbl_splits_null_assignments_over_copies():
    n, m, k, t = 4, 4, 2, 30
    z = jax.random.normal(jax.random.PRNGKey(0), (t, n))
    u = jax.random.normal(jax.random.PRNGKey(1), (t,)) + 1.0
    r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True)
    ids = np.asarray(r.expert_ids)
    real_counts = np.array([(ids == i).sum() for i in range(n)], float)
    null_each = (t * k - real_counts.sum()) / m
    loads = np.concatenate([real_counts, np.full(m, null_each)]) / (t * k)
    want = 0.01 * (loads * (n + m) / k * np.asarray(r.probs).mean(0)).sum()
    assert float(R.load_balancing_loss(r, n, 0.01)) == pytest.approx(want, rel=1e-5)
    # gradient flows to the null logit through P, not through the (integer) loads
    g = jax.grad(lambda u: R.load_balancing_loss(R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True), n, 0.01))(u)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


@pytest.mark.fast
def test_routing_stats():
    ids = jnp.array([[0, 4], [4, 4], [1, 2]])  # n = 4, null id 4
    s = R.routing_stats(ids, 4)
    assert float(s["null_frac"]) == pytest.approx(0.5)
    assert float(s["experts_per_token"]) == pytest.approx(1.0)
    assert float(s["all_null_frac"]) == pytest.approx(1 / 3)
    np.testing.assert_allclose(s["real_per_token_hist"], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(s["expert_loads"], [1 / 3, 1 / 3, 1 / 3, 0])
    assert float(s["load_violation_max"]) == pytest.approx(4 / 3 - 1)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(2, 9),
    m=st.integers(0, 10),
    k_frac=st.floats(0.0, 1.0),
    tun=st.booleans(),
    renorm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_learned_routing_matches_loop_on_random_configs(n, m, k_frac, tun, renorm, seed):
    k = 1 + int(k_frac * (n - 1))
    t = 16
    kz, ku = jax.random.split(jax.random.PRNGKey(seed))
    z = jax.random.normal(kz, (t, n)) * 2
    u = jax.random.normal(ku, (t,)) * 2
    r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=tun, renormalize_real=renorm)
    logits = np.asarray(R.expand_logits(z, u, m)) if m else np.asarray(z)
    ids, wts = _loop_route(logits, n, k, tun, renorm)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(r.weights), wts, atol=1e-6)
    stats = R.routing_stats(r.expert_ids, n)
    assert float(stats["null_frac"]) == pytest.approx(float((ids == n).mean()))


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_grouped_load_balancing_loss_is_the_mean_of_each_groups_loss(groups):
    """groups > 1: the loss of each consecutive group of tokens on its own (a loop over slices), averaged; the
    gradient w.r.t. the router logits too."""
    n, m, k, t = 6, 3, 2, 32
    logits = jax.random.normal(jax.random.PRNGKey(groups), (t, n))
    null = jax.random.normal(jax.random.PRNGKey(100 + groups), (t,))

    def grouped(logits):
        return R.load_balancing_loss(R.learned_routing(logits, null, k=k, num_null=m, take_until_null=False, renormalize_real=True), n, 0.1, groups)

    def loop(logits):
        per = t // groups
        losses = [R.load_balancing_loss(R.learned_routing(logits[g * per:(g + 1) * per], null[g * per:(g + 1) * per],
                                                          k=k, num_null=m, take_until_null=False, renormalize_real=True), n, 0.1)
                  for g in range(groups)]
        return sum(losses) / groups

    np.testing.assert_allclose(grouped(logits), loop(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(grouped)(logits), jax.grad(loop)(logits), rtol=1e-5, atol=1e-8)
    if groups > 1:  # loads measured per group differ from loads over the batch
        assert abs(float(grouped(logits)) - float(R.load_balancing_loss(
            R.learned_routing(logits, null, k=k, num_null=m, take_until_null=False, renormalize_real=True), n, 0.1))) > 1e-6


def test_grouped_load_balancing_loss_needs_groups_dividing_the_tokens():
    routing = R.learned_routing(jnp.zeros((10, 4)), jnp.zeros((10,)), k=2, num_null=2, take_until_null=False,
                                renormalize_real=True)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="groups must divide the 10 tokens"):
            R.load_balancing_loss(routing, 4, 0.1, bad)


# --- the null-fraction controller (null_control="bias") ------------------------------------------------------------
def _zu(t=40, n=6, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (t, n)), jax.random.normal(jax.random.PRNGKey(seed + 1), (t,))


@pytest.mark.parametrize("m,k,tun,renorm,bias", [(3, 4, False, True, 0.7), (3, 4, True, True, -0.4),
                                                 (10, 6, True, False, 1.3), (2, 3, False, True, -2.0)])
def test_null_bias_moves_the_selection_only(m, k, tun, renorm, bias):
    """Slots: the per-token loop on logits whose M null copies read u + b. Gate weights: the *unbiased* probs of those
    slots (renormalized over the real ones); probs and logits (what the aux losses read): the unbiased ones."""
    n = 6
    z, u = _zu(n=n)
    # the layer passes one copy of the bias per token ([T]); a scalar is the same
    b = jnp.full((z.shape[0],), bias, jnp.float32) if tun else jnp.float32(bias)
    r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=tun, renormalize_real=renorm, null_bias=b)
    logits = np.asarray(R.expand_logits(z, u, m))
    biased = logits.copy()
    biased[:, n:] += bias
    ids, _ = _loop_route(biased, n, k, tun, renorm)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    unbiased_ids, _ = _loop_route(logits, n, k, tun, renorm)
    assert (ids != unbiased_ids).any()  # the bias did change some selections here
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    w = np.where(ids < n, np.take_along_axis(probs, np.minimum(ids, n - 1), axis=1), 0.0)
    if renorm:
        s = w.sum(-1, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 0.0)
    np.testing.assert_allclose(np.asarray(r.weights), w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.probs), probs, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(r.logits), logits)


def test_null_bias_update_moves_toward_the_target_from_above_and_below():
    """The rule b <- b + rate (p - realized), closed around a fixed router: it starts above the target (p = 0.2) or
    below it (p = 0.8), moves the bias the right way from the first step and settles within 1% of p."""
    n, k, m, t = 8, 2, 8, 1024
    z, u = _zu(t=t, n=n, seed=3)
    u = u + 1.0  # the null logit's own level: about a third of the slots null at b = 0

    def realized(b):
        r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True,
                              null_bias=jnp.float32(b))
        return float(R.routing_stats(r.expert_ids, n)["null_frac"])

    start = realized(0.0)
    assert 0.2 < start < 0.8, start
    assert float(R.null_bias_update(jnp.float32(0.5), 0.3, 0.4, 2.0)) == pytest.approx(0.7)
    for p in (0.2, 0.8):
        b, errors = 0.0, []
        for step in range(30):
            r = realized(b)
            errors.append(abs(r - p))
            b = float(R.null_bias_update(jnp.float32(b), r, p, 1.0))
            if step == 0:
                assert (b < 0) if p < start else (b > 0), (p, b)  # down from above, up from below
        assert errors[-1] < 0.01 and max(errors[-10:]) < 0.01, (p, errors)
        assert errors[0] > 0.1


def test_null_bias_signal_is_zero_with_the_control_error_as_gradient():
    b = jnp.float32(0.37)
    value, grad = jax.value_and_grad(lambda b: R.null_bias_signal(b, jnp.float32(0.61), 0.5))(b)
    assert float(value) == 0.0
    assert float(grad) == pytest.approx(0.11, abs=1e-6)
    # the realized fraction is data, not a path for gradients
    g_frac = jax.grad(lambda r: R.null_bias_signal(b, r, 0.5))(jnp.float32(0.61))
    assert float(g_frac) == 0.0


def test_lbl_over_the_real_pool():
    """pool='real': loads are shares of the real assignments, probs the softmax over the real logits, f = load N / k;
    the null logit gets no gradient from it; with M = 0 it is the usual loss."""
    n, k, m, t = 6, 3, 4, 50
    z, u = _zu(t=t, n=n, seed=5)
    coef = 0.1

    def lbl(z, u, pool):
        r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True,
                              null_bias=jnp.float32(0.5))
        return R.load_balancing_loss(r, n, coef, pool=pool)

    r = R.learned_routing(z, u, k=k, num_null=m, take_until_null=False, renormalize_real=True,
                          null_bias=jnp.float32(0.5))
    ids = np.asarray(r.expert_ids)
    counts = np.array([(ids == i).sum() for i in range(n)], np.float64)
    assert counts.sum() < t * k  # some slots are null
    real_probs = np.asarray(jax.nn.softmax(z, axis=-1)).mean(0)
    want = coef * np.sum(counts / counts.sum() * n / k * real_probs)
    assert float(lbl(z, u, "real")) == pytest.approx(want, rel=1e-5)
    assert float(lbl(z, u, "real")) != pytest.approx(float(lbl(z, u, "all")), rel=1e-3)
    assert float(jax.grad(lbl, argnums=1)(z, u, "real").__abs__().max()) == 0.0
    assert float(jax.grad(lbl, argnums=1)(z, u, "all").__abs__().max()) > 0.0
    r0 = R.learned_routing(z, None, k=k, num_null=0, take_until_null=False, renormalize_real=True)
    assert float(R.load_balancing_loss(r0, n, coef, pool="real")) == float(R.load_balancing_loss(r0, n, coef))
    with pytest.raises(ValueError, match="pool"):
        R.load_balancing_loss(r0, n, coef, pool="null")
