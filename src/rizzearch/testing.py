"""Comparison helpers shared by the tests and the benchmarks.

One helper, ``assert_close``, with dtype-aware default tolerances and a failure message that
prints the max-abs and max-relative error and where it happens (the habit of fla's testing
utilities). Tests never call ``torch.testing.assert_close`` directly, so tolerances live here.
"""

from __future__ import annotations

import torch

# (atol, rtol) per dtype; fp32 values are for comparing two float32 forms of the same math.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Max-abs / max-rel error and the index of the worst element, as one line."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return "empty tensors"
    finite = torch.isfinite(diff)
    if not finite.all():
        bad = (~finite).nonzero()[0].tolist()
        return f"non-finite difference at index {bad}: actual={a[tuple(bad)].item()} expected={e[tuple(bad)].item()}"
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    rel = (diff / e.abs().clamp_min(1e-12)).max().item()
    return (
        f"max abs err {diff.max().item():.3e} at {list(idx)} "
        f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); max rel err {rel:.3e}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Tolerances default by the lower-precision dtype of the two tensors. Shapes must match
    exactly. The error message names the tensor and prints the error report.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    dt = actual.dtype if actual.dtype.itemsize <= expected.dtype.itemsize else expected.dtype
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dt, (0.0, 0.0))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.dtype.is_floating_point or e.dtype.is_floating_point:
        ok = torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=False).all().item()
    else:
        ok = torch.equal(a, e)
    if not ok:
        raise AssertionError(f"{name} mismatch (atol={atol:g}, rtol={rtol:g}): {error_report(actual, expected)}")
