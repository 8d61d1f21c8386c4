"""The bench results as a table, a JSON file and a plot of the ratios."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from isthmus.bench.measure import Row
from isthmus.errors import InputError


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": numpy.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    try:
        info["load average (1 min)"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "cycles":
        return f"{value:,.0f} cycles"
    if unit == "us":
        return f"{value:,.1f} us" if value < 1e4 else f"{value / 1e3:,.1f} ms"
    return f"{value:,.1f} {unit}" if value < 1e3 else f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    """One line per (case, peer): isthmus's figure, the peer's, and the ratio (> 1: isthmus better;
    for the NPU, the fraction of the bound reached)."""
    head = ("group", "case", "shape", "isthmus", "peer", "peer figure", "ratio")
    cells = [head]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        cells.append((r.group, r.case, r.shape, f"{r.engine} {_fmt(r.value, r.unit)}" if r.value else r.engine,
                      r.peer, _fmt(r.peer_value, r.unit), ratio))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for n, (c, r) in enumerate(zip(cells, [None] + rows)):
        line = "  ".join(v.rjust(w) if i >= 5 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths)))
        if r is not None and r.note:
            line += f"  ({r.note})"
        lines.append(line.rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """The same table as Markdown, for docs/performance.md."""
    out = ["| group | case | shape | isthmus | peer | peer figure | ratio |", "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"**{r.ratio:.2f}x**"
        ours = f"{r.engine} {_fmt(r.value, r.unit)}" if r.value else r.engine
        peer = r.peer + (f" ({r.note})" if r.note else "")
        out.append(f"| {r.group} | {r.case} | {r.shape} | {ours} | {peer} | {_fmt(r.peer_value, r.unit)} | {ratio} |")
    return "\n".join(out)


def write_json(path, rows: list[Row], command: str, quick: bool) -> None:
    doc = {"command": command, "quick": quick, "machine": machine(), "rows": [r.to_dict() for r in rows]}
    _write(path, json.dumps(doc, indent=2) + "\n")


def _write(path, text: str | bytes) -> None:
    p = Path(path)
    try:
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    except OSError as e:
        raise InputError(f"{p}: cannot write: {e.strerror or e}") from None


def check_plot_available() -> None:
    """Before an --plot run starts, not after minutes of measuring."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'isthmus[plot]'") from None


def write_plot(path, rows: list[Row]) -> None:
    """Horizontal bars of the ratios on a log axis, one per (case, peer), a line at 1."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.2))
    labels = [f"{r.group}: {r.case} {r.shape} vs {r.peer.split(' (')[0]}" for r in shown]
    # a bound cannot be beaten: those rows are shares of it, drawn apart from the peer races
    colors = ["tab:blue" if r.unit == "cycles" else "tab:green" if r.ratio >= 1 else "tab:orange" for r in shown]
    ax.barh(range(len(shown)), [r.ratio for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("isthmus vs peer (> 1: isthmus better; npu: fraction of the bound)", fontsize=8)
    ax.set_title("isthmus bench", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _write(path, buf.getvalue())


def print_machine(file=sys.stdout) -> None:
    m = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), file=file)
