"""Model-only benchmark: torch eager vs onnxruntime fp32 / int8 vs TensorRT on pre-decoded inputs.

All backends compute the same thing — the contract graph (uint8 NHWC → probs, confidence, label,
ood_score, embedding); torch eager runs :class:`~calibclust.export.onnx.ContractModule`, the module
that was exported. Inputs are uint8 batches already in memory (digits at the model's input size),
so decoding is not measured. With a CUDA GPU (``--devices cpu,cuda``) the GPU rows take inputs
already on the device and leave outputs there (torch tensors; onnxruntime's CUDA provider through
IO binding; TensorRT on device buffers), so host↔device copies are not measured either: torch
eager fp32 and fp16 autocast, onnxruntime CUDA, TensorRT FP16. Each row's ratio is to torch eager
fp32 *on the same device*. For each batch size the backends are timed **alternately**, round by
round in rotating order, so that load from other processes on a shared machine spreads over all of
them instead of skewing one. Reported per backend and batch size: images/s (images / total time),
latency p50/p95 of one call, ratio to torch eager, and achieved GFLOP/s (FLOPs per image counted
from the ONNX graph: 2·MACs of Conv, Gemm and MatMul).

Entry points: ``calibclust bench model [--model DIR]`` (registered by calibclust.export.cli) and its
alias ``calibclust export bench``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class BenchRow:
    backend: str
    batch: int
    device: str
    images_per_s: float
    p50_ms: float
    p95_ms: float
    calls: int
    ratio_to_torch: float | None = None
    gflops: float | None = None


@dataclass
class BenchResult:
    rows: list[BenchRow]
    flops_per_image: float
    info: dict = field(default_factory=dict)

    def table(self) -> str:
        head = (f"{'backend':<24}{'device':<7}{'batch':>6}{'images/s':>11}{'p50 ms':>10}{'p95 ms':>10}"
                f"{'x torch':>9}{'GFLOP/s':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            ratio = "-" if r.ratio_to_torch is None else f"{r.ratio_to_torch:.2f}"
            lines.append(
                f"{r.backend:<24}{r.device:<7}{r.batch:>6}{r.images_per_s:>11.1f}{r.p50_ms:>10.2f}{r.p95_ms:>10.2f}"
                f"{ratio:>9}{(r.gflops or 0):>9.1f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "flops_per_image": self.flops_per_image, "info": self.info}


# --- FLOPs from the ONNX graph -------------------------------------------------------------------
def count_flops(model_proto) -> tuple[float, list[str]]:
    """FLOPs for one image (2 × multiply-adds of Conv / Gemm / MatMul).

    Shapes come from running the graph once in onnxruntime on a batch of one (every intermediate
    tensor exposed as an output): static shape inference cannot see through the Shape → Concat →
    Reshape chains the exporters emit before the head.
    """
    import copy

    import onnx
    import onnxruntime as ort

    proto = copy.deepcopy(model_proto)
    present = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    graph_input = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in graph_input.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {graph_input.name: np.zeros([1] + dims[1:], dtype)})
    shapes = {name: list(v.shape) for name, v in zip(names, values)}
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    flops, unknown = 0.0, []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, first = shapes.get(node.output[0]), shapes.get(node.input[0])
        if out is None or first is None:
            unknown.append(node.name)
            continue
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            flops += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))  # per output: Cin/g·kh·kw MACs
        else:
            transa = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = first[-2] if (node.op_type == "Gemm" and transa) else first[-1]
            flops += 2.0 * float(np.prod(out)) * float(k)
    return flops, unknown


# --- timing --------------------------------------------------------------------------------------
def _time_alternating(backends: dict, calls_per_round: int, rounds: int) -> dict:
    times: dict = {name: [] for name in backends}
    names = list(backends)
    for fn in backends.values():  # warm-up: first-call allocations, oneDNN/MLAS kernel selection
        fn()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = backends[name]
            for _ in range(calls_per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_model_bench(
    model=None,
    metadata=None,
    backbone: str = "resnet18",
    input_size: int = 32,
    batches=(1, 32, 256),
    rounds: int = 5,
    threads: int = 2,
    head_steps: int = 300,
    int8: bool = True,
    tensorrt: bool = True,
    devices: tuple[str, ...] | None = None,
    work_dir: str | None = None,
    seed: int = 0,
    log=print,
) -> BenchResult:
    import onnx
    import onnxruntime as ort
    import torch

    from calibclust.datasets import digits_images
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.export.parity import ort_session

    torch.set_num_threads(threads)
    devices = resolve_devices(devices)
    load_before = os.getloadavg()
    if model is None:
        from calibclust.export.selflabel import fit_heads, recalibrate_batchnorm, thumbnail_kmeans_labels
        from calibclust.metadata import ModelMetadata
        from calibclust.models.backbones import build_backbone
        from calibclust.models.clustering import ClusteringModel

        torch.manual_seed(seed)
        model = ClusteringModel(build_backbone(backbone, input_size), 10)
        images, _ = digits_images(input_size)
        log(f"building the benchmark model: {backbone} (input {input_size}x{input_size}), random backbone with BN "
            f"statistics from 512 digits, heads fitted on thumbnail K-means pseudo-labels for {head_steps} steps")
        recalibrate_batchnorm(model, images, seed=seed)
        fit_heads(model, images, thumbnail_kmeans_labels(images, 10, seed), steps=head_steps, seed=seed)
        metadata = ModelMetadata(num_clusters=10, input_size=(input_size, input_size), mean=(0.5,) * 3, std=(0.25,) * 3,
                                 backbone=backbone)
        what = f"{backbone} built here (random backbone + data BN statistics, heads on pseudo-labels)"
    else:
        images, _ = digits_images(metadata.input_size[0])
        if metadata.input_size[0] != metadata.input_size[1]:
            from calibclust.io.images import resize_image

            images = np.stack([np.asarray(resize_image(im, metadata.input_size)) for im in images])
        what = metadata.backbone or "checkpoint"
    model = model.eval()
    tmp = tempfile.TemporaryDirectory() if work_dir is None else None
    folder = Path(work_dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fp32_path = folder / "bench.onnx"
        exported = export_onnx(model, metadata, images, fp32_path, OnnxExportConfig(seed=seed), log=log)
        flops, unknown = count_flops(onnx.load(str(fp32_path)))
        sessions = {"onnxruntime fp32": ort_session(fp32_path, threads)}
        info = {
            "model": what,
            "threads": threads,
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "fp32_parity": exported.parity.to_dict(),
            "flops_unknown_nodes": unknown,
        }
        if int8 and "cpu" in devices:
            from calibclust.export.int8 import Int8Config, quantize_int8

            # The bench reports agreement instead of refusing (min_agreement ~ 0); export refuses < 99%.
            q = quantize_int8(fp32_path, folder / "bench.int8.onnx", images, Int8Config(min_agreement=1e-9, seed=seed),
                              threads=threads, log=log)
            sessions["onnxruntime int8"] = ort_session(q.path, threads)
            info["int8_label_agreement"] = q.agreement.label_agreement
            info["int8_eval_images"] = q.agreement.n_images
        module = exported.module
        runners: dict[tuple[str, str], Callable[[np.ndarray], Callable[[], object]]] = {}  # (backend, device)
        if "cpu" in devices:
            def torch_runner(batch):
                x = torch.from_numpy(batch)

                def call():
                    with torch.inference_mode():
                        return module(x)

                return call

            runners["torch eager", "cpu"] = torch_runner
            for name, session in sessions.items():
                def make(batch, session=session):
                    feed = {session.get_inputs()[0].name: batch}
                    return lambda: session.run(None, feed)

                runners[name, "cpu"] = make
        if "cuda" in devices:
            runners.update({(name, "cuda"): make for name, make in _cuda_runners(module, fp32_path, info, log).items()})
        if tensorrt and "cuda" in devices:
            trt_runner = _tensorrt_runner(fp32_path, folder, images, log)
            if trt_runner is not None:
                runners["tensorrt fp16", "cuda"] = trt_runner

        rows: list[BenchRow] = []
        for batch_size in batches:
            reps = -(-batch_size // len(images))
            batch = np.ascontiguousarray(np.tile(images, (reps, 1, 1, 1))[:batch_size])
            calls = max(1, min(20, 256 // batch_size))  # ~256 images per backend per round
            times = _time_alternating({key: make(batch) for key, make in runners.items()}, calls, rounds)
            new_rows = []
            for (name, device), samples in times.items():
                samples = np.asarray(samples)
                ips = batch_size * len(samples) / samples.sum()
                new_rows.append(BenchRow(name, batch_size, device, ips, 1e3 * float(np.percentile(samples, 50)),
                                         1e3 * float(np.percentile(samples, 95)), len(samples), None, flops * ips / 1e9))
            base = {r.device: r.images_per_s for r in new_rows if r.backend == "torch eager"}
            for row in new_rows:
                row.ratio_to_torch = row.images_per_s / base[row.device] if row.device in base else None
            rows += new_rows
            log(f"batch {batch_size}: done")
        info["load_average_before"] = [round(v, 2) for v in load_before]
        info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        return BenchResult(rows, flops, info)
    finally:
        if tmp is not None:
            tmp.cleanup()



def resolve_devices(devices) -> tuple[str, ...]:
    """``None`` → cpu, plus cuda when torch sees a GPU; an explicit ``cuda`` without one is an error."""
    import torch

    from calibclust.errors import InputError

    if devices is None:
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    devices = tuple(dict.fromkeys(devices))
    unknown = [d for d in devices if d not in ("cpu", "cuda")]
    if unknown or not devices:
        raise InputError(f"--devices takes cpu and/or cuda, got {','.join(devices) or 'nothing'}")
    if "cuda" in devices and not torch.cuda.is_available():
        raise InputError("--devices cuda: torch.cuda.is_available() is False on this machine")
    return devices


def _cuda_runners(module, fp32_path: Path, info: dict, log) -> dict[str, Callable[[np.ndarray], Callable[[], object]]]:
    """batch -> callable factories for the GPU rows; inputs are copied to the GPU once per batch
    size and outputs stay there, so each call times the model alone (synchronised at the end)."""
    import copy

    import onnxruntime as ort
    import torch

    gpu_module = copy.deepcopy(module).cuda().eval()
    # cuDNN picks its fastest kernels per shape, as TensorRT does at build time: a fair baseline.
    torch.backends.cudnn.benchmark = True
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda"] = torch.version.cuda

    def torch_cuda(batch, fp16=False):
        x = torch.from_numpy(batch).cuda()

        def call():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                out = gpu_module(x)
            torch.cuda.synchronize()
            return out

        return call

    factories = {"torch eager": torch_cuda, "torch fp16 autocast": lambda batch: torch_cuda(batch, fp16=True)}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log("onnxruntime cuda: skipped, this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)")
        return factories
    from calibclust.export.parity import ort_session

    session = ort_session(fp32_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        log(f"onnxruntime cuda: skipped, onnxruntime started {session.get_providers()[0]} (CUDA libraries missing?)")
        return factories
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]

    def ort_cuda(batch):
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        for name in output_names:
            binding.bind_output(name, "cuda")

        def call():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return binding

        return call

    factories["onnxruntime cuda"] = ort_cuda
    return factories

def _tensorrt_runner(fp32_path: Path, folder: Path, images: np.ndarray, log):
    """A batch -> callable factory timing a TensorRT FP16 engine on device-resident inputs, or None."""
    try:
        import tensorrt  # noqa: F401
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    from calibclust.export.tensorrt import TensorRTConfig, TensorRTRunner, build_engine

    result = build_engine(fp32_path, folder / "bench.engine", TensorRTConfig(precision="fp16"), images=images[:512], log=log)
    runner = TensorRTRunner(result.path.read_bytes())

    def make(batch):
        x = torch.from_numpy(batch).cuda()

        def call():
            out = runner.run_device(x)
            torch.cuda.current_stream().synchronize()
            return out

        return call

    return make


# --- CLI -----------------------------------------------------------------------------------------
def run_bench_command(args) -> int:
    model = metadata = None
    if args.model:
        from calibclust.models.clustering import load_model

        model, metadata = load_model(args.model)
    result = run_model_bench(
        model, metadata, backbone=args.backbone, input_size=args.image_size, batches=args.batch_sizes, rounds=args.rounds,
        threads=args.threads, head_steps=args.head_steps, int8=not args.no_int8, tensorrt=not args.no_tensorrt,
        devices=args.devices, work_dir=args.work_dir, seed=args.seed,
    )
    info = result.info
    print()
    print(f"model: {info['model']}; {result.flops_per_image / 1e9:.3f} GFLOP per image (2 x MACs from the ONNX graph)")
    print(f"cpu: {info['cpu']}; threads {info['threads']} (torch.set_num_threads, onnxruntime intra_op_num_threads); "
          f"torch {info['torch']}, onnxruntime {info['onnxruntime']}")
    if "gpu" in info:
        print(f"gpu: {info['gpu']}; CUDA {info['cuda']}; GPU rows take inputs already on the GPU and leave the outputs "
              f"there; 'x torch' is the ratio to torch eager fp32 on the same device")
    print(f"load average before {info['load_average_before']}, after {info['load_average_after']} "
          f"(other processes share this machine)")
    if "int8_label_agreement" in info:
        print(f"int8 label agreement with fp32: {100 * info['int8_label_agreement']:.2f}% on {info['int8_eval_images']} "
              f"held-out images")
    print(result.table())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_dict(), indent=2))
    return 0
