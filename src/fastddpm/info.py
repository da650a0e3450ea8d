"""`python -m fastddpm.info`: what was built, and which backends can run here (and why not)."""
from __future__ import annotations

import json
import os
import platform
import sys


def build_info() -> dict:
    """The record setup.py wrote of what it compiled ({} if the package was never built)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def report() -> dict:
    from . import __version__, backends
    return {
        "fastddpm": __version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "build": build_info() or "not built (no _build_info.json): the compiled core is missing",
        "backends": backends(),
    }


def format_report(info: dict) -> str:
    lines = [f"fastddpm {info['fastddpm']}  python {info['python']}  {info['machine']}  {info['cpus']} cpus"]
    build = info["build"]
    if isinstance(build, dict):
        cpu, cuda = build.get("cpu", {}), build.get("cuda", {})
        native = (f"cpu ISA paths {', '.join(cpu.get('isa_paths', []))}" if cpu.get("built", True)
                  else f"cpu core not built ({cpu.get('reason', '?')})")
        lines.append(f"build: {build.get('distribution', 'source build')}; {native}; "
                     + (f"cuda {cuda.get('cuda_version')} archs {','.join(cuda.get('archs', []))}"
                        if cuda.get("built") else f"cuda not built ({cuda.get('reason', '?')})"))
    else:
        lines.append(f"build: {build}")
    lines.append("backends:")
    for name, entry in info["backends"].items():
        if entry["available"]:
            extra = {k: v for k, v in entry.items() if k not in ("available", "reasons")}
            lines.append(f"  {name:12s} available   {json.dumps(extra, default=str)}")
        else:
            lines.append(f"  {name:12s} unavailable: {'; '.join(entry['reasons'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    info = report()
    print(json.dumps(info, indent=2, default=str) if "--json" in args else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
