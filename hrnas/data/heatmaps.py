"""Keypoint heatmap targets: one Gaussian per keypoint channel (top-down pose convention)."""

from __future__ import annotations

import torch


def render_heatmaps(
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    heatmap_size: tuple[int, int],
    stride: float,
    sigma: float = 1.0,
) -> torch.Tensor:
    """Gaussian heatmaps ``[..., K, h, w]`` of keypoints ``[..., K, 2]`` (x, y in input pixels).

    A keypoint maps to heatmap coordinates ``(x + 0.5) / stride - 0.5`` (pixel centres, as
    ``F.interpolate(align_corners=False)``), and its channel is
    ``exp(-((u - x')^2 + (v - y')^2) / (2 sigma^2))``; invisible keypoints give all-zero channels.
    """
    if keypoints.shape[-1] != 2 or visible.shape != keypoints.shape[:-1]:
        raise ValueError(
            f"keypoints must be [..., K, 2] with visible [..., K], got {list(keypoints.shape)} "
            f"and {list(visible.shape)}"
        )
    if stride <= 0 or sigma <= 0:
        raise ValueError(f"stride and sigma must be > 0, got {stride} and {sigma}")
    h, w = heatmap_size
    centre = (keypoints.float() + 0.5) / stride - 0.5
    u = torch.arange(w, dtype=torch.float32)
    v = torch.arange(h, dtype=torch.float32)
    gx = torch.exp(-((u - centre[..., 0:1]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((v - centre[..., 1:2]) ** 2) / (2 * sigma**2))
    heat = gy.unsqueeze(-1) * gx.unsqueeze(-2)
    return heat * visible.to(heat.dtype)[..., None, None]


def with_heatmap_targets(
    sample: dict, heatmap_size: tuple[int, int], stride: float, sigma: float
) -> dict:
    """``sample`` (tensor ``keypoints [..., K, 2]`` and ``visible [..., K]``) plus ``heatmap``
    (``render_heatmaps``) and ``target_weight`` (1.0 for visible keypoints, else 0)."""
    out = dict(sample)
    out["heatmap"] = render_heatmaps(
        sample["keypoints"], sample["visible"], heatmap_size, stride, sigma
    )
    out["target_weight"] = sample["visible"].float()
    return out
