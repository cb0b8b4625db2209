"""``calibclust demo``: the command line of the Gradio demo. Its options become a
:class:`~calibclust.serve.demo_config.DemoConfig` (the login from ``--auth``, ``--auth-file`` or
``$CALIBCLUST_DEMO_AUTH``; the quick start's model when no ``--model`` is given), then the server
runs (:func:`~calibclust.serve.demo_app.launch`) until Ctrl-C or SIGTERM.

Module level imports only the standard library (``calibclust --help`` stays fast).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from calibclust.serve.demo_app import launch
from calibclust.serve.demo_config import (
    DEFAULT_BATCH_PIXELS, DEFAULT_CONCURRENCY, DEFAULT_HOST, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT,
    DemoConfig,
)
from calibclust.serve.demo_session import MAX_SAVED_BYTES, MAX_SAVES

# Where `calibclust quickstart` writes its exported model (relative to the current folder); the
# demo opens it when no --model is given.
DEFAULT_QUICKSTART_MODEL = Path("quickstart-out") / "model.onnx"

DESCRIPTION = """\
Start a local web app (Gradio) to try an exported calibclust model:

  Single image        upload a picture (or pick an example): predicted cluster, calibrated top-k
                      probabilities, OOD score vs. its threshold, and the decision (accepted /
                      rejected - low confidence / rejected - out of distribution). The threshold
                      sliders change the decision without running the model again.
  Clusters & naming   the most typical images of each cluster (from the model's exemplars sidecar,
                      see 'calibclust exemplars'); type a name per cluster and save a NEW model file
                      with those names (the original file is never modified).
  Batch               several images or a .zip: a table of decisions and a CSV download, the same
                      table 'calibclust label' writes.

Without --model the demo opens the quick start's model, %s
(relative to the current folder). The server listens on 127.0.0.1 (this machine only) unless --host says otherwise; --share asks
Gradio for a temporary public link (needs internet access). Reachable from other machines, it needs a
login (--auth USER:PASSWORD or --auth-file FILE, Gradio's own auth) or an explicit --insecure-no-auth;
a batch request may hold --max-batch-pixels (read from image headers before decoding), and one server
run saves at most %d named models (%d GB).
""" % (DEFAULT_QUICKSTART_MODEL.as_posix(), MAX_SAVES, MAX_SAVED_BYTES >> 30)

EPILOG = """\
examples:
  calibclust quickstart && calibclust demo          # the quick start's model
  calibclust demo --model model.onnx                # http://127.0.0.1:7860
  calibclust demo --model model.onnx --examples photos/ --port 8080
  calibclust demo --model model.onnx --host 0.0.0.0 --auth-file login.txt --max-upload-mb 5   # on the network
  calibclust exemplars train_images/ --model model.onnx   # add the exemplars gallery, then demo the new file
"""


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """``--model`` or the quick start's model; an InputError that says what to do otherwise."""
    from calibclust.errors import InputError

    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        return path
    if DEFAULT_QUICKSTART_MODEL.is_file():
        return DEFAULT_QUICKSTART_MODEL
    raise InputError(
        f"no --model given and no quick-start model at {DEFAULT_QUICKSTART_MODEL.as_posix()} "
        f"(looked in {Path.cwd()}).\n"
        "  Either run the quick start first, from this folder:   calibclust quickstart\n"
        "  or point the demo at an exported model:              calibclust demo --model path/to/model.onnx"
    )


AUTH_ENV = "CALIBCLUST_DEMO_AUTH"


def parse_auth(text: str | None, file: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` from ``--auth``, from the first line of ``--auth-file`` (kept out of the
    shell history and process list), or else from the environment variable ``CALIBCLUST_DEMO_AUTH``
    (e.g. ``docker run -e``)."""
    from calibclust.errors import InputError

    if text and file:
        raise InputError("--auth and --auth-file exclude each other")
    if not text and not file:
        text = os.environ.get(AUTH_ENV)
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise InputError(f"--auth-file {file}: {exc.strerror or exc}") from None
        text = lines[0].strip() if lines else ""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL",
                   help=f"exported model (.onnx); default: the quick start's {DEFAULT_QUICKSTART_MODEL.as_posix()}")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1 = this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also create a temporary public gradio.live link (needs internet)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest upload accepted, per file (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more than N pixels (default {DEFAULT_MAX_PIXELS:,}, as 'calibclust label'; "
                        "a decoded image takes 3 bytes per pixel, and --concurrency of them may be in memory at once)")
    p.add_argument("--examples", metavar="FOLDER",
                   help="offer the first images of FOLDER as clickable examples (default: the exemplars' top images)")
    p.add_argument("--save-dir", metavar="DIR", help="where the naming tab writes new model files (default: the model's folder)")
    p.add_argument("--backend", default="auto", metavar="NAME", help="auto (default), cpu, cuda, tensorrt")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"requests processed at once; the rest wait in Gradio's queue (default {DEFAULT_CONCURRENCY})")
    g = p.add_argument_group("exposed use (--host beyond this machine, or --share)")
    g.add_argument("--auth", metavar="USER:PASSWORD",
                   help=f"a login (Gradio's own auth); required when exposed (default: ${AUTH_ENV} if set)")
    g.add_argument("--auth-file", metavar="FILE", help="the same, read from the first line of FILE")
    g.add_argument("--insecure-no-auth", action="store_true", help="serve beyond this machine without a login")
    g.add_argument("--max-batch-pixels", type=int, default=DEFAULT_BATCH_PIXELS, metavar="N",
                   help=f"pixels per batch request, read from image headers before decoding (default {DEFAULT_BATCH_PIXELS:,})")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="try a model in the browser: single images, cluster exemplars and naming, batches (Gradio)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args) -> DemoConfig:
    from calibclust.errors import InputError

    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be > 0")
    if args.max_pixels < 1:
        raise InputError("--max-pixels must be >= 1")
    if args.concurrency < 1:
        raise InputError("--concurrency must be >= 1")
    if not 0 <= args.port < 65536:
        raise InputError("--port must be in 0..65535")
    return DemoConfig(
        model=resolve_model_path(args.model),
        host=args.host,
        port=args.port or None,
        share=args.share,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        examples=args.examples,
        save_dir=args.save_dir,
        backend=args.backend,
        concurrency=args.concurrency,
        auth=parse_auth(args.auth, args.auth_file),
        insecure_no_auth=args.insecure_no_auth,
        max_batch_pixels=args.max_batch_pixels,
    )


def run(args) -> int:
    import signal

    from calibclust.errors import require

    config = config_from_args(args)
    require("gradio", "demo", "the demo app")

    def stop(signum, frame):  # `docker stop` / kill: shut down as on Ctrl-C (server closed, temp files removed)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    running = None
    try:
        print(f"calibclust demo: loading {config.model} ...", flush=True)
        running = launch(config, block=False, quiet=True)
        print(f"calibclust demo: open {running.url} in a browser (Ctrl-C to stop)", flush=True)
        if config.exposed:
            login = "with a login" if config.auth else "WITHOUT a login"
            print(f"calibclust demo: listening on {config.host}, reachable from other machines, {login}", flush=True)
        running.app.block_thread()  # returns after Ctrl-C, having closed the server
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped, at any moment: not an error
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if running is not None:
            running.close()
    print("calibclust demo: stopped", flush=True)
    return 0

