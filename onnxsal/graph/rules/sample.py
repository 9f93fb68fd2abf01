"""VJP rules for sampling at computed positions: AffineGrid and GridSample (spatial transformers).

A spatial transformer network predicts an affine map from the image, builds a sampling grid from it
(``AffineGrid``) and resamples the image there (``GridSample``); the gradient reaches the image
both through the samples and through the grid.

``GridSample`` (2-D, bilinear or nearest, zeros or border padding) reads each output at
``(ix, iy)``, the grid point in pixels. Bilinear sampling is ``sum_c w_c X[c]`` over the four
corners around it, with ``w`` the products of ``1 - |ix - x_c|`` and ``1 - |iy - y_c|``:
- ``dX`` adds ``w_c * dy`` into each corner: one ``ScatterElements(reduction="add")`` over the
  flattened image, since many outputs may read the same pixel;
- ``d ix`` is ``wy0 (X[y0,x1] - X[y0,x0]) + wy1 (X[y1,x1] - X[y1,x0])`` (likewise ``d iy``),
  summed over channels against ``dy`` and scaled by the pixels per grid unit.
A corner outside the image reads 0 (zeros padding) or its clamped neighbour (border padding,
where both corners then read the same pixel and the coordinate's derivative is 0 beyond the
edge, as in PyTorch). Nearest sampling reads one pixel: ``dX`` adds ``dy`` there, and the grid's
derivative is 0 almost everywhere.
"""

from __future__ import annotations

import numpy as np

from ..autodiff import RuleContext, vjp_rule
from .shape import Grads, _unsupported


@vjp_rule("AffineGrid")
def affine_grid(ctx: RuleContext, gy: Grads) -> Grads:
    """grid[n, p] = theta[n] @ [base(p), 1]: dtheta[n] = sum_p dgrid[n, p]^T [base(p), 1].

    The base coordinates come from AffineGrid itself on the identity map (a constant subgraph
    that ONNX Runtime folds), so they follow its ``align_corners`` arithmetic exactly."""
    theta, size = ctx.inputs[0], ctx.inputs[1]
    shape = ctx.shape(theta)
    k = shape[1] if shape is not None and len(shape) == 3 else None
    if k is None:
        sizes = ctx.const_value(size)
        k = len(sizes) - 2 if sizes is not None else None
    if k not in (2, 3):
        raise _unsupported(ctx, "the number of spatial axes is unknown at build time")
    eye = ctx.const(np.eye(k, k + 1, dtype=np.float32)[None], like=theta)
    one_image = ctx.op("Concat", [ctx.const([1]), ctx.op("Slice", [size, ctx.const([1]), ctx.const([k + 2])])], axis=0)
    base = ctx.op("AffineGrid", [eye, one_image], align_corners=int(ctx.attr("align_corners", 0)))
    base = ctx.op("Reshape", [base, ctx.const([1, -1, k])])                       # (1, P, k)
    ones = ctx.op("Add", [ctx.op("Mul", [ctx.op("Slice", [base, ctx.const([0]), ctx.const([1]), ctx.const([2])]),
                                         ctx.const(0.0, like=theta)]), ctx.const(1.0, like=theta)])
    homogeneous = ctx.op("Concat", [base, ones], axis=2)                          # (1, P, k + 1)
    dgrid = ctx.op("Transpose", [ctx.op("Reshape", [gy[0], ctx.const([0, -1, k])])], perm=[0, 2, 1])   # (N, k, P)
    return [ctx.op("MatMul", [dgrid, homogeneous]), None]


@vjp_rule("GridSample")
def grid_sample(ctx: RuleContext, gy: Grads) -> Grads:
    x, grid = ctx.inputs[0], ctx.inputs[1]
    mode = ctx.attr("mode", "bilinear")
    padding = ctx.attr("padding_mode", "zeros")
    if ctx.rank(x) != 4:
        raise _unsupported(ctx, f"GridSample over {'an unknown number of' if ctx.rank(x) is None else ctx.rank(x) - 2} "
                                "spatial axes; onnxsal differentiates 2-D sampling")
    if mode not in ("bilinear", "linear", "nearest"):
        raise _unsupported(ctx, f"mode {mode!r}; onnxsal differentiates bilinear and nearest sampling")
    if padding not in ("zeros", "border", "reflection"):
        raise _unsupported(ctx, f"padding_mode {padding!r}; onnxsal differentiates zeros, border and reflection padding")
    s = _Sampler(ctx, x, grid, bool(ctx.attr("align_corners", 0)), padding)
    dy = gy[0]
    if mode == "nearest":
        corners = [(ctx.op("Round", [s.iy]), ctx.op("Round", [s.ix]), None)]    # halves to even, as ORT rounds
    else:
        x0, y0 = ctx.op("Floor", [s.ix]), ctx.op("Floor", [s.iy])
        x1, y1 = ctx.op("Add", [x0, s.one]), ctx.op("Add", [y0, s.one])
        wx1, wy1 = ctx.op("Sub", [s.ix, x0]), ctx.op("Sub", [s.iy, y0])
        wx0, wy0 = ctx.op("Sub", [s.one, wx1]), ctx.op("Sub", [s.one, wy1])
        corners = [(y0, x0, ctx.op("Mul", [wy0, wx0])), (y0, x1, ctx.op("Mul", [wy0, wx1])),
                   (y1, x0, ctx.op("Mul", [wy1, wx0])), (y1, x1, ctx.op("Mul", [wy1, wx1]))]
    flat = [s.flat_index(yc, xc) for yc, xc, _ in corners]         # (index (N,1,P), in-image mask or None)
    dx = dgrid = None
    if ctx.needs_grad(0):
        dy_flat = ctx.op("Reshape", [dy, ctx.const([0, 0, -1])])      # (N, C, P)
        idx, vals = [], []
        for (_, _, w), (index, inside) in zip(corners, flat):
            weight = w if inside is None else (inside if w is None else ctx.op("Mul", [w, inside]))
            vals.append(dy_flat if weight is None else ctx.op("Mul", [dy_flat, s.per_pixel(weight)]))
            idx.append(ctx.op("Expand", [index, ctx.shape_of(dy_flat)]))
        scattered = ctx.op("ScatterElements", [s.zeros_flat(), ctx.op("Concat", idx, axis=2) if len(idx) > 1 else idx[0],
                                               ctx.op("Concat", vals, axis=2) if len(vals) > 1 else vals[0]],
                           axis=2, reduction="add")
        dx = ctx.op("Reshape", [scattered, ctx.shape_of(x)])
    if ctx.needs_grad(1):
        if mode == "nearest":
            dgrid = ctx.zeros_like(grid)
        else:
            read = [s.read(index, inside) for index, inside in flat]          # X at each corner, (N, C, Ho, Wo)
            d_ix = ctx.op("Add", [ctx.op("Mul", [ctx.op("Sub", [read[1], read[0]]), s.per_channel(wy0)]),
                                  ctx.op("Mul", [ctx.op("Sub", [read[3], read[2]]), s.per_channel(wy1)])])
            d_iy = ctx.op("Add", [ctx.op("Mul", [ctx.op("Sub", [read[2], read[0]]), s.per_channel(wx0)]),
                                  ctx.op("Mul", [ctx.op("Sub", [read[3], read[1]]), s.per_channel(wx1)])])
            g_ix = ctx.op("Mul", [ctx.reduce_sum(ctx.op("Mul", [d_ix, dy]), [1], keepdims=False), s.scale_w])
            g_iy = ctx.op("Mul", [ctx.reduce_sum(ctx.op("Mul", [d_iy, dy]), [1], keepdims=False), s.scale_h])
            dgrid = ctx.op("Concat", [ctx.unsqueeze(g_ix, [3]), ctx.unsqueeze(g_iy, [3])], axis=3)
    return [dx, dgrid]


class _Sampler:
    """The forward's pixel coordinates and the index arithmetic shared by the two gradients."""

    def __init__(self, ctx: RuleContext, x: str, grid: str, align_corners: bool, padding: str) -> None:
        self.ctx, self.x, self.border = ctx, x, padding != "zeros"    # reflection reads clamped corners too
        self._reads: tuple = ()
        shape_x = ctx.shape_of(x)
        self.h_int = ctx.op("Slice", [shape_x, ctx.const([2]), ctx.const([3])])
        self.w_int = ctx.op("Slice", [shape_x, ctx.const([3]), ctx.const([4])])
        self.h, self.w = (ctx.op("Cast", [d], to=ctx.elem_type(grid) or 1) for d in (self.h_int, self.w_int))
        self.one = ctx.const(1.0, like=grid)
        half = ctx.const(0.5, like=grid)
        gx = ctx.op("Gather", [grid, ctx.const(0)], axis=3)          # (N, Ho, Wo), in [-1, 1]
        gy = ctx.op("Gather", [grid, ctx.const(1)], axis=3)
        if align_corners:        # -1 and 1 are the centres of the edge pixels: ix = (g + 1) / 2 * (W - 1)
            self.scale_w = ctx.op("Mul", [ctx.op("Sub", [self.w, self.one]), half])
            self.scale_h = ctx.op("Mul", [ctx.op("Sub", [self.h, self.one]), half])
            self.ix = ctx.op("Mul", [ctx.op("Mul", [ctx.op("Add", [gx, self.one]), half]), ctx.op("Sub", [self.w, self.one])])
            self.iy = ctx.op("Mul", [ctx.op("Mul", [ctx.op("Add", [gy, self.one]), half]), ctx.op("Sub", [self.h, self.one])])
        else:                    # -1 and 1 are the outer edges: ix = ((g + 1) W - 1) / 2
            self.scale_w = ctx.op("Mul", [self.w, half])
            self.scale_h = ctx.op("Mul", [self.h, half])
            self.ix = ctx.op("Mul", [ctx.op("Sub", [ctx.op("Mul", [ctx.op("Add", [gx, self.one]), self.w]), self.one]), half])
            self.iy = ctx.op("Mul", [ctx.op("Sub", [ctx.op("Mul", [ctx.op("Add", [gy, self.one]), self.h]), self.one]), half])
        if padding == "reflection":     # folded back into the image's extent: a slope of +1 or -1
            lo = ctx.const(0.0 if align_corners else -0.5, like=grid)
            self.ix, sign_w = self._reflect(self.ix, lo, ctx.op("Sub", [self.w, self.one]) if align_corners else
                                            ctx.op("Sub", [self.w, half]))
            self.iy, sign_h = self._reflect(self.iy, lo, ctx.op("Sub", [self.h, self.one]) if align_corners else
                                            ctx.op("Sub", [self.h, half]))
            self.scale_w = ctx.op("Mul", [self.scale_w, sign_w])
            self.scale_h = ctx.op("Mul", [self.scale_h, sign_h])

    def _reflect(self, t: str, lo: str, hi: str) -> tuple[str, str]:
        """t reflected into [lo, hi] at its ends as often as it takes (ONNX Runtime's GsReflect),
        and its derivative: the sign of t - lo, flipped at each odd reflection."""
        ctx = self.ctx
        two = ctx.const(2.0, like=t)
        span = ctx.op("Max", [ctx.op("Sub", [hi, lo]), ctx.const(1e-6, like=t)])
        d = ctx.op("Abs", [ctx.op("Sub", [t, lo])])
        flips = ctx.op("Floor", [ctx.op("Div", [d, span])])
        extra = ctx.op("Sub", [d, ctx.op("Mul", [flips, span])])
        odd = ctx.op("Sub", [flips, ctx.op("Mul", [two, ctx.op("Floor", [ctx.op("Div", [flips, two])])])])
        folded = ctx.op("Add", [ctx.op("Add", [lo, extra]),
                                ctx.op("Mul", [odd, ctx.op("Sub", [span, ctx.op("Mul", [two, extra])])])])
        slope = ctx.op("Mul", [ctx.op("Sign", [ctx.op("Sub", [t, lo])]),
                               ctx.op("Sub", [self.one, ctx.op("Mul", [two, odd])])])
        return folded, slope

    def flat_index(self, yc: str, xc: str) -> tuple[str, object]:
        """(row-major pixel index (N, 1, P), int64; the in-image mask (N, Ho, Wo) or None for border).

        Out-of-image corners get a clamped index: border padding reads that pixel, zeros padding
        reads it with weight 0."""
        ctx = self.ctx
        zero = ctx.const(0.0, like=yc)
        yk = ctx.op("Max", [ctx.op("Min", [yc, ctx.op("Sub", [self.h, self.one])]), zero])
        xk = ctx.op("Max", [ctx.op("Min", [xc, ctx.op("Sub", [self.w, self.one])]), zero])
        index = ctx.op("Cast", [ctx.op("Add", [ctx.op("Mul", [yk, self.w]), xk])], to=7)
        index = ctx.op("Reshape", [index, ctx.const([0, 1, -1])])
        if self.border:
            return index, None
        same = ctx.op("And", [ctx.op("Equal", [yk, yc]), ctx.op("Equal", [xk, xc])])
        return index, ctx.op("Cast", [same], to=ctx.elem_type(yc) or 1)

    def per_pixel(self, w: str) -> str:
        """(N, Ho, Wo) weights as (N, 1, P), against the flattened gradient."""
        return self.ctx.op("Reshape", [w, self.ctx.const([0, 1, -1])])

    def per_channel(self, w: str) -> str:
        """(N, Ho, Wo) weights as (N, 1, Ho, Wo), against (N, C, Ho, Wo) reads."""
        return self.ctx.unsqueeze(w, [1])

    def zeros_flat(self) -> str:
        ctx = self.ctx
        return ctx.op("Reshape", [ctx.zeros_like(self.x), ctx.const([0, 0, -1])])

    def read(self, index: str, inside) -> str:
        """X at a corner for every output, (N, C, Ho, Wo); 0 outside the image with zeros padding."""
        ctx = self.ctx
        if not self._reads:        # what the four corners share: X flat, the channel axis, the output shape
            c = ctx.op("Slice", [ctx.shape_of(self.x), ctx.const([1]), ctx.const([2])])
            self._reads = (ctx.op("Reshape", [self.x, ctx.const([0, 0, -1])]),
                           ctx.op("Concat", [ctx.const([1]), c, ctx.const([1])], axis=0),
                           ctx.op("Concat", [ctx.op("Slice", [ctx.shape_of(self.x), ctx.const([0]), ctx.const([2])]),
                                             ctx.op("Slice", [ctx.shape_of(self.ix), ctx.const([1]), ctx.const([3])])],
                                  axis=0))
        x_flat, channels, out_shape = self._reads
        got = ctx.op("GatherElements", [x_flat, ctx.op("Expand", [index, channels])], axis=2)
        got = ctx.op("Reshape", [got, out_shape])
        return got if inside is None else ctx.op("Mul", [got, self.per_channel(inside)])
