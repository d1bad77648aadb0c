"""torch and torchvision as the tests and the benchmarks import them (the one copy of the shim).

torchvision's PyPI wheel is a CUDA build: beside CPU torch its meta registrations fail to
import ("operator torchvision::nms does not exist"); the models do not need them, so the
module is stubbed before torchvision is imported. Benchmarks run from a checkout import this
with the repository root on ``sys.path``.
"""

import sys
import types


def import_torchvision():
    """``(torch, torchvision)``.

    Raises:
        ImportError: torch is not installed, or torchvision cannot be imported (the message
            says why).
    """
    import torch
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure means "unusable"
        raise ImportError(f"torchvision unusable: {exc}") from exc
    return torch, torchvision
