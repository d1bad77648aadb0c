"""Pretrained weights: the registry, the download cache, the Hugging Face Hub (``hf.py``), and
the one function that turns a builder's ``pretrained=``/``weights=`` arguments into a state
dict."""

import os
from collections.abc import Mapping

from ..checkpoint import load_pth
from . import hf
from .download import (UnverifiedDownloadWarning, cache_dir, cached_file, download, mirrored,
                       torch_cache_dir)
from .hf import HubWeights, hub_weights, is_hub_spec
from .registry import (REGISTRY, Weights, WeightsEnum, get_weights, hash_prefix,
                       imagenet_categories)

__all__ = ["REGISTRY", "HubWeights", "UnverifiedDownloadWarning", "Weights", "WeightsEnum",
           "cache_dir", "cached_file", "download", "fetch_state_dict", "get_weights",
           "hash_prefix", "imagenet_categories", "is_local_path", "mirrored", "resolve",
           "torch_cache_dir"]

# Names that can only mean a local file (the registry's tags never end like this).
LOCAL_SUFFIXES = (".pth", ".pt", ".safetensors")


def resolve(arch, pretrained=False, weights=None):
    """Decide where a builder's weights come from.

    Returns:
        ``None`` (random initialisation), a registry :class:`Weights`, a :class:`HubWeights`
        for ``"hf-hub:org/name[@revision]"`` (its config.json fetched or found in the cache),
        a string (a local path or an http(s) URL), or a state dict given as is.

    Raises:
        ValueError: both ``pretrained`` and ``weights`` given, unknown tag, malformed Hub
            spec, or weights of another architecture.
        TypeError: ``weights`` of an unsupported type.
        DownloadError, CheckpointError: a Hub repo's config.json cannot be had or read.
    """
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained=True or weights=..., not both")
    if pretrained:
        return get_weights(arch, "IMAGENET1K_V1")  # as torchvision maps pretrained=True
    if weights is None:
        return None
    if isinstance(weights, WeightsEnum):
        weights = weights.value
    if isinstance(weights, Weights):
        if weights.arch != arch:
            raise ValueError(f"weights {weights.arch}/{weights.tag} do not fit {arch}")
        return weights
    if isinstance(weights, os.PathLike):
        return os.fspath(weights)
    if isinstance(weights, Mapping):
        return weights
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a tag, Weights, path or URL, got "
                        f"{type(weights).__name__}")
    if is_hub_spec(weights):
        return hub_weights(arch, weights)
    if weights.startswith(("http://", "https://")):
        return weights
    if is_local_path(weights):
        if not os.path.exists(weights):
            raise FileNotFoundError(f"weights file not found: {weights}")
        return weights
    return get_weights(arch, weights)


def is_local_path(weights):
    """Whether a ``weights=`` string names a local file: not a URL or Hub spec, and it
    exists, has a folder in it, or ends like a checkpoint file (the registry's tags never
    do)."""
    if weights.startswith(("http://", "https://")) or is_hub_spec(weights):
        return False
    return os.path.exists(weights) or os.sep in weights or weights.endswith(LOCAL_SUFFIXES)


def fetch_state_dict(source, progress=True, check=None):
    """Load the state dict for what :func:`resolve` returned (downloading if needed).

    Args:
        source: :func:`resolve`'s result (not None).
        progress: progress bar on stderr while downloading (terminals only).
        check: ``state_dict -> list of problems``, applied to Hub weights before they are
            returned (:func:`numres.hub.hf.load_state_dict`).

    Returns:
        dict name -> array.
    """
    if isinstance(source, Mapping):
        return source
    if isinstance(source, HubWeights):
        return hf.load_state_dict(source, progress=progress, check=check)
    if isinstance(source, Weights):
        return load_pth(cached_file(source.url, progress=progress))
    if source.startswith(("http://", "https://")):
        return load_pth(cached_file(source, progress=progress))
    return load_pth(source)
