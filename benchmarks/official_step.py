"""Side by side: the official BK-SDM training step against ``bksdm distill``'s, uncached and cached, same settings.

Each program runs in its own process, one at a time, alternating their order on every round, each on one torch
thread, fp32, batch 1, EMA on, the same plan (bk-small), teacher folder, images and resolution. The step time is
what a user waits for: the interval between two updates of the program's own progress bar (data loading,
encoders, teacher and student, backward, clipping, optimizer, EMA and logging all included), timed by a
``tqdm`` subclass put in place before the program imports it. The first ``--warmup`` steps are left out; the
process stops itself right after the last timed step (the final save is not a step). Inside each step the
harness also times the parts it can see from outside either program, wrapping class methods without changing
them: data loading, VAE encode, text encoder, teacher forward, student forward, backward, gradient clipping,
optimizer step, EMA update; "other" is the rest (noise, losses, hooks' reads, logging).

Preparing the official script (``Nota-NetsPresso/BK-SDM``, ``src/kd_train_text_to_image.py``): one edit,
accelerate's ``Accelerator`` no longer takes ``logging_dir`` (it is ``project_dir`` now)::

    git -C BK-SDM show HEAD:src/kd_train_text_to_image.py \\
        | sed 's/logging_dir=logging_dir,/project_dir=logging_dir,/' > /tmp/official/kd_train_text_to_image.py
    git -C BK-SDM show HEAD:src/unet_config/bk_small/config.json > /tmp/official/unet_config/bk_small/config.json

The other adaptation, torchvision's transforms (torchvision cannot be installed beside this torch), is done
here: the harness gives the script a small ``torchvision.transforms`` of its own (Resize, CenterCrop,
RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize: the operations the script uses, on PIL images,
as torchvision defines them). It also sets the script's ``valid_prompt`` to None: its validation runs at
dataloader step 0 whatever ``--valid_steps`` says (25-step generations of 4 images inside the first step).

Usage::

    python benchmarks/official_step.py --official /tmp/official/kd_train_text_to_image.py \\
        --unet-config /tmp/official/unet_config --teacher TEACHER --data DATA --resolution 256

``TEACHER`` is a diffusers SD-v1.4 folder (random weights are fine: ``benchmarks/real_scale.py`` builds one
offline); ``DATA`` an image folder with ``metadata.csv`` (``file_name``, ``text``), which both programs read. The
cached program trains from ``bksdm cache`` of the same folder (made once, first; not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

PROGRAMS = ("official", "uncached", "cached")
SEED = 1234


# ------------------------------------------------------------------------------------ worker side


class _Clock:
    """Per-part seconds of the step in progress, and every finished step's record."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.steps: list[dict[str, Any]] = []
        self.depth = 0  # only the outermost timed part counts (a teacher forward inside an encode, ...)

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds


CLOCK = _Clock()


def _timed(part: str | Any, fn: Any) -> Any:
    """``fn`` with its calls timed into CLOCK under ``part`` (a name, or a function of the call's self)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if CLOCK.depth:
            return fn(*args, **kwargs)
        CLOCK.depth += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CLOCK.depth -= 1
            name = part(args[0]) if callable(part) else part
            CLOCK.add(name, time.perf_counter() - start)

    wrapper.__wrapped__ = fn
    return wrapper


_SIZES: dict[int, int] = {}


def _unet_part(module: Any) -> str:
    size = _SIZES.get(id(module))
    if size is None:
        size = _SIZES[id(module)] = sum(p.numel() for p in module.parameters())
    # The teacher is the larger U-Net (859.5 M for SD-v1.4; bk-small is 482.3 M).
    return "teacher_forward" if size == max(_SIZES.values()) and len(_SIZES) > 1 else "student_forward"


def _install_probes(result: Path, warmup: int) -> None:
    """Timing wrappers around the parts of a step, and the progress bar that closes each step."""
    import torch
    import tqdm.auto
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    from transformers import CLIPTextModel

    _BaseDataLoaderIter.__next__ = _timed("data_loading", _BaseDataLoaderIter.__next__)
    AutoencoderKL.encode = _timed("vae_encode", AutoencoderKL.encode)
    CLIPTextModel.forward = _timed("text_encoder", CLIPTextModel.forward)
    UNet2DConditionModel.forward = _timed(_unet_part, UNet2DConditionModel.forward)
    Accelerator.backward = _timed("backward", Accelerator.backward)
    torch.nn.utils.clip_grad_norm_ = _timed("clip_grad_norm", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = _timed("optimizer_step", torch.optim.AdamW.step)
    EMAModel.step = _timed("ema_update", EMAModel.step)

    base = tqdm.auto.tqdm

    class StepBar(base):  # type: ignore[misc, valid-type]
        """The program's progress bar: each update closes a step."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._tick, self._cpu_tick = time.perf_counter(), time.process_time()
            desc = getattr(self, "desc", None)  # (a disabled bar has no attributes)
            self._steps_bar = getattr(self, "total", None) is not None and desc == "distill"

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            super().set_description(desc, refresh)
            if desc == "Steps":  # the official script's bar
                self._steps_bar = True
                self._tick, self._cpu_tick = time.perf_counter(), time.process_time()
                CLOCK.parts = {}

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if not getattr(self, "_steps_bar", False):
                return out
            now, cpu = time.perf_counter(), time.process_time()
            # CPU seconds of the process (one thread): what the step costs whatever else shares the cores.
            CLOCK.steps.append(
                {"seconds": now - self._tick, "cpu_seconds": cpu - self._cpu_tick, "parts": dict(CLOCK.parts)}
            )
            CLOCK.parts = {}
            self._tick, self._cpu_tick = now, cpu
            if self.total is not None and self.n >= self.total:
                _finish(result, warmup)
            return out

    tqdm.auto.tqdm = StepBar


def _finish(result: Path, warmup: int) -> None:
    """Writes the step records and ends the process at once (the final save is not part of a step)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"steps": CLOCK.steps, "warmup": warmup, "peak_rss_bytes": rss, "loadavg_end": os.getloadavg()}
    result.write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _torchvision_transforms() -> types.ModuleType:
    """The few torchvision transforms the official script uses, on PIL images, as torchvision defines them."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    module = types.ModuleType("torchvision.transforms")

    class InterpolationMode:
        BILINEAR = Image.BILINEAR
        BICUBIC = Image.BICUBIC
        NEAREST = Image.NEAREST

    class Compose:
        def __init__(self, ops: list) -> None:
            self.ops = ops

        def __call__(self, x: Any) -> Any:
            for op in self.ops:
                x = op(x)
            return x

    class Resize:
        """The shorter side to ``size``, the other keeping the aspect ratio (truncated, as torchvision does)."""

        def __init__(self, size: int, interpolation: Any = Image.BILINEAR) -> None:
            self.size, self.interpolation = size, interpolation

        def __call__(self, image: Any) -> Any:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return image
            new_short, new_long = self.size, int(self.size * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            return image.resize(size, self.interpolation)

    class CenterCrop:
        def __init__(self, size: int) -> None:
            self.size = size

        def __call__(self, image: Any) -> Any:
            w, h = image.size
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            return image.crop((left, top, left + self.size, top + self.size))

    class RandomCrop:
        def __init__(self, size: int) -> None:
            self.size = size

        def __call__(self, image: Any) -> Any:
            w, h = image.size
            top = int(torch.randint(0, h - self.size + 1, (1,)))
            left = int(torch.randint(0, w - self.size + 1, (1,)))
            return image.crop((left, top, left + self.size, top + self.size))

    class RandomHorizontalFlip:
        def __init__(self, p: float = 0.5) -> None:
            self.p = p

        def __call__(self, image: Any) -> Any:
            return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image

    class Lambda:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __call__(self, x: Any) -> Any:
            return self.fn(x)

    class ToTensor:
        def __call__(self, image: Any) -> Any:
            array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)

    class Normalize:
        def __init__(self, mean: list[float], std: list[float]) -> None:
            self.mean, self.std = mean, std

        def __call__(self, x: Any) -> Any:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
            return (x - mean) / std

    for cls in (InterpolationMode, Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, Lambda, ToTensor):
        setattr(module, cls.__name__, cls)
    module.Normalize = Normalize
    del random
    return module


def _official_argv(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        str(args.official),
        *("--pretrained_model_name_or_path", str(args.teacher), "--train_data_dir", str(args.data)),
        *("--use_ema", "--resolution", str(args.resolution), "--center_crop", "--random_flip"),
        *("--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--mixed_precision", "no"),
        *("--learning_rate", "5e-05", "--max_grad_norm", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"),
        *("--max_train_steps", str(args.warmup + args.steps), "--seed", str(SEED), "--checkpointing_steps", "1000000"),
        *(
            "--lambda_sd",
            "1.0",
            "--lambda_kd_output",
            "1.0",
            "--lambda_kd_feat",
            "1.0",
            "--use_copy_weight_from_teacher",
        ),
        *("--unet_config_path", str(args.unet_config), "--unet_config_name", "bk_small"),
        *("--dataloader_num_workers", "0", "--report_to", "tensorboard", "--output_dir", str(out)),
    ]


def _bksdm_argv(args: argparse.Namespace, program: str, out: Path) -> list[str]:
    data = [f"data.cache={args.work / 'cache'}"] if program == "cached" else [f"data.train={args.data}"]
    return [
        "distill",
        f"model.teacher={args.teacher}",
        "model.plan=bk-small",
        *data,
        f"data.resolution={args.resolution}",
        "data.num_workers=0",
        f"train.output_dir={out}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.batch_size=1",
        "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        "train.use_ema=true",
        f"train.seed={SEED}",
        "train.log_every=1",
        "train.checkpoint_every=1000000",
        "train.validate_every=0",
        "train.overwrite=true",
    ]


def worker(args: argparse.Namespace) -> None:
    """One program in this process, timed; writes ``args.result`` and exits after the last step."""
    import torch

    torch.set_num_threads(1)
    out = args.work / f"run-{args.worker}"
    _install_probes(args.result, args.warmup)
    if args.worker == "official":
        import runpy

        import datasets  # noqa: F401  (before the stand-in below: datasets probes for a real torchvision)

        sys.modules["torchvision"] = types.ModuleType("torchvision")
        sys.modules["torchvision.transforms"] = transforms = _torchvision_transforms()
        sys.modules["torchvision"].transforms = transforms  # type: ignore[attr-defined]
        parse = argparse.ArgumentParser.parse_args

        def parse_args(self: argparse.ArgumentParser, *a: Any, **k: Any) -> argparse.Namespace:
            ns = parse(self, *a, **k)
            if hasattr(ns, "valid_prompt"):
                ns.valid_prompt = None  # its validation would run inside step 1 whatever valid_steps says
            return ns

        argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
        sys.argv = _official_argv(args, out)
        runpy.run_path(str(args.official), run_name="__main__")
    else:
        import bksdm.train.distill
        from bksdm.cli import main

        bksdm.train.distill.ema_update = _timed(
            "ema_update", bksdm.train.distill.ema_update
        )  # bksdm's EMAModel.step in place
        main(_bksdm_argv(args, args.worker, out))
    raise SystemExit(f"{args.worker}: the program ended before its last step was timed")


# ------------------------------------------------------------------------------------ driver side


def _uptime() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_one(args: argparse.Namespace, program: str, round_: int) -> dict[str, Any]:
    result = args.work / f"result-{program}-{round_}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", program, "--result", str(result), *args.passthrough]
    load_before = _uptime()
    start = time.perf_counter()
    log_path = args.work / f"log-{program}-{round_}.txt"
    with log_path.open("w") as log_file:
        proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{program} (round {round_}) failed with status {proc.returncode}; log {log_path}:\n{tail}")
    record = json.loads(result.read_text())
    timed = record["steps"][record["warmup"] :]
    record.update(
        program=program,
        round=round_,
        wall_s=wall,
        loadavg_before=load_before,
        times_s=[s["seconds"] for s in timed],
    )
    steps = ", ".join(f"{t:.2f}" for t in record["times_s"])
    rss = record["peak_rss_bytes"] / 2**30
    load = f"load {load_before[0]:.1f} -> {record['loadavg_end'][0]:.1f}"
    log(f"round {round_} {program:<9} steps {steps} s ({load}), peak RSS {rss:.2f} GiB")
    return record


def ensure_cache(args: argparse.Namespace) -> None:
    cache = args.work / "cache"
    if (cache / "manifest.json").is_file() or (cache.is_dir() and any(cache.iterdir())):
        return
    log(f"caching {args.data} at {args.resolution} px into {cache} (not timed)")
    cmd = [
        sys.executable, "-m", "bksdm.cli", "cache", f"data.train={args.data}", f"model.teacher={args.teacher}",
        f"data.resolution={args.resolution}", "data.num_workers=0", "--out", str(cache), "--dtype", "fp32",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def summarize(runs: list[dict[str, Any]], programs: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for program in programs:
        mine = [r for r in runs if r["program"] == program]
        times = [t for r in mine for t in r["times_s"]]
        parts: dict[str, list[float]] = {}
        for r in mine:
            for step in r["steps"][r["warmup"] :]:
                for name, seconds in step["parts"].items():
                    parts.setdefault(name, []).append(seconds)
                other = step["seconds"] - sum(step["parts"].values())
                parts.setdefault("other", []).append(other)
        cpu = [s.get("cpu_seconds") for r in mine for s in r["steps"][r["warmup"] :]]
        table[program] = {
            "s_per_step_median": statistics.median(times),
            "s_per_step_min": min(times),
            "times_s": times,
            # Process CPU seconds per step (one thread): what a step costs, whatever else shares the cores.
            "cpu_s_per_step_median": statistics.median(cpu) if None not in cpu else None,
            "cpu_s_per_step_min": min(cpu) if None not in cpu else None,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
            "parts_median_s": {k: statistics.median(v) for k, v in sorted(parts.items())},
        }
    base = table.get("official")
    for row in table.values():
        if base:
            row["speedup_median"] = base["s_per_step_median"] / row["s_per_step_median"]
            row["speedup_min"] = base["s_per_step_min"] / row["s_per_step_min"]
            if base["cpu_s_per_step_median"] and row["cpu_s_per_step_median"]:
                row["speedup_cpu_median"] = base["cpu_s_per_step_median"] / row["cpu_s_per_step_median"]
    return table


def markdown(record: dict[str, Any]) -> str:
    s, table = record["settings"], record["table"]
    lines = [
        f"official_step: SD-v1.4-sized teacher -> bk-small, {s['resolution']} px, batch 1, fp32, EMA, 1 torch thread; "
        f"{s['steps']} timed steps (+{s['warmup']} warm-up) per run, {s['rounds']} rounds alternating",
        "",
        "| program | s/step median (min) | speed-up vs official, median (min) | CPU s/step median (min) "
        "| speed-up in CPU s | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for program, row in table.items():
        speed = f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}x)" if "speedup_median" in row else "-"
        cpu, cpu_speed = "-", "-"
        if row.get("cpu_s_per_step_median"):
            cpu = f"{row['cpu_s_per_step_median']:.2f} ({row['cpu_s_per_step_min']:.2f})"
            cpu_speed = f"{row['speedup_cpu_median']:.2f}x" if "speedup_cpu_median" in row else "-"
        lines.append(
            f"| {program} | {row['s_per_step_median']:.2f} ({row['s_per_step_min']:.2f}) | {speed} | {cpu} "
            f"| {cpu_speed} | {row['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    names = sorted({n for row in table.values() for n in row["parts_median_s"]})
    lines += ["", "| part (median s per step) | " + " | ".join(table) + " |", "|---|" + "---:|" * len(table)]
    for name in names:
        cells = [f"{row['parts_median_s'].get(name, 0.0):.2f}" for row in table.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    loads = [f"{r['program']} r{r['round']}: {r['loadavg_before'][0]:.1f}" for r in record["runs"]]
    lines += ["", "1-min load average at each run's start: " + ", ".join(loads)]
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="the adapted official kd_train_text_to_image.py")
    parser.add_argument("--unet-config", type=Path, help="the official src/unet_config folder (bk_small/config.json)")
    parser.add_argument("--teacher", type=Path, help="SD-v1.4-sized diffusers folder")
    parser.add_argument("--data", type=Path, help="image folder with metadata.csv (file_name,text)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per program, alternating the order")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated: official, uncached, cached")
    parser.add_argument("--work", type=Path, default=Path("/tmp/official_step"), help="scratch folder")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the code version)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: results/official_step_<res>px.json)")
    parser.add_argument("--merge", type=Path, nargs="+", help="summarize the runs of these result JSONs together")
    parser.add_argument("--worker", choices=PROGRAMS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    if args.merge:
        return args
    if not (args.teacher and args.data):
        parser.error("--teacher and --data are needed")
    if set(args.programs) - set(PROGRAMS) or not args.programs:
        parser.error(f"--programs takes {', '.join(PROGRAMS)}")
    if "official" in args.programs and not args.worker and not (args.official and args.unet_config):
        parser.error("the official program needs --official SCRIPT and --unet-config FOLDER (see the module notes)")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("need --steps >= 1, --warmup >= 1, --rounds >= 1")
    keep = ("--official", "--unet-config", "--teacher", "--data", "--resolution", "--steps", "--warmup", "--work")
    args.passthrough = []
    for flag in keep:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            args.passthrough += [flag, str(value)]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.merge:
        records = [json.loads(path.read_text()) for path in args.merge]
        runs, offset = [], 0
        for rec in records:  # rounds numbered on across the files, in the order given
            runs += [dict(r, round=r["round"] + offset) for r in rec["runs"]]
            offset = max(r["round"] for r in runs) + 1
        record = dict(records[0], runs=runs, label=args.label or records[0]["label"])
        record["settings"] = dict(record["settings"], rounds=offset)
        programs = [p for p in PROGRAMS if any(r["program"] == p for r in record["runs"])]
        record["table"] = summarize(record["runs"], programs)
        record["merged_from"] = [str(p) for p in args.merge]
        print(markdown(record))
        out = args.out or args.merge[0]
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if "cached" in args.programs:
        ensure_cache(args)
    runs = []
    for round_ in range(args.rounds):
        order = args.programs if round_ % 2 == 0 else args.programs[::-1]
        for program in order:
            runs.append(run_one(args, program, round_))
    import platform

    import torch

    record = {
        "benchmark": "official_step",
        "label": args.label,
        "settings": {
            "resolution": args.resolution,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "batch": 1,
            "dtype": "fp32",
            "ema": True,
            "plan": "bk-small",
            "torch_threads": 1,
            "bksdm_onednn": os.environ.get("BKSDM_ONEDNN", "1"),
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name()},
        "runs": runs,
        "table": summarize(runs, args.programs),
    }
    print(markdown(record))
    out = args.out or Path(f"benchmarks/results/official_step_{args.resolution}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
