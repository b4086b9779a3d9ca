"""Published figures the end-of-sweep summary compares against (data the bench owns).

TPU null-routing sweep, from the public logbook of Marin's null-routed MoE experiment (February 2026): forced
null mask, forward + backward, real gate weights renormalized after nulling, the TPU grouped matmul, the seed
matrix's full-size shapes. Each entry: shape (tokens x hidden x mlp_dim x experts), topk, and tokens/s at null
0.0, 0.1 and 0.9. The same sweep reported, in words: from null 0.1 to 0.9, +23..31% tokens/s at topk 2,
+43..57% at topk 4, +88..101% at topk 8; take_until_null within 0.2% of independent everywhere.
"""

TPU_SWEEP = (
    ("32768x2048x1408x60", 8, 858_766, 920_847, 1_833_742),
    ("32768x2048x2048x64", 8, 765_115, 821_075, 1_540_460),
    ("65536x3072x3072x128", 8, 354_834, 383_765, 771_626),
)


def tpu_gain(experts: int, topk: int) -> float | None:
    """tokens/s at null 0.9 over null 0.0 in the TPU sweep for the shape with this expert count (the CPU matrix
    keeps the expert counts of the shapes it scales down), or None."""
    for shape, k, at0, _, at9 in TPU_SWEEP:
        if k == topk and int(shape.rsplit("x", 1)[1]) == experts:
            return at9 / at0
    return None
