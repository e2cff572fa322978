"""The `dp4tl` command: flags from config dataclasses, YAML configs, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dp4tl_ray.cli import run
from dp4tl_ray.data.parquet import Reencode, open_shards


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("dp4tl: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_synth_config_exits_2_with_one_line(tmp_path, capsys):
    assert run(["data", "synth", "--root", str(tmp_path / "d"), "--num-domains", "0"]) == 2
    assert "num_domains" in _one_line_error(capsys)


def test_unknown_yaml_key_names_the_valid_ones(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("root: x\nnum_domain: 3\n")
    assert run(["data", "synth", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "num_domain" in _one_line_error(capsys)


@pytest.mark.ray
def test_missing_source_exits_2(ray_local, tmp_path, capsys):
    assert run(["extract", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_synth_index_and_shard_commands(tmp_path, capsys):
    root = tmp_path / "d"
    assert run(["data", "synth", "--root", str(root), "--num-domains", "2", "--classes-per-domain", "2",
                "--images-per-class", "3", "--domains-per-task", "1", "--classes-per-task-domain", "1",
                "--train-per-class", "2", "--test-per-class", "1"]) == 0
    train = root / "source" / "train"
    assert run(["data", "index", str(train), "--out", str(tmp_path / "ci.json")]) == 0
    assert run(["data", "shard", str(train), "--out", str(tmp_path / "shards"), "--rows-per-shard", "5",
                "--class-index", str(tmp_path / "ci.json")]) == 0
    out = capsys.readouterr().out
    assert "12 images in 3 shards" in out
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]


def test_shard_command_resizes_on_request(tmp_path, capsys, synth_dirty):
    train = str(synth_dirty.source_dir)
    assert run(["data", "shard", train, "--out", str(tmp_path / "s"), "--quality", "80"]) == 2
    assert "--max-side" in _one_line_error(capsys)
    assert run(["data", "shard", train, "--out", str(tmp_path / "s"), "--max-side", "3"]) == 2
    assert "max_side" in _one_line_error(capsys)
    assert run(["data", "shard", train, "--out", str(tmp_path / "s"), "--max-side", "16", "--quality", "80"]) == 0
    assert "longer side <= 16, JPEG quality 80" in capsys.readouterr().out
    assert open_shards(tmp_path / "s").reencode == Reencode(16, 80)


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("dp4tl")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "extract" in out and "data" in out


def test_every_stage_has_a_command_and_bad_input_exits_2(tmp_path, capsys):
    assert run(["evaluate", "--task-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r.json")]) == 2
    assert "task" in _one_line_error(capsys)
    assert run(["pretrain", "--source", str(tmp_path), "--out", str(tmp_path / "runs"), "--mode", "simclr"]) == 2
    assert "unknown mode" in _one_line_error(capsys)
    assert run(["select", "--method", "lm", "--ratio", "1.5", "--source-features", str(tmp_path)]) == 2
    assert "ratio" in _one_line_error(capsys)
    assert run(["explain", str(tmp_path / "no-keepset")]) == 2
    assert "no keep-set at" in _one_line_error(capsys)


@pytest.mark.ray
def test_extract_prints_rows_done_out_of_total(ray_local, synth_dirty, tmp_path, capsys):
    assert run(["extract", "--source", str(synth_dirty.source_dir), "--out", str(tmp_path / "store"), "--arch", "resnet18",
                "--image-size", "32", "--resize-size", "32", "--batch-size", "16", "--num-actors", "1"]) == 0
    from dp4tl_ray.featurestore import FeatureStore

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[extract store]")]
    m = FeatureStore.open(tmp_path / "store").manifest
    total, readable = m["num_inputs"], m["num_rows"]
    assert readable < total  # the planted broken files are skipped
    # the closing line: every readable row of every input file, the rate, and how long it took
    assert lines[-1].startswith(f"[extract store] {readable}/{total} rows (") and " images/s | took " in lines[-1], lines
    assert run(["extract", "--source", str(synth_dirty.source_dir), "--out", str(tmp_path / "store"), "--arch", "resnet18",
                "--image-size", "32", "--resize-size", "32", "--batch-size", "16", "--num-actors", "1"]) == 0
    assert f"is up to date: reusing its {readable} rows" in capsys.readouterr().out


def test_sweep_verbose_flag_before_or_after_the_command():
    from dp4tl_ray.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["sweep", "--config", "s.yaml"]).verbose is False
    assert parse(["-v", "sweep", "--config", "s.yaml"]).verbose is True
    assert parse(["sweep", "--config", "s.yaml", "--verbose"]).verbose is True


def test_the_command_and_a_sweep_plan_build_without_torch(tmp_path):
    """`dp4tl --help` took 3 s importing torch and torchvision for the stage configs' flags; the configs are torch-free,
    so the flags, a sweep's plan and its checks cost no torch (a driver that only plans and starts Ray stays light)."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    code = ("import sys\n"
            "from dp4tl_ray.cli import build_parser\n"
            "build_parser()\n"
            "from dp4tl_ray.sweep import load_plan\n"
            f"load_plan({str(Path(root) / 'tests' / 'configs' / 'sweep_tiny.yaml')!r})\n"
            "sys.exit(sorted(m for m in ('torch', 'torchvision') if m in sys.modules) or None)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
