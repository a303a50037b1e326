"""CPU training throughput, side by side: lora-llava against LLaMA-Factory 0.9.5 and ms-swift 4.6.0.

    python benchmarks/peers.py --setup                       # once: builds /work/venvs/{llamafactory,swift}
    python benchmarks/peers.py                               # 3 interleaved runs of each, 12 steps, 3 left out
    python benchmarks/peers.py --trainers lora-llava --runs 1   # lora-llava alone, for quick iterations
    python benchmarks/peers.py --profile --profile-dir prof  # torch.profiler over the measured steps, each trainer once

All three train the same LLaVA-1.5-shaped llava-hf folder (lora_llava.model.tiny:
CLIP at 336 px, 576 image tokens; a 4-layer LLaMA of width 256) on the same
shapes VQA data, with the same settings (LoRA r=16, alpha 32, dropout 0.05 on
every linear layer of the language model, the projector trained fully, batch 4,
fp32, non-reentrant activation checkpointing, AdamW, one learning rate, one
thread, no eval, no saving during the steps). Each run is its own process,
started through the trainer's real command line; runs interleave (A B C A B C
...) so that a change in the machine's load hits every trainer alike.

They are measured by one probe (benchmarks/peers_probe/sitecustomize.py, put
on PYTHONPATH): tokens without padding from the attention mask of each batch
fed to the model, process CPU time per optimizer step, the loss per step, and
the trainable parameters, which must be equal for the run to count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBE = HERE / "peers_probe"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from peers_lib import commands, profiles, results, venvs, workload  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", choices=commands.TRAINERS, default=list(commands.TRAINERS))
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of each trainer")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the figures")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--swift-default-system", action="store_true",
                   help="run ms-swift's llava1_5_hf template as shipped (no system prompt) instead of LLaVA-1.5's")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("/tmp/peers-bench"), help="model, data and run folders")
    p.add_argument("--venvs", type=Path, default=Path("/work/venvs"), help="folder of the peers' virtual environments")
    p.add_argument("--lora-llava-root", type=Path, default=ROOT, help="the lora-llava source tree to run (default: this one)")
    p.add_argument("--lora-llava-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for the lora-llava runs, e.g. lora.shared_dropout=false")  # fmt: skip
    p.add_argument("--setup", nargs="*", choices=tuple(venvs.SETUP), help="(re)create these venvs (none named: both), then exit")
    p.add_argument("--json", type=Path, help="write every figure and the probe's raw results here")
    p.add_argument("--profile", action="store_true", help="one profiled run per trainer instead of the benchmark")
    p.add_argument("--profile-dir", type=Path, default=Path("peers-profile"), help="where --profile writes its tables")
    p.add_argument("--profile-kind", choices=("cpu", "torch"), default="cpu",
                   help="cpu: CPU time per op and step region (robust on a shared machine); torch: torch.profiler")  # fmt: skip
    p.add_argument("--timeout", type=int, default=900, help="seconds one run may take")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> workload.Settings:
    return workload.Settings(
        steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, threads=args.threads,
        swift_system=not args.swift_default_system,
    )  # fmt: skip


def run_env(cmd: commands.Command, result: Path, threads: int, profile: tuple[Path, str, str] | None) -> dict[str, str]:
    """The trainer's environment: offline hubs, one thread, and the probe first on PYTHONPATH."""
    env = {**os.environ, **venvs.OFFLINE_ENV, **cmd.env}
    path = [str(PROBE)] + [p for p in (cmd.env.get("PYTHONPATH"),) if p]
    env |= {
        "PYTHONPATH": os.pathsep.join(path),
        "PEERS_PROBE_OUT": str(result),
        "PEERS_PROBE_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "LORA_LLAVA_PROGRESS": "0",
    }
    if profile is not None:
        prefix, steps, kind = profile
        env |= {"PEERS_PROBE_PROFILE": str(prefix), "PEERS_PROBE_PROFILE_STEPS": steps, "PEERS_PROBE_PROFILE_KIND": kind}
    return env


def run_one(name: str, label: str, args, s: workload.Settings, w: workload.Workload, profile: Path | None = None) -> dict:
    """One training run in its own process; the probe's result, or SystemExit with the trainer's last words."""
    out = args.workdir / "runs" / label
    cmd = commands.build(name, s, w, out, args.lora_llava_root.resolve(), args.venvs, tuple(args.lora_llava_set))
    result = out / "probe.json"
    result.unlink(missing_ok=True)
    env = run_env(cmd, result, s.threads, (profile, f"{s.warmup + 1}-{s.steps}", args.profile_kind) if profile else None)
    env["PEERS_PROBE_LABEL"] = label
    log = out / "log.txt"
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        try:
            proc = subprocess.run(cmd.argv, cwd=cmd.cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{label}: still running after {args.timeout} s (--timeout); log in {log}") from None
    if proc.returncode != 0 or not result.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        why = f"exit status {proc.returncode}" if proc.returncode else "no probe result (did it reach Trainer.train?)"
        raise SystemExit(f"{label}: {why}; full log in {log}")
    print(f"{label}: done in {time.perf_counter() - start:.0f} s wall", flush=True)
    return json.loads(result.read_text(encoding="utf-8"))


def check_trainers(args) -> None:
    for name in args.trainers:
        if name != "lora-llava":
            try:
                venvs.check(name, args.venvs / name)
            except venvs.MissingVenv as e:
                raise SystemExit(str(e)) from None


def benchmark(args, s: workload.Settings, w: workload.Workload) -> dict:
    """Runs interleaved (A B C A B C ...); figures, ratios and the equal-work check."""
    raw: dict[str, list[dict]] = {t: [] for t in args.trainers}
    for run in range(1, args.runs + 1):
        for name in args.trainers:
            raw[name].append(run_one(name, f"{name}-{run}", args, s, w))
    figs = [results.figures(t, run, raw[t][run - 1], s.warmup) for run in range(1, args.runs + 1) for t in args.trainers]
    return {"figures": figs, "raw": raw}


def profile(args, s: workload.Settings, w: workload.Workload) -> None:
    """One profiled run per trainer over the measured steps, then the trainers side by side."""
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    for name in args.trainers:
        prefix = args.profile_dir / f"profile_{name}"
        raw = run_one(name, f"{name}-profile", args, s, w, profile=prefix)
        (args.profile_dir / f"probe_{name}.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
        print(f"{name}: {prefix}.txt", flush=True)
    found = profiles.load(args.profile_dir, args.trainers)
    lines = profiles.compare(found) + [""] + profiles.differences(found)
    (args.profile_dir / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


def header(argv: list[str], s: workload.Settings) -> dict:
    import torch

    return {
        "command": "python benchmarks/peers.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        "main_torch": torch.__version__,
        "settings": s.as_dict(),
    }


def report(head: dict, done: dict) -> dict:
    figs = done["figures"]
    lines = [f"{head['command']}  ({head['date']}; {head['machine']})", ""]
    lines += results.table(figs) + [""] + results.summary(figs)
    print("\n".join(lines), flush=True)
    versions = {t: rs[0]["versions"] for t, rs in done["raw"].items()}
    return {**head, "versions": versions, "figures": [asdict(f) for f in figs],
            "ratios": results.ratios(figs), "raw": done["raw"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # The trainers run in other working directories: every path they are given must be absolute.
    args.workdir, args.venvs, args.profile_dir = args.workdir.resolve(), args.venvs.resolve(), args.profile_dir.resolve()
    if args.setup is not None:
        for name in args.setup or tuple(venvs.SETUP):
            venvs.SETUP[name](args.venvs / name)
        return 0
    check_trainers(args)
    s = settings_from(args)
    w = workload.prepare(args.workdir)
    if args.profile:
        profile(args, s, w)
        return 0
    head = header(argv, s)
    done = benchmark(args, s, w)
    out = report(head, done)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    results.check_equal_work(done["raw"])  # last, so that unequal runs still leave their figures to inspect
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except results.UnequalWork as e:
        sys.exit(f"error: {e}")
