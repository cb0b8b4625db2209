"""``calibclust export``: onnx / tensorrt / triton / bench / ood-compare.

Imports nothing heavy at module level (torch, onnx, tensorrt load inside the command functions), so
``calibclust --help`` stays fast. Each subcommand parses arguments, builds a config dataclass and
calls one library function.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from calibclust.cli_names import add_model_arg
from calibclust.errors import InputError

EPILOG_ONNX = """examples:
  calibclust export onnx --model runs/cdc/model --images data/digits --out model.onnx
  calibclust export onnx --model runs/cdc/model --images data/digits --out model.onnx --int8
  calibclust export onnx --model runs/cdc/model --images data/digits --out model.onnx --ood-score msp --slim

The training images are needed at export: the OOD statistics (kNN bank, prototypes) and the OOD
threshold (95% of training images accepted) are fitted on them, INT8 is calibrated on them, and the
parity gate compares torch with onnxruntime on a sample of them.
"""

EPILOG_TRT = """examples:
  calibclust export tensorrt --model model.onnx --out model.engine --batch-sizes 1,32,256
  calibclust export tensorrt --model model.onnx --out model.fp16.engine --fp16
  calibclust export tensorrt --model model.int8.onnx --out model.int8.engine   # Q/DQ graph -> INT8 engine

Needs a CUDA GPU, the tensorrt Python package (pip install 'calibclust[tensorrt]') and onnxruntime for the
parity gate. Precision comes from the ONNX graph (strongly typed network): --fp16 converts the graph
to FP16 first; an INT8 engine is built from the Q/DQ model that 'export onnx --int8' writes.
The engine is only valid on the GPU model and TensorRT version it was built with; the JSON sidecar
(model.engine.json) records both and loading refuses a mismatch.
"""

EPILOG_TRITON = """examples:
  calibclust export triton --model model.onnx --repo triton_models
  calibclust export triton --model model.engine --repo triton_models --name digits_trt --max-batch-size 256
  tritonserver --model-repository triton_models
"""

EPILOG_BENCH = """examples:
  calibclust export bench                              # ResNet-18 CIFAR stem, 32x32, digits
  calibclust export bench --model runs/cdc/model --batch-sizes 1,32,256 --rounds 7
  calibclust export bench --backbone small --threads 2
  calibclust bench model --model runs/cdc/model --devices cuda --batch-sizes 1,32,256   # GPU rows only

Measures images/s and latency p50/p95 on pre-decoded uint8 batches for torch eager, onnxruntime fp32,
onnxruntime int8 and TensorRT (when available), alternating between them round by round so that
machine load hits all of them alike; prints one table with ratios to torch eager and GFLOP/s.
With a CUDA GPU it adds torch eager (fp32 and fp16 autocast), onnxruntime's CUDA provider
(onnxruntime-gpu) and TensorRT FP16 rows, timed on inputs already on the GPU; their ratio is to
torch eager on the GPU.
"""

EPILOG_OOD = """examples:
  calibclust export ood-compare                       # self-labelled small model on digits
  calibclust export ood-compare --model runs/cdc/model   # a trained model (digits-sized input)

Fits each OOD score on 70% of the digits and reports AUROC / FPR@95%TPR against letters, photo
patches and noise (calibclust.datasets.ood_images).
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _device_list(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices or any(d not in ("cpu", "cuda") for d in devices):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cpu,cuda, got {text!r}")
    return devices


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser, "trained model directory (default: build one, see --backbone)", required=False, metavar="DIR")
    parser.add_argument("--backbone", default="resnet18", help="backbone of the built model (default resnet18, CIFAR stem)")
    parser.add_argument("--image-size", type=int, default=32, metavar="PX", help="H = W of the built model's input (default 32)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 32, 256], help="batch sizes timed (default 1,32,256)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per backend and batch size (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    parser.add_argument("--head-steps", type=int, default=300, help="steps fitting the built model's heads on pseudo-labels")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 model")
    parser.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT even when available")
    parser.add_argument("--devices", type=_device_list, default=None,
                        help="cpu, cuda or cpu,cuda (default: cpu, plus cuda when torch sees a GPU)")
    parser.add_argument("--work-dir", help="where the exported models go (default: a temporary folder)")
    parser.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built model and the data (default %(default)s)")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX / TensorRT / Triton, benchmark it",
        description="Turn a trained checkpoint into the deployable model contract: one ONNX graph from raw uint8 "
        "images to probs, confidence, label, ood_score and embedding (optionally INT8), TensorRT engines, "
        "a Triton model repository; and benchmark the result.",
        epilog="Run 'calibclust export SUBCOMMAND --help' for each one's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="export_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser(
        "onnx", help="export to ONNX (fused pre/post-processing, OOD score, metadata, parity gate)",
        description="Export a checkpoint to one ONNX graph: uint8 NHWC images (dynamic batch) -> normalise -> "
        "backbone -> predicting head -> softmax; outputs probs, confidence, label, ood_score, embedding. "
        "The file is written only after onnxruntime matched torch (max |dprobs| <= 1e-5, no label differs).",
        epilog=EPILOG_ONNX, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(p, "trained model directory (model.safetensors + config.json), e.g. runs/cdc/model", metavar="DIR")
    p.add_argument("--images", required=True, help="the training image folder (OOD fit, INT8 calibration, parity)")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--ood-score", default=None, choices=("msp", "energy", "prototype", "knn"),
                   help="OOD score in the graph (default knn: best measured, see 'export ood-compare')")
    p.add_argument("--neighbors", type=int, default=5, metavar="K", help="neighbours k of the kNN OOD score (default 5)")
    p.add_argument("--bank-size", type=int, default=1024, help="training embeddings carried for kNN (default 1024)")
    p.add_argument("--ood-tpr", type=float, default=0.95, help="share of training images the OOD threshold accepts (default 0.95)")
    p.add_argument("--confidence-threshold", type=float, help="default confidence threshold stored in the metadata")
    p.add_argument("--max-images", type=int, default=5000, help="training images used (seeded subsample, default 5000)")
    p.add_argument("--parity-images", type=int, default=256, help="training images in the parity gate (default 256)")
    p.add_argument("--no-embedding", action="store_true", help="leave the embedding output out of the graph")
    p.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"),
                   help="auto: dynamo exporter, TorchScript exporter as fallback")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--slim", action="store_true", help="simplify the graph with onnxslim (optional dependency)")
    p.add_argument("--int8", action="store_true", help="also write a static INT8 (QDQ, per-channel) model")
    p.add_argument("--int8-out", help="INT8 output path (default: OUT with .int8.onnx)")
    p.add_argument("--calibration-images", type=int, default=512, help="INT8 calibration images (default 512)")
    p.add_argument("--int8-calibration", default="minmax", choices=("minmax", "entropy", "percentile"),
                   help="how INT8 activation ranges are calibrated (default %(default)s)")
    p.add_argument("--int8-min-agreement", type=float, default=0.99,
                   help="refuse an INT8 model whose labels agree with fp32 on fewer held-out images (default 0.99)")
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subsamples (default %(default)s)")
    p.set_defaults(func=run_onnx)

    p = sub.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX model (GPU)",
                       description="Build a TensorRT engine (strongly typed network) with an optimisation profile for the "
                       "dynamic batch, a timing cache, a JSON sidecar, and a parity gate against onnxruntime.",
                       epilog=EPILOG_TRT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, "exported .onnx (fp32, or the .int8.onnx Q/DQ model)", metavar="ONNX")
    p.add_argument("--out", required=True, help="output .engine path (sidecar: OUT.json)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="convert the graph to FP16 before building")
    precision.add_argument("--int8", action="store_true", help="require a Q/DQ (INT8) input model")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 32, 256], help="min,opt,max batch of the profile (default 1,32,256)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB (default 4)")
    p.add_argument("--timing-cache", help="timing cache file, read and updated (default: OUT.timing)")
    p.add_argument("--images", help="image folder for the parity gate (default: random uint8 batches)")
    p.set_defaults(func=run_tensorrt)

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository",
                       description="Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.{onnx,plan} for an exported model: "
                       "the contract's inputs and outputs, dynamic batching, onnxruntime_onnx or tensorrt_plan platform.",
                       epilog=EPILOG_TRITON, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, "exported .onnx, or a TensorRT .engine with its .engine.json sidecar")
    p.add_argument("--repo", required=True, help="model repository folder (created if needed)")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    p.add_argument("--max-batch-size", type=int, default=256, help="max_batch_size (default 256)")
    p.add_argument("--preferred-batch-sizes", type=_int_list, default=[32, 256], help="preferred batch sizes (default 32,256)")
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="dynamic batcher queue delay (default 500)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--instance-kind", choices=("cpu", "gpu"), default=None,
                   help="Triton instance group kind (default: gpu for engines, cpu for ONNX)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder of that name")
    p.set_defaults(func=run_triton)

    p = sub.add_parser("bench", help="benchmark torch / onnxruntime fp32 / int8 / TensorRT on one model",
                       description="Model-only throughput and latency on pre-decoded inputs.",
                       epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("ood-compare", help="measure the OOD scores on digits vs letters / photos / noise",
                       description="Compare msp, energy, prototype and kNN OOD scores (AUROC, FPR@95%%TPR).",
                       epilog=EPILOG_OOD, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="trained model directory (default: a self-labelled small model, ~1 min)")
    p.add_argument("--n-ood", type=int, default=500, help="images per OOD kind (default 500)")
    p.add_argument("--steps", type=int, default=150, help="training steps of the self-labelled model")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the model (default %(default)s)")
    p.set_defaults(func=run_ood_compare)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_onnx(args) -> int:
    from calibclust.export.onnx import OnnxExportConfig, export_checkpoint
    from calibclust.export.ood import DEFAULT_OOD_SCORE

    _set_threads(args.threads)
    if not Path(args.model).exists():
        raise InputError(f"--model {args.model}: no such model directory")
    if not Path(args.images).is_dir():
        raise InputError(f"{args.images}: not a folder")
    config = OnnxExportConfig(
        opset=args.opset, ood_score=args.ood_score or DEFAULT_OOD_SCORE, knn_k=args.neighbors, bank_size=args.bank_size,
        ood_tpr=args.ood_tpr, confidence_threshold=args.confidence_threshold, max_images=args.max_images,
        parity_images=args.parity_images, include_embedding=not args.no_embedding, exporter=args.exporter,
        slim=args.slim, seed=args.seed,
    )
    result = export_checkpoint(args.model, args.images, args.out, config)
    meta = result.metadata
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB, {result.exporter} exporter, opset {config.opset}, "
          f"{result.seconds:.1f} s)")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  clusters {meta.num_clusters}, input uint8 [N, {meta.input_size[0]}, {meta.input_size[1]}, 3], "
          f"probs from the {meta.probs_head} head")
    print(f"  OOD: {meta.ood.score} {meta.ood.params}, threshold {meta.ood.threshold:.5g} "
          f"({100 * meta.ood.fitted_tpr:.0f}% of training images accepted); confidence threshold {meta.confidence_threshold}")
    print(f"  parity (gate max|Δprobs| <= 1e-5, no label differs): {result.parity.summary()}")
    if args.int8:
        from calibclust.export.int8 import Int8Config, quantize_int8

        int8_out = Path(args.int8_out) if args.int8_out else result.path.with_suffix(".int8.onnx")
        int8 = quantize_int8(
            result.path, int8_out, result.train_images,
            Int8Config(calibration_images=args.calibration_images, calibrate_method=args.int8_calibration,
                       min_agreement=args.int8_min_agreement, seed=args.seed),
            threads=args.threads,
        )
        print(f"wrote {int8.path} ({int8.path.stat().st_size / 1e6:.2f} MB): label agreement with fp32 "
              f"{100 * int8.agreement.label_agreement:.2f}% on {int8.agreement.n_images} held-out training images "
              f"(bar {100 * args.int8_min_agreement:.1f}%), {int8.speedup:.2f}x fp32 images/s (one batch, rough; "
              f"see 'calibclust export bench')")
    return 0


def run_tensorrt(args) -> int:
    from calibclust.export.tensorrt import TensorRTConfig, build_engine

    if len(args.batch_sizes) != 3 or not args.batch_sizes[0] <= args.batch_sizes[1] <= args.batch_sizes[2]:
        raise InputError(f"--batch-sizes needs min,opt,max with min <= opt <= max, got {args.batch_sizes}")
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    config = TensorRTConfig(precision=precision, min_batch=args.batch_sizes[0], opt_batch=args.batch_sizes[1], max_batch=args.batch_sizes[2],
                            workspace_gb=args.workspace_gb, timing_cache=args.timing_cache)
    result = build_engine(args.model, args.out, config, images_folder=args.images)
    print(f"wrote {result.path} + {result.sidecar.name} (TensorRT {result.tensorrt_version}, {result.gpu_name}, "
          f"{precision}, batch {args.batch_sizes}, {result.seconds:.1f} s)")
    print(f"  parity: {result.parity.summary()}")
    return 0


def run_triton(args) -> int:
    from calibclust.export.triton import TritonConfig, write_triton_repository

    config = TritonConfig(name=args.name, version=args.version, max_batch_size=args.max_batch_size,
                          preferred_batch_sizes=args.preferred_batch_sizes, max_queue_delay_us=args.max_queue_delay_us,
                          instances=args.instances, device=args.instance_kind, force=args.overwrite)
    folder = write_triton_repository(args.model, args.repo, config)
    print(f"wrote Triton model {folder.name!r} to {folder}")
    print(f"  serve with: tritonserver --model-repository {Path(args.repo).resolve()}")
    return 0


def register_bench_cli(subparsers) -> None:
    """``calibclust bench model``: the same benchmark as ``calibclust export bench``."""
    from calibclust.bench import add_bench_target

    add_bench_target(
        subparsers,
        "model",
        help="model-only throughput: torch eager / onnxruntime fp32 / int8 / TensorRT",
        description="Model-only throughput and latency on pre-decoded inputs.",
        epilog=EPILOG_BENCH.replace("calibclust export bench", "calibclust bench model"),
        configure=add_bench_arguments,
        run=run_bench,
    )


def run_bench(args) -> int:
    from calibclust.export.bench import run_bench_command

    return run_bench_command(args)


def run_ood_compare(args) -> int:
    import json

    import torch

    from calibclust.datasets import OOD_KINDS, digits_images, ood_images
    from calibclust.export.ood import compare_ood_scores

    torch.set_num_threads(2)
    if args.model:
        from calibclust.models.clustering import load_model

        model, meta = load_model(args.model)
        size = meta.input_size[0]
        what = args.model
    else:
        from calibclust.export.selflabel import pseudo_label_digits_model

        size = 32
        print(f"training a self-labelled small model on digits ({args.steps} steps; thumbnail K-means pseudo-labels, no ground truth)")
        model = pseudo_label_digits_model(steps=args.steps, seed=args.seed)
        what = f"self-labelled small backbone, {args.steps} steps, seed {args.seed}"
    images, _ = digits_images(size)
    ood = {kind: ood_images(kind, args.n_ood, size, args.seed) for kind in OOD_KINDS}
    variants = {
        "msp": {"name": "msp"},
        "energy": {"name": "energy"},
        "prototype": {"name": "prototype"},
        "knn k=1": {"name": "knn", "k": 1},
        "knn k=5": {"name": "knn", "k": 5},
        "knn k=10": {"name": "knn", "k": 10},
        "knn k=5 M=256": {"name": "knn", "k": 5, "bank_size": 256},
    }
    result = compare_ood_scores(model, images, ood, variants, seed=args.seed)
    print(f"OOD scores, {what}: fitted on {result.n_fit} digits, in-distribution test {result.n_test} held-out digits, "
          f"{args.n_ood} images per OOD kind (AUROC / FPR@95%TPR; higher AUROC, lower FPR is better)")
    print(result.table())
    print(f"best by mean AUROC: {result.best()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": what, **result.to_dict()}, indent=2))
    return 0
