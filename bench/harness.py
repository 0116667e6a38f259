"""The one bench harness: suites of arms as data (bench/suites.py), one runner, results appended as JSON
lines, the markdown made from them.

    PYTHONPATH=. python bench/harness.py run SUITE [--only ARM ...] [--steps N]   # appends bench/results/SUITE.jsonl
    PYTHONPATH=. python bench/harness.py report SUITE                             # writes bench/results/SUITE.md

Every arm runs in a fresh process (no allocator state carried over), one after another. Each line of the
results file is one arm of one command: the command's id, the commit (and whether the tree was dirty),
the card and its total as the driver reports it, torch and CUDA versions, the command line, and every
figure the arm measured. Two memory figures per arm: the allocator's peak (what PyTorch reserved) and
the whole process on the card (NVML, sampled every 0.25 s: the CUDA context, cuBLAS workspaces and
kernels included), the number a card must hold.

A ratio is computed only between two arms of the same command (`Arm.baseline`): the report never
divides numbers from different device sessions or cards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class Arm:
    """One measured run. `kind` `fitrun`: `fitrun train JOB` with `sets` (from `tree`, another checkout,
    when given); `script`: `python SCRIPT ARGS...` that prints one `RESULT {json}` line."""

    name: str
    kind: str                                  # "fitrun" | "script"
    job: str = ""                              # fitrun: the job file
    sets: tuple[str, ...] = ()                 # fitrun: --set overrides; script: its arguments
    flags: tuple[str, ...] = ()                # fitrun: other CLI flags (--gpu L4)
    script: str = ""                           # script: path from the repo root
    tree: str = ""                             # run another checkout of fitrun (the code before a change)
    baseline: str = ""                         # the arm(s) of the same command a ratio divides by: comma-separated;
    #                                            "unsloth-*": the fastest arm whose name matches (a peer's best)
    card_total_mib: int | None = None          # the card this arm emulates: fits = whole process <= this
    note: str = ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def environment() -> dict:
    """What every line records: commit, card, versions. The commit comes from git where the tree has it,
    else from FITRUN_COMMIT (the device copy of the tree has no .git)."""
    import torch

    given = os.environ.get("FITRUN_COMMIT")  # the device's copy of the tree: its git state is not the commit's
    env = {"commit": given or _git("rev-parse", "HEAD") or "unknown",
           "dirty": False if given else bool(_git("status", "--porcelain", "--untracked-files=no")),
           "torch": torch.__version__,
           "cuda": torch.version.cuda, "card": "CPU", "card_total_mib": None, "driver": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        env.update(card=pynvml.nvmlDeviceGetName(h), card_total_mib=pynvml.nvmlDeviceGetMemoryInfo(h).total // MIB,
                   driver=pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        pass
    return env


class DeviceSampler:
    """Peak GPU memory of one arm, as nvidia-smi shows it (NVML, every `interval_s`): the used memory of
    the arm's processes (the driver it starts and its Ray workers, found as descendants of `pid`), summed;
    where NVML lists no process of the arm (a sandbox that hides process ids), the whole card's used
    memory beyond what was used at the start, which is only the arm's when arms run one at a time."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.peak_mib, self.device_peak_mib, self._stop = interval_s, 0, 0, threading.Event()
        self.pid = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.base_mib = self._used_mib()
        except Exception:
            self._nvml = None

    def _used_mib(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used // MIB

    def _arm_mib(self) -> int:
        import psutil

        try:
            mine = {self.pid, *(p.pid for p in psutil.Process(self.pid).children(recursive=True))}
        except psutil.Error:
            return 0
        return sum((p.usedGpuMemory or 0) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                   if p.pid in mine) // MIB

    def start(self, pid: int) -> "DeviceSampler":
        self.pid = pid
        if self._nvml:
            threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, self._arm_mib())
                self.device_peak_mib = max(self.device_peak_mib, self._used_mib() - self.base_mib)
            except Exception:
                pass
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    @property
    def peak_gib(self) -> float | None:
        if not self._nvml:
            return None
        return (self.peak_mib or self.device_peak_mib) * MIB / GIB

    @property
    def source(self) -> str:
        return "arm's processes (NVML)" if self.peak_mib else "whole card beyond its start (NVML)"


def run_arm(arm: Arm, steps: int | None, log_dir: Path) -> dict:
    """One arm in a fresh process; its figures (or `error`)."""
    cwd = ROOT / arm.tree if arm.tree else ROOT
    env = {**os.environ, "FITRUN_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        if arm.kind == "fitrun":
            sets = [f"output_dir={tmp}/out", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", *arm.sets]
            if steps:
                sets.append(f"training.max_steps={steps}")
            args = [sys.executable, "-m", "runner", "train", arm.job, "--no-resume", *arm.flags]
            for s in sets:
                args += ["--set", s]
        else:
            args = [sys.executable, str(ROOT / arm.script), *arm.sets, *(["--steps", str(steps)] if steps else [])]
        log_path = log_dir / f"{arm.name}.log"
        started = time.time()
        sampler = DeviceSampler()
        with open(log_path, "w") as log:
            p = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            sampler.start(p.pid)
            stdout, _ = p.communicate()
            sampler.stop()
        log_text = log_path.read_text()
        with open(log_path, "a") as log:
            log.write(stdout)
    figures = {"wall_s": round(time.time() - started, 1), "device_peak_gib": sampler.peak_gib,
               "device_peak_source": sampler.source}
    if p.returncode != 0:
        return {**figures, "error": (log_text + stdout)[-2000:]}
    if arm.kind == "fitrun":
        summary = json.loads(stdout[stdout.index("\n{") + 1:] if not stdout.startswith("{") else stdout)
    else:
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
        summary = json.loads(line[len("RESULT "):])
    figures.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None})
    return figures


def whole_process_gib(figures: dict) -> float | None:
    """The job's whole process: the worker's own NVML peak where it has one (it starts after a dry run's
    random-weight build, which a pretrained base never holds), else the harness's sample of the arm."""
    return figures.get("peak_device_gib") or figures.get("device_peak_gib")


def derived(arm: dict, figures: dict) -> dict:
    """Figures computed from the measured ones: the estimate's error and the fit on the arm's card."""
    out, whole = dict(figures), whole_process_gib(figures)
    if figures.get("predicted_device_gib") and whole:
        out["device_error_pct"] = (figures["predicted_device_gib"] / whole - 1) * 100
    if arm.get("card_total_mib") is not None and whole is not None:
        out["fits_card"] = whole * GIB / MIB <= arm["card_total_mib"]
    return out


def run_suite(suite: str, arms: list[Arm], steps: int | None, parallel: int = 1) -> Path:
    """Run `arms` (`parallel` at a time: for memory-fit arms only, never for speed), appending one JSON
    line per arm to bench/results/SUITE.jsonl as each ends."""
    from concurrent.futures import ThreadPoolExecutor

    env, command_id = environment(), uuid.uuid4().hex[:12]
    out = RESULTS / f"{suite}.jsonl"
    log_dir = Path(os.environ.get("OUT", tempfile.gettempdir()))
    command = " ".join(["python", "bench/harness.py", *sys.argv[1:]])
    lock = threading.Lock()

    def one(arm: Arm) -> None:
        print(f"[{suite}] {arm.name} ...", flush=True)
        figures = run_arm(arm, steps, log_dir)
        figures["arms_at_once"] = parallel
        line = {"suite": suite, "command_id": command_id, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": command, **env, "arm": asdict(arm), "figures": figures}
        with lock, open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"[{suite}] {arm.name}: " + json.dumps({k: v for k, v in figures.items() if k != "error"})
              + (f"\n  error: {figures['error'][-600:]}" if "error" in figures else ""), flush=True)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, arms))
    return out


COLUMNS = (("tokens_per_s", "tokens/s", ",.0f"), ("peak_reserved_gib", "allocator peak reserved GiB", ".2f"),
           ("predicted_peak_gib", "estimate, allocator GiB", ".2f"),
           ("device_peak_gib", "arm's processes GiB (NVML, from the start)", ".2f"),
           ("peak_device_gib", "whole process GiB (the worker's NVML)", ".2f"),
           ("predicted_device_gib", "estimate, whole process GiB", ".2f"),
           ("device_error_pct", "estimate error, whole process %", "+.1f"), ("loss", "loss", ".4f"),
           ("fits_card", "fits the card", ""))


def ratio_lines(name: str, baselines: str, figures: dict[str, dict]) -> list[str]:
    """`NAME_vs_BASE_same_command: x` per baseline of the arm; a glob baseline (`unsloth-*`) divides by the
    fastest matching arm of the command and names it (`NAME_vs_unsloth_best_same_command`)."""
    from fnmatch import fnmatch

    mine, out = figures.get(name, {}).get("tokens_per_s"), []
    for base in filter(None, baselines.split(",")):
        if "*" in base:
            ran = {n: f["tokens_per_s"] for n, f in figures.items() if fnmatch(n, base) and f.get("tokens_per_s")}
            if mine and ran:
                best = max(ran, key=ran.get)
                out.append(f"{name}_vs_{base.rstrip('-*')}_best_same_command: {mine / ran[best]:.2f} "
                           f"(the best of {len(ran)} that ran: {best}, {ran[best]:,.0f} tokens/s)")
        elif mine and (theirs := figures.get(base, {}).get("tokens_per_s")):
            out.append(f"{name}_vs_{base}_same_command: {mine / theirs:.2f}")
    return out


def report(suite: str) -> str:
    """The markdown of every command in bench/results/SUITE.jsonl, newest first; ratios only within a command."""
    lines_in = [json.loads(x) for x in (RESULTS / f"{suite}.jsonl").read_text().splitlines() if x.strip()]
    by_command: dict[str, list[dict]] = {}
    for x in lines_in:
        by_command.setdefault(x["command_id"], []).append(x)
    md = [f"# bench suite `{suite}`", "", f"Generated by `python bench/harness.py report {suite}` from `{suite}.jsonl`; "
          "each section is one command on one card, and every ratio divides two arms of that section.", ""]
    for command_id, rows in sorted(by_command.items(), key=lambda kv: kv[1][0]["date"], reverse=True):
        head = rows[0]
        md += [f"## {head['date']} on {head['card']} (command {command_id})", "",
               f"- commit `{head['commit'][:12]}`{' (uncommitted changes)' if head['dirty'] else ''}; torch "
               f"{head['torch']}, CUDA {head['cuda']}, driver {head['driver']}; card total "
               f"{head['card_total_mib']} MiB as the driver reports it",
               f"- command: `{head['command']}`",
               *([f"- arms ran {head['figures']['arms_at_once']} at a time: memory per arm holds, tokens/s are "
                  "contended and not compared"] if head["figures"].get("arms_at_once", 1) > 1 else []), "",
               "| arm | " + " | ".join(c[1] for c in COLUMNS) + " | note |",
               "| --- |" + " --- |" * (len(COLUMNS) + 1)]
        for r in rows:
            r["figures"] = derived(r["arm"], r["figures"])
        figures = {r["arm"]["name"]: r["figures"] for r in rows}
        for r in rows:
            f, arm = r["figures"], r["arm"]
            if "error" in f:
                md.append(f"| {arm['name']} | failed: {f['error'].splitlines()[-1][:120]} |" + " |" * len(COLUMNS))
                continue
            cells = [("-" if f.get(k) is None else (("yes" if f[k] else "no") if fmt == "" else format(f[k], fmt)))
                     for k, _, fmt in COLUMNS]
            md.append(f"| {arm['name']} | " + " | ".join(cells) + f" | {arm['note']} |")
        md.append("")
        for r in rows:
            md += ratio_lines(r["arm"]["name"], r["arm"]["baseline"], figures)
            if r["arm"].get("card_total_mib") is not None and "fits_card" in r["figures"]:
                total = r["arm"]["card_total_mib"]
                md.append(f"card_job_fits_{r['arm']['name'].removeprefix('card-')}: "
                          f"{'yes' if r['figures']['fits_card'] else 'no'} ({whole_process_gib(r['figures']):.2f} GiB "
                          f"whole process; the card's total {total} MiB = {total * MIB / GIB:.2f} GiB)")
        md.append("")
    text = "\n".join(md)
    (RESULTS / f"{suite}.md").write_text(text)
    return text


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from suites import SUITES

    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["run", "report"])
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--only", nargs="*", help="these arms of the suite (names or globs), in the suite's order")
    ap.add_argument("--steps", type=int, help="optimizer steps per arm (default: the arm's own)")
    ap.add_argument("--parallel", type=int, default=1, help="arms at once (memory-fit suites only; speed needs 1)")
    args = ap.parse_args()
    if args.verb == "run":
        from fnmatch import fnmatch

        arms = [a for a in SUITES[args.suite] if not args.only or any(fnmatch(a.name, o) for o in args.only)]
        run_suite(args.suite, arms, args.steps, args.parallel)
    print(report(args.suite))


if __name__ == "__main__":
    main()
