"""Turn a pytest-benchmark JSON file into markdown tables (and, with --plot, a PNG bar chart).

    python benchmarks/report.py benchmarks/results/<run>.json [--plot out.png] [--out table.md]

Rows are grouped by benchmark group (one workload each). Per row: the median, what the work needs
(bytes or GFLOP, from extra_info), what was reached (GB/s or GFLOP/s), the fraction of the
machine's ceiling measured in the same run (copy GB/s for the step; sgemm and the FMA peak,
fastddpm._C._fma_peak_gflops, for the U-Net)
and the speed-up over the row's baseline (extra_info["baseline"], else the group's reference row).
"""
from __future__ import annotations

import argparse
import json
import sys

# Implementations that are baselines, not results (the ratio column is relative to them).
BASELINES = ("torch-ref", "torch-eager", "reference")
CEILINGS = ("copy", "copy-d2d", "sgemm", "fma-peak")


def _median(b: dict) -> float:
    return float(b["stats"]["median"])


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _machine_line(data: dict) -> str:
    m = data.get("machine_info", {})
    parts = [m.get("cpu_model") or m.get("cpu", {}).get("brand_raw", "?"), f"{m.get('cpu_count', '?')} cpus"]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    return ", ".join(str(p) for p in parts) + f"; run {data.get('datetime', '?')}"


def _sgemm_ceiling(benches: list[dict]) -> float | None:
    for b in benches:
        e = b.get("extra_info", {})
        if e.get("kind") == "sgemm":
            return e["gflop"] / _median(b)
    return None


def _fma_peak(benches: list[dict]) -> float | None:
    """GFLOP/s of the FMA-peak row (it times itself: extra_info["gflops"])."""
    for b in benches:
        e = b.get("extra_info", {})
        if e.get("kind") == "fma-peak":
            return float(e["gflops"])
    return None


def rows(data: dict) -> dict[str, list[dict]]:
    """group -> rows with the derived columns filled in."""
    benches = data.get("benchmarks", [])
    sgemm = _sgemm_ceiling(benches)
    peak = _fma_peak(benches)
    groups: dict[str, list[dict]] = {}
    for b in benches:
        if b.get("extra_info", {}).get("kind") != "paired":  # those: paired_markdown
            groups.setdefault(b.get("group") or b["name"], []).append(b)
    out = {}
    for group, items in groups.items():
        by_impl = {b.get("extra_info", {}).get("impl", b["name"]): b for b in items}
        # the fastest copy row of the group is its ceiling (one thread, or the step's threads)
        copies = [b["extra_info"]["bytes"] / _median(b) / 1e9 for b in items
                  if b.get("extra_info", {}).get("kind", "").startswith("copy")]
        copy_gbs = max(copies) if copies else None
        table = []
        for b in items:
            e = b.get("extra_info", {})
            med = _median(b)
            row = {"impl": e.get("impl", b["name"]), "kind": e.get("kind", "?"), "median_ms": med * 1e3}
            if "bytes" in e:
                row["GB/s"] = e["bytes"] / med / 1e9
                if copy_gbs and e.get("kind") not in CEILINGS:
                    row["of copy"] = row["GB/s"] / copy_gbs
            if e.get("kind") == "fma-peak":
                row["GFLOP/s"] = float(e["gflops"])
            if "gflop" in e:
                row["GFLOP/s"] = e["gflop"] / med
                if sgemm and e.get("kind") != "sgemm":
                    row["of sgemm"] = row["GFLOP/s"] / sgemm
                if peak:
                    row["of peak"] = row["GFLOP/s"] / peak
            base_name = e.get("baseline")
            base = by_impl.get(base_name) if base_name else None
            if base is None:
                base = next((by_impl[n] for n in BASELINES if n in by_impl), None)
            if base is not None and base is not b and e.get("kind") not in CEILINGS:
                row["speed-up"] = _median(base) / med
                row["vs"] = base.get("extra_info", {}).get("impl", base["name"])
            table.append(row)
        out[group] = table
    return out


def paired_markdown(data: dict) -> list[str]:
    """Interleaved runs (extra_info kind "paired"): each implementation's median, and native's
    speed-up over each baseline as the median of the per-round ratios."""
    lines = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if e.get("kind") != "paired":
            continue
        lines += [f"### {b.get('group') or b['name']} ({e['rounds']} interleaved rounds)", "",
                  "| impl | median_ms | GFLOP/s | native's paired speed-up over it |", "|---|---|---|---|"]
        for impl, ms in e["medians_ms"].items():
            ratio = e["paired"].get(impl)
            lines.append(f"| {impl} | {ms:.3g} | {e['gflop'] / ms * 1e3:.3g} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append("")
    return lines


def markdown(data: dict) -> str:
    lines = [f"Machine: {_machine_line(data)}", ""]
    cols = ["impl", "median_ms", "GB/s", "of copy", "GFLOP/s", "of sgemm", "of peak", "speed-up", "vs"]
    for group, table in rows(data).items():
        present = [c for c in cols if any(c in r for r in table)]
        lines += [f"### {group}", "", "| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
        for r in table:
            cells = []
            for c in present:
                v = r.get(c, "")
                if isinstance(v, float):
                    v = f"{v:.1%}" if c.startswith("of ") else (f"{v:.2f}x" if c == "speed-up" else f"{v:.3g}")
                cells.append(str(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + paired_markdown(data))


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = rows(data)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * sum(len(t) for t in groups.values())),
                             squeeze=False)
    for ax, (group, table) in zip(axes[:, 0], groups.items()):
        ax.barh([r["impl"] for r in table], [r["median_ms"] for r in table])
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("median ms (lower is better)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--plot", help="write a bar chart PNG here")
    args = ap.parse_args(argv)
    try:
        data = load(args.json)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    text = markdown(data)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
