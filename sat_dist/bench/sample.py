"""`sat-dist bench-sample PIPELINE --world N --layouts tp,sp,cfg ...`: the CogVideoX engine's parallel
layouts (TP, Ulysses SP, CFG parallel) timed side by side on the same pipeline, prompt and seed.

For each layout, in the order given, `N` fresh ranks are forked (the fork server of `sat_dist.bench`:
nothing the parent did is inherited) and each runs `load_engine(PIPELINE, tp=, sp=, cfg_parallel=)`,
one untimed warm-up sample, then `--repeat` timed samples of the same prompt and seed (each after a
barrier). Per layout: seconds per step (the median over every step of every timed sample, the slowest
work-group leader per step: ranks of a group move in lock-step), encode and decode seconds (median over
the samples, slowest leader), the total of a sample (median, slowest rank), the engine's load seconds
(`EngineReport.seconds_load`, slowest rank, in a fresh process), the bytes each rank sends per step by
kind when the run report carries them (`RunRecord.comm_bytes`, the busiest rank's; shown only if
present), the final latents' largest difference to the first layout's (relative to its max |latent|;
the frames' too in the JSON), and ratios to the first layout. A layout the engine refuses
(its own ConfigError: heads, world, token rows) is shown as skipped with the engine's message.

`--tiny KIND` writes a pipeline first (diffusers' and transformers' `save_pretrained`, random weights,
nothing downloaded): `5b` / `2b` are 12-head, 4-layer DiTs at 17x128x192 (a step ~0.1-1 s on a CPU;
TP 1-4, and SP 1-4 at TP 1, divide the heads; 8 token rows), `mini` is the demo's pipeline
(sat_dist/demo_pipeline.py: 4 heads, ms per step).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

MIB = 1 << 20
PROMPT = "a red panda eating bamboo by a river"
PRELOAD = ("torch", "sat_dist.bench.sample")
_ON, _OFF = ("on", "1", "true", "yes", "cfg"), ("off", "0", "false", "no", "")


# --- layouts --------------------------------------------------------------------------------------

def parse_layout(text: str) -> tuple[int, int, bool]:
    """'tp,sp,cfg' (cfg: on|off) -> (tp, sp, cfg_parallel)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 2:
        parts.append("off")
    try:
        tp, sp, cfg = int(parts[0]), int(parts[1]), parts[2].lower()
        if len(parts) != 3 or tp < 1 or sp < 1 or cfg not in _ON + _OFF:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"layout {text!r}: expected tp,sp,cfg with cfg on|off (e.g. 2,1,off)") from None
    return tp, sp, cfg in _ON


def layout_name(tp: int, sp: int, cfg: bool) -> str:
    return f"{tp},{sp},{'on' if cfg else 'off'}"


# --- the tiny pipeline ----------------------------------------------------------------------------

TINY_KINDS = ("5b", "2b", "mini")
TINY_SIZE = (17, 128, 192)  # frames, height, width the 5b/2b bench pipelines sample at


def write_tiny_pipeline(root: str, kind: str = "5b", seed: int = 0) -> str:
    """A CogVideoX pipeline folder at `root` for the bench (see module docstring); returns `root`:
    `mini` is the demo's, `5b`/`2b` the same writer at 12 heads, 4 layers and TINY_SIZE."""
    from ..demo_pipeline import TinySpec, write_demo_pipeline

    if kind not in TINY_KINDS:
        raise ValueError(f"--tiny {kind!r}: one of {', '.join(TINY_KINDS)}")
    if kind == "mini":
        return write_demo_pipeline(root, seed)
    frames, height, width = TINY_SIZE
    return write_demo_pipeline(root, seed, TinySpec(
        heads=12, head_dim=32, layers=4, time_embed_dim=64, frames=frames, dit_hw=(height // 8, width // 8),
        vae_hw=(height, width), rope=kind == "5b", dit_scale=0.05, ddim=kind == "2b"))


# --- one rank -------------------------------------------------------------------------------------

def _barrier(engine) -> None:
    from .. import collectives as C

    C.all_gather_objects(None, engine.rt.ctrl_group)


def _sync(engine) -> None:
    import torch

    if engine.rt.device.type == "cuda":
        torch.cuda.synchronize(engine.rt.device)


def run_layout_rank(rank: int, path: str, world: int, tp: int, sp: int, cfg: bool, opts: dict) -> dict:
    """One rank of one layout, in a fresh process: load, one warm-up sample, `repeat` timed ones."""
    import torch

    import sat_dist
    from ..engine.report import RunRecord
    from ..errors import ConfigError

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    kw = {k: opts[k] for k in ("num_frames", "height", "width") if opts.get(k)}
    kw.update(num_steps=opts["steps"], seed=opts["seed"])
    try:
        t0 = time.perf_counter()
        try:
            engine = sat_dist.load_engine(path, tp=tp, sp=sp, cfg_parallel=cfg, device=opts.get("device"))
        except ConfigError as exc:  # the engine's own refusal, before anything is loaded: on every rank alike
            return {"skipped": str(exc)}
        load_wall = time.perf_counter() - t0
        try:
            engine.run(opts["prompt"], **kw)  # warm-up, untimed
        except ConfigError as exc:  # checked before any step (sizes, token rows), on every rank alike
            return {"skipped": str(exc)}
        totals, frames, latents = [], None, None
        for _ in range(opts["repeat"]):
            _barrier(engine)
            t = time.perf_counter()
            frames, latents = engine.run(opts["prompt"], **kw)
            _sync(engine)
            totals.append(time.perf_counter() - t)
        runs = [asdict(r) if isinstance(r, RunRecord) else dict(r) for r in engine.report.runs[1:]]
        comm = getattr(engine, "comm", None)  # bytes sent per run where the engine counts them
        mesh = engine.rt.mesh
        out = {"rank": rank, "leader": engine.leader, "runs": runs, "totals": totals, "load_wall": load_wall,
               "seconds_load": engine.report.seconds_load,
               "comm": [dict(c) for c in comm[1:]] if isinstance(comm, list) else None,
               "mesh": {"tp": mesh.tp, "sp": mesh.sp, "cfg": mesh.cfg, "work_groups": mesh.work_groups,
                        "device": str(engine.rt.device)}}
        if rank == 0:
            out["latents"] = latents.detach().float().cpu().numpy()  # numpy: a tensor would cross by shared fd
            if frames is not None and frames.size <= opts.get("max_frames_elems", 1 << 24):
                out["frames"] = frames
        return out
    finally:
        sat_dist.shutdown()


# --- results --------------------------------------------------------------------------------------

@dataclass
class LayoutResult:
    layout: str
    tp: int
    sp: int
    cfg: bool
    skipped: Optional[str] = None
    failed: bool = False
    mesh: dict = field(default_factory=dict)
    seconds_per_step: Optional[float] = None
    seconds_encode: Optional[float] = None
    seconds_decode: Optional[float] = None
    seconds_total: Optional[float] = None
    seconds_load: Optional[float] = None
    steps_timed: int = 0
    bytes_per_step: Optional[dict] = None  # kind -> bytes the busiest rank sent per step (when counted)
    latents_vs_first: Optional[float] = None  # max |latents - first layout's| / max |first layout's|
    frames_vs_first: Optional[float] = None  # max |frames - first layout's| (frames in [0, 1])
    latents_shape: Optional[list] = None
    frames_shape: Optional[list] = None
    runs: list = field(default_factory=list)  # the leaders' timed RunRecords (as dicts)


def _med(xs: Sequence[float]) -> Optional[float]:
    return round(statistics.median(xs), 4) if xs else None


def summarize(res: LayoutResult, values: list[dict]) -> tuple:
    """Fill `res` from every rank's returned dict; returns (latents, frames) of rank 0."""
    leaders = [v for v in values if v["runs"]]
    repeat = len(values[0]["totals"])
    steps = []
    for r in range(repeat):
        per = [v["runs"][r]["seconds_per_step"] for v in leaders]
        steps += [max(col) for col in zip(*per)]  # the slowest leader, step by step
    res.steps_timed = len(steps)
    res.seconds_per_step = _med(steps)
    res.seconds_encode = _med([max(v["runs"][r]["seconds_encode"] for v in leaders) for r in range(repeat)])
    res.seconds_decode = _med([max(v["runs"][r]["seconds_decode"] for v in leaders) for r in range(repeat)])
    res.seconds_total = _med([max(v["totals"][r] for v in values) for r in range(repeat)])
    res.seconds_load = round(max(v["seconds_load"] for v in values), 4)
    res.mesh = values[0]["mesh"]
    res.runs = [run for v in leaders for run in v["runs"]]
    per_step = [c.get("per_step") for v in values for c in (v.get("comm") or []) if isinstance(c, dict)]
    per_step = [p for p in per_step if isinstance(p, dict)]
    if not per_step:  # or the leaders' records, where only they carry it
        per_step = [r.get("comm_bytes", {}).get("per_step") for r in res.runs if isinstance(r.get("comm_bytes"), dict)]
        per_step = [p for p in per_step if isinstance(p, dict)]
    if per_step:
        kinds = sorted({k for p in per_step for k in p})
        res.bytes_per_step = {k: max(int(p.get(k, 0)) for p in per_step) for k in kinds}
    lat, frames = values[0].get("latents"), values[0].get("frames")
    res.latents_shape = list(lat.shape) if lat is not None else None
    res.frames_shape = list(frames.shape) if frames is not None else None
    return lat, frames


@dataclass
class SampleBench:
    pipeline: str
    world: int
    steps: int
    repeat: int
    size: dict
    prompt: str
    seed: int
    layouts: list = field(default_factory=list)  # LayoutResult, in the order given
    seconds_wall: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        first = self._first()
        for row, res in zip(d["layouts"], self.layouts):
            row["x_first_per_step"] = _ratio(res.seconds_per_step, first and first.seconds_per_step)
            row["x_first_total"] = _ratio(res.seconds_total, first and first.seconds_total)
        return d

    def _first(self) -> Optional[LayoutResult]:
        first = self.layouts[0] if self.layouts else None
        return first if first is not None and first.skipped is None else None

    def table(self) -> str:
        first = self._first()
        against = self.layouts[0].layout if self.layouts else "-"
        size = "x".join(str(self.size[k]) for k in ("num_frames", "height", "width")) if all(self.size.values()) \
            else "the model's size"
        lines = [f"{self.pipeline}: world {self.world}, {self.steps} steps at {size}, median of {self.repeat} timed "
                 f"sample(s) after one warm-up; slowest rank; ratios against {against}"
                 f"{'' if first else ' (skipped: no ratios)'}",
                 f"{'tp,sp,cfg':<10} {'mesh':<18} {'load s':>7} {'enc s':>7} {'s/step':>8} {'x first':>8} "
                 f"{'dec s':>7} {'total s':>8} {'x first':>8} {'|dlat|/max':>10} {'sent/step/rank':<24}"]
        for res in self.layouts:
            if res.skipped:
                lines.append(f"{res.layout:<10} {'failed' if res.failed else 'skipped'}: {res.skipped}")
                continue
            m = res.mesh
            mesh = f"tp{m['tp']} sp{m['sp']} cfg{m['cfg']} g{m['work_groups']}"
            sent = "-" if res.bytes_per_step is None else " ".join(
                f"{k}={_size(v)}" for k, v in res.bytes_per_step.items() if v) or "0"
            diff = "" if res.latents_vs_first is None else f"{res.latents_vs_first:.1e}"
            x_step = _fmt(_ratio(res.seconds_per_step, first and first.seconds_per_step))
            lines.append(f"{res.layout:<10} {mesh:<18} {res.seconds_load:>7.2f} {res.seconds_encode:>7.3f} "
                         f"{res.seconds_per_step:>8.3f} {x_step:>8} "
                         f"{res.seconds_decode:>7.2f} {res.seconds_total:>8.2f} "
                         f"{_fmt(_ratio(res.seconds_total, first and first.seconds_total)):>8} {diff:>10} {sent:<24}")
            if res.cfg and m["cfg"] != 2:
                n = self.world // (m["tp"] * m["sp"])
                lines.append(f"{'':<10} (cfg on asked: {n} replica{'s' if n > 1 else ''}, an odd count, do not pair; "
                             f"the engine runs sequential CFG)")
        return "\n".join(lines)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def _size(n: int) -> str:
    return f"{n / MIB:.2f}MiB" if n >= MIB else f"{n / 1024:.1f}KiB" if n >= 1024 else f"{n}B"


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def run_sample_bench(path: str, world: int, layouts: Sequence[str], steps: int = 4, repeat: int = 1,
                     num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                     prompt: str = PROMPT, seed: int = 42, device: Optional[str] = None, timeout_s: float = 1800.0,
                     log: Callable[[str], None] = print) -> SampleBench:
    from . import start_ranks

    t_all = time.perf_counter()
    size = {"num_frames": num_frames, "height": height, "width": width}
    bench = SampleBench(path, world, steps, repeat, size, prompt, seed)
    opts = {**size, "steps": steps, "repeat": repeat, "prompt": prompt, "seed": seed, "device": device}
    ref = None  # the first layout's (latents, frames)
    for text in layouts:
        tp, sp, cfg = parse_layout(text)
        res = LayoutResult(layout_name(tp, sp, cfg), tp, sp, cfg)
        bench.layouts.append(res)
        t = time.perf_counter()
        out = start_ranks(world, (path, world, tp, sp, cfg, opts), timeout_s, target=run_layout_rank, preload=PRELOAD)
        bad = [(r, err) for r, (_, err) in enumerate(out) if err]
        if bad:
            res.skipped, res.failed = f"failed on rank {bad[0][0]}: {bad[0][1]}", True
        elif any("skipped" in v for v, _ in out):
            res.skipped = next(v["skipped"] for v, _ in out if "skipped" in v)
        else:
            lat, frames = summarize(res, [v for v, _ in out])
            if ref is None and bench.layouts[0] is res:
                ref = (lat, frames)
            elif ref is not None:
                import numpy as np

                if lat is not None and ref[0] is not None and lat.shape == ref[0].shape:
                    res.latents_vs_first = float(np.abs(lat - ref[0]).max() / max(float(np.abs(ref[0]).max()), 1e-30))
                if frames is not None and ref[1] is not None and frames.shape == ref[1].shape:
                    res.frames_vs_first = float(np.abs(frames.astype(np.float64) - ref[1]).max())
        what = ("failed" if res.failed else "skipped") if res.skipped else f"{res.seconds_per_step:.3f} s/step"
        log(f"{res.layout}: {what} ({time.perf_counter() - t:.1f}s with the fork and load)")
    bench.seconds_wall = round(time.perf_counter() - t_all, 2)
    return bench


# --- the command ----------------------------------------------------------------------------------

def cmd_bench_sample(args) -> int:
    path = args.pipeline
    if args.tiny:
        if not path:
            path = os.path.join(tempfile.mkdtemp(prefix="sat_dist_bench_sample_"), f"tiny-{args.tiny}")
        if not os.path.exists(os.path.join(path, "model_index.json")):
            t = time.perf_counter()
            write_tiny_pipeline(path, args.tiny)
            print(f"wrote a tiny '{args.tiny}' pipeline to {path} in {time.perf_counter() - t:.1f}s", flush=True)
    elif not path:
        print("sat-dist bench-sample: give a PIPELINE folder, or --tiny KIND to write one", file=sys.stderr)
        return 2
    try:
        for text in args.layouts:
            parse_layout(text)
    except ValueError as exc:
        print(f"sat-dist bench-sample: {exc}", file=sys.stderr)
        return 2
    bench = run_sample_bench(path, args.world, args.layouts, args.steps, args.repeat, args.frames, args.height,
                             args.width, seed=args.seed, device=args.device)
    print(bench.table(), flush=True)
    print(f"wall {bench.seconds_wall:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.to_dict(), f, indent=2)
    failed = [r.layout for r in bench.layouts if r.failed]
    if failed:
        print(f"sat-dist bench-sample: {', '.join(failed)} failed (see the table)", file=sys.stderr, flush=True)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench-sample", help="time the CogVideoX engine's TP / SP / CFG-parallel layouts side by side")
    p.add_argument("pipeline", nargs="?", default=None,
                   help="a diffusers CogVideoX pipeline folder (with --tiny: where to write one; default a temp dir)")
    p.add_argument("--world", type=int, required=True, help="ranks to fork on this machine, for every layout")
    p.add_argument("--layouts", nargs="+", required=True, metavar="TP,SP,CFG",
                   help="layouts to compare, e.g. 2,1,off 1,2,off 1,1,on (ratios against the first)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per sample (default 4)")
    p.add_argument("--frames", type=int, default=None, help="frames (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="width (default: the model's)")
    p.add_argument("--repeat", type=int, default=1, help="timed samples per layout, after one warm-up (default 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--tiny", choices=TINY_KINDS, default=None,
                   help="write a tiny random-weight pipeline first (5b/2b: ~0.1-1 s a step on a CPU; mini: the demo's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every layout's numbers here")
