"""The lent GPU machine's one command: check the install (issue 32), then train the paper
preset of CE and LogitNorm for as many epochs as the time allows (issue 31).

Started by ``benchmarks/device/run.sh`` (which installs the carried wheels first)::

    bash benchmarks/device/run.sh                  # on the GPU machine: 8 minutes
    bash benchmarks/device/run.sh --skip_check --minutes 4   # the training alone
    bash benchmarks/device/run.sh --methods= --minutes 4     # the check alone
    PYTHON=.venv/bin/python OUT=/tmp/out bash benchmarks/device/run.sh --smoke   # CPU

Each step is a child process with a time limit cut from one deadline (``--minutes``):

1. versions: what the processes import (jax, flax, ... and where from) and the GPU;
2. probe: a one-epoch ``smoke`` CE run on the carried data, first with the carried pins
   (this repo's tested flax / optax / orbax-checkpoint, on the image's jax), else with the
   image's own; the steps after it use whichever trained, and none run if neither did;
3. ``python -m experiments.check_device`` (the ``paper`` preset of every method), capped
   at ``--check_minutes`` (its report keeps the methods measured before the cap);
4. ``--methods`` (CE, LogitNorm) trained at once on the GPU: the ``paper`` preset
   (WRN-40-2, batch 128, SGD Nesterov, lr 0.1 divided by 10 at 40% and 70% of the
   epochs, as at 80 and 140 of 200) for as many epochs as the time left allows,
   estimated from step 3's images/s; on the carried CIFAR-10 (JPEG) training subset
   (``subset10k``'s images, ``benchmarks/device/carry.py``) and the whole test set; a
   checkpoint every few epochs, all kept; then each run's checkpoints measured
   (``python -m experiments.study.regime measure``) and its final weights exported
   (``benchmarks/device/export.py``).

``$OUT`` gets ``summary.md``, ``run.log``, ``results.tar.gz`` (the check's report, each
run's ``config.json``, ``metrics.jsonl``, ``final.json``, ``regime.jsonl`` and TensorBoard
files, ``steps.json``) and ``weights/`` (``manifest.json``, ``<method>.npz``): 6 files of
the 8 that may come back, rewritten after every step, so a command stopped by the tool's
limit still returns what was done. The last line printed is a one-line summary. This
module imports neither jax nor the library (its children do): it never holds the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Per preset: the batch and training images of a run (experiments/configs/default.py; a
# test checks they agree), and the epochs the preset's own schedule has.
PRESET_BATCH = {"paper": 128, "smoke": 64}
SMOKE_TRAIN_IMAGES = 1024
TEST_IMAGES = 10_000
PAPER_EPOCHS = 200
# The paper's lr drops (epochs 80 and 140 of 200) as fractions of the run.
PAPER_DROPS = (80 / PAPER_EPOCHS, 140 / PAPER_EPOCHS)
# Checkpoints measured per run (experiments.study.regime measure reads every kept one,
# oldest first: few enough that the last is reached in the time left).
MEASURED = 6
# The epoch estimate (guesses until a GPU run's metrics.jsonl calibrates them): the
# training process's start (JAX, the data from the probe's decode cache) and its final
# test pass; its train and eval steps' compilation, in the check's train-step compiles;
# the share of the check's random-image images/s the real input pipeline reaches; and
# how the runs trained at once share the GPU (each at 1 / n**0.75 of its speed alone: a
# WRN-40-2 step at batch 128 leaves an H100 partly idle).
STARTUP_S = 20.0
COMPILES = 1.3
EFFICIENCY = 0.6
SHARING_EXPONENT = 0.75
CHECKPOINT_S = 0.5
# Seconds a step may run on after SIGTERM (training saves a checkpoint first).
GRACE_S = 30.0
# Kept back from the deadline for packing $OUT.
RESERVE_S = 10.0
VERSIONS = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "ml-collections",
    "tensorboardX",
    "numpy",
    "tensorstore",
    "pillow",
)
CHECK_FILES = ("check_device.md", "check_device.json")
RUN_FILES = ("config.json", "metrics.jsonl", "final.json", "regime.jsonl", "changes.jsonl")
MODULE = (sys.executable, "-m", "benchmarks.device.run")
EXPORT = (sys.executable, "-m", "benchmarks.device.export")


def estimate_epochs(
    seconds: float,
    row: dict | None,
    train_images: int,
    *,
    fallback: int,
    most: int,
    sharing: int = 1,
) -> int:
    """Epochs a training process of ``seconds`` can finish, from the check's row for its
    method (``images_per_s``, ``compile_s``: random images, the train step alone), with
    ``sharing`` runs on the GPU at once; ``fallback`` without a usable row; between 1 and
    ``most``."""
    if not row or "images_per_s" not in row:
        return max(1, min(fallback, most))
    speed = row["images_per_s"] * EFFICIENCY / sharing**SHARING_EXPONENT
    fixed = STARTUP_S + COMPILES * row.get("compile_s", 0.0)
    per_epoch = train_images / speed + TEST_IMAGES / (3 * speed) + CHECKPOINT_S
    return max(1, min(most, math.floor((seconds - fixed) / per_epoch)))


def lr_drops(epochs: int) -> tuple[int, int]:
    """The paper's two lr drops (epochs 80 and 140 of 200) scaled to ``epochs``."""
    first = max(1, round(PAPER_DROPS[0] * epochs))
    return first, max(first + 1, round(PAPER_DROPS[1] * epochs))


def train_command(
    method: str, workdir: Path, *, preset: str, epochs: int, train_images: int, on_device: bool
) -> list[str]:
    """The training run of ``method``: ``preset`` on the carried files (``--data local``,
    ``$OOD_JAX_DATA_DIR``), ``epochs`` epochs with the paper's lr drops scaled to them, a
    checkpoint every ``epochs / MEASURED`` epochs (all kept), no OOD report. Spelled out
    rather than built by ``experiments.methods.train_argv``: this process imports nothing
    of the repository's packages, whose libraries the probe has yet to choose."""
    steps_per_epoch = train_images // PRESET_BATCH[preset]
    every = max(1, math.ceil(epochs / MEASURED))
    first, second = lr_drops(epochs)
    argv = [
        sys.executable,
        "-m",
        f"experiments.cifar10_{method}",
        f"--workdir={workdir}",
        f"--preset={preset}",
        "--data=local",
        f"--config.data.train_limit={train_images}",
        f"--config.train.epochs={epochs}",
        f"--config.optim.boundaries_epochs={first},{second}",
        f"--config.train.checkpoint_every={every * steps_per_epoch}",
        f"--config.train.max_to_keep={epochs // every + 2}",
        "--config.eval.ood=false",
        "--config.train.progress=false",
    ]
    return argv + (["--config.data.on_device=true"] if on_device else [])


def probe_command(workdir: Path) -> list[str]:
    """One epoch of the ``smoke`` preset's CE on the carried data: imports, a compile,
    the input pipeline, a checkpoint and the test pass, in seconds."""
    return [
        sys.executable,
        "-m",
        "experiments.cifar10_ce",
        f"--workdir={workdir}",
        "--preset=smoke",
        "--data=local",
        "--config.train.epochs=1",
        "--config.train.progress=false",
    ]


def check_command(out: Path, *, smoke: bool) -> list[str]:
    argv = [sys.executable, "-m", "experiments.check_device", f"--out={out}"]
    if smoke:
        return argv + ["--preset=smoke", "--methods=ce,logitnorm", "--steps=2"]
    return argv + ["--preset=paper", "--steps=30"]


def versions() -> dict[str, str]:
    """``{package: "version (where from)"}`` of :data:`VERSIONS` as this process imports
    them (``python -m benchmarks.device.run --versions`` prints it for a child's path)."""
    import importlib.metadata

    out = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            found = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out[name] = f"{found.version} ({found.locate_file('')})"
    return out


@dataclasses.dataclass
class Job:
    """A step's running child process."""

    name: str
    proc: subprocess.Popen
    start: float
    limit: float
    lines: list[str]
    pump: threading.Thread


class Steps:
    """Runs the steps as child processes against one deadline, logging to ``run.log``."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out, self.deadline = out, deadline
        self.log = open(out / "run.log", "a", buffering=1)  # noqa: SIM115 (open for the run)
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)
            self.log.write(text + "\n")

    def run(self, name: str, argv: list[str], env: dict, limit: float) -> dict:
        """Runs ``argv`` for at most ``limit`` seconds (then SIGTERM, and SIGKILL after
        :data:`GRACE_S`), its output to stdout and ``run.log``; returns its record with
        the output's lines."""
        return self.finish(self.start(name, argv, env, limit))

    def run_together(self, jobs: list[tuple[str, list[str], dict]], limit: float) -> list[dict]:
        """:meth:`run` of each ``(name, argv, env)`` at once, their lines prefixed."""
        started = [
            self.start(name, argv, env, limit, prefix=len(jobs) > 1) for name, argv, env in jobs
        ]
        return [self.finish(job) for job in started]

    def start(self, name: str, argv: list[str], env: dict, limit: float, prefix=False) -> Job:
        limit = max(1.0, min(limit, self.left()))
        self.say(f"=== {name} (limit {limit:.0f} s): {shlex.join(argv)}")
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: list[str] = []
        tag = f"[{name}] " if prefix else ""
        pump = threading.Thread(target=self._pump, args=(proc, lines, tag), daemon=True)
        pump.start()
        return Job(name, proc, time.monotonic(), limit, lines, pump)

    def finish(self, job: Job) -> dict:
        timed_out = False
        try:
            job.proc.wait(timeout=max(0.0, job.start + job.limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            job.proc.send_signal(signal.SIGTERM)
            try:
                job.proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
        job.pump.join(timeout=5)
        record = {
            "step": job.name,
            "rc": job.proc.returncode,
            "seconds": round(time.monotonic() - job.start, 1),
            "limit_s": round(job.limit),
            "timed_out": timed_out,
        }
        self.records.append(record)
        self.say(f"=== {job.name}: rc {job.proc.returncode} after {record['seconds']} s")
        return {**record, "output": job.lines}

    def _pump(self, proc: subprocess.Popen, lines: list[str], tag: str) -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            with self._lock:
                sys.stdout.write(tag + line)
                self.log.write(tag + line)
        sys.stdout.flush()


def choose_libs(steps: Steps, site: Path, work: Path, found: dict, *, smoke: bool) -> str | None:
    """``"pins"`` or ``"image"``: the first set of libraries a probe trains with (the
    carried pins first, where carried), their versions recorded in ``found``; None if
    none does."""
    for libs in ("pins", "image") if (site / "pins").is_dir() else ("image",):
        env = child_env(site, libs, smoke=smoke)
        listed = steps.run(f"versions ({libs})", [*MODULE, "--versions"], env, 60)
        for line in listed["output"]:
            if line.startswith("{"):
                found[libs] = json.loads(line)
        if steps.run(f"probe ({libs})", probe_command(work / f"probe_{libs}"), env, 120)["rc"] == 0:
            return libs
    return None


def child_env(site: Path, libs: str, *, smoke: bool) -> dict:
    """The children's environment: the carried packages first on ``PYTHONPATH`` (``pins``:
    the pinned flax/optax/orbax and the missing packages; ``image``: the missing ones)."""
    env = dict(os.environ)
    paths = [site / "pins", site / "extra"] if libs == "pins" else [site / "extra"]
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths if p.is_dir())
    env["PYTHONUNBUFFERED"] = "1"
    # The image's jax (0.11) is outside ood_jax's tested range: summary.md lists the
    # versions once, rather than every process warning.
    env["OOD_JAX_ALLOW_UNTESTED"] = "1"
    if not smoke:
        # A CPU-backend flag; an XLA that does not know it would refuse to start.
        env["OOD_JAX_DEFAULT_XLA_FLAGS"] = "0"
    return env


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer in 30 s"
    return done.stdout.strip() or done.stderr.strip()


def check_rows(work: Path) -> dict:
    path = work / "check_device" / "check_device.json"
    return json.loads(path.read_text())["training"] if path.is_file() else {}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a killed writer is left out."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_summary(work: Path, method: str) -> dict:
    """What a training run left: its final test accuracy and its last regime record."""
    run = work / method
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").is_file() else {}
    metrics = read_jsonl(run / "metrics.jsonl")
    regime = read_jsonl(run / "regime.jsonl")
    return {
        "epochs_done": metrics[-1].get("epoch") if metrics else 0,
        "final": final,
        "regime": regime[-1] if regime else {},
    }


def pack(out: Path, work: Path, state: dict) -> None:
    """Writes ``results.tar.gz`` and ``summary.md`` under ``out`` (again after each step)."""
    (work / "steps.json").write_text(json.dumps(state, indent=2, default=str))
    tmp = out / "results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work / "steps.json", arcname="steps.json")
        for name in CHECK_FILES:
            path = work / "check_device" / name
            if path.is_file():
                tar.add(path, arcname=f"check_device/{name}")
        for method in state["methods"]:
            run = work / method
            for name in RUN_FILES:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{method}/{name}")
            if (run / "tensorboard").is_dir():
                tar.add(run / "tensorboard", arcname=f"{method}/tensorboard")
    os.replace(tmp, out / "results.tar.gz")
    (out / "summary.md").write_text(summary_markdown(work, state))


def summary_markdown(work: Path, state: dict) -> str:
    lines = [
        "# GPU machine run (benchmarks/device/run.py)",
        "",
        f"- date: {state['date']}; GPU: {state['gpu']}; libraries: {state['libs']}",
        f"- versions: {json.dumps(state['versions'])}",
        f"- command: `{state['command']}`",
        "",
        "| step | rc | seconds | limit s | timed out |",
        "|---|---|---|---|---|",
    ]
    for r in state["steps"]:
        lines.append(
            f"| {r['step']} | {r['rc']} | {r['seconds']} | {r['limit_s']} | {r['timed_out']} |"
        )
    lines += [
        "",
        "| method | epochs planned | epochs done | test acc | train clean acc | test ECE | "
        "test MSP |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, planned in state["epochs"].items():
        got = run_summary(work, method)
        regime, final = got["regime"], got["final"]

        def pct(v):
            return f"{100 * v:.2f}%" if isinstance(v, int | float) else "-"

        lines.append(
            f"| {method} | {planned} | {got['epochs_done']} | "
            f"{pct(final.get('test_accuracy'))} | {pct(regime.get('train_clean_accuracy'))} | "
            f"{pct(regime.get('test_ece'))} | {pct(regime.get('test_msp'))} |"
        )
    report = work / "check_device" / "check_device.md"
    if report.is_file():
        lines += ["", "## experiments.check_device", "", report.read_text()]
    return "\n".join(lines) + "\n"


def one_line(work: Path, state: dict) -> str:
    rows = check_rows(work)
    good = sum("images_per_s" in r for r in rows.values())
    parts = [f"device run: {state['gpu']}", f"libs {state['libs']}"]
    parts.append(f"check_device {good}/{len(rows)} methods ok")
    for method, planned in state["epochs"].items():
        got = run_summary(work, method)
        acc = got["final"].get("test_accuracy")
        parts.append(
            f"{method} {got['epochs_done']}/{planned} epochs"
            + (f", test acc {acc:.4f}" if acc is not None else ", no final.json")
        )
    return "; ".join(parts) + f"; {state['wall_s']:.0f} s"


def train_all(steps: Steps, state: dict, work: Path, out: Path, env: dict, plan: dict) -> None:
    """Trains ``state["methods"]`` at once on the GPU for the time left (less what
    measuring and exporting them needs), then measures and exports them; the epochs
    planned go to ``state["epochs"]``, and ``out`` is packed after each step."""
    methods = state["methods"]
    if not methods:
        return
    env = dict(env)
    if len(methods) > 1:  # JAX takes 75% of the GPU's memory by default
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / len(methods):.2f}"
    limit = steps.left() - min(90.0, 0.3 * steps.left())
    for m in methods:
        state["epochs"][m] = plan["epochs"] or estimate_epochs(
            limit,
            plan["rows"].get(m),
            plan["train_images"],
            fallback=plan["fallback_epochs"],
            most=2 if plan["preset"] == "smoke" else PAPER_EPOCHS,
            sharing=len(methods),
        )
    options = {k: plan[k] for k in ("preset", "train_images", "on_device")}
    jobs = [
        (f"train {m}", train_command(m, work / m, epochs=state["epochs"][m], **options), env)
        for m in methods
    ]
    steps.run_together(jobs, limit)
    pack(out, work, state)
    measure = [sys.executable, "-m", "experiments.study.regime", "measure"]
    jobs = [(f"measure {m}", [*measure, f"--workdir={work / m}"], env) for m in methods]
    steps.run_together(jobs, max(15.0, steps.left() - 30))
    pack(out, work, state)
    runs = [f"--run={m}={work / m}" for m in methods]
    steps.run("export", [*EXPORT, f"--to={out / 'weights'}", *runs], env, max(20.0, steps.left()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device.run", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--site", default="/tmp/site", help="where run.sh installed the wheels")
    p.add_argument("--work", default="/tmp/ood_jax_device", help="workdirs (not returned)")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole command's time")
    p.add_argument("--check_minutes", type=float, default=2.5, help="check_device's cap")
    p.add_argument("--methods", default="ce,logitnorm", help="trained ('' = none: the check)")
    p.add_argument("--epochs", type=int, default=0, help="fixed epochs (0 = estimate)")
    p.add_argument("--fallback_epochs", type=int, default=10, help="without an estimate")
    p.add_argument("--train_limit", type=int, default=10_000, help="the carried training images")
    p.add_argument("--on_device", action="store_true", help="config.data.on_device=true")
    p.add_argument("--skip_check", action="store_true", help="no check_device step")
    p.add_argument("--smoke", action="store_true", help="CPU: the smoke preset, 2 epochs")
    p.add_argument("--versions", action="store_true", help="print the versions, as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.versions:
        print(json.dumps(versions()))
        return 0
    start = time.monotonic()
    out, site = Path(args.out), Path(args.site)
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, start + 60 * args.minutes - RESERVE_S)
    methods = [m for m in args.methods.split(",") if m]
    state = {
        "command": shlex.join(["python", "-m", "benchmarks.device.run", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": gpu_name(),
        "libs": None,
        "versions": {},
        "methods": methods,
        "epochs": {},
        "steps": steps.records,
        "wall_s": 0.0,
    }
    state["libs"] = choose_libs(steps, site, work, state["versions"], smoke=args.smoke)
    pack(out, work, state)
    if state["libs"] is None:
        steps.say("the probe failed with every set of libraries: see run.log; stopping")
        return 1
    env = child_env(site, state["libs"], smoke=args.smoke)
    if not args.skip_check:
        # At least 2 minutes are kept back from the check for the training runs.
        cap = min(60 * args.check_minutes, steps.left() - 120 * bool(methods))
        steps.run("check_device", check_command(work / "check_device", smoke=args.smoke), env, cap)
        pack(out, work, state)
    plan = {
        "preset": "smoke" if args.smoke else "paper",
        "train_images": SMOKE_TRAIN_IMAGES if args.smoke else args.train_limit,
        "epochs": args.epochs,
        "fallback_epochs": args.fallback_epochs,
        "on_device": args.on_device,
        "rows": check_rows(work),
    }
    state["plan"] = {k: v for k, v in plan.items() if k != "rows"}
    train_all(steps, state, work, out, env, plan)
    state["wall_s"] = time.monotonic() - start
    pack(out, work, state)
    steps.say(one_line(work, state))
    return 0 if all((work / m / "final.json").is_file() for m in methods) else 1


if __name__ == "__main__":
    sys.exit(main())
