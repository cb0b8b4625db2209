"""``calibclust demo``: try a calibrated clustering model in the browser (Gradio). Torch-free.

Tabs:

* **Single image** – upload (or pick an example) → the predicted cluster (its name if named), the
  calibrated top-k probabilities, the OOD score against its threshold and a decision badge
  (accepted / rejected — low confidence / rejected — out of distribution). The two threshold
  sliders re-decide from the prediction kept in ``gr.State``: the model is not run again.
* **Clusters & naming** – each cluster's most typical images (the exemplars sidecar the model
  points to, :mod:`calibclust.exemplars`; a note when there is none), a name per cluster, and
  "save" → a NEW model file with the names in its metadata (the original is never modified).
* **Batch** – several images or a zip → the decisions table and a CSV download, through the same
  :class:`~calibclust.serve.labeler.Labeler` and predictions-table writer as ``calibclust label``.

Bad input never shows a stack trace: unreadable or non-image uploads, files over the size limit
and images over the pixel limit come back as a message in the page. Requests go through Gradio's
queue (``--concurrency`` at a time). The server binds 127.0.0.1 unless ``--host`` says otherwise.

The demo is split by concern; this module is its front door (``calibclust.serve.demo:register_cli``
and the names in ``__all__`` are imported from here):

* :mod:`~calibclust.serve.demo_config` – :class:`DemoConfig`, its defaults, :class:`DemoError`;
* :mod:`~calibclust.serve.demo_uploads` – upload limits and batch uploads (zips included) as hostile
  input, counted before anything is decoded;
* :mod:`~calibclust.serve.demo_session` – :class:`DemoSession`, the logic without Gradio (model,
  predictions and decisions, batch tables, naming, exemplars), and :class:`Prediction`;
* :mod:`~calibclust.serve.demo_view` – results as what the page shows (badge HTML, summaries, tables);
* :mod:`~calibclust.serve.demo_app` – the Gradio Blocks app, and :func:`launch` with its login check;
* :mod:`~calibclust.serve.demo_cli` – the ``calibclust demo`` command (options, login, running).

The fixed limits (``MAX_BATCH_FILES``, ``MAX_SAVES``, ...) live in the module that reads them and are
not re-exported here, where setting one would change nothing: a test patches them there (e.g.
``calibclust.serve.demo_uploads.MAX_BATCH_FILES``).

Every part imports only the standard library at module level (``calibclust --help`` stays fast);
numpy, gradio and onnxruntime are imported when the app is built. Never torch.
"""

from __future__ import annotations

from calibclust.serve.demo_app import RunningDemo, anchored_step, build_app, check_exposure, launch
from calibclust.serve.demo_cli import DEFAULT_QUICKSTART_MODEL, parse_auth, register_cli, resolve_model_path
from calibclust.serve.demo_config import DEFAULT_MAX_PIXELS, DemoConfig, DemoError
from calibclust.serve.demo_session import DemoSession, Prediction

__all__ = [
    "DEFAULT_QUICKSTART_MODEL", "DemoConfig", "DemoSession", "Prediction", "build_app", "launch",
    "register_cli", "resolve_model_path",
    # imported from here by the tests, and the type launch returns
    "DEFAULT_MAX_PIXELS", "DemoError", "RunningDemo", "anchored_step", "check_exposure", "parse_auth",
]
