"""The ``dp4tl`` command: one entry point over the library's stages.

Every stage's flags are generated from its config dataclass, so a flag, a YAML key (``--config``)
and a field are always the same thing. Bad input exits 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from dp4tl_ray.config import from_dict, load_yaml
from dp4tl_ray.errors import UserError, user_message
from dp4tl_ray.ray_console import filter_native_notices


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per dataclass field (required fields are positional-free flags)."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", help="YAML file with these same keys (flags override it)")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = f"default: {default}" if not required else "required"
        base = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) in (list, tuple):
            item = (typing.get_args(base) or (str,))[0]
            parser.add_argument(flag, dest=f.name, nargs="+", type=item, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=base if base in (int, float) else str, default=None, help=help_)


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The stage's config from ``--config`` and the flags, validated (bad input fails before Ray starts)."""
    data = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    cfg = from_dict(cls, data, where=cls.__name__)
    cfg.validate()
    return cfg


def _cmd_synth(args: argparse.Namespace) -> None:
    from dp4tl_ray.data.synthetic import SynthConfig, generate

    s = generate(_config_from_args(SynthConfig, args))
    print(f"source: {s.source_dir} ({s.num_classes} classes, {s.num_images} images) in {s.seconds:.1f}s")
    for t in s.task_dirs:
        print(f"downstream task: {t}")
    if s.broken_files:
        print(f"broken files planted (dirty mode): {len(s.broken_files)}")


def _cmd_index(args: argparse.Namespace) -> None:
    from dp4tl_ray.data.imagefolder import scan_image_folder, write_class_index

    index = scan_image_folder(args.root, args.class_index)
    write_class_index(index.classes, args.out)
    print(f"{len(index.classes)} classes, {len(index)} images; class index written to {args.out}")


def _cmd_shard(args: argparse.Namespace) -> None:
    from dp4tl_ray.data.imagefolder import scan_image_folder
    from dp4tl_ray.data.parquet import DEFAULT_QUALITY, Reencode, shard_image_folder

    if args.max_side is None and args.quality is not None:
        raise UserError("--quality applies to re-encoded images only: give --max-side too")
    quality = DEFAULT_QUALITY if args.quality is None else args.quality
    reencode = Reencode(args.max_side, quality) if args.max_side is not None else None
    shards = shard_image_folder(scan_image_folder(args.root, args.class_index), args.out, args.rows_per_shard, reencode)
    resized = f" (longer side <= {reencode.max_side}, JPEG quality {reencode.quality})" if reencode else ""
    print(f"{shards.num_rows} images in {len(shards.files)} shards under {shards.root}{resized}")


def _cmd_extract(args: argparse.Namespace) -> None:
    from dp4tl_ray.features import ExtractConfig, extract_features

    cfg = _config_from_args(ExtractConfig, args)
    init_ray(verbose=args.verbose)
    store = extract_features(cfg, progress=args.verbose)
    print(format_extract_summary(store))


def format_extract_summary(store) -> str:
    """A few lines a person reads after extraction: rows, speed, skipped files."""
    m = store.manifest
    lines = [
        f"FeatureStore {store.path}: {m['num_rows']} rows ({len(m['classes'])} classes), d={m['dim']}, "
        f"top-{m['topk']} of the surrogate's {m['surrogate']['num_classes']} source classes",
        f"  surrogate {m['surrogate']['arch']} ({m['surrogate'].get('checkpoint') or 'random init'}), "
        f"{m['images_per_s']} images/s on {m['num_actors']} {m['device']} actor(s)",
    ]
    if m["skipped"]:
        lines.append(f"  skipped {len(m['skipped'])} unreadable file(s):")
        lines += [f"    {s['path']}: {s['error']}" for s in m["skipped"][:10]]
        if len(m["skipped"]) > 10:
            lines.append(f"    ... {len(m['skipped']) - 10} more in {store.path}/manifest.json")
    return "\n".join(lines)


def _cmd_select(args: argparse.Namespace) -> None:
    from dp4tl_ray.select.pipeline import SelectConfig, format_keepset_summary, select_keepset, uses_ray

    cfg = _config_from_args(SelectConfig, args)
    if uses_ray(cfg):
        init_ray(verbose=args.verbose)
    print(format_keepset_summary(select_keepset(cfg), cfg.out))


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from dp4tl_ray.train.trainer import PretrainConfig, pretrain

    cfg = _config_from_args(PretrainConfig, args)
    init_ray(verbose=args.verbose)
    r = pretrain(cfg, progress=f"pretrain {cfg.name}")
    m = r.metrics
    print(f"pretrained {m.get('epoch')} epoch(s) on {r.images} images of {len(r.kept_classes)} classes "
          f"in {r.seconds:.0f}s (last epoch: loss {m.get('loss', float('nan')):.4f}, {m.get('images_per_s', 0):.0f} images/s)")
    print(f"checkpoint: {r.model_path}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from dp4tl_ray.train.evaluate import EvalConfig, evaluate

    cfg = _config_from_args(EvalConfig, args)
    init_ray(verbose=args.verbose)
    r = evaluate(cfg)
    print(f"{r['mode'].upper()} on {r['task']}: test top-1 {r['test_acc']:.4f} at epoch {r['best_epoch']} "
          f"(chosen on validation, val {r['val_acc']:.4f}); max test over epochs {r['test_acc_max_over_epochs']:.4f} "
          "(selection on test, for comparison with the paper only)")
    print(f"results: {cfg.out_path()}")


def _cmd_report(args: argparse.Namespace) -> None:
    from dp4tl_ray.report import write_report

    paths = write_report(args.sweep_dir, args.out)
    print(paths["report.md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")


def _cmd_explain(args: argparse.Namespace) -> None:
    from dp4tl_ray.explain import explain_keepset, uses_ray
    from dp4tl_ray.explain.explorer import PAGE, SUMMARY

    if uses_ray(args.keepset):  # fm-classmean: class means from actors reading the source store
        init_ray(verbose=args.verbose)
    out = explain_keepset(args.keepset, args.out)
    print(f"explorer page: {out / PAGE}\nsummary: {out / SUMMARY}")


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags (shared by ``dp4tl sweep`` and ``jobs/sweep.py``): a YAML plus a few overrides."""
    parser.add_argument("--config", required=True, help="sweep YAML (see jobs/configs/demo.yaml, imagenet.yaml)")
    parser.add_argument("--name", default=None, help="override sweep.name (the same name resumes)")
    parser.add_argument("--storage-path", default=None, help="override sweep.storage_path (local dir or s3://...)")
    parser.add_argument("--work-dir", default=None, help="override sweep.work_dir (shared artifacts)")
    # SUPPRESS: absent unless given, so `dp4tl -v sweep` (the top-level flag) still counts
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show Ray's worker logs and Tune's per-result tables")


_started_ray = False  # True once init_ray has started or attached to Ray for this command (run() shuts it down)


def init_ray(verbose: bool = False, worker_logs: bool = True) -> None:
    """Ray for an entry point (the library never starts it): attach to the cluster named by RAY_ADDRESS
    (set by `ray job submit`), else start an embedded local Ray whose node also holds the trial-driver
    resource a sweep's Tune trials ask for. ``worker_logs`` False keeps workers' output off the console
    (a sweep's many trials); ``verbose`` keeps Ray Data's own logs on it. Nothing starts when Ray is up."""
    global _started_ray
    import os

    import ray

    from dp4tl_ray.ray_console import drop_default_auth_notice, drop_worker_pool_notice, quiet_ray_data
    from dp4tl_ray.sweep import TRIAL_RESOURCE

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address.lower() in ("", "local") and not verbose:
        # Notices an embedded local Ray prints on every healthy run of ours (ray_console says why each is harmless).
        # (Setting RAY_AUTH_MODE here instead of dropping its notice would come too late: Ray caches the mode
        # when it is imported.)
        if "RAY_AUTH_MODE" not in os.environ:
            drop_default_auth_notice()
        drop_worker_pool_notice()
    _started_ray = True
    if address:
        ray.init()
    else:
        # An embedded local Ray is one node that nothing drains: Train's preemption watcher (an actor each run
        # starts, polling for node drains) has nothing to watch, and its process costs every run ~1 CPU-s.
        # Ray's processes inherit this; a user's own setting wins. (The controller's poll: trainer._fit.)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=cpus, resources={TRIAL_RESOURCE: cpus}, include_dashboard=False,
                 log_to_driver=worker_logs)


def run_sweep_command(args: argparse.Namespace) -> None:
    """Run the sweep; its last lines say where the report and the keep-set explorer pages are."""
    from dp4tl_ray.explain.report_pages import EXPLAIN_DIR
    from dp4tl_ray.sweep import load_plan, run_sweep

    plan = load_plan(args.config, {"name": args.name, "storage_path": args.storage_path, "work_dir": args.work_dir})
    verbose = getattr(args, "verbose", False)
    init_ray(verbose, worker_logs=verbose)
    s = run_sweep(plan, verbose=verbose)
    print(f"[sweep] {s['ok']}/{s['trials']} trials ok in {s['seconds']:.0f}s; results: {s['results']}")
    report = s.get("report")
    if report:
        print(Path(report["report.md"]).read_text())
        for path in report.values():
            print(f"[sweep] wrote {path}")
        print(f"[sweep] report: {report['report.md']}")
        for name, page in report.items():
            if name.startswith(EXPLAIN_DIR + "/"):
                print(f"[sweep] keep-set explorer: {page}")


def build_parser() -> argparse.ArgumentParser:
    from dp4tl_ray.data.synthetic import SynthConfig
    from dp4tl_ray.features import ExtractConfig

    p = argparse.ArgumentParser(prog="dp4tl", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, index and shard image datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate a synthetic ImageNet-shaped source + downstream tasks")
    _add_config_flags(synth, SynthConfig)
    synth.set_defaults(func=_cmd_synth)
    index = data.add_parser("index", help="write the class index (class -> label) of a folder tree")
    index.add_argument("root")
    index.add_argument("--out", required=True)
    index.add_argument("--class-index", default=None)
    index.set_defaults(func=_cmd_index)
    shard = data.add_parser("shard", help="convert a folder tree into parquet shards (ids and labels kept)")
    shard.add_argument("root")
    shard.add_argument("--out", required=True)
    shard.add_argument("--rows-per-shard", type=int, default=1000)
    shard.add_argument("--class-index", default=None)
    shard.add_argument("--max-side", type=int, default=None,
                       help="re-encode images whose longer side exceeds this many pixels down to it (default: copy bytes)")
    shard.add_argument("--quality", type=int, default=None, help="JPEG quality of re-encoded images (default 90)")
    shard.set_defaults(func=_cmd_shard)

    from dp4tl_ray.select.pipeline import SelectConfig
    from dp4tl_ray.train.eval_config import EvalConfig  # the configs are torch-free: `dp4tl --help` imports no torch
    from dp4tl_ray.train.pretrain_config import PretrainConfig

    stages = [
        ("extract", "run the surrogate over a dataset with Ray Data -> FeatureStore", ExtractConfig, _cmd_extract),
        ("select", "votes -> ranked units -> KeepSet (lm, fm, fm-classmean, baselines)", SelectConfig, _cmd_select),
        ("pretrain", "Ray Train DDP pretraining on a keep-set (supervised, moco_v2, adversarial)", PretrainConfig,
         _cmd_pretrain),
        ("evaluate", "linear probe (lp) or full finetune (ff) of a pretrained backbone on a downstream task",
         EvalConfig, _cmd_evaluate),
    ]
    for name, help_, cls, func in stages:
        stage = sub.add_parser(name, help=help_)
        _add_config_flags(stage, cls)
        stage.set_defaults(func=func)

    explain = sub.add_parser("explain", help="a keep-set's explorer page: units ranked by votes, the cut, thumbnails")
    explain.add_argument("keepset", help="the keep-set directory (from `dp4tl select --method lm|fm|fm-classmean`)")
    explain.add_argument("--out", default=None, help="where to write index.html and summary.png (default: KEEPSET/explain)")
    explain.set_defaults(func=_cmd_explain)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep: method x ratio x surrogate x mode x task -> results + report")
    add_sweep_flags(sweep)
    sweep.set_defaults(func=run_sweep_command)

    report = sub.add_parser("report", help="accuracy and time tables (Markdown, CSV) and plots from a sweep's results")
    report.add_argument("sweep_dir", help="the sweep's directory (holds results.jsonl); local path or URI")
    report.add_argument("--out", default=None, help="where to write the report (default: SWEEP_DIR/report)")
    report.set_defaults(func=_cmd_report)
    return p


def run(argv: list[str] | None = None, console: bool = False) -> int:
    """Parse and run; returns the exit code (0 ok, 2 bad input). ``console``: this process is the command
    (``main``), so Ray's known-harmless native notices are kept off its stderr unless ``-v``."""
    args = build_parser().parse_args(argv)
    if console and not getattr(args, "verbose", False):
        filter_native_notices()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter is not news
    try:
        args.func(args)
    except UserError as e:
        print(f"dp4tl: error: {user_message(e)}", file=sys.stderr)
        return 2
    finally:
        _shutdown_ray()
    return 0


def _shutdown_ray() -> None:
    """Stop the Ray this command started (detach from a cluster's) now: left to Ray's exit hook, each
    command's exit also waited 0.5 s for log lines a finished command no longer prints."""
    global _started_ray
    if _started_ray:
        import ray

        _started_ray = False
        ray.shutdown()


def main() -> None:
    sys.exit(run(console=True))


__all__ = ["main", "run", "build_parser", "format_extract_summary", "init_ray"]


if __name__ == "__main__":
    main()
