"""The ``mskt`` command line (also ``python -m mskt``).

    mskt data info PATH                     splits, shapes, lengths, labels, non-finite counts
    mskt data synth --preset mosi [--unaligned] [--scale F] [--seed S] --out PATH.h5
    mskt data convert IN OUT.h5             any supported file -> the mskt feature store
    mskt data align --text T.csd --audio A.csd --vision V.csd --labels L.csd --out OUT.h5
    mskt train --data PATH --variant V [--epochs N] [--seed S] [--out DIR] [--<any config key> VALUE]
    mskt train --resume DIR                 continue an interrupted run; torchrun ... -m mskt train: DDP
    mskt evaluate --run DIR [--data PATH] [--out FILE.json] [--missing audio,vision] [--missing-rate R] [--missing-mode sample|step] [--missing-seed S]
    mskt grid --data PATH --variants full,kt,... --seeds 3 --out DIR [--against kt [--correction holm|bh|none] [--bootstrap N]] [--<any config key> VALUE]
    mskt bench [--presets mosi,mosi-unaligned] [--variants full,kt] [--config paper|mult] [--reference [--rounds R]] [--json PATH]
    mskt notebooks [--smoke] [--only 03] [--param key=value]
    mskt tune --data PATH --variant V --trials N [--study NAME] [--storage URL] [--space FILE] [--prune] [--timeout S] [--<any config key> VALUE]
    mskt tune --finalize --seeds K [--study NAME] [--storage URL] [--threads N]

Expected errors (bad files, bad options) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mskt.errors import MsktError


def _add_config_options(parser: argparse.ArgumentParser, skip=()) -> None:
    """One ``--key`` per Config field and per option of every registered variant (its plugins are
    imported before the parser is built), all parsed as strings and coerced by Config.from_dict."""
    from mskt.config import Config
    from mskt.model import VARIANTS
    from mskt.model.options import option_fields, option_help

    group = parser.add_argument_group("config (any field of mskt.config.Config)")
    for name, f in Config.fields().items():
        if name in skip or name == "plugins":
            continue
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=f"cfg_{name}", metavar=str(f.type).upper(), default=None, help=f"default: {f.default!r}")
    owners = {}  # option -> (field, [variants owning it])
    for variant, cls in VARIANTS.items():
        for name, f in option_fields(cls.Options).items():
            owners.setdefault(name, (f, []))[1].append(variant)
    options = parser.add_argument_group("variant options (each taken only with a variant that owns it)")
    for name, (f, variants) in owners.items():
        flags = ["--" + n.replace("_", "-") for n in (name, *f.metadata.get("aliases", ()))]  # old names still work
        options.add_argument(*flags, dest=f"cfg_{name}", metavar=str(f.type).upper(), default=None,
                             help=f"{', '.join(variants)}: {option_help(f)}")
    _add_plugin_option(parser)
    parser.add_argument("--preset", help="start from a dataset preset (mosi, mosi-unaligned, mosei, ..., see mskt.config.PRESETS)")


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", dest="cfg_plugins", action="append", default=None, metavar="MODULE|FILE.py",
                        help="a module or .py file that registers variants of your own (repeatable; recorded in config.json)")


def _config_from_args(args, split_options: bool = False):
    """The Config the flags describe; with ``split_options``, ``(config, options)``: the variant
    options kept apart (a grid applies each to the variants that own it)."""
    from mskt.config import Config, preset

    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    options = {k: values.pop(k) for k in list(values) if k not in Config.fields()} if split_options else {}
    base = preset(args.preset) if args.preset else None
    cfg = Config.from_dict(values, base=base)
    return (cfg, options) if split_options else cfg


def _dataset_report(ds) -> str:
    lines = [
        f"{ds.meta.source}",
        f"  format {ds.meta.format}, dataset {ds.meta.name}, task {ds.meta.task}, {'aligned' if ds.meta.aligned else 'unaligned'}",
    ]
    summary = ds.summary()
    cols = ["split", "modality", "n", "steps", "dim", "len_min", "len_mean", "len_max", "nonfinite_replaced"]
    lines.append(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    for s, sp in ds.splits.items():
        labels = sp.labels
        if len(sp) == 0:
            lines.append(f"  {s}: 0 samples")
        elif ds.meta.task == "regression":
            lines.append(
                f"  {s}: {len(sp)} samples, labels in [{labels.min():.2f}, {labels.max():.2f}], mean {labels.mean():.3f}, "
                f"std {labels.std():.3f}, {int((labels == 0).sum())} exactly zero"
            )
        else:
            from mskt.data.presets import EMOTIONS

            rates = ", ".join(f"{e} {labels[:, i].mean():.2f}" for i, e in enumerate(EMOTIONS))
            lines.append(f"  {s}: {len(sp)} samples, positive rate: {rates}")
    total = sum(ds.meta.nonfinite.values())
    lines.append(f"  non-finite values replaced by 0: {total}" + (f" ({ds.meta.nonfinite})" if total else ""))
    return "\n".join(lines)


def cmd_data_info(args) -> int:
    path = Path(args.path)
    if path.suffix.lower() == ".csd":
        from mskt.data.csd import csd_summary, format_csd_summary

        print(format_csd_summary(csd_summary(path)))
        return 0
    from mskt.data.readers import load_dataset

    print(_dataset_report(load_dataset(args.path, scale=args.scale, seed=args.seed, dataset=args.dataset)))
    return 0


def cmd_data_synth(args) -> int:
    from mskt.data.store import write_store
    from mskt.data.synthetic import make_synthetic

    ds = make_synthetic(args.preset, aligned=not args.unaligned, scale=args.scale, seed=args.seed)
    path = write_store(ds, args.out)
    print(f"wrote {path}: {', '.join(f'{s} {len(sp)}' for s, sp in ds.splits.items())} samples")
    return 0


def cmd_data_convert(args) -> int:
    from mskt.data.readers import load_dataset
    from mskt.data.store import write_store

    ds = load_dataset(args.input, dataset=args.dataset)
    path = write_store(ds, args.output)
    print(f"wrote {path} from {args.input} ({ds.meta.format}, {', '.join(f'{s} {len(sp)}' for s, sp in ds.splits.items())})")
    return 0


def cmd_data_align(args) -> int:
    from mskt.data.csd import align_csds
    from mskt.data.store import write_store

    feats = {"text": args.text, "audio": args.audio, "vision": args.vision}
    ds = align_csds(feats, args.labels, seq_len=args.seq_len, name=args.name, task=args.task)
    path = write_store(ds, args.out)
    print(f"wrote {path}: {', '.join(f'{s} {len(sp)}' for s, sp in ds.splits.items())} word-aligned segments")
    return 0


def cmd_train(args) -> int:
    from mskt.train import describe, resume, train

    if args.resume:
        given = sorted(k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None and k != "cfg_plugins")
        if given or args.preset or args.out:
            raise MsktError(f"--resume {args.resume} continues that run with its own config.json; drop {given or '--preset/--out'}")
        result = resume(args.resume)
        cfg = result.config
    else:
        cfg = _config_from_args(args)
        result = train(cfg, out_dir=args.out)
    if result.dir is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"run folder: {result.dir}")
    print(f"best epoch {result.metrics['best_epoch']} of {cfg.epochs} (validation); test: {describe(result.metrics['test'])}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from mskt.experiments.bench import PRESET_NAMES, run_bench, to_markdown
    from mskt.model import VARIANTS
    from mskt.train import atomic_write_text, resolve_device

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, given, allowed in (("--presets", presets, PRESET_NAMES), ("--variants", variants, VARIANTS)):
        unknown = [g for g in given if g not in allowed]
        if unknown or not given:
            raise MsktError(f"{name} {unknown or given}: allowed {', '.join(allowed)}")
    if args.steps < 1:
        raise MsktError(f"--steps must be at least 1, found {args.steps}")
    if args.rounds < 0 or (args.rounds and not args.reference):
        raise MsktError(f"--rounds {args.rounds}: a number of rounds >= 0, and only with --reference")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    records = run_bench(presets, variants, args.config, args.steps, device=device, precision=args.precision, compile=args.compile,
                        reference=args.reference, rounds=args.rounds, plugins=args.cfg_plugins or ())
    print(to_markdown(records))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def _missing_options(args) -> dict:
    """The evaluate command's missing-modality options, checked before anything loads; {} = none given
    (the default protocol). Any one given switches to explicit masks: nothing else is missing."""
    from mskt.data import missing

    given = any(v is not None for v in (args.missing, args.missing_rate, args.missing_mode, args.missing_seed))
    if not given:
        return {}
    try:
        rate = float(args.missing_rate) if args.missing_rate is not None else 0.0
    except ValueError:
        raise missing.MissingError(f"--missing-rate must be a number in [0, 1), found {args.missing_rate!r}") from None
    try:
        seed = int(args.missing_seed) if args.missing_seed is not None else 0
    except ValueError:
        raise missing.MissingError(f"--missing-seed must be an integer, found {args.missing_seed!r}") from None
    if seed < 0:
        raise missing.MissingError(f"--missing-seed must be >= 0, found {seed}")
    options = {
        "missing": missing.parse_missing(args.missing),
        "missing_rate": missing.check_rate(rate),
        "missing_mode": missing.check_mode(args.missing_mode or "sample"),
        "missing_seed": seed,
    }
    return options


def _realised_rate(split, options: dict) -> float:
    """The share of the free modality slots (or time steps) the evaluation's masks remove; 0.0 for
    the default protocol (mskt.data.missing.realised_rate)."""
    from mskt.data.missing import evaluation_masks, realised_rate

    if not options:
        return 0.0
    steps = {m: int(x.shape[1]) for m, x in split.features.items()}  # lazy arrays too: only the shape
    masks = evaluation_masks(len(split), steps, options["missing"], options["missing_rate"], options["missing_mode"], options["missing_seed"])
    return realised_rate(masks, options["missing"])


def cmd_evaluate(args) -> int:
    from mskt.data import missing
    from mskt.data.readers import load_dataset
    from mskt.train import Tensors, atomic_write_text, describe, evaluate, load_run, model_config_for, resolve_device

    options = _missing_options(args)
    cfg, model = load_run(args.run)
    data_source = args.data or cfg.data
    ds = load_dataset(data_source, scale=cfg.data_scale, seed=cfg.data_seed, dataset=cfg.dataset)  # the run's identity: its metrics
    wanted = model_config_for(cfg, ds)
    for key in ("text_dim", "audio_dim", "vision_dim", "task") + (("text_steps",) if model.cfg.ctc_align else ()):
        if getattr(wanted, key) != getattr(model.cfg, key):
            raise MsktError(
                f"{data_source}: {key}={getattr(wanted, key)} does not fit the run {args.run} ({key}={getattr(model.cfg, key)})"
            )
    device = resolve_device(cfg.device)
    model.to(device)
    metrics = evaluate(model, Tensors.from_split(ds["test"], ds.meta.task, device), cfg.eval_batch_size, **options)
    protocol = missing.describe(options.get("missing"), options.get("missing_rate", 0.0), options.get("missing_mode", "sample"), options.get("missing_seed", 0))
    print(f"{args.run} on {data_source} (test, {len(ds['test'])} samples, {protocol}): {describe(metrics)}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"run": str(args.run), "data": data_source, "protocol": protocol, **({"missing": {**options, "missing": list(options["missing"])}} if options else {})}
        record["missing_rate_realised"] = _realised_rate(ds["test"], options)
        atomic_write_text(out, json.dumps({**record, "test": metrics}, indent=2) + "\n")
    return 0


def cmd_grid(args) -> int:
    from mskt.experiments.grid import run_grid
    from mskt.model import VARIANTS

    cfg, options = _config_from_args(args, split_options=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise MsktError(f"unknown variant(s) {bad}; allowed: {', '.join(VARIANTS)}")
    if args.seeds < 1:
        raise MsktError("--seeds must be at least 1")
    out = Path(args.out)

    def report(row):
        print(f"  {row['variant']:<16} seed {row['seed']}: best epoch {row['best_epoch']}, {row['seconds']:.0f}s", flush=True)

    if args.bootstrap and args.against is None:
        raise MsktError("--bootstrap needs --against VARIANT (the reference the variants are compared with)")
    if args.against is not None and args.against not in variants:
        raise MsktError(f"--against {args.against}: not among --variants {','.join(variants)}")
    run_grid(cfg, variants, args.seeds, out, on_run=report, jobs=args.jobs, against=args.against, correction=args.correction,
             bootstrap=args.bootstrap, options=options)
    print((out / "results.md").read_text())
    if args.against is not None:
        print((out / "comparisons.md").read_text())
        print(f"wrote {out / 'comparisons.csv'}, {out / 'comparisons.md'}")
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'runs.csv'}")
    return 0


def cmd_tune(args) -> int:
    from mskt.experiments import tune as tuning

    if args.finalize:
        # Where and how fast the runs compute (--threads, --device, ...) may change; what they compute may not.
        given = sorted(k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None and k not in ("cfg_data", "cfg_variant", "cfg_plugins"))
        config = sorted(set(given) - set(tuning.EXECUTION_FIELDS))
        if config or args.preset or args.space or args.prune:
            raise MsktError(f"--finalize retrains the study's best configuration with the study's own config; drop {config or '--preset/--space/--prune'}")
        cfg = _config_from_args(args)
        study = args.study or tuning.default_study_name(cfg)
        result = tuning.finalize(study, seeds=args.seeds, storage=args.storage, root=args.root, jobs=args.jobs,
                                 execution={k: getattr(cfg, k) for k in given})
        print(result["markdown"])
        print(f"wrote {result['dir'] / 'results.md'}, {result['dir'] / 'results.csv'}, {result['dir'] / 'runs.csv'}")
        return 0
    if args.trials is None:
        raise MsktError("--trials N is required (the number of complete or pruned trials the study should hold)")
    cfg = _config_from_args(args)
    # A field given as a flag is fixed, not searched, unless the space file names it (a --preset's values
    # are defaults: searched).
    given = {k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.space:
        space, fixed = tuning.load_space(args.space, cfg, exclude=given)
    else:
        space, fixed = {k: v for k, v in tuning.default_space(cfg).items() if k not in given}, None
    pruner = args.pruner if args.prune else None
    study = args.study or tuning.default_study_name(cfg)

    def report(t):
        value = "" if t.value is None else f" validation {t.value:.4f}"
        print(f"  trial {t.number}: {t.state.name.lower()}{value} {t.params}", flush=True)

    st = tuning.tune(cfg, args.trials, study=study, storage=args.storage, space=space, fixed=fixed, pruner=pruner,
                     timeout=args.timeout, root=args.root, heartbeat=args.heartbeat, on_trial=report)
    frame = tuning.trials_frame(st)
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    print(f"study {study}: {len(frame)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}); folder {tuning.study_folder(study, args.root)}")
    try:
        best, trial = tuning.best_configuration(st)
        print(f"best trial {trial.number}: validation {trial.value:.4f}, {trial.params}")
    except MsktError as e:
        print(str(e))
    return 0


def cmd_notebooks(args) -> int:
    from mskt.notebooks import parse_params, run_notebooks

    only = [o.strip() for o in args.only.split(",")] if args.only else None
    params = parse_params(args.param)
    if args.cfg_plugins:  # every notebook declares `plugins`
        params["plugins"] = list(args.cfg_plugins)
    results = run_notebooks(smoke=args.smoke, only=only, params=params, out_dir=args.out)
    failed = [r for r in results if r.status != "ok"]
    out = results[0].output.parent
    print(f"executed notebooks in {out} (summary: {out / 'summary.json'})")
    if failed:  # exit 2, one line: the notebook, the cell, where to look
        raise MsktError(f"{failed[0].notebook} failed at {failed[0].error}; the executed copy is {failed[0].output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one function per group of commands below."""
    from mskt import __version__

    p = argparse.ArgumentParser(prog="mskt", description="Multimodal sentiment analysis with a missing modality (knowledge transfer).")
    p.add_argument("--version", action="version", version=f"mskt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _data_parsers(sub)
    _train_parsers(sub)
    _tune_parser(sub)
    _bench_parser(sub)
    _notebooks_parser(sub)
    return p


def _data_parsers(sub) -> None:
    data = sub.add_parser("data", help="inspect, synthesise and convert datasets").add_subparsers(dest="data_command", required=True)
    info = data.add_parser("info", help="splits, shapes, lengths, label statistics and non-finite counts of any supported file")
    info.add_argument("path", help=".pkl (MulT/MMSA), .h5 (mskt store), .csd (SDK sequence) or synthetic:<preset>")
    info.add_argument("--scale", type=float, default=1.0, help="synthetic presets only")
    info.add_argument("--seed", type=int, default=0, help="synthetic presets only")
    info.add_argument("--dataset", default="auto", choices=("auto", "mosi", "mosei", "iemocap", "sims", "other"),
                      help="which dataset the file holds (paper rows, label range); auto: from its name or content")
    info.set_defaults(func=cmd_data_info)
    synth = data.add_parser("synth", help="write a synthetic dataset shaped like a benchmark")
    synth.add_argument("--preset", required=True, choices=("mosi", "mosei", "iemocap"))
    synth.add_argument("--unaligned", action="store_true")
    synth.add_argument("--scale", type=float, default=1.0)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True)
    synth.set_defaults(func=cmd_data_synth)
    convert = data.add_parser("convert", help="any supported file to the mskt HDF5 feature store")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--dataset", default="auto", choices=("auto", "mosi", "mosei", "iemocap", "sims", "other"),
                         help="the identity the store records; auto: from the file's name or content")
    convert.set_defaults(func=cmd_data_convert)
    align = data.add_parser("align", help="word-align CMU-MultimodalSDK feature .csd files onto a label .csd")
    for m in ("text", "audio", "vision", "labels"):
        align.add_argument(f"--{m}", required=True)
    align.add_argument("--seq-len", type=int, default=50)
    align.add_argument("--name", default=None)
    align.add_argument("--task", default="regression", choices=("regression", "emotions"))
    align.add_argument("--out", required=True)
    align.set_defaults(func=cmd_data_align)



def _train_parsers(sub) -> None:
    """train, evaluate and grid."""
    tr = sub.add_parser("train", help="train one variant; writes runs/<name>/")
    tr.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<variant>-seed<S>-<time>)")
    tr.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run from its last completed epoch")
    _add_config_options(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained run on its own or another dataset's test split")
    ev.add_argument("--run", required=True)
    ev.add_argument("--data", default=None)
    ev.add_argument("--out", default=None, help="write the metrics as JSON here")
    ev.add_argument("--missing", default=None, metavar="M[,M]",
                    help="modalities missing for every test sample: audio, vision, language (text), or two joined by a comma; none = nothing")
    ev.add_argument("--missing-rate", default=None, metavar="R", help="each other modality of each sample missing with probability R in [0, 1)")
    ev.add_argument("--missing-mode", default=None, metavar="sample|step", help="sample (default): whole modalities; step: each time step zeroed with probability R")
    ev.add_argument("--missing-seed", default=None, metavar="S", help="seed of the random masks (default 0)")
    _add_plugin_option(ev)  # the run's own plugins (config.json) are imported anyway
    ev.set_defaults(func=cmd_evaluate)

    gr = sub.add_parser("grid", help="variants x seeds, with a mean/std results table")
    gr.add_argument("--variants", default="full,vision,language,language_vision,kt")
    gr.add_argument("--seeds", type=int, default=3)
    gr.add_argument("--out", required=True)
    gr.add_argument("--jobs", type=int, default=1, help="runs trained at once, one torch thread each (use the number of cores on a CPU)")
    gr.add_argument("--against", default=None, metavar="VARIANT", help="also compare every other variant with this one, paired by seed (comparisons.md)")
    gr.add_argument("--bootstrap", type=int, default=0, metavar="N", help="with --against: also N bootstrap resamples of seeds x test samples (0: none)")
    gr.add_argument("--correction", default="holm", choices=("holm", "bh", "none"), help="multiple-comparison correction across the comparisons table's cells")
    _add_config_options(gr, skip=("variant",))
    gr.set_defaults(func=cmd_grid)


def _tune_parser(sub) -> None:
    tu = sub.add_parser("tune", help="hyperparameter search on Optuna; trials are run folders under runs/tune/<study>/")
    tu.add_argument("--trials", type=int, default=None, help="complete or pruned trials the study should hold (all workers together)")
    tu.add_argument("--study", default=None, help="study name (default <data>-<variant>, e.g. synthetic-mosi-kt)")
    tu.add_argument("--storage", default=None,
                    help="an Optuna RDB URL (postgresql://..., mysql://..., sqlite:///...) or a journal file on a shared file system; default: SQLite in the study folder")
    tu.add_argument("--space", default=None, metavar="FILE", help="a .toml/.yaml/.json search space laid over the variant's default (see mskt.experiments.tune)")
    tu.add_argument("--prune", action="store_true", help="stop bad trials early on each epoch's validation loss")
    tu.add_argument("--pruner", default="median", choices=("median", "hyperband"), help="with --prune (default median)")
    tu.add_argument("--timeout", type=float, default=None, metavar="S", help="start no trial after S seconds (this worker)")
    tu.add_argument("--heartbeat", type=float, default=10, metavar="S",
                    help="seconds between a running trial's heartbeats; a trial silent for 6x this is failed and retried")
    tu.add_argument("--root", default=None, metavar="DIR", help="folder of the study folders (default runs/tune)")
    tu.add_argument("--finalize", action="store_true", help="retrain the best configuration and the untuned default over --seeds seeds")
    tu.add_argument("--seeds", type=int, default=3, help="with --finalize: seeds per configuration")
    tu.add_argument("--jobs", type=int, default=1, help="with --finalize: runs trained at once, one torch thread each")
    _add_config_options(tu)
    tu.set_defaults(func=cmd_tune)


def _bench_parser(sub) -> None:
    be = sub.add_parser("bench", help="train / inference throughput, memory and FLOPs at each dataset's real shapes")
    be.add_argument("--presets", default="mosi,mosi-unaligned", help="comma-separated: mosi, mosi-unaligned, mosei, mosei-unaligned, iemocap, iemocap-unaligned")
    be.add_argument("--variants", default="full,kt")
    be.add_argument("--config", default="mult", choices=("paper", "mult"), help="this project's defaults, or the public MulT code's (d=30, 5 layers, 5 heads, batch 24)")
    be.add_argument("--steps", type=int, default=10, help="timed training steps per record (after 3 warm-up steps)")
    be.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    be.add_argument("--device", default="auto")
    be.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    be.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    be.add_argument("--reference", action="store_true",
                    help="also time the public MulT code's training step (mskt.experiments.mult_reference) per preset, and each record's speed-up over it")
    be.add_argument("--rounds", type=int, default=0,
                    help="with --reference: also measure each speed-up in one process, alternating the two codes for this many "
                         "rounds of --steps steps; the median ratio is robust to a machine whose speed drifts")
    be.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list")
    _add_plugin_option(be)
    be.set_defaults(func=cmd_bench)


def _notebooks_parser(sub) -> None:
    nb = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill into runs/notebooks-<time>/")
    nb.add_argument("--smoke", action="store_true", help="tiny data and models: a check that every notebook runs")
    nb.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 03 or 01,02")
    nb.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a parameter for every notebook that declares it")
    nb.add_argument("--out", default=None, help="folder for the executed copies")
    _add_plugin_option(nb)
    nb.set_defaults(func=cmd_notebooks)


class LogFormat(logging.Formatter):
    """INFO lines as they are (the data's one-line reports, training progress); a warning or error
    names the logger it came from (``mskt.fast: 14 stacks run their Python code (...)``). Messages
    never carry their logger's name themselves, so a format with ``%(name)s`` shows it once."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{record.name}: {line}" if record.levelno >= logging.WARNING else line


def configure_logging(stream=None) -> None:
    """The command's log: INFO and above to stderr, warnings prefixed with their logger's name."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogFormat("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _import_plugins(argv) -> None:
    """Import the ``--plugin`` modules before the parser is built, so that their variants' options
    are flags too."""
    from mskt.plugins import load_entry_points, load_plugins

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    load_entry_points()
    load_plugins(known.plugin)


def main(argv=None) -> int:
    configure_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _import_plugins(argv)
    except MsktError as e:
        print(f"mskt: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MsktError as e:
        print(f"mskt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run's says how to resume it (mskt.train.RunInterrupted)
        print(f"mskt: {e}" if str(e) else "mskt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
