"""The summary of ``scripts/gpu_check.sh``: summary.json and summary.md in its output folder.

    python scripts/gpu_check_summary.py WORK OUT_DIR --device cuda|cpu --dry 0|1 --seconds S

WORK is the script's working folder: steps.tsv (one line per step: name, rc, seconds, status, time
limit, note), logs/<step>.log, pytest-gpu.xml, bench-*.json and the torchrun run folder. Exits 0
when every step passed or was skipped, else 1; a torchrun step whose run folder is incomplete, or
that ran on another backend than the device's (nccl on CUDA, gloo on CPU), counts as failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RUN_FILES = {"checkpoint.pt", "config.json", "history.csv", "last.pt", "metrics.json"}
BENCH_STEPS = {"bench-fp32": "fp32", "bench-bf16": "bf16 autocast", "bench-compile": "torch.compile"}


def read_steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, status, limit, note = (line.split("\t") + [""] * 6)[:6]
        steps.append({"step": name, "rc": int(rc) if rc else None, "seconds": float(seconds or 0), "status": status,
                      "limit_s": int(limit or 0), "note": note})
    return steps


def read_env(work: Path) -> dict:
    """The JSON line the env step printed, and nvidia-smi's output."""
    log = work / "logs" / "env.log"
    if not log.exists():
        return {}
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return {**json.loads(line), "nvidia_smi": "\n".join(lines[i + 1 :])}
            except json.JSONDecodeError:
                break
    return {}


def read_pytest(work: Path) -> dict | None:
    """Counts and each test's outcome from pytest's JUnit XML (None when pytest did not write it)."""
    path = work / "pytest-gpu.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = ("failed" if kind == "failure" else kind), (node.get("message") or "").splitlines()[0:1]
                message = message[0] if message else ""
                break
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome, "message": message[:300]})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": tests}


def check_run(work: Path, device: str) -> tuple[dict | None, str]:
    """(the torchrun run's metrics, "" or why the run folder is not what a finished run writes)."""
    run = work / "torchrun-run"
    if not run.is_dir():
        return None, "no run folder"
    missing = RUN_FILES - {p.name for p in run.iterdir()}
    if missing:
        return None, f"run folder lacks {', '.join(sorted(missing))}"
    metrics = json.loads((run / "metrics.json").read_text())
    expected = "nccl" if device == "cuda" else "gloo"
    problems = []
    if metrics.get("world_size") != 1:
        problems.append(f"world_size {metrics.get('world_size')}, expected 1")
    if metrics.get("distributed_backend") != expected:
        problems.append(f"backend {metrics.get('distributed_backend')!r}, expected {expected!r}")
    bad = [k for k, v in metrics.get("test", {}).items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        problems.append(f"non-finite test metrics {bad}")
    return metrics, "; ".join(problems)


def bench_markdown(records: list[dict]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's mskt, installed or not
    try:
        from mskt.experiments.bench import to_markdown
    except ImportError as e:  # the summary still comes out where mskt does not import
        return f"(mskt does not import here: {e}; the records are in summary.json)"
    return to_markdown(records)


def log_tail(work: Path, step: str, lines: int = 30) -> str:
    log = work / "logs" / f"{step}.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def summarise(work: Path, out: Path, device: str, dry: bool, seconds: float) -> dict:
    steps = read_steps(work)
    by_name = {s["step"]: s for s in steps}
    summary = {"device": device, "dry": dry, "seconds": seconds, "env": read_env(work), "steps": steps,
               "pytest": read_pytest(work), "bench": {}, "torchrun": None}
    if "torchrun" in by_name and by_name["torchrun"]["status"] == "ok":
        metrics, problem = check_run(work, device)
        summary["torchrun"] = metrics
        if problem:
            by_name["torchrun"].update(status="failed", note=problem)
    for step in BENCH_STEPS:
        path = work / f"{step}.json"
        if path.exists():
            summary["bench"][step] = json.loads(path.read_text())
    summary["passed"] = all(s["status"] in ("ok", "skipped") for s in steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(to_markdown(summary, work))
    return summary


def to_markdown(summary: dict, work: Path) -> str:
    env = summary["env"]
    lines = ["# mskt GPU check (issue 21)", ""]
    if summary["dry"]:
        lines += ["**Dry run**: tiny sizes, a check of the script itself. Its numbers measure nothing.", ""]
    lines += [
        f"device `{summary['device']}`; torch {env.get('torch', '?')} (CUDA build {env.get('cuda_build')}); "
        f"CUDA available: {env.get('cuda_available', '?')}; GPU: {env.get('gpu', 'none')}"
        + (f" (capability {env['capability']}, {env['gpu_memory_gib']} GiB, nccl {env.get('nccl')})" if env.get("gpu") else "")
        + f"; python {env.get('python', '?')}; {summary['seconds']:.0f} s in all. "
        + ("Every step passed or was skipped." if summary["passed"] else "**Some steps did not pass.**"),
        "",
        "| step | status | rc | seconds | limit s | note |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {'' if s['rc'] is None else s['rc']} | {s['seconds']:.1f} | {s['limit_s'] or ''} | {s['note']} |")
    pytest = summary["pytest"]
    if pytest is not None:
        lines += ["", f"## pytest -m gpu: {pytest['passed']} passed, {pytest['failed']} failed, {pytest['error']} errors, {pytest['skipped']} skipped", ""]
        for t in pytest["tests"]:
            lines.append(f"- {t['outcome']}: `{t['test']}`" + (f": {t['message']}" if t["message"] else ""))
    if summary["torchrun"] is not None:
        m = summary["torchrun"]
        lines += ["", f"## torchrun, one process: backend {m.get('distributed_backend')}, world {m.get('world_size')}, "
                      f"best epoch {m.get('best_epoch')} of {m.get('epochs')}", "", "test: " + json.dumps(m.get("test"))]
    for step, label in BENCH_STEPS.items():
        if step in summary["bench"]:
            lines += ["", f"## mskt bench, {label}", "", bench_markdown(summary["bench"][step])]
    for s in summary["steps"]:
        if s["status"] not in ("ok", "skipped"):
            lines += ["", f"## {s['step']}: {s['status']}; the end of its log", "", "```", log_tail(work, s["step"]), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--dry", type=int, choices=(0, 1), default=0)
    p.add_argument("--seconds", type=float, default=math.nan)
    args = p.parse_args(argv)
    summary = summarise(args.work, args.out, args.device, bool(args.dry), args.seconds)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
