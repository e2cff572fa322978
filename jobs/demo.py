"""The demo, end to end on an embedded local Ray with CPUs only:

generate data -> train a surrogate -> extract features -> select a keep-set (LM) -> pretrain on
the keep-set -> linear-probe the downstream task (and a random-init backbone as the floor).

    python jobs/demo.py --out out/demo [--config jobs/configs/demo.yaml]

Every stage reuses its finished artifact when run again with the same inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.cli import format_extract_summary  # noqa: E402
from dp4tl_ray.config import from_dict, load_yaml  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.errors import UserError  # noqa: E402
from dp4tl_ray.features import ExtractConfig, extract_features  # noqa: E402
from dp4tl_ray.select.pipeline import SelectConfig, format_keepset_summary, select_keepset  # noqa: E402
from dp4tl_ray.train.evaluate import EvalConfig, evaluate  # noqa: E402
from dp4tl_ray.train.trainer import PretrainConfig, pretrain  # noqa: E402


def run_demo(out: Path, config: Path) -> None:
    import ray

    out = out.resolve()
    p = load_yaml(config)
    t0 = time.perf_counter()
    synth = generate(from_dict(SynthConfig, {**p["synth"], "root": str(out / "data")}, "synth"))
    task = synth.task_dirs[0]
    print(f"[1/6] data: {synth.num_classes} source classes, {synth.num_images} images, "
          f"{len(synth.broken_files)} planted broken files -> {synth.root}")

    ray.init(num_cpus=min(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    surrogate = pretrain(from_dict(PretrainConfig, {**p["surrogate"], "source": str(synth.source_dir),
                                                    "out": str(out / "runs"), "name": "surrogate"}, "surrogate"))
    print(f"[2/6] surrogate: {surrogate.metrics['epoch']} epochs, loss {surrogate.metrics['loss']:.3f} -> {surrogate.model_path}")

    extract = {**p["extract"], "checkpoint": surrogate.model_path}
    source = extract_features(from_dict(ExtractConfig, {**extract, "source": str(synth.source_dir),
                                                        "out": str(out / "features" / "source")}, "extract"))
    down = extract_features(from_dict(ExtractConfig, {**extract, "source": str(task / "train"),
                                                      "out": str(out / "features" / task.name),
                                                      "num_classes": len(source.manifest["classes"])}, "extract"))
    print("[3/6] features:\n" + format_extract_summary(source) + "\n" + format_extract_summary(down))

    sel = from_dict(SelectConfig, {**p["select"], "source_features": str(source.path),
                                   "downstream_features": [str(down.path)], "out": str(out / "keepsets" / "lm")}, "select")
    keepset = select_keepset(sel)
    print("[4/6] " + format_keepset_summary(keepset, sel.out))

    model = pretrain(from_dict(PretrainConfig, {**p["pretrain"], "source": str(synth.source_dir), "out": str(out / "runs"),
                                                "name": f"pretrain-{sel.method}-{sel.ratio:g}", "keepset": sel.out}, "pretrain"))
    print(f"[5/6] pretrained on the keep-set: {model.images} images, {model.metrics['epoch']} epochs "
          f"({sum(h['epoch_s'] for h in model.history):.0f}s of epochs) -> {model.model_path}")

    lp = evaluate(from_dict(EvalConfig, {**p["evaluate"], "task_dir": str(task), "checkpoint": model.model_path}, "evaluate"))
    floor = evaluate(from_dict(EvalConfig, {**p["evaluate"], "task_dir": str(task), "checkpoint": None,
                                            "out": str(out / "eval-random-init.json")}, "evaluate"))
    print(f"[6/6] linear probe on {task.name}: test top-1 {lp['test_acc']:.3f} (keep-set backbone) vs "
          f"{floor['test_acc']:.3f} (random-init backbone)")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; artifacts under {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "demo.yaml")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        run_demo(args.out, args.config)
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
