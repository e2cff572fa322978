"""torchvision imported without torch._dynamo, which stays importable (a fresh interpreter per test)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_building_a_model_loads_no_dynamo_and_dynamo_still_loads_for_real_later():
    out = _run("""
import sys
from dp4tl_ray.model_spec import ModelSpec
from dp4tl_ray.models import build_model
build_model(ModelSpec("resnet18", 10))
print("dynamo after model:", "torch._dynamo" in sys.modules, "torch._dynamo.utils" in sys.modules)
import torch
import torch._dynamo.utils as real
roi = sys.modules["torchvision.ops.roi_align"]
print("helper agrees:", roi.is_compile_supported("cpu") == real.is_compile_supported("cpu"), real.__file__.endswith("utils.py"))
print("compile works:", torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2)).tolist())
""")
    assert "dynamo after model: False False" in out
    assert "helper agrees: True True" in out
    assert "compile works: [3.0, 3.0]" in out


def test_a_torchvision_that_needs_more_of_dynamo_is_imported_the_ordinary_way():
    out = _run("""
import sys, types
import dp4tl_ray.torchvision_import as ti
ti._stand_in = lambda: types.ModuleType("torch._dynamo.utils")  # lacks the one name torchvision imports
tv = ti.import_torchvision()
print("models:", callable(tv.models.resnet18), "real dynamo:", hasattr(sys.modules["torch._dynamo.utils"], "is_compile_supported"))
""")
    assert "models: True real dynamo: True" in out
