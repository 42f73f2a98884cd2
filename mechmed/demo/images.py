"""Synthetic chest-X-ray-like images with six findings, for the embedded default.

Each image is a caricature of a frontal (PA) chest radiograph at a small size (32 x 32 by
default): a soft-tissue body on a dark background, two dark lung fields with faint vascular
markings and ribs, a bright mediastinum, heart shadow and spine. Patients vary in position,
scale, lung and heart size, brightness and noise. The findings are drawn on top:

* ``effusion``: bright fluid filling one lung base, its upper edge a meniscus rising laterally.
* ``cardiomegaly``: a heart shadow wider than half the chest.
* ``pneumothorax``: one lung collapsed away from the chest wall, leaving a very dark apical and
  lateral rim with no lung markings and a thin bright pleural line.
* ``nodule``: a small bright round spot in one lung.
* ``consolidation``: a bright patchy region in one lobe (upper or lower, either side).
* ``edema``: a diffuse bilateral perihilar haze over both lungs.

:func:`render` draws every random number in the same order whatever the findings, so one rng
state gives the same patient with or without any finding. Images are rendered at 3x and averaged
down, so the same patient looks the same at any ``size``. Image left is the patient's right, as on
a PA film.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mechmed.io import atomic_path

FINDINGS: tuple[str, ...] = ("effusion", "cardiomegaly", "pneumothorax", "nodule", "consolidation", "edema")

_SUPERSAMPLE = 3


def sample_findings(rng: np.random.Generator, p: float = 0.4) -> dict[str, bool]:
    """Each finding present independently with probability ``p``."""
    draws = rng.random(len(FINDINGS))
    return {f: bool(d < p) for f, d in zip(FINDINGS, draws, strict=True)}


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipse."""
    return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)


def _soft(r: np.ndarray, edge: float = 0.08) -> np.ndarray:
    """Soft inside-mask from a normalised radius: 1 inside, 0 outside, a smooth rim of width ``edge``."""
    t = np.clip((1.0 - r) / edge, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _smooth_noise(rng: np.random.Generator, grid: int, out: int) -> np.ndarray:
    """Low-frequency noise: a ``grid`` x ``grid`` gaussian field upsampled bilinearly to ``out``."""
    coarse = rng.normal(size=(grid, grid)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((out, out), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def render(findings: dict[str, bool], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One chest-X-ray-like image, uint8 of shape (size, size); deterministic given ``rng``'s state."""
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; use names from FINDINGS {FINDINGS}")
    has = {f: bool(findings.get(f, False)) for f in FINDINGS}
    s_px = size * _SUPERSAMPLE
    c = ((np.arange(s_px) + 0.5) / s_px).astype(np.float32)
    x, y = np.meshgrid(c, c)

    # --- patient: every draw happens, in this order, whatever the findings -----------------------
    cx = 0.5 + rng.uniform(-0.04, 0.04)
    cy = rng.uniform(-0.035, 0.035)
    sc = rng.uniform(0.9, 1.06)
    lung_ax = 0.145 * sc * rng.uniform(0.93, 1.07)
    lung_ay = 0.29 * sc * rng.uniform(0.93, 1.07)
    lung_gap = 0.175 * sc
    lung_cy = 0.46 + cy
    heart_w = rng.uniform(0.115, 0.135) * sc  # semi-axis; the chest is about 0.64 * sc wide
    heart_h = rng.uniform(0.10, 0.12) * sc
    heart_dx = rng.uniform(0.03, 0.06) * sc
    lung_dark = rng.uniform(0.12, 0.2)
    tissue = rng.uniform(0.38, 0.5)
    rib_phase = rng.uniform(0, 1)
    markings = _smooth_noise(rng, 10, s_px)
    gain = rng.uniform(0.88, 1.12)
    offset = rng.uniform(-0.04, 0.04)
    noise_sd = rng.uniform(0.015, 0.035)
    noise = rng.normal(size=(size, size))
    # finding parameters
    eff_side = rng.integers(2)
    eff_height = rng.uniform(0.25, 0.42)  # fraction of the lung height filled, at the medial side
    eff_meniscus = rng.uniform(0.35, 0.55)
    eff_level = rng.uniform(0.6, 0.72)
    cm_w = rng.uniform(0.19, 0.23) * sc
    cm_h = rng.uniform(0.13, 0.155) * sc
    ptx_side = rng.integers(2)
    ptx_scale = rng.uniform(0.55, 0.7)
    nod_side = rng.integers(2)
    nod_ang = rng.uniform(0, 2 * np.pi)
    nod_rad = np.sqrt(rng.uniform(0.0, 1.0)) * 0.55
    nod_r = rng.uniform(0.045, 0.06) * sc
    nod_level = rng.uniform(0.45, 0.6)
    con_side = rng.integers(2)
    con_lobe = rng.integers(2)  # 0 upper, 1 lower
    con_blobs = rng.normal(size=(5, 2)) * 0.3
    con_sizes = rng.uniform(0.05, 0.08, size=5) * sc
    con_level = rng.uniform(0.42, 0.52)
    con_texture = _smooth_noise(rng, 16, s_px)
    ed_level = rng.uniform(0.2, 0.28)
    ed_texture = _smooth_noise(rng, 16, s_px)

    # --- anatomy ---------------------------------------------------------------------------------
    img = np.full_like(x, 0.04)
    body = _soft(_ellipse(x, y, cx, 0.62 + cy, 0.47 * sc, 0.62), 0.05)
    shoulders = _soft(_ellipse(x, y, cx, 0.2 + cy, 0.5 * sc, 0.16), 0.1)
    img += (tissue - 0.04) * np.maximum(body, shoulders)

    lung_cx = (cx - lung_gap, cx + lung_gap)  # image left = patient's right
    lung_r = [_ellipse(x, y, lx, lung_cy, lung_ax, lung_ay) for lx in lung_cx]
    lung_m = [_soft(r, 0.12) for r in lung_r]
    lungs = np.maximum(*lung_m)

    # vascular markings: brighter near the hila, fading to the periphery
    hila = [
        np.hypot(x - (lx + (0.06 if i == 0 else -0.06) * sc), y - (lung_cy + 0.03))
        for i, lx in enumerate(lung_cx)
    ]
    vessels = sum(0.09 * np.exp(-h / 0.09) for h in hila) + 0.022 * markings
    lung_val = lung_dark + vessels
    # ribs: faint bands curving down laterally
    ry = y - 0.35 * (x - cx) ** 2
    ribs = 0.05 * np.clip(np.cos(2 * np.pi * (ry / 0.095 + rib_phase)), 0, None) ** 3

    if has["edema"]:
        perihilar = sum(np.exp(-h / 0.16) for h in hila)
        lung_val = lung_val + ed_level * (0.45 + 0.55 * np.clip(perihilar, 0, 1)) + 0.04 * ed_texture

    if has["consolidation"]:
        lx = lung_cx[con_side] + (-0.2 if con_side == 0 else 0.2) * lung_ax
        ly = lung_cy + (-0.4 if con_lobe == 0 else 0.22) * lung_ay
        patch = np.zeros_like(x)
        for (bx, by), r in zip(con_blobs, con_sizes, strict=True):
            patch = np.maximum(
                patch,
                np.exp(-(((x - lx - bx * lung_ax) ** 2 + (y - ly - by * lung_ay * 0.5) ** 2) / (2 * r**2))),
            )
        patch = np.clip(patch * (0.9 + 0.2 * con_texture), 0, 1)
        lung_val = lung_val + con_level * patch * lung_m[con_side]

    # the pneumothorax: the lung shrinks towards the hilum; the rim between is air without markings
    ptx_m = np.zeros_like(x)
    if has["pneumothorax"]:
        i = ptx_side
        lx = lung_cx[i]
        medial = 1.0 if i == 0 else -1.0
        ccx = lx + medial * lung_ax * (1 - ptx_scale) * 0.9
        ccy = lung_cy + lung_ay * (1 - ptx_scale) * 0.75
        collapsed_r = _ellipse(x, y, ccx, ccy, lung_ax * ptx_scale, lung_ay * ptx_scale)
        collapsed = _soft(collapsed_r, 0.1)
        ptx_m = lung_m[i] * (1 - collapsed)
        pleural_line = np.exp(-(((collapsed_r - 1.0) / 0.05) ** 2)) * lung_m[i]
        lung_val = lung_val * (1 - ptx_m) + 0.0 * ptx_m + 0.06 * collapsed * lung_m[i] + 0.12 * pleural_line

    img = img * (1 - lungs) + lung_val * lungs
    img += ribs * np.maximum(lungs, 0.4 * body) * (1 - ptx_m)

    if has["effusion"]:
        i = eff_side
        lx = lung_cx[i]
        lateral = np.clip((x - lx) / lung_ax * (-1.0 if i == 0 else 1.0), -1, 1)  # +1 at the chest wall
        surface = (
            lung_cy
            + lung_ay * (1 - 2 * eff_height)
            - eff_meniscus * lung_ay * np.clip(lateral + 0.3, 0, 1.3) ** 1.5
        )
        fluid = np.clip((y - surface) / 0.025, 0, 1)
        # the fluid fills the lung base and the costophrenic angle below it
        basin = _soft(_ellipse(x, y, lx, lung_cy, lung_ax * 1.08, lung_ay * 1.04), 0.08)
        fm = fluid * np.maximum(lung_m[i], basin * (y > lung_cy))
        img = img * (1 - fm) + eff_level * fm

    # mediastinum, heart, spine
    hw, hh, hdx = (cm_w, cm_h, heart_dx + 0.03 * sc) if has["cardiomegaly"] else (heart_w, heart_h, heart_dx)
    heart_cy = lung_cy + lung_ay - hh * 0.95
    heart = _soft(_ellipse(x, y, cx + hdx, heart_cy, hw, hh), 0.1)
    upper_med = _soft(_ellipse(x, y, cx, lung_cy - 0.08, 0.065 * sc, lung_ay), 0.15)
    med = np.maximum(heart, upper_med)
    img = img * (1 - med) + 0.72 * med
    spine = np.exp(-(((x - cx) / (0.032 * sc)) ** 4)) * body
    img = np.maximum(img, 0.55 * spine + 0.25 * spine * (np.cos(2 * np.pi * (y / 0.06)) > 0))

    if has["nodule"]:
        lx = lung_cx[nod_side]
        nx = lx + nod_rad * np.cos(nod_ang) * lung_ax
        ny = lung_cy - 0.2 * lung_ay + nod_rad * np.sin(nod_ang) * lung_ay * 0.8
        d = np.hypot(x - nx, y - ny) / nod_r
        img = np.maximum(img, img + nod_level * _soft(d, 0.35))

    # --- film: average down, brightness, noise -----------------------------------------------------
    small = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    small = small * gain + offset + noise_sd * noise
    return np.clip(np.round(small * 255), 0, 255).astype(np.uint8)


def make_images(n: int, seed: int, size: int = 32) -> list[tuple[np.ndarray, dict[str, bool]]]:
    """``n`` (image, findings) samples; image ``i`` depends only on ``(seed, i)``.

    So ``make_images(n, seed)[:k] == make_images(k, seed)``. The model trains on images from seed
    ``seed``; :func:`mechmed.demo.dataset.write_demo_data` writes its evaluation images from seed
    ``seed + 10_000``.
    """
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        findings = sample_findings(rng)
        out.append((render(findings, rng, size), findings))
    return out


def counterfactual(seed: int, i: int, finding: str, size: int = 32) -> tuple[np.ndarray, dict[str, bool]]:
    """Image ``i`` of ``make_images(n, seed, size)`` with ``finding`` toggled: the same patient (every
    random draw of :func:`render` replayed), with the finding added when it is absent and removed when it
    is present. Returns the image and its findings."""
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; use one of {FINDINGS}")
    rng = np.random.default_rng([seed, i])
    findings = sample_findings(rng)
    toggled = {**findings, finding: not findings[finding]}
    return render(toggled, rng, size), toggled


def caption(findings: dict[str, bool]) -> str:
    """The present findings, comma-separated, or ``"normal"``."""
    present = [f for f in FINDINGS if findings.get(f)]
    return ", ".join(present) if present else "normal"


def contact_sheet(
    samples: Sequence[tuple[np.ndarray, dict[str, bool]]], path: str | Path, ncols: int = 8, scale: int = 4
) -> Path:
    """Write a PNG grid of ``samples`` with each image's findings captioned under it (atomically)."""
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    font = ImageFont.load_default()
    h, w = samples[0][0].shape
    cell_w, img_h = w * scale, h * scale
    chars = max(8, cell_w // 6)
    lines = [textwrap.wrap(caption(f), chars) or [""] for _, f in samples]
    line_h = 11
    cap_h = line_h * max(len(ls) for ls in lines) + 4
    pad = 4
    ncols = max(1, min(ncols, len(samples)))
    nrows = -(-len(samples) // ncols)
    sheet = Image.new("L", (ncols * (cell_w + pad) + pad, nrows * (img_h + cap_h + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    for k, ((im, _), ls) in enumerate(zip(samples, lines, strict=True)):
        r, col = divmod(k, ncols)
        x0, y0 = pad + col * (cell_w + pad), pad + r * (img_h + cap_h + pad)
        tile = Image.fromarray(np.asarray(im, dtype=np.uint8), mode="L").resize(
            (cell_w, img_h), Image.Resampling.NEAREST
        )
        sheet.paste(tile, (x0, y0))
        for j, line in enumerate(ls):
            draw.text((x0, y0 + img_h + 2 + j * line_h), line, fill=0, font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
