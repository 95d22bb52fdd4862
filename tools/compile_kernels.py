#!/usr/bin/env python3
"""The compile gate over every arch: each Triton kernel, autotune candidate and dtype compiled for sm_80, sm_90a and
sm_100a on this machine (no GPU), with registers, spills, shared memory and tensor-core instructions checked.

    python tools/compile_kernels.py                       # all archs in parallel; the table; exit 1 on a problem
    python tools/compile_kernels.py --arch sm_90a --only attention --markdown table.md
    python tools/compile_kernels.py --full                # fp16 on every family too (several times longer)
    python tools/compile_kernels.py --triton 3.6.0        # with another triton (the GPU image's), kept in a cache

One worker process per core (pretrain.kernels.compile_check --shard), each with a fresh triton cache; TRITON_INTERPRET is cleared for
them. Exit 0: every kernel passed; 1: a problem (the table says which); 2: bad arguments or a crashed arch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.kernels.compile_check import ARCHS  # noqa: E402  (imports no triton)


def triton_site(version: str) -> Path:
    """A folder holding triton==version (pip --target, installed once, then reused): the gate's workers import it
    instead of the environment's triton, so one checkout can check the pinned version and the GPU image's."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain" / f"triton-{version}"
    if not (cache / "triton" / "__init__.py").is_file():
        partial = cache.with_name(cache.name + ".partial")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                               f"triton=={version}"], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SystemExit(f"error: could not install triton=={version}: {tail}")
        partial.replace(cache)
    return cache


NOT_COMPILED = ("bench.py", "reference.py")  # kernels/ files the gate never imports


def cache_key(archs: list[str], full: bool, only: str | None, cases: str | None, site: Path | None) -> str:
    """What a gate run's rows depend on: every file of kernels/ the gate imports (the kernels and
    compile_check.py; not the benchmark and the torch references, which compile nothing), the cases file, the
    triton version (its bundled ptxas with it), the arguments. Equal keys compile to equal cubins."""
    from importlib import metadata

    digest = hashlib.sha256()
    sources = [p for p in sorted((ROOT / "kernels").glob("*.py")) if p.name not in NOT_COMPILED]
    for path in sources + ([Path(cases)] if cases else []):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    version = site.name if site else f"triton-{metadata.version('triton')}"
    digest.update(json.dumps([version, archs, full, only, os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")]).encode())
    return digest.hexdigest()[:24]


def cached_run(archs: list[str], full: bool, only: str | None, cases: str | None, site: Path | None,
               use_cache: bool) -> tuple[list[dict], list[str], bool]:
    """``run_archs``, or the rows a run with the same ``cache_key`` wrote (~/.cache/pretrain/compile-gate/):
    (rows, crashed, whether they came from the cache). Only complete runs (no crashed worker) are kept."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain" / "compile-gate"
    file = folder / f"{cache_key(archs, full, only, cases, site)}.json"
    if use_cache and file.is_file():
        try:
            return json.loads(file.read_text())["rows"], [], True
        except (OSError, ValueError, KeyError):
            pass  # unreadable: compile again
    rows, crashed = run_archs(archs, full, only, cases, site)
    if not crashed:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"rows": rows}))
            tmp.replace(file)
        except OSError:
            pass  # a read-only home: no cache, same result
    return rows, crashed, False


def run_archs(archs: list[str], full: bool, only: str | None, cases: str | None,
              site: Path | None = None) -> tuple[list[dict], list[str]]:
    """Rows of every arch, and one line per arch whose process failed without rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*([str(site)] if site else []), str(ROOT)]) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory(prefix="compile-kernels-") as tmp:
        procs = {}
        workers = max(1, min(os.cpu_count() or 1, 8))
        for index in range(workers):  # each worker a balanced share of (arch, family, dtype) compiles
            cmd = [sys.executable, "-m", "pretrain.kernels.compile_check", "--arch", *archs, "--shard", f"{index}/{workers}",
                   "--json", f"{tmp}/{index}.json"]
            cmd += ["--full"] if full else []
            cmd += ["--only", only] if only else []
            cmd += ["--cases", cases] if cases else []
            procs[index] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        rows, crashed = [], []
        for index, proc in procs.items():
            output = proc.communicate()[0]
            path = Path(f"{tmp}/{index}.json")
            if not path.exists():
                tail = [line for line in output.strip().splitlines() if "Warning" not in line][-1:] or ["no output"]
                crashed.append(f"worker {index}: the gate process exited {proc.returncode}: {tail[0]}")
                continue
            result = json.loads(path.read_text())
            rows += result["rows"]
            print(f"worker {index}: {len(result['rows'])} kernels compiled in {result['seconds']} s", file=sys.stderr)
    merged: dict[tuple, dict] = {}  # one kernel build compiled by two workers (shared by their families) is one row
    for row in rows:
        key = (row["arch"], row["kernel"], row["config"], row["dtype"], row["regs"], row["smem"], row["spill_bytes"],
               tuple(row["problems"]))
        if key in merged:
            merged[key]["families"] += [f for f in row["families"] if f not in merged[key]["families"]]
        else:
            merged[key] = row
    order = {arch: i for i, arch in enumerate(ARCHS)}
    return sorted(merged.values(), key=lambda r: (order[r["arch"]], r["kernel"], r["dtype"], r["config"])), crashed


def table(rows: list[dict]) -> str:
    lines = ["| arch | kernel | config | dtype | regs | spill B | smem B (limit) | MMA | families | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        families = "; ".join(f.split("/", 1)[1] for f in r["families"])
        smem = f"{r['smem']:,} ({r['smem_limit']:,})" if r["smem_limit"] else ""
        result = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"| {r['arch']} | {r['kernel'].lstrip('_')} | {r['config']} | {r['dtype']} | {r['regs']} | "
                     f"{r['spill_bytes']} | {smem} | {r['mma'] or '-'} | {families} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), help=f"some of {', '.join(ARCHS)} (default all)")
    parser.add_argument("--full", action="store_true", help="fp16 on every family, and head dim 256 with padding")
    parser.add_argument("--only", help="only the families whose name contains this (e.g. attention, rms_norm)")
    parser.add_argument("--cases", help="a Python file defining CASES to compile instead of the project's kernels")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile even when a run of the same kernel sources, triton and arguments is cached")
    parser.add_argument("--triton", metavar="VERSION", help="compile with this triton version (pip-installed into "
                        "~/.cache/pretrain/triton-VERSION once) instead of the environment's")
    args = parser.parse_args(argv)
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        print(f"error: unknown arch {', '.join(unknown)} (known: {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    if args.cases and not Path(args.cases).is_file():
        print(f"error: --cases {args.cases} is not a file", file=sys.stderr)
        return 2
    start = time.time()
    site = triton_site(args.triton) if args.triton else None
    rows, crashed, cached = cached_run(args.arch, args.full, args.only,
                                       args.cases and str(Path(args.cases).resolve()), site, not args.no_cache)
    text = table(rows)
    print(text)
    for path, content in ((args.markdown, text + "\n"), (args.json, json.dumps(rows, indent=1))):
        if path:
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            tmp.write_text(content)
            tmp.replace(path)
    failed = [r for r in rows if r["problems"]]
    for line in crashed:
        print(f"error: {line}", file=sys.stderr)
    print(f"compile gate{f' (triton {args.triton})' if args.triton else ''}: {len(rows)} kernels on "
          f"{', '.join(args.arch)}, {len(failed)} failed, "
          f"{time.time() - start:.0f} s{' (cached: the same kernel sources, triton and arguments compiled before; --no-cache to redo)' if cached else ''}",
          file=sys.stderr)
    if crashed:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
