"""The fast chunkwise mLSTM: one autograd Function over all chunks, with a hand-derived backward.

The forward and backward derivations are in ``docs/xlstm.md``; the spec this is tested against
(``tests/ops/test_mlstm.py``: outputs, final states and every gradient) is the reference chunkwise
form beside it in ``rizzearch.ops.mlstm``, which also holds the public entry point
``mlstm_chunkwise(..., backend="fast")`` that calls ``_MLSTMChunkwiseFn``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

def _chunk_view(x: Tensor, NC: int, L: int) -> Tensor:
    """(BH, T_pad, ...) -> (BH, NC, L, ...)."""
    return x.view(x.shape[0], NC, L, *x.shape[2:])


_EXP_FLOOR = -80.0  # exponents are clamped here before exp(): still a normal float32 (1.8e-35)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_e x[..., e] y[..., e] as one batched (1 x n)(n x 1) matmul: one pass, no temporary
    (what einsum lowers it to, without einsum's parsing overhead)."""
    n = x.shape[-1]
    return torch.bmm(x.reshape(-1, 1, n), y.reshape(-1, n, 1)).view(x.shape[:-1])


def _segsum(x: Tensor) -> Tensor:
    """S[..., c, c'] = sum_{c' < r <= c} x[..., r] for c' <= c, -inf above the diagonal. x: (..., NC).

    Accumulated column by column (a cumsum of a masked matrix), so every entry is a short sum of
    the entries it spans, never a difference of two long prefix sums.
    """
    not_strict, upper = _segsum_masks(x.shape[-1], x.device)
    S = x[..., :, None].expand(*x.shape, x.shape[-1]).masked_fill(not_strict, 0.0).cumsum(-2)  # (..., NC, NC): rows c, cols c'
    return S.masked_fill(upper, float("-inf"))


@functools.lru_cache(maxsize=32)
def _segsum_masks(NC: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(r <= c' : not strictly below the diagonal, c' > c : above the diagonal), both (NC, NC) bool; read only."""
    ones = torch.ones(NC, NC, dtype=torch.bool, device=device)
    return ~ones.tril(-1), ~ones.tril()


def _decay_matrix(rb: Tensor, cg: Tensor, scale: float) -> Tensor:
    """P[..., j, l] = scale * exp(b_j - mrow_j - b_l + i_l) for l <= j, 0 above the diagonal.

    ``rb = b - mrow + log(scale)`` (row part), ``cg = i - b`` (column part), both (BH, NC, L).
    exp() takes a slow path (10x+) for -inf and for results below the normal range, so the
    exponent is clamped to [_EXP_FLOOR, 0] + log(scale) first (entries are <= 0 up to rounding;
    e^-80 ~ 1e-35 is negligible next to each row's maximum of 1), then the upper triangle is zeroed.
    """
    ls = math.log(scale)
    return torch.add(rb[..., :, None], cg[..., None, :]).clamp_(_EXP_FLOOR + ls, ls).exp_().tril_()  # (BH, NC, L, L)


def _chunk_starts(Wp: Tensor, W0p: Tensor, KV: Tensor, C0p: Tensor | None) -> Tensor:
    """Start state [C | n] of every chunk: ``Wp @ KV + W0p C0'`` -> (BH, NC, d, e1) (``C0p=None``: empty)."""
    BH, NC, d, e1 = KV.shape
    Cp = torch.matmul(Wp, KV.view(BH, NC, d * e1)).view(BH, NC, d, e1)
    return Cp if C0p is None else Cp.addcmul_(W0p[..., None, None], C0p[:, None])


class _MLSTMChunkwiseFn(torch.autograd.Function):
    """mLSTM chunkwise forward over all chunks at once; backward derived by hand (docs/xlstm.md).

    Inputs are fp32/fp64, already flattened to (BH, T, .), ``k`` unscaled (``scale`` = 1/sqrt(Dqk)
    is applied inside), ``logf`` already ``logsigmoid(f)``. The normaliser rides along as one more
    value column: with ``v' = [v | 1]`` the state ``C' = [C | n]`` (Dqk x (Dv + 1)) holds both
    eq. 19 and eq. 20, and every product with ``v'`` or ``C'`` yields the numerator and the
    denominator of eq. 21 at once. Per chunk, with ``b`` the within-chunk cumulative log forget gate:

        log D_jl = b_j - b_l + i_l  (l <= j)        row stabiliser mrow_j = max(max_l log D_jl, m_prev + b_j)
        P = exp(log D - mrow),  A = (q k^T) * P,   w_j = exp(m_prev + b_j - mrow_j)
        [num | den] = A v' + w q^T C'_prev,        h = num / max(|den|, exp(-mrow))

    The row maximum is a prefix maximum, ``b_j + cummax_l(i_l - b_l)``, so the L x L matrix is
    built in a few in-place passes (add, clamp, exp, tril) and never searched. Between chunks there
    is no Python loop: each chunk's input is summarised as ``KV_c = K^T diag(exp(g - mloc_c)) V'``
    (``g`` the log-weights at the chunk end, ``mloc_c`` their max), and the end state of every
    chunk is one matrix product over chunks, ``C_c = sum_{c' <= c} W[c, c'] KV_c' + W0[c] C_0``
    with ``W[c, c'] = exp(mloc_c' + sum_{c' < r <= c} B_r - m_c)`` (``B_r`` = total log forget of
    chunk r, ``m_c`` the row maximum = the recurrent stabiliser). The start states of the chunks
    come straight out of that product with ``W`` shifted down one row (no concatenation), and its
    backward needs no reverse scan either.

    Stabilisers are constants in the backward: ``h`` and the true (unstabilised) states do not
    depend on them, so their gradient paths cancel exactly; the one exception is the returned
    final ``m``, whose gradient (plus the implied rescaling of the returned ``C``, ``n``) is routed
    to the entry that attains the maximum.

    Speed (CPU): the work is twelve L x L x D batched matmuls (four forward, eight backward) plus
    small products over chunks and about twenty elementwise passes. What costs as much as the
    matmuls is memory: glibc hands large freed blocks back to the kernel, so every megabyte the
    call's peak footprint grows costs ~256 page faults (~0.5 ms on a VM) on each call. So the
    forward keeps only ``v'``, the chunk summaries ``KV`` and ``A``; the backward recomputes the
    cheap ``P``, gate-weighted keys and chunk-start states when it needs them, works in place and
    frees each temporary as soon as it is dead.

    Memory kept for the backward: ``v'``, ``KV`` (NC x Dqk x (Dv + 1) per head) and ``A`` (T L per
    head), never a T x T matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v, ig, logf, C0, n0, m0, L: int, has_state: bool, scale: float, need_state: bool):
        ctx.set_materialize_grads(False)  # unused outputs (often the final state) arrive as None
        BH, T, d = q.shape
        e = v.shape[-1]
        e1 = e + 1
        NC = -(-T // L)
        pad = NC * L - T
        if pad:  # neutral tail: no input (i = -inf), no decay (log f = 0)
            q = F.pad(q, (0, 0, 0, pad))
            k = F.pad(k, (0, 0, 0, pad))
            ig = F.pad(ig, (0, pad), value=float("-inf"))
            logf = F.pad(logf, (0, pad), value=0.0)
        vp = q.new_empty(BH, NC * L, e1)  # v' = [v | 1]: the normaliser as one more value column
        vp[:, :T, :e] = v
        if pad:
            vp[:, T:, :e] = 0.0
        vp[..., e] = 1.0
        qc, kc, vpc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(vp, NC, L)
        b = logf.view(BH, NC, L).cumsum(-1)  # (BH, NC, L) within-chunk cumulative log forget
        Bc = b[..., -1]  # (BH, NC) total log forget of each chunk
        cg = ig.view(BH, NC, L) - b  # i_l - b_l
        g = cg + Bc[..., None]  # (BH, NC, L) log-weight of each input at its chunk end
        mloc = g.amax(-1)  # (BH, NC)
        # chunk-end states as one product over chunks
        logW = _segsum(Bc).add_(mloc[:, None, :])  # (BH, NC, NC)
        logW0 = m0[:, None] + Bc.cumsum(-1)  # (BH, NC) log-weight of the initial state at each chunk end
        mend = torch.maximum(logW.amax(-1), logW0)  # (BH, NC) = m_c
        W = logW.sub_(mend[..., None]).exp_()  # (BH, NC, NC)
        W0 = logW0.sub_(mend).exp_()  # (BH, NC); exactly 0 without an initial state (m0 = -inf)
        u = torch.exp(g - mloc[..., None]).mul_(scale)  # (BH, NC, L), the key scale 1/sqrt(Dqk) folded in
        KV = torch.matmul((kc * u[..., None]).transpose(-1, -2), vpc)  # (BH, NC, d, e1) chunk summaries [K^T U V | K^T u]
        C0p = torch.cat([C0, n0[..., None]], -1) if has_state else None  # (BH, d, e1) = [C0 | n0]
        # start state of chunk c = end state of chunk c - 1 (the initial state for c = 0)
        Wp = F.pad(W[:, :-1], (0, 0, 1, 0))  # (BH, NC, NC): W shifted down one row
        W0p = torch.cat([torch.ones_like(W0[:, :1]), W0[:, :-1]], 1)  # (BH, NC)
        use_inter = has_state or NC > 1  # else the only chunk starts from the empty state: no inter-chunk term
        mp = torch.cat([m0[:, None], mend[:, :-1]], 1)  # (BH, NC) chunk-start stabilisers
        # intra-chunk matrices
        a = mp[..., None] + b  # (BH, NC, L) log-weight of the chunk-start state
        mrow = torch.maximum(b + cg.cummax(-1).values, a)  # row maxima of log D, then the state
        w = torch.exp(a - mrow)
        rb = (b - mrow).add_(math.log(scale))  # row part of log P (the key scale as log(scale): k stays unscaled)
        A = torch.matmul(qc, kc.transpose(-1, -2)).mul_(_decay_matrix(rb, cg, scale))  # (BH, NC, L, L)
        if use_inter:  # [num | den] = w q^T C'_prev + A v'
            num = torch.matmul(qc, _chunk_starts(Wp, W0p, KV, C0p)).mul_(w[..., None])  # (BH, NC, L, e1)
            num.view(BH * NC, L, e1).baddbmm_(A.view(BH * NC, L, L), vp.view(BH * NC, L, e1))
        else:
            num = torch.matmul(A, vpc)
        den = num[..., e]
        lo = torch.exp(-mrow)
        N = torch.maximum(den.abs(), lo)
        h = torch.div(num[..., :e], N[..., None])  # (BH, NC, L, e) contiguous
        # d N / d den: sign(den) where |den| wins the max, 0 where exp(-m) wins
        dN = torch.sign(den).mul_(den.abs() > lo)
        del num, den
        Cfin = None
        if need_state:  # C'_T = W[-1] KV + W0[-1] C0'
            Cfin = torch.matmul(W[:, -1:], KV.view(BH, NC, d * e1)).view(BH, d, e1)
            if has_state:
                Cfin.addcmul_(W0[:, -1, None, None], C0p)
        ctx.save_for_backward(q, k, vp, g, cg, rb, Bc, mloc, C0p, m0, Cfin, W, W0, Wp, W0p, u, KV, A, w, h, N, dN)
        ctx.shape = (BH, T, d, e, NC, L, pad, use_inter, scale)
        hT = h.view(BH, NC * L, e)[:, :T]
        if not need_state:
            return hT, None, None, None
        return hT, Cfin[..., :e].contiguous(), Cfin[..., e].contiguous(), mend[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gCT, gnT, gmT):
        (q, k, vp, g, cg, rb, Bc, mloc, C0p, m0, Cfin, W, W0, Wp, W0p, u, KV, A, w, h, N, dN) = ctx.saved_tensors
        BH, T, d, e, NC, L, pad, use_inter, scale = ctx.shape
        e1 = e + 1
        has_state = C0p is not None
        state_out = gCT is not None or gnT is not None  # are the returned C, n in the loss?
        gCfin = None  # d loss / d [C_T | n_T]
        if state_out:
            gCfin = h.new_zeros(BH, d, e1)
            if gCT is not None:
                gCfin[..., :e] = gCT
            if gnT is not None:
                gCfin[..., e] = gnT
        qc, kc, vpc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(vp, NC, L)
        gm0 = torch.zeros_like(m0)
        gC0p = None

        # h = num / N,  N = max(|den|, exp(-m))  (the exp(-m) branch carries no gradient)
        # gnum' = [gh / N | -(gh . h) / N * dN]: the gradients of [num | den]
        gnum = h.new_empty(BH, NC * L, e1)
        if gh is None:
            gnum.zero_()
        else:
            torch.div(gh, N.view(BH, NC * L)[:, :T, None], out=gnum[:, :T, :e])
            if pad:
                gnum[:, T:, :e] = 0.0
        gnum = _chunk_view(gnum, NC, L)
        gnum[..., e] = _rowdot(gnum[..., :e], h).mul_(dN).neg_()
        # [num | den] = A v' + w q^T C'_prev
        gA = torch.matmul(gnum, vpc.transpose(-1, -2))  # (BH, NC, L, L)
        gv = torch.matmul(A.transpose(-1, -2), gnum[..., :e])  # (BH, NC, L, e)
        gq = gk = gKV = gWe = gW0e = None
        gb = torch.zeros_like(g)
        gig = torch.zeros_like(g)
        gB = torch.zeros_like(Bc)
        if use_inter:  # the chunk-start states feed every chunk's output
            gq = torch.matmul(gnum, _chunk_starts(Wp, W0p, KV, C0p).transpose(-1, -2))  # (BH, NC, L, d) = gnum' C'_prev^T
            ga = _rowdot(qc, gq).mul_(w)  # d/da, a = m_prev + b (w = exp(a - mrow))
            gq.mul_(w[..., None])
            gCp = torch.matmul(qc.transpose(-1, -2), gnum.mul_(w[..., None]))  # (BH, NC, d, e1)
            gb.add_(ga)
            if has_state:
                gm0 = gm0 + ga[:, 0].sum(-1)  # a = m_prev + b; m_prev of chunk 0 is m0
            gKV, gWe, gC0p, gW0e = _grad_chunk_starts(gCp, Wp, W0p, KV, C0p)
            del gCp
        del gnum
        if use_inter or state_out:
            gk, gg, gB, gC0p, glogW0 = _grad_chunk_summaries(gKV, gWe, gW0e, gC0p, gCfin, W, W0, KV, C0p, kc, vpc, u, gv)
            if has_state:
                gm0 = gm0 + glogW0.sum(-1)
            gig.add_(gg)
            gb.sub_(gg)
        # A = (q k^T) * P ;  P = exp(log D - mrow)  =>  d (q k^T) = gA * P,  d log D = gA * A
        gS = _decay_matrix(rb, cg, scale).mul_(gA)
        gq = torch.matmul(gS, kc) if gq is None else gq.view(BH * NC, L, d).baddbmm_(gS.view(BH * NC, L, L), kc.reshape(BH * NC, L, d)).view(BH, NC, L, d)
        gk = torch.matmul(gS.transpose(-1, -2), qc) if gk is None else gk.view(BH * NC, L, d).baddbmm_(gS.view(BH * NC, L, L).transpose(-1, -2), qc.reshape(BH * NC, L, d)).view(BH, NC, L, d)
        del gS
        glogD = gA.mul_(A)
        col = glogD.sum(-2)  # (BH, NC, L): sum over rows j for each input l
        gig.add_(col)
        gb.add_(glogD.sum(-1)).sub_(col)
        del gA, glogD
        # The returned final m: its own gradient plus the rescaling of the returned C, n, routed to
        # the entry attaining m_T = max(m0 + sum_r B_r, max_c' [mloc_c' + sum_{r > c'} B_r]).
        G = -(gCfin * Cfin).sum((-1, -2)) if state_out else None  # (BH,)
        if gmT is not None:
            G = gmT if G is None else G + gmT
        if G is not None and bool((G != 0).any()):
            gm0, gB = _grad_final_m(G, Bc, mloc, m0, g, gm0, gB, gig, gb)
        gb[..., -1] += gB
        glogf = gb.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(log f)
        gq = gq.view(BH, NC * L, d)[:, :T]
        gk = gk.view(BH, NC * L, d)[:, :T]
        gv = gv.view(BH, NC * L, e)[:, :T]
        gig = gig.reshape(BH, NC * L)[:, :T]
        glogf = glogf.reshape(BH, NC * L)[:, :T]
        gC0, gn0 = (gC0p[..., :e], gC0p[..., e]) if gC0p is not None else (None, None)
        return gq, gk, gv, gig, glogf, gC0, gn0, gm0 if has_state else None, None, None, None, None


def _grad_chunk_starts(gCp: Tensor, Wp: Tensor, W0p: Tensor, KV: Tensor, C0p: Tensor | None):
    """Backward of the chunk-start states ``Cp = Wp KV + W0p C0'`` given their gradient ``gCp``
    (BH, NC, d, e1): returns ``(gKV, gWe, gC0p, gW0e)``, the last two None without an initial state."""
    BH, NC, d, e1 = KV.shape
    de1 = d * e1
    gCpf = gCp.view(BH, NC, de1)
    gKV = torch.matmul(Wp.transpose(-1, -2), gCpf)  # (BH, NC, de1)
    # d log W[c, c'] = (gC_c . KV_c') W[c, c'], gC_c = gradient of the end state of chunk c
    # (= start state of chunk c + 1, then the final state)
    gWe = F.pad(torch.matmul(gCpf[:, 1:], KV.view(BH, NC, de1).transpose(-1, -2)), (0, 0, 0, 1))  # (BH, NC, NC)
    gC0p = gW0e = None
    if C0p is not None:
        gC0p = torch.matmul(W0p[:, None, :], gCpf).view(BH, d, e1)
        gW0e = F.pad(torch.matmul(gCpf[:, 1:], C0p.view(BH, de1, 1))[..., 0], (0, 1))  # (BH, NC)
    return gKV, gWe, gC0p, gW0e


def _grad_chunk_summaries(gKV, gWe, gW0e, gC0p, gCfin, W, W0, KV, C0p, kc, vpc, u, gv):
    """Backward of the chunk summaries ``KV = K^T diag(u) V'`` and of the chunk-end weights ``W``,
    ``W0`` (through the chunk starts and, when ``gCfin`` is not None, the returned final state
    ``C'_T = W[-1] KV + W0[-1] C0'``). Adds to ``gv`` in place; returns
    ``(gk, gg, gB, gC0p, glogW0)`` (gg = d/dg, gB = d/dB, glogW0 None without an initial state)."""
    BH, NC, d, e1 = KV.shape
    L, e, de1 = kc.shape[2], e1 - 1, d * e1
    KVf = KV.view(BH, NC, de1)
    if gWe is None:  # one chunk from the empty state: only the returned state depends on KV
        gWe, gW0e = W.new_zeros(BH, NC, NC), W0.new_zeros(BH, NC)
    if gCfin is not None:
        gCff = gCfin.view(BH, 1, de1)
        gKV = torch.matmul(W[:, -1, :, None], gCff) if gKV is None else gKV.baddbmm_(W[:, -1, :, None], gCff)
        gWe[:, -1] = torch.matmul(gCff, KVf.transpose(-1, -2))[:, 0]
        if C0p is not None:
            gC0p = gCfin * W0[:, -1, None, None] if gC0p is None else gC0p.addcmul_(W0[:, -1, None, None], gCfin)
            gW0e[:, -1] = (gCfin * C0p).sum((-1, -2))
    glogW = gWe.mul_(W)  # (BH, NC, NC)
    gKV = gKV.view(BH, NC, d, e1)
    # KV = K^T diag(u) V' ;  u = exp(g - mloc) scale
    ku = kc * u[..., None]  # (BH, NC, L, d)
    gv.view(BH * NC, L, e).baddbmm_(ku.view(BH * NC, L, d), gKV.view(BH * NC, d, e1)[..., :e])
    gk = torch.matmul(vpc, gKV.transpose(-1, -2))  # (BH, NC, L, d) = v' gKV^T
    del gKV
    gg = _rowdot(ku, gk)  # d/dg, g = i - b + B
    del ku
    gk.mul_(u[..., None])
    # log W[c, c'] = mloc_c' + sum_{c' < r <= c} B_r ;  log W0[c] = m0 + sum_{r <= c} B_r
    # (mloc and m_c are stabilisers: constants)
    cum_excl = glogW.cumsum(-1) - glogW  # [c, r] = sum_{c' < r} glogW[c, c']
    gB = cum_excl.tril().sum(-2) + gg.sum(-1)  # sum over c >= r
    glogW0 = None
    if C0p is not None:
        glogW0 = gW0e.mul_(W0)  # (BH, NC)
        gB = gB + glogW0.flip(-1).cumsum(-1).flip(-1)
    return gk, gg, gB, gC0p, glogW0


def _grad_final_m(G, Bc, mloc, m0, g, gm0, gB, gig, gb):
    """Route ``G`` (BH,), the gradient of the returned final ``m`` (its own plus the rescaling of
    the returned C, n), to the entry attaining ``m_T = max(m0 + sum_r B_r, max_c' [mloc_c' +
    sum_{r > c'} B_r])``. Adds to ``gig`` and ``gb`` in place; returns the new ``(gm0, gB)``."""
    NC = Bc.shape[-1]
    # the last row of the forward's max, recomputed exactly as there
    cand = torch.cat([_segsum(Bc)[:, -1] + mloc, (m0 + Bc.cumsum(-1)[:, -1])[:, None]], 1)  # (BH, NC + 1)
    win = cand.argmax(-1)  # (BH,) in 0..NC (NC = the initial state)
    r = torch.arange(NC, device=G.device)
    from_state = win == NC
    gm0 = gm0 + torch.where(from_state, G, torch.zeros_like(G))
    gB = gB + G[:, None] * ((r[None, :] > win[:, None]) | from_state[:, None]).to(G.dtype)  # decays on the path
    hit = (r[None, :] == win[:, None]).to(G.dtype) * G[:, None]  # (BH, NC): chunk c* wins via mloc_c*
    onehot = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0)  # l* with g_{l*} = mloc
    gig.addcmul_(onehot, hit[..., None])  # g_{l*} = i_{l*} - b_{l*} + B
    gb.addcmul_(onehot, hit[..., None], value=-1.0)
    return gm0, gB + hit
