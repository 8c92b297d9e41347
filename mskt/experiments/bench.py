"""``mskt bench``: training and inference throughput at each dataset's real shapes.

For every preset (full feature dims and sequence lengths of MOSI, MOSEI, IEMOCAP, aligned and
unaligned; synthetic values) and variant, one process measures: train samples/s (forward, loss,
backward, clipping, optimizer step), inference samples/s, peak memory, training FLOPs per sample
(``torch.utils.flop_counter``) and, in the same run, a matrix-multiply peak, so the achieved
fraction of it says how far the model is from what the hardware can do.

``--config paper`` is this project's defaults (d=40, 3 layers per stack, 4 heads, one encoder
layer per modality); ``--config mult`` is the public MulT code's (d=30, 5 cross-modal and memory
layers, 5 heads, batch 24, no modality encoders), for a like-for-like comparison with it.

Timing is noisy on shared machines: compare numbers from one run, never across runs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import torch

from mskt.data.presets import DATA_SHAPES, MODALITIES

CONFIGS = {
    "paper": {},
    # MulT's public code (main.py defaults): nlevels 5, num_heads 5, d 30 per modality, batch 24.
    # Its self-attention after the concatenation has max(nlevels, 3) = 5 layers; it has no
    # modality encoders (a kernel-1 Conv1d projection only).
    "mult": {"d_model": 30, "heads": 5, "crossmodal_layers": 5, "memory_layers": 5, "encoder_layers": 0, "batch_size": 24},
}
PRESET_NAMES = tuple(f"{n}{suffix}" for n in DATA_SHAPES for suffix in ("", "-unaligned"))
PUBLIC_MULT = "mult-public"  # the config name of the public MulT code's records (``--reference``)
RECORD_KEYS = ("preset", "variant", "config", "train_samples_per_s", "infer_samples_per_s", "peak_mem_mb", "train_flops_per_sample")


@dataclass
class Shapes:
    dims: dict
    steps: dict
    task: str


def shapes_for(preset: str) -> Shapes:
    from mskt.errors import ConfigError

    name, _, rest = preset.partition("-")
    if name not in DATA_SHAPES or rest not in ("", "unaligned"):
        raise ConfigError(f"bench preset {preset!r} unknown; allowed: {', '.join(PRESET_NAMES)}")
    shape = DATA_SHAPES[name]
    steps = dict(shape.unaligned_lens) if rest else {m: shape.aligned_len for m in MODALITIES}
    return Shapes(dims=dict(shape.dims), steps=steps, task=shape.task)


def synthetic_batch(shapes: Shapes, batch: int, device, seed: int = 0) -> dict:
    """A full-length batch of random features at the preset's shapes (every step real)."""
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.randn(batch, shapes.steps[m], shapes.dims[m], generator=g).to(device) for m in MODALITIES}
    out["lengths"] = {m: torch.full((batch,), shapes.steps[m], dtype=torch.long, device=device) for m in MODALITIES}
    if shapes.task == "regression":
        out["labels"] = (torch.rand(batch, generator=g) * 6 - 3).to(device)
    else:
        out["labels"] = torch.randint(0, 2, (batch, 4), generator=g).to(device)
    return out


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or on CPU the process's peak
    resident set sampled every few milliseconds above what it was on entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._rss_mb()
        self._top = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._top = max(self._top, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._top, self._rss_mb()) - self._base
        return False


def matmul_peak_flops(device: torch.device, size: int = 1024, seconds: float = 1.0, dtype=torch.float32) -> float:
    """FLOP/s of a large square matmul: what the matrix units deliver here, with these threads."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_sample(model, batch: dict) -> float:
    """FLOPs of one training step (forward + backward) over the batch size. Counted on the explicit
    attention path (``return_attention=True``): the same function as the fused kernels, whose
    CPU implementations the FLOP counter does not know. ``model`` should not be accelerated
    (``mskt.fast``): stacks called without ``return_attention`` (kt's theta, phi and delta) would
    otherwise run the compiled node, which the counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(batch, return_attention=True)
        model.loss(out, batch["labels"])["total"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["labels"])


def bench_config(preset: str, variant: str, config: str = "mult", precision: str = "fp32", compile: bool = False, plugins=()):
    """The run Config of a record: the dataset's preset, then ``config``'s values, at the preset's
    shapes; ``plugins`` register variants of your own (a record's process imports them)."""
    from mskt.config import PRESETS, Config

    shapes = shapes_for(preset)
    base_name = preset.split("-")[0] + ("-unaligned" if preset.endswith("-unaligned") else "")
    values = {**PRESETS.get(base_name, {}), **CONFIGS[config], "variant": variant, "plugins": list(plugins)}
    values.update(text_dim=shapes.dims["text"], audio_dim=shapes.dims["audio"], vision_dim=shapes.dims["vision"],
                  text_steps=shapes.steps["text"], task=shapes.task, precision=precision, compile=compile)
    values.pop("data", None)
    return Config.from_dict(values)


def _built(cfg, device):
    """The model as ``mskt train`` builds it: accelerated by mskt.fast when ``cpu_kernels="fused"``."""
    from mskt.fast import accelerate
    from mskt.model import build_model

    model = build_model(cfg).to(device)
    return accelerate(model) if cfg.cpu_kernels == "fused" else model


def bench_one(preset: str, variant: str, config: str = "mult", steps: int = 10, warmup: int = 3, device=None,
              precision: str = "fp32", compile: bool = False, peak: float | None = None, plugins=()) -> dict:
    """One record: ``preset`` at its real shapes, ``variant``, ``config`` ("paper" or "mult")."""
    from mskt.model import build_model
    from mskt.train import make_optimizer, resolve_device, training_step
    from mskt.train.evaluation import default_test_batch

    device = resolve_device("auto") if device is None else torch.device(device)
    shapes = shapes_for(preset)
    cfg = bench_config(preset, variant, config, precision, compile, plugins)
    torch.manual_seed(0)
    # FLOPs grow linearly with the batch; two samples keep the explicit attention maps small. Torch's
    # operations throughout: the FLOP counter cannot see inside the compiled kernels.
    flops = train_flops_per_sample(build_model(cfg).to(device), synthetic_batch(shapes, 2, device, seed=2))

    with PeakMemory(device) as mem:  # weights, optimizer state, batch and activations
        model = _built(cfg, device)
        batch = synthetic_batch(shapes, cfg.batch_size, device)
        optimizer = make_optimizer(model, cfg)
        train_seconds = _time_steps(training_step(model, optimizer, cfg), batch, steps, warmup, device)

    eval_batch = default_test_batch(model, synthetic_batch(shapes, cfg.eval_batch_size, device, seed=1))
    model.eval()
    n_infer, infer_seconds = _time_inference(model, eval_batch, steps * cfg.batch_size, device)
    from mskt.fast.build import compiled_kernels

    kernels = "fused" if cfg.cpu_kernels == "fused" and device.type == "cpu" and compiled_kernels() is not None else "torch"
    return _record(preset, variant, config, steps * cfg.batch_size / train_seconds, n_infer / infer_seconds, mem.peak_mb,
                   flops, cfg.batch_size, device, precision, peak, kernels)


def _record(preset, variant, config, train_rate, infer_rate, peak_mem_mb, flops, batch_size, device, precision, peak, cpu_kernels) -> dict:
    """A benchmark record (RECORD_KEYS and the run's settings, among them ``cpu_kernels``: "fused"
    when the compiled CPU kernels ran, else "torch"); with ``peak``, the achieved FLOP/s and its
    fraction of that matmul peak."""
    record = {
        "preset": preset,
        "variant": variant,
        "config": config,
        "train_samples_per_s": train_rate,
        "infer_samples_per_s": infer_rate,
        "peak_mem_mb": peak_mem_mb,
        "train_flops_per_sample": flops,
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "cpu_kernels": cpu_kernels,
    }
    if peak:
        record["matmul_peak_gflops"] = peak / 1e9
        record["achieved_gflops"] = flops * train_rate / 1e9
        record["peak_fraction"] = flops * train_rate / peak
    return record


def _time_steps(step, batch: dict, steps: int, warmup: int, device) -> float:
    """Seconds for ``steps`` training steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _sync(device)
    return time.perf_counter() - start


def _time_inference(forward, batch: dict, samples: int, device) -> tuple[int, float]:
    """(samples predicted, seconds) for at least ``samples`` samples in inference mode."""
    n = len(batch["labels"])
    with torch.inference_mode():
        for _ in range(2):
            forward(batch)
        _sync(device)
        start = time.perf_counter()
        done = 0
        while done < max(samples, n):
            forward(batch)
            done += n
        _sync(device)
        return done, time.perf_counter() - start


def bench_public_mult(preset: str, steps: int = 10, warmup: int = 3, device=None, peak: float | None = None) -> dict:
    """The record of the public MulT code's training step (:mod:`mskt.experiments.mult_reference`, its
    hyperparameters: d=30, 5 layers, 5 heads, batch 24; all three modalities) at ``preset``'s
    shapes: the baseline of the speed targets, timed like every other record."""
    from torch.utils.flop_counter import FlopCounterMode

    from mskt.experiments import mult_reference
    from mskt.train import resolve_device

    device = resolve_device("auto") if device is None else torch.device(device)
    shapes = shapes_for(preset)
    batch_size = CONFIGS["mult"]["batch_size"]
    n_outputs = 1 if shapes.task == "regression" else 8
    build = lambda: mult_reference.MULTModel(shapes.dims, n_outputs=n_outputs).to(device)
    torch.manual_seed(0)
    model, small = build().train(), synthetic_batch(shapes, 2, device, seed=2)
    with FlopCounterMode(display=False) as counter:
        model(small["text"], small["audio"], small["vision"]).sum().backward()
    flops = counter.get_total_flops() / 2
    with PeakMemory(device) as mem:
        model = build().train()
        batch = synthetic_batch(shapes, batch_size, device)
        train_seconds = _time_steps(mult_reference.training_step(model, shapes.task), batch, steps, warmup, device)
    model.eval()
    eval_batch = synthetic_batch(shapes, 256, device, seed=1)
    forward = lambda b: model(b["text"], b["audio"], b["vision"])
    n_infer, infer_seconds = _time_inference(forward, eval_batch, steps * batch_size, device)
    return _record(preset, "full", PUBLIC_MULT, steps * batch_size / train_seconds, n_infer / infer_seconds, mem.peak_mb,
                   flops, batch_size, device, "fp32", peak, "torch")  # the public code's own operations


def interleaved_speedup(preset: str, variant: str = "full", config: str = "mult", rounds: int = 8, steps: int = 3, device=None,
                        plugins=()) -> dict:
    """The training speed-up over the public MulT code measured in one process, alternating: each
    round times ``steps`` steps of each (the order flipping every round) and gives one ratio of
    samples/s, so a machine that slows down or speeds up mid-run moves both sides of a ratio alike.
    Returns ``{"median": ..., "rounds": [...]}``: the median ratio and every round's."""
    import statistics

    from mskt.experiments import mult_reference
    from mskt.train import make_optimizer, resolve_device, training_step

    device = resolve_device("auto") if device is None else torch.device(device)
    shapes = shapes_for(preset)
    cfg = bench_config(preset, variant, config, plugins=plugins)
    torch.manual_seed(0)
    model = _built(cfg, device)
    ours = training_step(model, make_optimizer(model, cfg), cfg)
    public_model = mult_reference.MULTModel(shapes.dims, n_outputs=1 if shapes.task == "regression" else 8).to(device).train()
    public = mult_reference.training_step(public_model, shapes.task)
    batch = synthetic_batch(shapes, CONFIGS["mult"]["batch_size"], device)
    for step in (ours, public):
        for _ in range(2):
            step(batch)
    ratios = []
    for r in range(rounds):
        order = (ours, public) if r % 2 == 0 else (public, ours)
        seconds = {step: _time_steps(step, batch, steps, 0, device) for step in order}
        ratios.append(seconds[public] / seconds[ours])  # same samples on both sides: the ratio of samples/s
    return {"median": statistics.median(ratios), "rounds": ratios}


def run_bench(presets=("mosi", "mosi-unaligned"), variants=("full", "kt"), config: str = "mult", steps: int = 10,
              device=None, precision: str = "fp32", compile: bool = False, log=None, isolate: bool = True,
              reference: bool = False, rounds: int = 0, plugins=()) -> list[dict]:
    """Every preset x variant (see :func:`bench_one`, each in its own process unless
    ``isolate=False``), with one matmul peak measured first. ``reference``: first, for each preset,
    the public MulT code's record (:func:`bench_public_mult`), and each record of that preset gets
    ``speedup_vs_public_mult``, the ratio of training samples/s measured in this same run.
    ``rounds`` (with ``reference``, fp32): each record also gets ``speedup_interleaved`` and
    ``speedup_interleaved_rounds`` from :func:`interleaved_speedup` (``rounds`` alternating rounds
    of ``steps`` steps, in a process of their own): on a machine whose speed drifts, the ratio to trust.
    ``plugins``: modules or files registering variants of your own, imported by each record's process."""
    from mskt.train import resolve_device

    log = log or (lambda line: print(line, flush=True))  # each line as soon as it is measured
    device = resolve_device("auto") if device is None else torch.device(device)
    peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_flops(device, dtype=peak_dtype)
    log(f"matmul peak ({device}, {torch.get_num_threads()} threads, {precision}): {peak / 1e9:.1f} GFLOP/s")
    run = lambda fn, kwargs: _isolated(fn, kwargs, torch.get_num_threads()) if isolate else fn(**kwargs)
    records = []
    for preset in presets:
        baseline = None
        if reference:
            baseline = run(bench_public_mult, dict(preset=preset, steps=steps, device=str(device), peak=peak))
            records.append(baseline)
            log(format_record(baseline))
        for variant in variants:
            kwargs = dict(preset=preset, variant=variant, config=config, steps=steps, device=str(device), precision=precision, compile=compile, peak=peak,
                          plugins=tuple(plugins))
            record = run(bench_one, kwargs)
            if baseline is not None:
                record["speedup_vs_public_mult"] = record["train_samples_per_s"] / baseline["train_samples_per_s"]
                if rounds and precision == "fp32" and not compile:
                    measured = run(interleaved_speedup, dict(preset=preset, variant=variant, config=config, rounds=rounds, steps=steps, device=str(device),
                                                             plugins=tuple(plugins)))
                    record["speedup_interleaved"], record["speedup_interleaved_rounds"] = measured["median"], measured["rounds"]
            records.append(record)
            log(format_record(record))
    return records


def _bench_in_child(args) -> dict:
    fn, kwargs, threads = args
    torch.set_num_threads(threads)
    return fn(**kwargs)


def _isolated(fn, kwargs: dict, threads: int) -> dict:
    """``fn(**kwargs)`` (a record function of this module) in a fresh process: memory the allocator
    kept from an earlier record (the CPU measure is resident memory) cannot hide this one's peak,
    no allocator setting of one record carries over to the next, and nothing warms up for the next."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bench_in_child, ((fn, kwargs, threads),))


def format_record(r: dict) -> str:
    speedup = f"  {r['speedup_vs_public_mult']:.2f}x public MulT" if "speedup_vs_public_mult" in r else ""
    if "speedup_interleaved" in r:
        speedup += f" ({r['speedup_interleaved']:.2f}x interleaved)"
    return (
        f"{r['preset']:<16} {r['variant']:<16} {r['config']:<11} train {r['train_samples_per_s']:8.1f}/s  "
        f"infer {r['infer_samples_per_s']:8.1f}/s  peak mem {r['peak_mem_mb']:7.1f} MB  "
        f"{r['train_flops_per_sample'] / 1e6:8.1f} MFLOP/sample  {100 * r.get('peak_fraction', math.nan):5.1f}% of matmul peak{speedup}"
    )


def to_markdown(records: list[dict]) -> str:
    """The records as a Markdown table; with a ``x public MulT`` column when a reference was measured."""
    ratio = any("speedup_vs_public_mult" in r for r in records)
    interleaved = any("speedup_interleaved" in r for r in records)
    head = "| preset | variant | config | train samples/s | infer samples/s | peak mem MB | train MFLOP/sample | % of matmul peak |"
    head += (" train x public MulT |" if ratio else "") + (" interleaved, median |" if interleaved else "")
    lines = [head, "|---" * (8 + ratio + interleaved) + "|"]
    for r in records:
        line = (
            f"| {r['preset']} | {r['variant']} | {r['config']} | {r['train_samples_per_s']:.1f} | {r['infer_samples_per_s']:.1f} | "
            f"{r['peak_mem_mb']:.0f} | {r['train_flops_per_sample'] / 1e6:.1f} | {100 * r.get('peak_fraction', math.nan):.1f} |"
        )
        if ratio:
            line += f" {r['speedup_vs_public_mult']:.2f} |" if "speedup_vs_public_mult" in r else " 1 |"
        if interleaved:
            line += f" {r['speedup_interleaved']:.2f} |" if "speedup_interleaved" in r else " |"
        lines.append(line)
    return "\n".join(lines)
