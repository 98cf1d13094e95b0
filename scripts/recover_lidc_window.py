#!/usr/bin/env python
"""Recover how the 8-bit LIDC-IDRI slice crops were made from HU, by matching them against the same scans in HU.

LIDC-IDRI-0001..0003 exist both as 8-bit nodule crops (``LIDC-IDRI-slices``, 128 x 128, spacing and window lost)
and as CT slabs in HU (``LIDC-IDRI_c2c_slabs``). For every crop slice this script:

1. finds the slab slice and 128 x 128 offset with the highest normalised cross-correlation (NCC; FFT over all
   offsets of every slab slice, at native pixel spacing). NCC is invariant to any linear intensity map, so the
   search does not presuppose the window;
2. checks whether the crop is at native pixel spacing: the best NCC with the slab slice resampled by other scales;
3. fits intensity models over the matched pixels: one fixed window for all slices (least squares on
   ``clip((HU - lo) / (hi - lo), 0, 1) * 255``), a free linear map per slice, and per-slice min-max
   ``round((HU - min) / (max - min) * 255)`` of the 128 x 128 crop;
4. compares the crops' reader masks with the slab's per-reader masks (reader numbering, polygon filling).

Prints one JSON object. Usage: ``python scripts/recover_lidc_window.py [--data ../shared/data/lung]`` (about 1 min).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MATCH_NCC = 0.999          # identical content up to a linear map and 8-bit rounding gives NCC > 0.9999
SCALES = (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25)


def _num(p: Path) -> int:
    return int(re.search(r"(\d+)\.png$", p.name).group(1))


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def ncc_map(img: np.ndarray, tpl: np.ndarray) -> np.ndarray:
    """NCC of template tpl (h, w) at every valid offset of img (H, W) -> (H-h+1, W-w+1); [row, col] = top-left."""
    from numpy.fft import irfft2, rfft2

    H, W = img.shape
    h, w = tpl.shape
    t = tpl - tpl.mean()
    t /= np.sqrt((t ** 2).sum()) or 1.0
    F = rfft2(img)
    valid = (slice(h - 1, H), slice(w - 1, W))
    num = irfft2(F * rfft2(t[::-1, ::-1], s=img.shape), s=img.shape)[valid]
    box = rfft2(np.ones((h, w)), s=img.shape)
    s1 = irfft2(F * box, s=img.shape)[valid]
    s2 = irfft2(rfft2(img ** 2) * box, s=img.shape)[valid]
    var = np.maximum(s2 - s1 ** 2 / (h * w), 1e-6)
    return num / np.sqrt(var)


def best_match(ct: np.ndarray, tpl: np.ndarray):
    """(ncc, z, row, col) of the best match of tpl over all slices of ct (z, y, x)."""
    best = (-2.0, -1, -1, -1)
    for z in range(ct.shape[0]):
        m = ncc_map(ct[z], tpl)
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        if m[r, c] > best[0]:
            best = (float(m[r, c]), z, int(r), int(c))
    return best


def best_ncc_at_scale(hu_slice: np.ndarray, tpl: np.ndarray, scale: float) -> float:
    """Best NCC of tpl against hu_slice zoomed by ``scale`` (as if the crop had been resampled by that factor)."""
    from scipy import ndimage

    zoomed = ndimage.zoom(hu_slice, scale, order=1)
    return float(ncc_map(zoomed, tpl).max())


def fit_fixed_window(hu: np.ndarray, val: np.ndarray):
    """Least-squares (lo, hi) of clip((HU - lo)/(hi - lo), 0, 1) * 255 over all pixels; returns lo, hi, MAE, RMSE."""
    from scipy.optimize import least_squares

    a, b = np.polyfit(hu, val, 1)                  # linear start, then let the clipping act
    x0 = np.array([-b / a, (255 - b) / a])

    def resid(p):
        lo, hi = p
        return np.clip((hu - lo) / max(hi - lo, 1e-3), 0, 1) * 255 - val

    sol = least_squares(resid, x0, x_scale=100.0)
    r = resid(sol.x)
    return float(sol.x[0]), float(sol.x[1]), float(np.abs(r).mean()), float(np.sqrt((r ** 2).mean()))


def minmax_8bit(hu: np.ndarray) -> np.ndarray:
    """The recovered mapping: per-slice min-max, rounded half up."""
    return np.floor((hu - hu.min()) / (hu.max() - hu.min()) * 255.0 + 0.5)


def analyse(data: Path) -> dict:
    import SimpleITK as sitk

    crops_root, slabs_root = data / "LIDC-IDRI-slices", data / "LIDC-IDRI_c2c_slabs"
    out = {"matches": [], "unmatched_nodules": [], "scale_check": [], "reader_dice": {}, "spacing_mm": {}}
    all_hu, all_val, per_slice = [], [], []
    for sdir in sorted(slabs_root.glob("LIDC-IDRI-*")):
        pid = sdir.name
        img = sitk.ReadImage(str(sdir / "ct.nii.gz"))
        ct = sitk.GetArrayFromImage(img).astype(np.float64)
        out["spacing_mm"][pid] = [round(s, 4) for s in img.GetSpacing()]
        readers = [sitk.GetArrayFromImage(sitk.ReadImage(str(sdir / f"nodule_reader{r}.nii.gz"))) > 0
                   for r in range(4)]
        for ndir in sorted((crops_root / pid).glob("nodule-*")):
            paths = sorted((ndir / "images").glob("slice-*.png"), key=_num)
            found = []
            for p in paths:
                tpl = _png(p)
                ncc, z, r, c = best_match(ct, tpl)
                if ncc < MATCH_NCC:
                    continue
                hu = ct[z, r:r + 128, c:c + 128]
                pred = minmax_8bit(hu)
                a, b = np.polyfit(hu.ravel(), tpl.ravel(), 1)
                found.append(dict(crop_slice=_num(p), slab_slice=z, row=r, col=c, ncc=round(ncc, 6),
                                  hu_min=float(hu.min()), hu_max=float(hu.max()),
                                  linear_fit_lo=round(-b / a, 1), linear_fit_hi=round((255 - b) / a, 1),
                                  minmax_mean_abs_err=round(float(np.abs(pred - tpl).mean()), 4),
                                  minmax_max_abs_err=float(np.abs(pred - tpl).max()),
                                  minmax_exact_fraction=round(float((pred == tpl).mean()), 5)))
                all_hu.append(hu.ravel())
                all_val.append(tpl.ravel())
                per_slice.append((hu, tpl))
            if not found:
                out["unmatched_nodules"].append(f"{pid}/{ndir.name}")
                continue
            offsets = {(m["row"], m["col"]) for m in found}
            dz = {m["slab_slice"] - m["crop_slice"] for m in found}
            out["matches"].append(dict(nodule=f"{pid}/{ndir.name}", crop_slices=len(paths), matched_slices=len(found),
                                       slab_slice_minus_crop_slice=sorted(dz),
                                       offsets_row_col=sorted(offsets),
                                       crop_centre_index_ijk=[found[0]["col"] + 64, found[0]["row"] + 64],
                                       slices=found))
            # scale check on the middle matched slice
            mid = found[len(found) // 2]
            tpl = _png(ndir / "images" / f"slice-{mid['crop_slice']}.png")
            out["scale_check"].append(dict(nodule=f"{pid}/{ndir.name}", crop_slice=mid["crop_slice"],
                                           best_ncc_by_scale={str(s): round(best_ncc_at_scale(ct[mid["slab_slice"]],
                                                                                               tpl, s), 5)
                                                              for s in SCALES}))
            # reader masks: Dice of crop reader a against slab reader b over the matched slices
            zs = [m["slab_slice"] for m in found]
            r0, c0 = found[0]["row"], found[0]["col"]
            dice = []
            for a in range(4):
                files = [ndir / f"mask-{a}" / f"slice-{m['crop_slice']}.png" for m in found]
                cm = np.stack([(_png(f) > 0) if f.is_file() else np.zeros((128, 128), bool) for f in files])
                row = []
                for b in range(4):
                    sm = readers[b][zs, r0:r0 + 128, c0:c0 + 128]
                    s = cm.sum() + sm.sum()
                    row.append(round(float(2 * (cm & sm).sum() / s), 3) if s else None)
                dice.append(row)
            out["reader_dice"][f"{pid}/{ndir.name}"] = dice
    hu, val = np.concatenate(all_hu), np.concatenate(all_val)
    lo, hi, mae, rmse = fit_fixed_window(hu, val)
    errs = np.concatenate([(minmax_8bit(h) - t).ravel() for h, t in per_slice])
    out["fixed_window_fit"] = dict(lo=round(lo, 1), hi=round(hi, 1), mean_abs_err_gray=round(mae, 3),
                                   rmse_gray=round(rmse, 3), pixels=int(hu.size))
    out["per_slice_minmax"] = dict(mean_abs_err_gray=round(float(np.abs(errs).mean()), 5),
                                   max_abs_err_gray=float(np.abs(errs).max()),
                                   exact_fraction=round(float((errs == 0).mean()), 6), pixels=int(errs.size),
                                   slices=len(per_slice))
    out["conclusion"] = dict(
        mapping="per 128x128 axial crop: value = round_half_up((HU - min_crop) / (max_crop - min_crop) * 255); "
                "no fixed HU window",
        native_pixel_spacing=all(max(s["best_ncc_by_scale"], key=s["best_ncc_by_scale"].get) == "1.0"
                                 for s in out["scale_check"]),
        slices="consecutive native slices, crop slice index increasing inferior -> superior",
        orientation="rows anterior->posterior, columns patient right->left (LPS index order of the DICOM)",
        recommended_clip_hu=[-1024.0, 3071.0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lung",
                    help="folder holding LIDC-IDRI-slices/ and LIDC-IDRI_c2c_slabs/")
    args = ap.parse_args(argv)
    if not (args.data / "LIDC-IDRI_c2c_slabs").is_dir() or not (args.data / "LIDC-IDRI-slices").is_dir():
        print(f"error: {args.data} must hold LIDC-IDRI-slices/ and LIDC-IDRI_c2c_slabs/; pass --data", file=sys.stderr)
        return 2
    print(json.dumps(analyse(args.data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
