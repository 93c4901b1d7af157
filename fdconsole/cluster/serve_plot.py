"""``fdbench serve --plot FILE``: tokens/s and time to first token against concurrency.

``FILE.png`` is drawn with matplotlib (tokens/s; TTFT p50 and p99); any other name gets two small line
charts (tokens/s, TTFT p50) in one self-contained, hand-written SVG.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

PANEL_W, PANEL_H = 320, 220  # one chart, margins included
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 16, 28, 40
PAD_X = 16  # keeps the first and last points off the axes
SERIES = (("tokens_per_s", "tokens/s", "#2563eb"), ("ttft_p50_ms", "TTFT p50 (ms)", "#dc2626"))


def write_svg(path: str | Path, results: list[dict], title: str = "fdbench serve") -> Path:
    """Write the chart of ``results`` (the bench's per-concurrency figures) to ``path``."""
    panels = [panel(results, key, label, colour, x0=i * PANEL_W)
              for i, (key, label, colour) in enumerate(SERIES)]
    width, height = PANEL_W * len(SERIES), PANEL_H + 24
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">\n'
           f'<rect width="100%" height="100%" fill="white"/>\n'
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>\n'
           + "".join(panels) + "</svg>\n")
    target = Path(path)
    target.write_text(svg)
    return target


def panel(results: list[dict], key: str, label: str, colour: str, x0: float) -> str:
    """One chart: y = ``results[i][key]`` against the concurrency levels, evenly spaced on x."""
    left, top = x0 + MARGIN_L, 24 + MARGIN_T
    inner_w, inner_h = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B
    bottom = top + inner_h
    points = [(i, r[key]) for i, r in enumerate(results) if r.get(key) is not None]
    top_value = max((y for _, y in points), default=0) or 1

    def x_at(i: int) -> float:
        if len(results) == 1:
            return left + inner_w / 2
        return left + PAD_X + (inner_w - 2 * PAD_X) * i / (len(results) - 1)

    def y_at(value: float) -> float:
        return bottom - inner_h * value / top_value

    parts = [f'<text x="{left + inner_w / 2}" y="{top - 10}" text-anchor="middle">{escape(label)}</text>',
             f'<path d="M{left},{top} V{bottom} H{left + inner_w}" fill="none" stroke="#444"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{top_value:g}</text>',
             f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>',
             f'<text x="{left + inner_w / 2}" y="{bottom + 30}" text-anchor="middle">concurrency</text>']
    for i, result in enumerate(results):
        parts.append(f'<text x="{x_at(i):.1f}" y="{bottom + 14}" text-anchor="middle">'
                     f'{result["concurrency"]}</text>')
    if points:
        line = " ".join(f"{x_at(i):.1f},{y_at(y):.1f}" for i, y in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x_at(i):.1f}" cy="{y_at(y):.1f}" r="3" fill="{colour}">'
                  f'<title>{y:g}</title></circle>' for i, y in points]
    return f'<g class="{key}">\n' + "\n".join(parts) + "\n</g>\n"


def write_plot(path: str | Path, results: list[dict], title: str = "fdbench serve") -> Path:
    """A PNG when ``path`` ends in .png, else the SVG of ``write_svg``."""
    if str(path).lower().endswith(".png"):
        return write_png(path, results, title)
    return write_svg(path, results, title)


def write_png(path: str | Path, results: list[dict], title: str = "fdbench serve") -> Path:
    """Tokens/s, and TTFT p50 and p99, against the concurrency levels, side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    from matplotlib import pyplot as plt

    levels = [r["concurrency"] for r in results]
    figure, (rate, ttft) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, layout="constrained")
    figure.suptitle(title)
    percentiles = (("ttft_p50_ms", "p50", "#dc2626"), ("ttft_p99_ms", "p99", "#f59e0b"))
    for axes, series, ylabel in ((rate, (("tokens_per_s", "tokens/s", "#2563eb"),), "tokens/s"),
                                 (ttft, percentiles, "time to first token (ms)")):
        for key, label, colour in series:
            points = [(c, r[key]) for c, r in zip(levels, results, strict=True) if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(ylabel)
        axes.set_xticks(levels)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend()
    target = Path(path)
    figure.savefig(target)
    plt.close(figure)
    return target
