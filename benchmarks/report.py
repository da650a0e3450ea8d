"""Turn a pytest-benchmark JSON file into markdown tables (and, with --plot, a PNG bar chart).

    python benchmarks/report.py benchmarks/results/<run>.json [--plot out.png] [--out table.md]
    python benchmarks/report.py --machines benchmarks/results/*.json   # medians per machine

Rows are grouped by benchmark group (one workload each). Per row: the median, what the work needs
(bytes or GFLOP, from extra_info), what was reached (GB/s or GFLOP/s), the fraction of the
machine's ceiling measured in the same run (copy GB/s for the step; sgemm and the FMA peak,
fastddpm._C._fma_peak_gflops, for the U-Net)
and the speed-up over the row's baseline (extra_info["baseline"], else the group's reference row).
"""
from __future__ import annotations

import argparse
import json
import re
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
        if b.get("extra_info", {}).get("kind") not in ("paired", "paired-cm", "load"):  # paired_markdown, load_markdown
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
    """Interleaved runs (extra_info kind "paired", or "paired-cm": test_bench_cm.py's one-step
    sampling): each implementation's median, and fastddpm's speed-up over each baseline as the
    median of the per-round ratios."""
    lines = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if e.get("kind") not in ("paired", "paired-cm"):
            continue
        lines += [f"### {b.get('group') or b['name']} ({e['rounds']} interleaved rounds)", "",
                  "| impl | median_ms | GFLOP/s | fastddpm's paired speed-up over it |", "|---|---|---|---|"]
        for impl, ms in e["medians_ms"].items():
            ratio = e["paired"].get(impl)
            lines.append(f"| {impl} | {ms:.3g} | {e['gflop'] / ms * 1e3:.3g} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append("")
    return lines


def load_markdown(data: dict) -> list[str]:
    """Latency under load (extra_info kind "load", test_bench_load.py): per condition and
    implementation, median / p90 / p99 latency and throughput."""
    lines = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if e.get("kind") != "load":
            continue
        lines += [f"### latency under load: {e['workload']} ({e.get('cpu', '?')})", "",
                  "| condition | impl | median ms | p90 ms | p99 ms | calls/s |", "|---|---|---|---|---|---|"]
        for cond, row in e["conditions"].items():
            for impl, st in row.items():
                lines.append(f"| {cond} | {impl} | {st['median_ms']:.3g} | {st['p90_ms']:.3g} | "
                             f"{st['p99_ms']:.3g} | {st['throughput_per_s']:.3g} |")
        lines += [f"({impl}: {why})" for impl, why in e.get("skipped", {}).items()] + [""]
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
    return "\n".join(lines + paired_markdown(data) + load_markdown(data))


# --- one table of medians per machine, over many result files ---------------------------------

# impl name in the result files -> column of the per-machine table
_COLUMNS = {"native": "native", "native-cpu": "native", "native-cuda": "native", "numba": "numba",
            "torch-eager": "eager", "torch-ref": "eager", "reference": "eager",
            "torch-compile": "compile", "onnxruntime": "onnxruntime", "openvino": "openvino"}
_HEADERS = {"native": "fastddpm native", "numba": "fastddpm numba", "eager": "torch eager",
            "compile": "torch.compile", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# native's speed-up columns: over these baselines (ONNX Runtime's only where a run measured it)
_RATIOS = {"eager": "speed-up vs eager", "compile": "vs torch.compile", "onnxruntime": "vs ONNX Runtime"}
# the CUDA engine's row is its default precision; the others are in docs/cuda.md
_CUDA_DTYPE = "tf32"


def machine_key(data: dict) -> tuple:
    """What identifies a machine across result files: CPU vendor, family, model, count, GPU."""
    m = data.get("machine_info", {})
    c = m.get("cpu", {})
    return (c.get("vendor_id_raw"), c.get("family"), c.get("model"), m.get("cpu_count"), m.get("gpu"))


def machine_name(data: dict) -> str:
    """The CPU (brand, family/model, widest vector ISA, logical cores) and the GPU, if any."""
    m = data.get("machine_info", {})
    c = m.get("cpu", {})
    flags = set(c.get("flags", []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE" if flags else "?"
    name = (f"{c.get('brand_raw') or m.get('cpu_model', '?')} (family {c.get('family', '?')} "
            f"model {c.get('model', '?')}), {isa}, {m.get('cpu_count', '?')} logical cores")
    return name + (f"; GPU {m['gpu']}" if m.get("gpu") else "")


def _workload(b: dict) -> str | None:
    e = b.get("extra_info", {})
    kind = e.get("kind")
    if kind in ("forward", "unet"):
        threads = f", {e['threads']} thread{'s' if e['threads'] > 1 else ''}" if "threads" in e else ""
        return f"{e['model']} forward, batch {e['batch']}{threads}"
    if kind == "sample":
        return f"{e['model']} 1000-step sample, batch {e['batch']}"
    if kind == "step":   # the shape: the CPU suite's group "step <shape>", the GPU's test id
        group = b.get("group") or ""
        shape = group[5:] if group.startswith("step ") else re.search(r"\[([^\]-]*)", b["name"]).group(1)
        return f"fused step {shape}"
    return None


def _order(workload: str) -> tuple:
    """forward rows, then samples, then steps; numbers in numeric order."""
    kind = 2 if workload.startswith("fused step") else 1 if "sample" in workload else 0
    return (kind,) + tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", workload))


def _ceilings(data: dict) -> dict[str, float]:
    benches = data.get("benchmarks", [])
    out = {}
    sgemm, peak = _sgemm_ceiling(benches), _fma_peak(benches)
    if sgemm:
        out["sgemm GFLOP/s"] = sgemm
    if peak:
        out["FMA peak GFLOP/s"] = peak
    # memory bandwidth: the fastest copy of the largest size (the smaller ones run in cache)
    copies = [(b["extra_info"]["bytes"], b["extra_info"]["bytes"] / _median(b) / 1e9) for b in benches
              if b.get("extra_info", {}).get("kind", "").startswith("copy")]
    if copies:
        out["copy GB/s"] = max(copies)[1]
    return out


def machine_tables(datas: list[dict]) -> dict[tuple, dict]:
    """Per machine: its name, one row of medians (ms) per workload, the ceilings, other results.

    Per workload the latest interleaved (paired) run wins over sequential runs, and its speed-ups
    are the medians of the per-round ratios; otherwise each implementation's latest sequential
    median is taken and the speed-up is the ratio of medians. Ceilings come from the latest run
    that measured each one."""
    machines: dict[tuple, dict] = {}
    for data in sorted(datas, key=lambda d: d.get("datetime", "")):   # later runs overwrite
        m = machines.setdefault(machine_key(data), {"name": machine_name(data), "paired": {},
                                                     "seq": {}, "ceilings": {}, "other": {}})
        m["ceilings"].update(_ceilings(data))
        for b in data.get("benchmarks", []):
            e = b.get("extra_info", {})
            if e.get("kind") == "paired":
                wl = (f"{e['model']} 1000-step sample, batch {e['batch']}" if "sample" in b["name"]
                      else f"{e['model']} forward, batch {e['batch']}")
                cells = {_COLUMNS[i]: ms for i, ms in e["medians_ms"].items() if i in _COLUMNS}
                ratios = {_COLUMNS[i]: r for i, r in e["paired"].items() if i in _COLUMNS}
                m["paired"][wl] = (cells, ratios, e["rounds"])
            elif e.get("kind") in ("shards", "projection", "paired-cm"):
                m["other"][e["kind"]] = e
            else:
                wl, col = _workload(b), _COLUMNS.get(e.get("impl"))
                if wl is None or col is None:
                    continue
                if e.get("impl") == "native-cuda" and e.get("dtype", _CUDA_DTYPE) != _CUDA_DTYPE:
                    continue
                m["seq"].setdefault(wl, {})[col] = _median(b) * 1e3
    for m in machines.values():
        rows = {}
        for wl, cells in m["seq"].items():
            ratios = {c: cells[c] / cells["native"] for c in _RATIOS if c in cells and "native" in cells}
            rows[wl] = (cells, ratios, None)
        rows.update(m["paired"])
        m["rows"] = rows
    return machines


def _ms(v: float) -> str:
    return f"{v / 1e3:.3g} s" if v >= 1000 else f"{v:.3g} ms" if v >= 1 else f"{v * 1e3:.3g} us"


def machines_markdown(datas: list[dict]) -> str:
    lines = []
    for m in machine_tables(datas).values():
        lines += [f"**{m['name']}**", ""]
        if m["rows"]:
            used = [c for c in _HEADERS if any(c in cells for cells, _, _ in m["rows"].values())]
            ratio_cols = [c for c in _RATIOS if c in ("eager", "compile")
                          or any(c in ratios for _, ratios, _ in m["rows"].values())]
            heads = ["workload"] + [_HEADERS[c] for c in used] + [_RATIOS[c] for c in ratio_cols]
            lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
            for wl, (cells, ratios, rounds) in sorted(m["rows"].items(), key=lambda kv: _order(kv[0])):
                label = wl + (f" ({rounds} paired rounds)" if rounds else "")
                row = [label] + [_ms(cells[c]) if c in cells else "" for c in used]
                row += [f"{ratios[c]:.2f}x" if c in ratios else "" for c in ratio_cols]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        if m["ceilings"]:
            lines += ["Ceilings (the suites' own rows): " + ", ".join(
                f"{k.split()[0]} {v:.4g} {k.split()[-1]}" for k, v in m["ceilings"].items()), ""]
        sh = m["other"].get("shards")
        if sh:
            lines += [f"Sharded sampling to disk (`test_bench_shards.py`), {sh['images']} images, {sh['steps']} steps, shards of "
                      f"{sh['shard_size']}: one process x 2 threads {sh['median_one_process_s']:.3g} s, "
                      f"Ray 2 workers x 1 thread {sh['median_ray_s']:.3g} s (throughput ratio "
                      f"{sh['throughput_ratio_ray_vs_one_process']:.2f}, median of "
                      f"{len(sh['pair_ratios'])} interleaved pairs)", ""]
        cm = m["other"].get("paired-cm")
        if cm:
            ms, ratio = cm["medians_ms"], cm["paired"]
            lines += [f"{cm['model']} one-step sampling, batch {cm['batch']} (`test_bench_cm.py`, {cm['rounds']} "
                      f"paired rounds): fastddpm {_ms(ms['fastddpm'])}; " + ", ".join(
                          f"{impl} {_ms(ms[impl])} ({ratio[impl]:.2f}x)" for impl in ratio), ""]
        pr = m["other"].get("projection")
        if pr:
            lines += [f"{pr['model']}, native engine on {pr['threads']} thread, batch {pr['batch']}: {pr['seconds_per_image_step'] * 1e3:.3g} ms "
                      f"per image and step, {pr['projected_hours_50k_ddpm1000']:,.0f} hours for 50,000 "
                      f"images x 1000 steps", ""]
    return "\n".join(lines)


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
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--machines", action="store_true",
                    help="one table of medians per machine over all the given files")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--plot", help="write a bar chart PNG here")
    args = ap.parse_args(argv)
    try:
        datas = [load(p) for p in args.json]
    except (OSError, ValueError) as exc:
        print(f"error: cannot read a result file: {exc}", file=sys.stderr)
        return 2
    if not args.machines and len(datas) > 1:
        print("error: several files need --machines", file=sys.stderr)
        return 2
    data = datas[0]
    text = machines_markdown(datas) if args.machines else markdown(data)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.plot and not args.machines:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
