"""Shared pieces of the benchmark suites: machine description and ceilings measured in the same run."""
import os
import platform


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastddpm
    from fastddpm.info import build_info
    machine_info["fastddpm"] = fastddpm.__version__
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        machine_info["cpu_model"] = model
    except OSError:
        pass
    machine_info["build"] = build_info()
    machine_info["backends"] = {k: v["available"] for k, v in fastddpm.backends().items()}
    try:
        import torch
        machine_info["torch"] = torch.__version__
        machine_info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            machine_info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Drop the per-round timings (150,000 rounds for a 1 us copy: megabytes per results file); the
    # summary statistics are what benchmarks/report.py reads and what gets committed.
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
