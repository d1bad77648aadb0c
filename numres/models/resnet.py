"""torchvision's ResNet family (ResNet v1.5), computed through a numres backend.

Architecture and attribute names follow ``torchvision/models/resnet.py``, so torchvision
``state_dict`` keys load unchanged. As in torchvision, the Bottleneck puts the stride on its
3x3 convolution ("ResNet v1.5"); the original paper put it on the first 1x1.

Batch norm is folded into the preceding convolution when weights are prepared for a backend
(once per load, in float64): ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma /
sqrt(var + eps)``. ``fold_bn=False`` keeps the two separate, as a reference for the folding.
"""

import threading

import numpy as np

from ..backends import get_backend
from . import memory
from ._input import as_float32, check_input
from ._modules import BatchNorm2d, Conv2d, Linear, Module, Sequential, load_state_dict

#: What ``feature_maps`` can return, in order: after the stem's max pool, then each stage.
STAGES = memory.STAGES


def conv3x3(in_planes, out_planes, stride=1, groups=1):
    return Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups)


def conv1x1(in_planes, out_planes, stride=1):
    return Conv2d(in_planes, out_planes, 1, stride=stride)


class BasicBlock(Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample

    units = (("conv1", "bn1"), ("conv2", "bn2"))

    def forward(self, x, run):
        identity = x if self.downsample is None else run["downsample"](x)
        out = run["conv1"](x, relu=True)
        return run["conv2"](out, relu=True, residual=identity)


class Bottleneck(Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, stride here: v1.5), 1x1 expand, shortcut."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    units = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def forward(self, x, run):
        identity = x if self.downsample is None else run["downsample"](x)
        out = run["conv1"](x, relu=True)
        out = run["conv2"](out, relu=True)
        return run["conv3"](out, relu=True, residual=identity)


class _ConvBN:
    """A convolution and its batch norm, prepared for one backend (folded or not)."""

    def __init__(self, backend, conv, bn, fold):
        self.backend = backend
        weight = conv.params["weight"]
        if fold:
            scale, shift = bn.scale_shift()
            # (O, I/G, kh, kw) scaled per output channel
            folded = (weight.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
            self.conv = backend.prepare_conv(folded, shift.astype(np.float32), conv.stride,
                                             conv.padding, conv.groups)
            self.bn = None
        else:
            self.conv = backend.prepare_conv(weight, None, conv.stride, conv.padding,
                                             conv.groups)
            p = bn.params
            self.bn = backend.prepare_batch_norm(p["running_mean"], p["running_var"],
                                                 p["weight"], p["bias"], bn.eps)

    def __call__(self, x, relu=False, residual=None):
        if self.bn is None:
            return self.backend.conv2d(x, self.conv, relu=relu, residual=residual)
        y = self.backend.conv2d(x, self.conv)
        return self.backend.batch_norm(y, self.bn, relu=relu, residual=residual)

    def pooled(self, x, relu, kernel_size, stride, padding):
        """This unit, then max pooling: fused by the backend where batch norm is folded."""
        if self.bn is None:
            return self.backend.conv2d_max_pool(x, self.conv, relu, kernel_size, stride,
                                                padding)
        return self.backend.max_pool2d(self(x, relu=relu), kernel_size, stride, padding)


class ResNet(Module):
    """A torchvision-compatible ResNet that runs on a numres backend.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: outputs of the final fully connected layer.
        groups, width_per_group: ResNeXt / Wide ResNet widths (as torchvision).
        backend: ``"auto"``, ``"numpy"``, ``"numba"``, ``"cupy"`` or a Backend.
        fold_bn: fold batch norm into the convolutions (the fast, default path).

    Memory: before each pass the model estimates what it will allocate
    (:mod:`numres.models.memory`); a batch that does not fit the memory available runs in
    chunks that do (same results, bit for bit), and an image that alone does not fit raises
    :class:`MemoryError` before anything large is allocated. ``memory_limit`` (bytes,
    ``"4GiB"`` or ``"none"``) overrides the detected memory, as ``NUMRES_MEMORY_LIMIT`` does
    for every model.

    Example:
        >>> model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, backend="numpy")
        >>> model(np.zeros((1, 3, 64, 64), np.float32)).shape
        (1, 10)
    """

    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64,
                 backend="auto", fold_bn=True):
        super().__init__()
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = Conv2d(3, self.inplanes, 7, stride=2, padding=3)
        self.bn1 = BatchNorm2d(self.inplanes)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.fc = Linear(512 * block.expansion, int(num_classes))
        self.num_features = 512 * block.expansion
        self.fold_bn = fold_bn
        self.arch = None
        self.weights = None  # the registry Weights when built pretrained
        self._backend = get_backend(backend)
        self._active = self._backend   # what the last call ran on (Backend.stand_in)
        self._plans = {}               # backend -> its prepared weights
        self._plan_lock = threading.Lock()
        self._call = threading.local()  # .plan: what this thread's call runs on
        self.memory_limit = None
        #: Called with the parameters' arrays once the backend holds its own copies of them
        #: (the builders pass ``numres.checkpoint.release_pages``: a checkpoint file's pages
        #: then go back to the OS); None does nothing.
        self.after_prepare = None

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                    BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width))
        return Sequential(*layers)

    def children(self):
        # Only modules that own parameters; torchvision has relu/maxpool/avgpool too, but they
        # hold no state and their key names never appear in a state dict.
        for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
            yield name, getattr(self, name)

    # -- weights and backend ---------------------------------------------------------------
    @property
    def backend(self):
        """The :class:`~numres.backends.Backend` this model runs on."""
        return self._backend

    @property
    def active_backend(self):
        """The backend calls run on: :attr:`backend`, or the stand-in it names while it
        cannot run yet (the Numba backend's kernels compiling in the background on a fresh
        machine: :meth:`~numres.backends.Backend.stand_in`). Inside a call, that call's;
        otherwise the last call's."""
        plan = getattr(self._call, "plan", None)
        return self._active if plan is None else plan["backend"]

    def to(self, backend):
        """Move the model to another backend (weights are re-prepared). Returns ``self``."""
        self._backend = self._active = get_backend(backend)
        self.reset_prepared()
        return self

    def reset_prepared(self):
        """Drop the backend's prepared copy of the weights (after changing ``params`` in
        place); it is made again, from the parameters, at the next call."""
        with self._plan_lock:       # after a preparation in progress, not under it
            self._plans = {}

    def load_state_dict(self, state_dict, strict=True):
        """Load torchvision-named weights; ``num_batches_tracked`` entries are ignored.

        Args:
            state_dict: mapping of names to arrays, e.g. from :func:`numres.load_pth`.
            strict: require exactly the model's keys.

        Returns:
            ``(missing_keys, unexpected_keys)``.

        Raises:
            CheckpointError: missing/unexpected keys (strict) or shape mismatches, by name.
        """
        result = load_state_dict(self, state_dict, strict=strict)
        self.reset_prepared()
        return result

    def _prepared(self, backend=None):
        """The weights prepared for ``backend`` (default: the current call's, else those
        of :attr:`active_backend`, as memory estimates outside a call see it), made once
        per backend."""
        if backend is None:
            plan = getattr(self._call, "plan", None)
            if plan is not None:
                return plan
            backend = self._active
        plan = self._plans.get(backend)
        if plan is None:
            with self._plan_lock:
                plan = self._plans.get(backend)
                if plan is None:
                    plan = self._plans[backend] = self._prepare(backend)
                    if self.after_prepare is not None and (backend.copies_weights
                                                           or self.fold_bn):
                        # The backend holds its own copies (folding makes new arrays too).
                        self.after_prepare(self.state_dict().values())
        return plan

    def _call_plan(self, x):
        """The prepared weights this call runs on: its stand-in's while the model's backend
        names one (:meth:`~numres.backends.Backend.stand_in`, asked once per call), else the
        model's backend's (and a stand-in's are dropped)."""
        stand_in = self._backend.stand_in() if isinstance(x, np.ndarray) else None
        if stand_in is not None:
            return self._prepared(stand_in)
        plan = self._prepared(self._backend)
        if len(self._plans) > 1:
            with self._plan_lock:
                for other in [b for b in self._plans if b is not self._backend]:
                    self._plans.pop(other, None)
        return plan

    def _prepare(self, backend):
        fold = self.fold_bn
        blocks = []
        for stage in STAGES[1:]:
            for block in getattr(self, stage):
                run = {conv: _ConvBN(backend, getattr(block, conv), getattr(block, bn), fold)
                       for conv, bn in block.units}
                if block.downsample is not None:
                    run["downsample"] = _ConvBN(backend, block.downsample[0],
                                                block.downsample[1], fold)
                blocks.append((stage, block, run))
        fc = self.fc.params
        return {"backend": backend,
                "stem": _ConvBN(backend, self.conv1, self.bn1, fold), "blocks": blocks,
                "fc": backend.prepare_linear(fc["weight"], fc["bias"]),
                "graphs": {},   # device backends' captured passes, tied to these weights
                "memory": {}}   # memory estimates per input shape (memory.batch_chunk)

    # -- inference -------------------------------------------------------------------------
    def __call__(self, x):
        """Class logits: (N, 3, H, W) float32 -> (N, num_classes) float32.

        NumPy in gives NumPy out; a device array of the model's backend stays on the device.
        """
        return self.forward(x)

    def forward(self, x):
        """Same as calling the model."""
        return self._run(x, "logits")

    def features(self, x):
        """Pooled embedding before ``fc``: (N, 512) for ResNet-18/34, (N, 2048) for the rest.

        Example:
            >>> emb = numres.resnet50(pretrained=True).features(batch)   # (N, 2048)
        """
        return self._run(x, "features")

    def feature_maps(self, x, stages=("layer1", "layer2", "layer3", "layer4")):
        """Intermediate feature maps, as torchvision's ``IntermediateLayerGetter``.

        Args:
            x: (N, 3, H, W) float32 batch.
            stages: any of ``"stem"`` (after max pool), ``"layer1"`` .. ``"layer4"``.

        Returns:
            dict stage -> (N, C, h, w) array: strides 4, 4, 8, 16, 32 and channels 64 and
            (64, 128, 256, 512) x expansion.
        """
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        return self._run(x, "maps", stages)

    def _run(self, x, kind, stages=()):
        """Validate ``x``, run the network up to ``kind``, return results like ``x``.

        Raises:
            MemoryError: one image of ``x``'s shape does not fit in the memory available
                (:func:`numres.models.memory.batch_chunk`); a batch that does not fit runs
                in chunks instead.
        """
        x = check_input(x, self._backend, cast=False)
        copy_input = x.dtype != np.float32 or not x.flags.c_contiguous
        try:
            plan = self._call_plan(x)
            # Memory estimates and the pass see this call's backend and weights only.
            self._call.plan = plan
            backend = self._active = plan["backend"]
            on_device = backend.owns(x)
            chunk = memory.batch_chunk(self, x.shape, kind, stages, copy_input)
            if chunk < x.shape[0]:
                return self._chunked(plan, x, kind, stages, chunk, on_device)
            out = self._pass(plan, as_float32(x), kind, stages)
        finally:
            self._call.plan = None
        if on_device:
            return out
        if isinstance(out, dict):
            return {k: backend.to_numpy(v) for k, v in out.items()}
        return backend.to_numpy(out)

    def _pass(self, plan, x, kind, stages, batch=None):
        """One pass of float32 ``x`` through ``backend.execute``: backend arrays out.
        ``batch``: the backend's choices are made as for that many images."""
        backend = plan["backend"]

        def forward(xd):
            act = backend.from_nchw(xd)
            if kind == "maps":
                found = {}
                self._trunk(plan, act, (stages, found))
                return {s: backend.to_nchw(found[s]) for s in stages}
            pooled = backend.global_avg_pool(self._trunk(plan, act, None))
            return pooled if kind == "features" else backend.linear(pooled, plan["fc"])

        return backend.execute(plan["graphs"], memory.pass_key(kind, stages, x.shape, batch),
                               forward, backend.to_device(x))

    def _chunked(self, plan, x, kind, stages, chunk, on_device):
        """``_run`` for a batch that does not fit at once: chunks of at most ``chunk`` images.

        Each chunk is computed as in the whole batch (``backend.as_batch``: the same
        algorithm per layer; every kernel computes each image on its own), so results equal
        an unsplit run's bit for bit. Logits: the chunks' pooled features are gathered and
        ``fc`` runs once on all of them, as in the unsplit pass (a GEMM's rounding may
        depend on its row count). Where the backend keeps buffers per input shape (recorded
        passes, CUDA graphs), the last chunk is padded with zeros to the others' size, so
        one shape's buffers serve them all.
        """
        backend = plan["backend"]
        n = x.shape[0]
        size = -(-n // -(-n // chunk))        # equal chunks: ceil(n / number of chunks)
        run_kind = "features" if kind == "logits" else kind
        keep = on_device or kind == "logits"  # gather backend arrays (fc runs on them)
        gathered = None
        with backend.as_batch(n):
            for i0 in range(0, n, size):
                i1 = min(i0 + size, n)
                part = x[i0:i1]
                if backend.keeps_buffers_per_shape and i1 - i0 < size:
                    # (size, 3, H, W): the remainder, then zero images
                    part = np.zeros_like(x, shape=(size,) + x.shape[1:], dtype=np.float32)
                    part[:i1 - i0] = x[i0:i1]
                out = self._pass(plan, as_float32(part), run_kind, stages, batch=n)
                out = out if isinstance(out, dict) else {None: out}
                if gathered is None:
                    # (N, ...) per result, backend arrays or NumPy as the caller gets them
                    gathered = {k: np.empty_like(v, shape=(n,) + v.shape[1:]) if keep else
                                np.empty((n,) + v.shape[1:], np.float32)
                                for k, v in out.items()}
                for k, v in out.items():
                    gathered[k][i0:i1] = (v if keep else backend.to_numpy(v))[:i1 - i0]
                del out
        if kind == "logits":
            logits = backend.linear(gathered[None], plan["fc"])
            return logits.copy() if on_device else backend.to_numpy(logits)
        return gathered if kind == "maps" else gathered[None]

    def _trunk(self, plan, x, collect):
        """Run the stem and the four stages. ``collect`` = (stage names, dict to fill)."""
        x = plan["stem"].pooled(x, relu=True, kernel_size=3, stride=2, padding=1)
        wanted, found = collect or ((), None)
        last = max((STAGES.index(s) for s in wanted), default=len(STAGES) - 1)
        if "stem" in wanted:
            found["stem"] = x
            if last == 0:
                return x
        blocks = plan["blocks"]
        for i, (stage, block, run) in enumerate(blocks):
            x = block.forward(x, run)
            stage_ends = i + 1 == len(blocks) or blocks[i + 1][0] != stage
            if stage_ends and stage in wanted:
                found[stage] = x
                if STAGES.index(stage) == last:
                    break
        return x

    def extra_repr(self):
        return f"backend={self._backend.name!r}, fold_bn={self.fold_bn}"
