"""Hostile model directories: safetensors helpers and the seeded fuzzer of test_hostile_files.py.

Run as a script (the test does, in a child process, so that a crash or a hang fails the test
instead of killing the suite):

    python tests/_hostile.py MODEL_DIR WORK_DIR SEED CASES

MODEL_DIR is a valid diffusers-layout model; each case writes one mutated file over a copy of it
in WORK_DIR and calls fastddpm.load. Every case must load or raise a ValueError, TypeError or
OSError subclass whose message names the mutated file. The last line printed is a JSON summary.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import time

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
UNET = "unet/config.json"
SCHED = "scheduler/scheduler_config.json"
FILES = (UNET, WEIGHTS, SCHED)
CLEAR = (ValueError, TypeError, OSError)

# every dtype safetensors defines, and some it does not
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64",
          "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F128", "f32", "", "F3"]


# ---------------------------------------------------------------------- safetensors bytes

def split(raw: bytes) -> tuple[dict, bytes]:
    """(header with __metadata__, data section) of a valid safetensors file."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data: bytes, *, length: int | None = None, text: bytes | None = None) -> bytes:
    """A safetensors file from a header (any JSON value, or raw ``text``) and a data section;
    ``length`` overrides the 8-byte header length."""
    text = json.dumps(header).encode() if text is None else text
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def pack(tensors: dict[str, tuple[str, list, bytes]]) -> bytes:
    """A well-formed safetensors file of {name: (dtype, shape, raw bytes)}, tensors tiling the
    data section in order."""
    header, data, at = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        data += raw
        at += len(raw)
    return join(header, data)


def tensors_of(raw: bytes) -> dict[str, tuple[str, list, bytes]]:
    header, data = split(raw)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


# ---------------------------------------------------------------------- the fuzzer

def _value(rng: random.Random, depth: int = 0):
    """A random JSON value, biased towards the ones validators get wrong."""
    pool = [
        lambda: rng.choice([0, 1, -1, 2, 3, 7, 8, 16, 10**6, 10**9, 10**12, 2**31, 2**63, 2**64,
                            -2**63, 10**30, 10**400, -10**400, 2**31 - 1, 2**31]),
        lambda: rng.randint(-100, 5000),
        lambda: rng.choice([0.0, 1.5, -0.5, 1e-30, 1e300, float("nan"), float("inf"),
                            -float("inf"), 16.0]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice(["", "16", "DownBlock2D", "AttnUpBlock2D", "linear", "silu", "x" * 300,
                            "F32", "\u0000", "epsilon"]),
        lambda: [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))] if depth < 2 else [],
        lambda: {"k": _value(rng, depth + 1)} if depth < 2 else {},
        lambda: [rng.choice([0, 1, 16, 32, 64, -8, 10**9]) for _ in range(rng.randint(0, 5))],
    ]
    return rng.choice(pool)()


def _mutate_json(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    obj = json.loads(raw)
    op = rng.random()
    keys = list(obj)
    if op < 0.6 and keys:
        key = rng.choice(keys)
        obj[key] = _value(rng)
        what = f"{key} = {obj[key]!r:.60}"
    elif op < 0.75 and keys:
        key = rng.choice(keys)
        old = obj[key]
        if isinstance(old, list) and old:
            i = rng.randrange(len(old))
            old[i] = _value(rng) if rng.random() < 0.5 else old[i]
            if rng.random() < 0.5:
                del old[rng.randrange(len(old))]
            elif rng.random() < 0.5:
                old.append(rng.choice(old))
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            obj[key] = rng.choice([old * 2, old * 10**6, -old, old + 1, 0, old / 3])
        else:
            del obj[key]
        what = f"edit {key}"
    elif op < 0.85 and keys:
        key = rng.choice(keys)
        del obj[key]
        what = f"delete {key}"
    elif op < 0.9:
        obj[rng.choice(["bogus", "_private", "sample_sizes", ""])] = _value(rng)
        what = "extra key"
    else:
        return "byte flips", _flip(rng, raw, 0, len(raw))
    return what, json.dumps(obj).encode()


def _flip(rng: random.Random, raw: bytes, lo: int, hi: int) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        if hi > lo:
            b[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(b)


def _mutate_weights(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = split(raw)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(10)
    if op == 0:
        return "flips in header", _flip(rng, raw, 8, 8 + n)
    if op == 1:
        return "flips in data", _flip(rng, raw, 8 + n, len(raw))
    if op == 2:
        cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(8 + n), rng.randrange(len(raw))])
        return f"truncated to {cut}", raw[:cut]
    if op == 3:
        length = rng.choice([0, 1, n - 1, n + 1, len(raw) - 8, len(raw), 2**32, 2**60,
                             2**64 - 1, rng.randrange(2**64)])
        return f"header length {length}", struct.pack("<Q", length) + raw[8:]
    name = rng.choice(names)
    entry = header[name]
    if op == 4:
        entry["data_offsets"] = rng.choice([
            [entry["data_offsets"][1], entry["data_offsets"][0]],
            [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4],
            [0, entry["data_offsets"][1] - entry["data_offsets"][0]],
            [len(data), len(data) + 4], [-4, 0], [0, 2**64], _value(rng)])
        what = f"{name} data_offsets = {entry['data_offsets']!r:.60}"
    elif op == 5:
        entry["dtype"] = rng.choice(DTYPES) if rng.random() < 0.8 else _value(rng)
        what = f"{name} dtype = {entry['dtype']!r:.60}"
    elif op == 6:
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([
            shape[::-1], shape + [1], shape[:-1], [s * 2 for s in shape], [s + 1 for s in shape],
            [], [0], [-1] + shape[1:], [2**62, 2**62], _value(rng)])
        what = f"{name} shape = {entry['shape']!r:.60}"
    elif op == 7:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.5:
            del entry[key]
        else:
            entry["extra"] = 1
        what = f"{name} entry keys"
    elif op == 8:
        if rng.random() < 0.5:
            del header[name]
            what = f"delete {name}"
        else:
            header["extra." + name] = dict(entry)
            what = f"copy {name}"
    else:
        text = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        return f"duplicate {name}", join(None, data, text=(text[:-1] + ", " + dup + "}").encode())
    return what, join(header, data)


def mutate(rng: random.Random, originals: dict[str, bytes]) -> tuple[str, str, bytes]:
    """(file, description, new bytes) of one random mutation of one of the model's files."""
    rel = rng.choices(FILES, weights=(3, 5, 2))[0]
    if rel == WEIGHTS:
        what, new = _mutate_weights(rng, originals[rel])
    else:
        what, new = _mutate_json(rng, originals[rel])
    return rel, what, new


def fuzz(model_dir: str, work: str, seed: int, cases: int) -> dict:
    import fastddpm

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(model_dir, work)
    originals = {rel: open(os.path.join(model_dir, rel), "rb").read() for rel in FILES}
    rng = random.Random(seed)
    counts = {"cases": 0, "loaded": 0, "clear_errors": 0, "unclear": 0, "max_case_s": 0.0}
    failures = []
    for i in range(cases):
        rel, what, new = mutate(rng, originals)
        for r, raw in originals.items():
            with open(os.path.join(work, r), "wb") as f:
                f.write(new if r == rel else raw)
        print(f"case {i}: {rel}: {what}", flush=True)  # the last such line names a crash's case
        t = time.perf_counter()
        try:
            fastddpm.load(work)
            counts["loaded"] += 1
        except CLEAR as e:
            msg = str(e)
            if msg.strip() and os.path.join(work, rel) in msg:
                counts["clear_errors"] += 1
            else:
                counts["unclear"] += 1
                failures.append(f"case {i} ({rel}: {what}): {type(e).__name__} not naming "
                                f"the file: {msg[:300]!r}")
        except BaseException as e:  # noqa: BLE001 - the point: anything else is a failure
            counts["unclear"] += 1
            failures.append(f"case {i} ({rel}: {what}): {type(e).__name__}: {str(e)[:300]!r}")
        counts["max_case_s"] = max(counts["max_case_s"], time.perf_counter() - t)
        counts["cases"] += 1
    counts["failures"] = failures
    return counts


if __name__ == "__main__":
    model_dir, work, seed, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(fuzz(model_dir, work, seed, cases)), flush=True)
