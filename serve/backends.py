"""Inference backends: run a contract model on a uint8 NHWC batch. Torch-free.

Built in: onnxruntime with the CPU, CUDA or TensorRT execution provider. ``auto`` starts the best
provider that actually runs here (TensorRT > CUDA > CPU): onnxruntime-gpu lists TensorRT (and CUDA)
whether or not their libraries are installed, so a provider that does not start is passed over with
a note. An explicit choice that cannot be honoured is an error, never a silent fall-back to CPU.

Native TensorRT engines (``.engine``/``.plan`` files) are not run by this package: they need a
TensorRT + CUDA runtime we cannot exercise here. Instead there is a hook — any installed package
can register a backend factory under the entry-point group ``calibclust.serve.backends``
(``name = "pkg.module:factory"``); the factory is called as ``factory(model_path, **options)`` and
returns an object with this module's :class:`Backend` surface. A factory may set a ``suffixes``
attribute (e.g. ``(".engine", ".plan")``) so that ``auto`` picks it for such files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from calibclust.errors import CalibclustError, InputError, MissingDependencyError

ENTRY_POINT_GROUP = "calibclust.serve.backends"
CONTRACT_OUTPUTS = ("probs", "confidence", "label", "ood_score")

# onnxruntime provider names for the built-in backends, best first.
_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
BUILTIN_BACKENDS = tuple(_PROVIDERS)
# Batch sizes that keep each backend busy without holding much memory: CPU gains little beyond
# a few hundred small images; GPUs want larger batches to amortise the launch/copy overhead.
DEFAULT_BATCH_SIZE = {"cpu": 256, "cuda": 512, "tensorrt": 512}


class BackendError(CalibclustError):
    pass


class ProviderUnavailable(BackendError):
    """onnxruntime offers the execution provider but could not start it (its libraries are missing)."""


class Backend(Protocol):
    name: str  # e.g. "cpu", "cuda", "tensorrt", or a plugin's name
    default_batch_size: int

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = CONTRACT_OUTPUTS) -> dict[str, np.ndarray]:
        """``images`` uint8 (N, H, W, 3) → the requested contract outputs as numpy arrays."""


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # [demo] alone, or a broken install: the serve extras bring it
        raise MissingDependencyError("onnxruntime", "serve", "running models; 'calibclust[serve-gpu]' on a CUDA machine") from exc
    return onnxruntime


# onnxruntime prints GPU set-up notes ("EP Error ... Falling back") to stdout, where `label` prints
# its results: they are sent to stderr. redirect_stdout swaps sys.stdout for the whole process, so
# one lock keeps two threads (the demo server) from restoring each other's stream.
_GPU_SETUP_LOCK = threading.Lock()


@contextlib.contextmanager
def _gpu_setup_notes_to_stderr():
    with _GPU_SETUP_LOCK, contextlib.redirect_stdout(sys.stderr):
        yield


@functools.cache
def _preload_gpu_libraries() -> None:
    """Load CUDA / cuDNN from the nvidia-* pip packages (onnxruntime-gpu >= 1.21 does this only when
    asked; torch would on import, but serve never imports torch). Called under the lock above."""
    preload = getattr(_ort(), "preload_dlls", None)
    if preload is not None:
        preload()


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def plugin_backends() -> dict[str, Any]:
    """Backend factories registered by installed packages (name → entry point, not loaded yet)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Built-in backends this machine can run (best first), then registered plugins."""
    providers = set(available_providers())
    names = [name for name, provider in _PROVIDERS.items() if provider in providers]
    return names + sorted(set(plugin_backends()) - set(names))


def resolve_backend(requested: str, model_path: str | os.PathLike) -> str:
    """Turn ``auto`` into a concrete backend name and check an explicit one exists here."""
    suffix = Path(model_path).suffix.lower()
    plugins = plugin_backends()
    if requested == "auto":
        if suffix != ".onnx":
            for name, ep in sorted(plugins.items()):
                if suffix in tuple(getattr(ep.load(), "suffixes", ())):
                    return name
            raise BackendError(
                f"{model_path}: no installed backend runs '{suffix}' files. calibclust.serve runs ONNX "
                f"models; for a native TensorRT engine install a package that registers a backend under "
                f"'{ENTRY_POINT_GROUP}', or label with the .onnx model and --backend tensorrt "
                f"(onnxruntime's TensorRT execution provider)."
            )
        providers = set(available_providers())
        return next(name for name, provider in _PROVIDERS.items() if provider in providers)
    if requested in _PROVIDERS:
        if suffix != ".onnx":
            raise BackendError(f"backend {requested!r} runs .onnx models, not {Path(model_path).name}")
        if _PROVIDERS[requested] not in available_providers():
            extra = ("pip install 'calibclust[serve-gpu]' (onnxruntime-gpu) instead of 'calibclust[serve]', never both"
                     + (" and 'calibclust[tensorrt]'" if requested == "tensorrt" else "")) if requested != "cpu" else ""
            raise BackendError(
                f"backend {requested!r} is not available in this onnxruntime build "
                f"(it offers {', '.join(available_providers())}). {extra}".strip()
            )
        return requested
    if requested in plugins:
        return requested
    raise InputError(
        f"unknown backend {requested!r}; choose auto, {', '.join(BUILTIN_BACKENDS)}"
        + (f" or a registered one ({', '.join(sorted(plugins))})" if plugins else "")
    )


@dataclass
class OrtOptions:
    """Session options; ``threads`` = intra-op threads (None: onnxruntime's default, one per core)."""

    threads: int | None = None
    max_batch_size: int | None = None  # TensorRT optimisation profile's upper bound
    trt_cache_dir: str | None = None  # where TensorRT EP keeps built engines (rebuilt otherwise)
    extra_provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # onnxruntime's CPU thread pool spin-waits between ops by default; in the labelling pipeline that
    # steals the cores the decode workers need, so the pipeline turns it off (model-only use keeps it).
    allow_spinning: bool = True


class OrtBackend:
    """onnxruntime session on one execution provider (plus CPU for ops the provider lacks)."""

    def __init__(self, model_path: str | os.PathLike, name: str = "cpu", options: OrtOptions | None = None):
        ort = _ort()
        options = options or OrtOptions()
        self.name = name
        self.model_path = str(model_path)
        self.default_batch_size = DEFAULT_BATCH_SIZE[name]
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._providers(name, options)
        try:
            if name == "cpu":
                self.session = ort.InferenceSession(self.model_path, sess_options=so, providers=providers)
            else:
                with _gpu_setup_notes_to_stderr():
                    _preload_gpu_libraries()
                    self.session = ort.InferenceSession(self.model_path, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise BackendError(f"{model_path}: onnxruntime cannot load this model: {exc}") from None
        active = self.session.get_providers()
        if active[0] != _PROVIDERS[name]:
            # onnxruntime silently falls back to CPU when CUDA/TensorRT libraries are missing.
            raise ProviderUnavailable(
                f"backend {name!r} requested but onnxruntime started {active[0]} "
                f"(CUDA/TensorRT libraries missing or incompatible?)"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _providers(self, name: str, options: OrtOptions) -> list:
        chain: list = []
        if name == "tensorrt":
            trt = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": options.trt_cache_dir
                or os.path.join(os.path.expanduser("~"), ".cache", "calibclust", "tensorrt"),
                "trt_timing_cache_enable": True,
            }
            if options.max_batch_size:
                # One profile covering every batch the pipeline sends (the last one is smaller),
                # so TensorRT does not rebuild its engine for a new batch size mid-run.
                session = _ort().InferenceSession(self.model_path, providers=["CPUExecutionProvider"])
                inp = session.get_inputs()[0]
                h, w, c = inp.shape[1:]
                trt.update(
                    trt_profile_min_shapes=f"{inp.name}:1x{h}x{w}x{c}",
                    trt_profile_opt_shapes=f"{inp.name}:{options.max_batch_size}x{h}x{w}x{c}",
                    trt_profile_max_shapes=f"{inp.name}:{options.max_batch_size}x{h}x{w}x{c}",
                )
            trt.update(options.extra_provider_options.get("tensorrt", {}))
            chain.append((_PROVIDERS["tensorrt"], trt))
        if name in ("tensorrt", "cuda"):
            chain.append((_PROVIDERS["cuda"], dict(options.extra_provider_options.get("cuda", {}))))
        chain.append(_PROVIDERS["cpu"])
        return chain

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = CONTRACT_OUTPUTS) -> dict[str, np.ndarray]:
        results = self.session.run(list(outputs), {self.input_name: images})
        return dict(zip(outputs, results))


def create_backend(
    model_path: str | os.PathLike, backend: str = "auto", options: OrtOptions | None = None, log=None
) -> Backend:
    """Resolve ``backend`` and start it on ``model_path``. With ``auto``, a built-in provider that
    onnxruntime lists but cannot start is reported through ``log`` and the next one is tried."""
    name = resolve_backend(backend, model_path)
    if name in _PROVIDERS:
        if backend != "auto":
            return OrtBackend(model_path, name, options)
        candidates = [n for n in available_backends() if n in _PROVIDERS]
        for candidate in candidates[candidates.index(name):]:
            try:
                return OrtBackend(model_path, candidate, options)
            except ProviderUnavailable as exc:
                if log is not None:
                    log(f"backend auto: {candidate} not usable here, trying the next ({exc})")
        raise BackendError(f"backend auto: none of {', '.join(candidates)} started for {model_path}")
    factory: Callable[..., Backend] = plugin_backends()[name].load()
    options = options or OrtOptions()
    instance = factory(model_path, threads=options.threads, max_batch_size=options.max_batch_size)
    for attr in ("run", "name", "default_batch_size"):
        if not hasattr(instance, attr):
            raise BackendError(f"backend plugin {name!r} returned an object without .{attr}")
    return instance
