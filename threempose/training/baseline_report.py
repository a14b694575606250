"""Statistics and figures of a random-baseline comparison (searched vs random genotypes).

Input: the searched genotype's val AP per seed ``[N]`` and, for each of K random genotypes
of the same cost, its AP per seed ``[K][N]``. :func:`summarize` gives the searched mean
beside the random mean +- std (over the K genotypes' seed means), the searched genotype's
rank among the K + 1, and a seeded percentile-bootstrap confidence interval of the
difference of means; :func:`markdown_table` and :func:`draw_ap_vs_gflops` present them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from threempose.util.files import atomic_open


def bootstrap_difference(searched: Sequence[float], random_means: Sequence[float], samples: int = 10000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(searched) - mean(random_means)``.

    Each of ``samples`` replicates resamples, with replacement, the searched genotype's
    per-seed APs ``[N]`` and the random genotypes' mean APs ``[K]`` (so the interval covers
    both seed noise of the searched network and the spread of random architectures), and
    takes the difference of the two means; the interval is the replicates'
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles. Seeded: the same inputs give the
    same interval.
    """
    s, r = np.asarray(searched, dtype=float), np.asarray(random_means, dtype=float)
    if s.size == 0 or r.size == 0:
        raise ValueError("bootstrap_difference needs at least one searched and one random AP")
    rng = np.random.default_rng(seed)
    s_means = s[rng.integers(0, s.size, (samples, s.size))].mean(axis=1)
    r_means = r[rng.integers(0, r.size, (samples, r.size))].mean(axis=1)
    low, high = np.quantile(s_means - r_means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(searched: Sequence[float], random: Sequence[Sequence[float]], samples: int = 10000,
              seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Summary of one comparison.

    Args:
        searched: the searched genotype's AP per seed ``[N]``.
        random: per random genotype its AP per seed ``[K][N]``.

    Returns ``searched_mean``, ``random_mean``, ``random_std`` (sample std over the K
    genotypes' seed means; 0 for K = 1), ``rank`` (1 + the number of random genotypes with a
    strictly higher mean: 1 is best, ties share the better rank), ``of`` (K + 1),
    ``difference`` (searched - random mean) and ``ci`` ``[low, high]`` at ``level``
    (:func:`bootstrap_difference`).
    """
    s_mean = float(np.mean(searched))
    r_means = np.array([np.mean(aps) for aps in random], dtype=float)
    return {
        "searched_mean": s_mean,
        "random_mean": float(r_means.mean()),
        "random_std": float(r_means.std(ddof=1)) if r_means.size > 1 else 0.0,
        "rank": int(1 + np.sum(r_means > s_mean)),
        "of": int(r_means.size + 1),
        "difference": s_mean - float(r_means.mean()),
        "ci": list(bootstrap_difference(searched, r_means, samples, seed, level)),
        "ci_level": level,
        "bootstrap_samples": samples,
        "bootstrap_seed": seed,
    }


def markdown_table(searched: dict[str, Any], random: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A markdown table (one row per genotype: GFLOPs, params, AP per seed, mean) and the summary
    line. ``searched`` and each of ``random``: ``{"name", "gflops", "params_m", "ap": [N]}``."""
    seeds = len(searched["ap"])
    head = ("| genotype | GFLOPs | params (M) | " + " | ".join(f"AP seed {i}" for i in range(seeds))
            + " | mean AP |\n|---|---:|---:|" + "---:|" * (seeds + 1) + "\n")
    rows = []
    for entry in [searched, *random]:
        aps = " | ".join(f"{a:.3f}" for a in entry["ap"])
        name = f"**{entry['name']}**" if entry is searched else entry["name"]
        rows.append(f"| {name} | {entry['gflops']:.4f} | {entry['params_m']:.4f} | {aps} | "
                    f"{np.mean(entry['ap']):.3f} |")
    lo, hi = summary["ci"]
    line = (f"\nsearched mean AP {summary['searched_mean']:.3f} vs random {summary['random_mean']:.3f} "
            f"+- {summary['random_std']:.3f} (mean +- std over {summary['of'] - 1} genotypes); rank "
            f"{summary['rank']} of {summary['of']}; difference {summary['difference']:+.3f}, "
            f"{summary['ci_level']:.0%} bootstrap CI [{lo:+.3f}, {hi:+.3f}]\n")
    return head + "\n".join(rows) + "\n" + line


def draw_ap_vs_gflops(searched: dict[str, Any], random: Sequence[dict[str, Any]], path: str | Path) -> None:
    """A PNG scatter of mean val AP (y) against GFLOPs (x): each genotype's mean over seeds with
    a bar from its lowest to its highest seed; random genotypes blue dots, the searched one a
    red diamond labelled "searched"; a dashed grey line at the random genotypes' mean. Drawn
    with Pillow; written atomically."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 480, 70, 30, 40, 60
    entries = [searched, *random]
    xs = [e["gflops"] for e in entries]
    ys = [a for e in entries for a in e["ap"]]
    x_lo, x_hi = min(xs), max(xs)
    pad = max((x_hi - x_lo) * 0.1, abs(x_hi) * 0.01, 1e-6)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = 0.0, max(max(ys) * 1.1, 1e-3)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    d.rectangle((left, top, width - right, height - bottom), outline="black")
    for i in range(6):
        x = x_lo + (x_hi - x_lo) * i / 5
        X, _ = px(x, y_lo)
        d.line([(X, height - bottom), (X, height - bottom + 5)], fill="black")
        d.text((X - 18, height - bottom + 8), f"{x:.4f}", fill="black")
        y = y_lo + (y_hi - y_lo) * i / 5
        _, Y = px(x_lo, y)
        d.line([(left - 5, Y), (left, Y)], fill="black")
        d.text((left - 45, Y - 6), f"{y:.3f}", fill="black")
    d.text((width // 2 - 30, height - 25), "GFLOPs", fill="black")
    d.text((10, top - 28), "val AP (mean over seeds; bars: lowest to highest seed)", fill="black")
    _, Y = px(x_lo, float(np.mean([np.mean(e["ap"]) for e in random])))
    for x in range(left, width - right, 12):
        d.line([(x, Y), (x + 6, Y)], fill="grey", width=1)
    d.text((width - right - 95, Y - 14), "random mean", fill="grey")
    for entry in [*random, searched]:
        is_searched = entry is searched
        colour = "red" if is_searched else "royalblue"
        X, Ym = px(entry["gflops"], float(np.mean(entry["ap"])))
        _, Ylo = px(entry["gflops"], min(entry["ap"]))
        _, Yhi = px(entry["gflops"], max(entry["ap"]))
        d.line([(X, Ylo), (X, Yhi)], fill=colour, width=2)
        for Y in (Ylo, Yhi):
            d.line([(X - 4, Y), (X + 4, Y)], fill=colour, width=2)
        r = 7 if is_searched else 5
        if is_searched:
            d.polygon([(X, Ym - r), (X + r, Ym), (X, Ym + r), (X - r, Ym)], fill=colour)
            d.text((X + 10, Ym - 6), "searched", fill=colour)
        else:
            d.ellipse((X - r, Ym - r, X + r, Ym + r), fill=colour)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
