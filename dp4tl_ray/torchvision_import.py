"""torchvision without torch._dynamo: about 1 CPU-second less in every process that builds a model.

torchvision 0.29's ``ops/roi_align.py`` runs ``from torch._dynamo.utils import is_compile_supported``
when torchvision is imported, and that loads all of dynamo (sympy, torch.fx's symbolic shapes): 1.0-1.3
CPU-s of the 1.2-1.5 s a torchvision import takes, on the critical path of every extraction actor's
start. Only roi_align calls that helper (on a deterministic-CUDA fallback), and no ResNet calls
roi_align. torchvision means dynamo to load lazily (pytorch/vision#8451 removed an earlier eager
import for that reason; this one came later). :func:`import_torchvision` imports it with that one name
standing in: a function that loads the real helper on its first call. The stand-in is gone from
``sys.modules`` once torchvision is imported, so a later ``import torch._dynamo`` (``torch.compile``)
loads the real module as usual. A torchvision that needs more of dynamo at import is imported the
ordinary way. (``torchvision.transforms.v2`` loads dynamo anyway, through ``torch.compiler.disable``
in ``tv_tensors``: training workers gain nothing, the extraction actors, which decode with PIL, do.)
"""

from __future__ import annotations

import sys
import threading
import types

_DYNAMO_UTILS = "torch._dynamo.utils"
_lock = threading.Lock()


def _is_compile_supported(device_type: str) -> bool:
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def _stand_in() -> types.ModuleType:
    module = types.ModuleType(_DYNAMO_UTILS, "stands in for torch._dynamo.utils while torchvision is imported")
    module.is_compile_supported = _is_compile_supported
    return module


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> types.ModuleType:
    """The ``torchvision`` module, imported (if it is not yet) without importing ``torch._dynamo``."""
    with _lock:
        if "torchvision" not in sys.modules:
            import torch  # noqa: F401 - torch's own import never sees the stand-in

            if "torch._dynamo" not in sys.modules and _DYNAMO_UTILS not in sys.modules:
                stand_in = sys.modules[_DYNAMO_UTILS] = _stand_in()
                try:
                    import torchvision  # noqa: F401
                except ImportError:  # it wanted more than the one name: the ordinary import below
                    _forget_torchvision()
                finally:
                    if sys.modules.get(_DYNAMO_UTILS) is stand_in:
                        del sys.modules[_DYNAMO_UTILS]
        import torchvision

        return torchvision


__all__ = ["import_torchvision"]
