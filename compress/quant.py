"""Uniform (linear) quantization grids: ``r = S (q - Z)``, the math shared by the linear and AdaRound stages.

No stage logic lives here: a grid is computed from one weight tensor and its
mask, weights are rounded onto it, and the result becomes a ``TensorRecord``.

Conventions:

* ``q`` is the signed grid integer of a weight, in ``[qmin, qmax]``;
  its value is ``float32(S[c]) * float32(q - Z[c])``.
* symmetric: ``Z = 0``, ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``; with the
  *restricted* range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` the grid is the same on
  both sides of zero (one code of the 2^b is then never used);
  ``S = max|w| / (2^(b-1) - 1)``.
* asymmetric: ``q`` in ``[0, 2^b - 1]``, ``[min, max]`` of the kept weights is
  widened to include 0 and ``Z`` is an integer in ``[0, 2^b - 1]``, so a zero
  weight is exactly representable (``q = Z`` gives exactly 0.0).
* per channel: one ``(S, Z)`` per output channel (the first dimension);
  per tensor: one of each, stored with length 1.
* every statistic (min/max, percentile, MSE) is computed over the KEPT weights
  only; pruned weights take no part and are absent from the record.
* the scale is float32 from the start and every rounding uses that float32
  value, so the stored grid is exactly the grid the weights were rounded on.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np
import torch

from compress.record import Affine, TensorRecord

ALPHAS = 100  # clipping ratios tried by the MSE search: 1.00, 0.99, ..., 0.01
_CHUNK_ELEMENTS = 1 << 22  # bound on alphas x weights evaluated at once by the MSE search (~16 MB a buffer)


class Granularity(str, enum.Enum):
    TENSOR = "tensor"  # one scale (and zero point) for the whole tensor
    CHANNEL = "channel"  # one per output channel: tighter grids where channel ranges differ


class ScaleMethod(str, enum.Enum):
    MINMAX = "minmax"  # cover the full range of the kept weights: no clipping error, coarse steps
    PERCENTILE = "percentile"  # clip outliers beyond a percentile of the kept weights
    MSE = "mse"  # the clipping ratio that minimises ||W - Q(W)||^2 (never worse than minmax)


class Grid(NamedTuple):
    """A uniform grid; unpacks as ``scale, zero_point, qmin, qmax``.

    Attributes:
        scale: float32 tensor ``(C,)``, ``C = 1`` per tensor.
        zero_point: int64 tensor ``(C,)``, 0 for symmetric grids.
        qmin, qmax: the signed integer range of ``q``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def int_range(bits: int, symmetric: bool, restricted: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit grid.

    Raises:
        ValueError: fewer than 2 bits, or ``restricted`` on an asymmetric grid.
    """
    if bits < 2:
        raise ValueError(f"a uniform grid needs at least 2 bits, got {bits}")
    if symmetric:
        half = 2 ** (bits - 1)
        return (-(half - 1) if restricted else -half), half - 1
    if restricted:
        raise ValueError("the restricted range applies to symmetric grids only")
    return 0, 2 ** bits - 1


def _rows(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``t`` as ``(C, K)``: one row per output channel, or one row."""
    return t.reshape(t.shape[0] if per_channel and t.dim() > 0 else 1, -1)


def broadcast_channels(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-row ``(C,)`` vector to broadcast along the first dimension of ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1))) if like.dim() > 0 else v.reshape(())


def _from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) covering ``[lo, hi]`` (float64, ``lo <= 0 <= hi``)."""
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).float()
    else:
        scale = ((hi - lo) / (qmax - qmin)).float()
    # An all-zero (or denormal) range: any scale represents it; 1.0 keeps the grid finite.
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    if symmetric:
        zp = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
    else:
        zp = torch.round(qmin - lo / scale.double()).clamp(qmin, qmax).to(torch.int64)
    return scale, zp


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                  ) -> torch.Tensor:
    """``Q(w) = S (clamp(round(w / S) + Z, qmin, qmax) - Z)`` in float32, ``(S, Z)`` broadcast along dim 0."""
    s = broadcast_channels(scale.to(w.device, torch.float32), w)
    z = broadcast_channels(zero_point.to(w.device), w).float()
    q = torch.clamp(torch.round(w.float() / s) + z, qmin, qmax)
    return s * (q - z)


def quantize_nearest(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                     ) -> torch.Tensor:
    """Round every weight to the nearest grid point (ties to even).

    Returns:
        int64 tensor of ``q`` in ``[qmin, qmax]``, the shape of ``w``.
    """
    s = broadcast_channels(scale.to(w.device, torch.float32), w)
    z = broadcast_channels(zero_point.to(w.device), w)
    q = torch.round(w.detach().float() / s).to(torch.int64) + z
    return q.clamp(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``float32(S) * float32(q - Z)``: the exact value an ``Affine`` record decodes to."""
    s = broadcast_channels(scale.to(q.device, torch.float32), q)
    z = broadcast_channels(zero_point.to(q.device), q)
    return s * (q - z).float()


def quant_error(w: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int, per_channel: bool = False) -> torch.Tensor:
    """``sum (W - Q(W))^2`` over the kept weights, in float64; per channel (shape ``(C,)``) or per tensor (``(1,)``)."""
    err = (w.detach().double() - fake_quantize(w.detach(), scale, zero_point, qmin, qmax).double()) ** 2
    if mask is not None:
        err = torch.where(mask.to(err.device), err, torch.zeros((), dtype=err.dtype, device=err.device))
    return _rows(err, per_channel).sum(dim=1)


def grid(w: torch.Tensor, mask: torch.Tensor | None = None, bits: int = 8, symmetric: bool = True,
         restricted: bool = False, per_channel: bool = False, method: ScaleMethod = ScaleMethod.MSE,
         percentile: float = 99.99) -> Grid:
    """The grid of one weight tensor, from its kept weights only.

    Args:
        w: the weights; channels along the first dimension.
        mask: True where a weight is kept (None: all kept). Pruned weights do not
            influence the grid.
        bits: 2**bits codes.
        symmetric: ``Z = 0`` and a grid symmetric about zero; else ``[min, max]``
            (widened to include 0) with an integer zero point.
        restricted: symmetric only: use ``[-(2^(b-1)-1), 2^(b-1)-1]``.
        per_channel: one grid per output channel.
        method: ``minmax``, ``percentile`` (clip to the ``percentile`` of |w|, or to the
            ``100 - p`` / ``p`` percentiles when asymmetric) or ``mse``: among the
            clipping ratios ``alpha = 1.00, 0.99, ..., 0.01`` of the min/max range, the one
            with the least ``||W - Q(W)||^2`` (per channel when per channel). ``alpha = 1``
            is the min/max grid itself, so MSE is never worse than min/max.
        percentile: in (50, 100], for ``method = percentile``.

    Returns:
        ``Grid(scale, zero_point, qmin, qmax)``.
    """
    method = ScaleMethod(method)
    qmin, qmax = int_range(bits, symmetric, restricted)
    wd = w.detach()
    rows = _rows(wd, per_channel).double()
    keep = _rows(mask.to(wd.device).bool(), per_channel) if mask is not None else torch.ones_like(rows, dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=rows.device)
    lo = torch.where(keep, rows, inf).amin(dim=1)
    hi = torch.where(keep, rows, -inf).amax(dim=1)
    empty = ~keep.any(dim=1)
    lo = torch.where(empty, torch.zeros_like(lo), lo).clamp(max=0.0)
    hi = torch.where(empty, torch.zeros_like(hi), hi).clamp(min=0.0)

    if method is ScaleMethod.PERCENTILE:
        lo, hi = _percentile_range(rows, keep, symmetric, percentile)
    scale, zp = _from_range(lo, hi, qmin, qmax, symmetric)
    if method is ScaleMethod.MSE:
        scale, zp = _mse_search(wd, mask, lo, hi, qmin, qmax, symmetric, per_channel, (scale, zp))
    return Grid(scale, zp, qmin, qmax)


def _percentile_range(rows: torch.Tensor, keep: torch.Tensor, symmetric: bool, p: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    data, kept = rows.cpu().numpy(), keep.cpu().numpy()
    lo, hi = np.zeros(len(data)), np.zeros(len(data))
    for i, (row, k) in enumerate(zip(data, kept)):
        values = row[k]
        if values.size == 0:
            continue
        if symmetric:
            hi[i] = np.percentile(np.abs(values), p)
            lo[i] = -hi[i]
        else:
            lo[i], hi[i] = np.percentile(values, 100.0 - p), np.percentile(values, p)
    as_t = lambda a: torch.from_numpy(a).to(rows.device)  # noqa: E731
    return as_t(lo).clamp(max=0.0), as_t(hi).clamp(min=0.0)


def _mse_search(w: torch.Tensor, mask: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, qmin: int,
                qmax: int, symmetric: bool, per_channel: bool, minmax: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipping ratio of ``[lo, hi]`` with the least squared rounding error of the kept weights."""
    rows = _rows(w, per_channel).float()
    keep = _rows(mask.to(w.device).bool(), per_channel) if mask is not None else None
    alphas = torch.arange(ALPHAS, 0, -1, dtype=torch.float64, device=w.device) / ALPHAS  # 1.00 first: ties keep it
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64, device=w.device)
    best_scale, best_zp = minmax[0].clone(), minmax[1].clone()
    chunk = max(1, _CHUNK_ELEMENTS // max(rows.numel(), 1))
    for start in range(0, ALPHAS, chunk):
        a = alphas[start:start + chunk, None]  # (A, 1)
        scale, zp = _from_range(a * lo, a * hi, qmin, qmax, symmetric)  # (A, C)
        s, z = scale[:, :, None], zp[:, :, None].float()
        q = torch.clamp(torch.round(rows / s) + z, qmin, qmax)
        err = (rows - s * (q - z)).square_()  # (A, C, K); float32 here, the final check below is float64
        if keep is not None:
            err = torch.where(keep, err, torch.zeros((), dtype=err.dtype, device=err.device))
        err = err.sum(dim=2, dtype=torch.float64)
        for i in range(err.shape[0]):  # in alpha order, strictly better only: ties keep the larger alpha
            better = err[i] < best_err
            best_err = torch.where(better, err[i], best_err)
            best_scale = torch.where(better, scale[i], best_scale)
            best_zp = torch.where(better, zp[i], best_zp)
    # Guard the promise exactly, with the same evaluation a caller would use: never worse than min/max.
    chosen = quant_error(w, mask, best_scale, best_zp, qmin, qmax, per_channel)
    plain = quant_error(w, mask, minmax[0], minmax[1], qmin, qmax, per_channel)
    worse = chosen > plain
    return torch.where(worse, minmax[0], best_scale), torch.where(worse, minmax[1], best_zp)


def code_offset(bits: int, qmin: int) -> int:
    """What turns a signed grid integer ``q`` into an unsigned record code: ``code = q + offset``.

    Signed (symmetric) grids use ``2^(b-1)``, so the record's zero point is ``levels // 2``
    (restricted or not); unsigned (asymmetric, ``qmin = 0``) grids use 0, so the record's
    zero point is ``Z`` itself. Either way ``code - zero_point_record = q - Z``: the record
    decodes to ``S (q - Z)`` exactly, as an exact integer times one float32 multiply.
    """
    return 2 ** (bits - 1) if qmin < 0 else 0


def to_record(w_shape: tuple[int, ...], mask: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor,
              zero_point: torch.Tensor, bits: int, per_channel: bool, *, qmin: int) -> TensorRecord:
    """The record of a quantized tensor: kept positions, unsigned codes, the affine table.

    Args:
        w_shape: the dense tensor's shape.
        mask: True where kept (None: all kept). Every kept weight is in the record, even one
            that quantizes to zero; pruned weights are not.
        q: signed grid integers (``quantize_nearest`` or AdaRound), the shape of the tensor.
        scale, zero_point: the grid, length 1 or one per output channel.
        qmin: the grid's lower bound; tells a signed grid from an unsigned one (see ``code_offset``).

    Returns:
        A ``TensorRecord`` with ``Affine(scale, zero_point + offset, 2**bits, per_channel)``.

    Raises:
        ValueError: a code outside ``[0, 2**bits)``.
    """
    offset = code_offset(bits, qmin)
    flat_q = q.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if mask is None:
        positions = np.arange(flat_q.size, dtype=np.int64)
    else:
        positions = np.flatnonzero(mask.detach().reshape(-1).cpu().numpy())
    codes = flat_q[positions] + offset
    levels = 2 ** bits
    if codes.size and (codes.min() < 0 or codes.max() >= levels):
        raise ValueError(f"codes outside [0, {levels}): q must lie in the grid's [qmin, qmax]")
    table = Affine(scale.detach().cpu().numpy().astype(np.float32),
                   zero_point.detach().cpu().numpy().astype(np.int64) + offset, levels=levels,
                   per_channel=per_channel)
    return TensorRecord(tuple(w_shape), positions, codes, table)
