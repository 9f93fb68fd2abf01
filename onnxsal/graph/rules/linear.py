"""VJP rules for matrix products: Gemm and MatMul (numpy matmul semantics).

Gradients are again matrix products, emitted as Gemm/MatMul with transpose
flags so ORT's GEMM kernels do the work; batched operands only pay a
ReduceSum where broadcasting really happened.
"""

from __future__ import annotations

from ..autodiff import RuleContext, vjp_rule

Grads = list


@vjp_rule("Gemm")
def gemm(ctx: RuleContext, gy: Grads) -> Grads:
    """Y = alpha * A' B' + beta * C, with A' = A^T if transA, B' = B^T if transB.

    dA' = alpha * G B'^T, so dA = alpha * G B'^T (transA=0) or alpha * B' G^T (transA=1);
    dB' = alpha * A'^T G, so dB = alpha * A'^T G (transB=0) or alpha * G^T A' (transB=1);
    dC = unbroadcast(beta * G).  Each case is one Gemm with suitable transpose flags.
    """
    g = gy[0]
    a, b = ctx.inputs[0], ctx.inputs[1]
    c = ctx.inputs[2] if len(ctx.inputs) > 2 and ctx.inputs[2] else None
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    ga = gb = gc = None
    if ctx.needs_grad(0):
        if not ta:
            ga = ctx.op("Gemm", [g, b], alpha=alpha, transB=1 - tb)            # G B'^T
        else:
            ga = ctx.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1)      # B' G^T
    if ctx.needs_grad(1):
        if not tb:
            gb = ctx.op("Gemm", [a, g], alpha=alpha, transA=1 - ta)            # A'^T G
        else:
            gb = ctx.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta)      # G^T A'
    if c is not None and ctx.needs_grad(2):
        gc = ctx.unbroadcast(g, c)
        if beta != 1.0:
            gc = ctx.op("Mul", [gc, ctx.const(beta, like=ctx.outputs[0])])
    return [ga, gb, gc]


def _swap_last(ctx: RuleContext, x: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.op("Transpose", [x], perm=perm)


@vjp_rule("MatMul")
def matmul(ctx: RuleContext, gy: Grads) -> Grads:
    """Y = A @ B (numpy semantics: 1-D operands get a unit axis, leading axes broadcast).

    dA = unbroadcast(G @ B^T, A), dB = unbroadcast(A^T @ G, B), with the unit
    axes of 1-D operands added to G and removed again.  A 2-D B against an
    N-D A (a linear layer on tokens) gets dB as one 2-D product over all rows
    instead of a batched product plus a ReduceSum.
    """
    g = gy[0]
    a, b = ctx.inputs
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra is None or rb is None:
        from ...errors import UnsupportedOpError

        raise UnsupportedOpError("MatMul", ctx.node.name, "(operand rank unknown)")
    if ra == 1 and rb == 1:
        ga = ctx.op("Mul", [g, b]) if ctx.needs_grad(0) else None
        gb = ctx.op("Mul", [g, a]) if ctx.needs_grad(1) else None
        return [ga, gb]
    # g2: the gradient with the unit axes of 1-D operands restored, rank = max(ra, rb, 2).
    g2 = g
    if ra == 1:
        g2 = ctx.unsqueeze(g2, [-2 if rb > 1 else 0])
    if rb == 1:
        g2 = ctx.unsqueeze(g2, [-1])
    rank = max(ra, rb, 2)
    ga = gb = None
    if ctx.needs_grad(0):
        if rb == 1:
            bt = ctx.unsqueeze(b, [0])                                   # [1, K]
        else:
            bt = _swap_last(ctx, b, rb)
        full = ctx.op("MatMul", [g2, bt])                                # [..., M, K]
        if ra == 1:
            ga = ctx.reduce_sum(full, list(range(rank - 1)), keepdims=False)
        else:
            ga = ctx.unbroadcast(full, a)
    if ctx.needs_grad(1):
        sb = ctx.shape(b)
        if rb == 2 and ra > 2 and sb is not None and all(d is not None for d in sb):
            k, n = sb
            a2 = ctx.op("Reshape", [a, ctx.const([-1, k])])
            gflat = ctx.op("Reshape", [g2, ctx.const([-1, n])])
            gb = ctx.op("Gemm", [a2, gflat], transA=1)
        else:
            if ra == 1:
                at = ctx.unsqueeze(a, [1])                               # [K, 1]
            else:
                at = _swap_last(ctx, a, ra)
            full = ctx.op("MatMul", [at, g2])                            # [..., K, N]
            if rb == 1:
                axes = [i for i in range(rank) if i != rank - 2]
                gb = ctx.reduce_sum(full, axes, keepdims=False)
            else:
                gb = ctx.unbroadcast(full, b)
    return [ga, gb]


def _einsum_terms(eq: str, n_in: int) -> tuple[list[str], str]:
    """Input terms and output term of an einsum equation, the implicit output made explicit."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != n_in:
        raise ValueError("equation and inputs disagree")
    if not arrow:
        letters = [ch for t in terms for ch in t.replace("...", "")]
        out = ("..." if any("..." in t for t in terms) else "") + "".join(
            sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    return terms, out


def _letters(term: str) -> list[str]:
    """The axis labels of a term, "..." counted as one label."""
    head, ellipsis, tail = term.partition("...")
    return list(head) + ([ellipsis] if ellipsis else []) + list(tail)


@vjp_rule("Einsum")
def einsum(ctx: RuleContext, gy: Grads) -> Grads:
    """Operand k's gradient is an einsum of the output gradient with the other operands.

    ``A,B->O`` gives ``dA = einsum(O,B->A)``: every label of A that is kept in O or shared with
    B comes back; a label only A has (summed out on its own) comes back by broadcasting the
    result along it; ``...`` dims that were broadcast are summed back (``unbroadcast``).
    Repeated labels within one term (diagonals, traces) are not supported.
    """
    from .shape import _unsupported

    try:
        terms, out = _einsum_terms(str(ctx.attr("equation")), len(ctx.inputs))
    except ValueError as exc:
        raise _unsupported(ctx, f"equation {ctx.attr('equation')!r}: {exc}") from None
    for t in terms + [out]:
        labels = _letters(t)
        if len(set(labels)) != len(labels):
            raise _unsupported(ctx, f"repeated label in {t!r}")
    if any("..." in t for t in terms) and "..." not in out:
        raise _unsupported(ctx, "'...' summed out")
    grads: Grads = []
    for k, x in enumerate(ctx.inputs):
        if not ctx.needs_grad(k):
            grads.append(None)
            continue
        others = [t for i, t in enumerate(terms) if i != k]
        avail = set(_letters(out)).union(*[set(_letters(t)) for t in others])
        labels = _letters(terms[k])
        kept = [ch for ch in labels if ch in avail]
        lonely = [i for i, ch in enumerate(labels) if ch not in avail]
        if "..." in lonely:
            raise _unsupported(ctx, "'...' only in one operand")
        eq = ",".join([out] + others) + "->" + "".join(kept)
        g = ctx.op("Einsum", [gy[0]] + [t for i, t in enumerate(ctx.inputs) if i != k], equation=eq)
        if lonely:
            ell = ctx.rank(x)
            if ell is None:
                raise _unsupported(ctx, f"rank of {x!r} unknown")
            n_ell = ell - (len(labels) - 1) if "..." in labels else 0
            # axis positions of the lonely labels in x, "..." expanded to its n_ell axes
            pos, axis = [], 0
            for i, ch in enumerate(labels):
                if i in lonely:
                    pos.append(axis)
                axis += n_ell if ch == "..." else 1
            g = ctx.op("Expand", [ctx.unsqueeze(g, pos), ctx.shape_of(x)])
            ctx.set_shape(g, x)
        grads.append(ctx.unbroadcast(g, x))
    return grads
