"""The demo's Gradio app: the page (sliders, the three tabs), its handlers and events, and
starting and stopping the server (:func:`launch`, with the login check for an exposed server).

Every handler asks the :class:`~calibclust.serve.demo_session.DemoSession` and shows its answer
through :mod:`calibclust.serve.demo_view`; any failure becomes a message in the page, never a
traceback. Requests go through Gradio's queue (``concurrency`` at a time). Each output is labelled
and the endpoints are named (``predict``, ``decide``, ``label_batch``, ``save_names``): that is the
demo's HTTP API, which the README shows with gradio_client.

Module level imports only the standard library; gradio is imported when the app is built.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibclust.serve.demo_config import DemoConfig, DemoError
from calibclust.serve.demo_session import DemoSession, Prediction
from calibclust.serve.demo_uploads import MAX_BATCH_FILES
from calibclust.serve.demo_view import (
    BATCH_COLUMNS, CSS, _upscale, badge_html, batch_summary, batch_view, single_outputs,
)

log = logging.getLogger("calibclust.serve.demo")  # the name it had while the demo was one module

TOP_K = 5  # probabilities shown in the gr.Label
OVERVIEW_COLUMNS = 10  # cluster tiles per row in the exemplars overview


def anchored_step(low: float, value: float, step: float) -> float:
    """A slider step close to ``step`` whose grid from ``low`` passes through ``value``, so that
    dragging back to the model's threshold gives exactly the model's threshold (and with it the
    decisions of ``calibclust label``), not the nearest multiple of 0.001."""
    if not (math.isfinite(value) and value > low and step > 0):
        return step
    return (value - low) / max(1, round((value - low) / step))


def build_app(session: DemoSession):
    """The Gradio Blocks app for ``session``. Gradio is imported here, not at module level."""
    from calibclust.errors import require

    gr = require("gradio", "demo", "the demo app")

    conf0, ood0 = session.default_thresholds()
    ood_lo, ood_hi = session.ood_slider_range()
    if math.isfinite(ood0):
        ood_lo, ood_hi = min(ood_lo, ood0), max(ood_hi, ood0)
    ood_init = ood0 if math.isfinite(ood0) else ood_hi
    n_clusters = session.num_clusters
    cluster_choices = [(session.cluster_label(c), c) for c in range(n_clusters)]

    def safe(fn, fallback):
        """Run a handler; turn any failure into a message in the page (never a traceback)."""

        @functools.wraps(fn)  # Gradio reads the handler's signature (gr.Request, gr.SelectData) through it
        def wrapper(*args):
            try:
                return fn(*args)
            except DemoError as exc:
                return fallback(str(exc))
            except Exception as exc:  # noqa: BLE001 - the page must get a message, the log the details
                log.exception("demo handler %s failed", fn.__name__)
                # The type only: an exception's text can hold server paths; the log has it all.
                return fallback(f"internal error ({type(exc).__name__}); the server log has the details")

        return wrapper

    # --- handlers: single image ------------------------------------------------------------
    def on_predict(image, confidence_threshold, ood_threshold):
        if image is None:
            return on_clear()
        pred, seen = session.predict_file(image)
        badge, summary, details = single_outputs(session, pred, confidence_threshold, ood_threshold)
        preview = None if seen is None else _upscale(seen)
        return badge, summary, session.top_probs(pred), preview, details, pred.to_state()

    def predict_fallback(msg):
        return badge_html("error", msg), f"**Error:** {html.escape(msg)}", {}, None, {"error": msg}, None

    def on_thresholds(state, confidence_threshold, ood_threshold):
        badge, summary, details = single_outputs(session, Prediction.from_state(state), confidence_threshold, ood_threshold)
        return badge, summary, details

    def on_clear():
        return badge_html(None), "", {}, None, {}, None

    # --- handlers: batch --------------------------------------------------------------------
    def on_batch(images, confidence_threshold, ood_threshold, request):
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        table, _, notes = session.label_batch(images, confidence_threshold, ood_threshold)
        headers, rows = batch_view(table)
        csv = session.write_csv(table, owner=getattr(request, "session_hash", None))
        return (batch_summary(table, notes), {"headers": headers, "data": rows}, str(csv),
                {"table": table, "notes": notes, "csv": str(csv)})

    def batch_fallback(msg):
        return f"**Error:** {html.escape(msg)}", {"headers": ["path", "decision"], "data": []}, None, None

    def on_batch_thresholds(state, conf_t, ood_t):
        if not state:
            return gr.update(), gr.update(), gr.update(), state
        table = session.redecide_table(state["table"], conf_t, ood_t)
        headers, rows = batch_view(table)
        csv = session.write_csv(table, state["csv"])
        return (batch_summary(table, state["notes"]), {"headers": headers, "data": rows}, str(csv),
                {**state, "table": table})

    # --- handlers: clusters & naming --------------------------------------------------------
    def names_rows(names: list[str]) -> list[list[Any]]:
        return [[c, n] for c, n in enumerate(names)]

    def table_rows(table) -> list[list[Any]]:
        if table is None:
            return []
        if hasattr(table, "values") and hasattr(table, "columns"):  # pandas DataFrame
            return table.values.tolist()
        if isinstance(table, dict):
            return table.get("data", [])
        return list(table)

    def on_select_cluster(c, table):
        c = int(c) if c is not None else 0
        rows = table_rows(table)
        name = next((r[1] for r in rows if len(r) > 1 and str(r[0]) != "" and int(float(r[0])) == c), session.names[c])
        return gr.update(value=session.cluster_gallery(c), label=session.gallery_label(c)), name

    # Navigation (Previous/Next, overview tiles) only moves the dropdown; its change event alone
    # fills the gallery and the name box, so a name typed right after "Next" is never overwritten
    # by a second, late update.

    def on_name_typed(c, name, table):
        rows = [list(r) for r in table_rows(table)] or names_rows(session.names)
        c = int(c or 0)
        for r in rows:
            if int(float(r[0])) == c:
                r[1] = name
        return {"headers": ["cluster", "name"], "data": rows}

    def on_overview_select(evt):
        tiles = [c for c in range(n_clusters) if session.exemplars is not None and session.exemplars.counts()[c]]
        return tiles[evt.index] if evt.index is not None and evt.index < len(tiles) else 0

    def on_example_select(evt):
        return session.example_paths[evt.index]

    # Event data is recognised by its annotation, resolved against the function's globals, where
    # the lazily imported gradio is not: give the class itself.
    on_overview_select.__annotations__ = {"evt": gr.SelectData}
    on_batch.__annotations__ = {"request": gr.Request}  # Gradio passes the request (its session hash)
    on_example_select.__annotations__ = {"evt": gr.SelectData}

    def on_save(cluster_names, filename):
        path = session.save_names(table_rows(cluster_names), filename)
        names = session.parse_names(table_rows(cluster_names))
        if session.config.exposed:  # a visitor from another machine learns no server folder
            path = path.name
        return (f"Saved **{path}** with cluster names {', '.join(names)}. The original "
                f"`{session.model_path.name}` is unchanged. Serve the named model with:\n\n"
                f"`calibclust demo --model {path}`"), session.suggested_filename()

    def save_fallback(msg):
        return f"**Not saved:** {html.escape(msg)}", gr.update()

    # The page opens with the first example already predicted (computed once, here), so a visitor
    # sees a complete result at once, without a round trip.
    first = [None, badge_html(None), "", {}, None, {}, None]
    if session.example_paths:
        try:
            first = [session.example_paths[0], *on_predict(session.example_paths[0], conf0, ood_init)]
        except Exception:  # noqa: BLE001 - an unusable example only costs the pre-filled result
            log.exception("could not predict the first example")

    # --- layout -----------------------------------------------------------------------------
    # delete_cache: Gradio's copies of uploads and outputs older than an hour go, hourly, so a
    # long-running demo does not fill the disk.
    with gr.Blocks(title=f"calibclust demo — {session.model_path.name}", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(session.header_markdown(), elem_id="cc-header")
        with gr.Row():
            conf_slider = gr.Slider(0.0, 1.0, value=conf0, step=anchored_step(0.0, conf0, 0.001), label="Confidence threshold",
                                    info="accept when confidence ≥ this", elem_id="cc-conf")
            ood_slider = gr.Slider(ood_lo, ood_hi, value=ood_init, step=anchored_step(ood_lo, ood_init, (ood_hi - ood_lo) / 1000),
                                   label=f"OOD threshold ({session.metadata.ood.score} score)",
                                   info="out of distribution when the score is > this", elem_id="cc-ood")
            reset = gr.Button("Model defaults", size="sm", scale=0)
        with gr.Tabs():
            with gr.Tab("Single image", id="single"):
                pred_state = gr.State(first[6])
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(first[0], label="Image (any format Pillow reads)", file_count="single",
                                         type="filepath", elem_id="cc-upload", height=140)
                        if session.example_paths:
                            examples = gr.Gallery(
                                [(_upscale(img, 96), Path(p).name) for img, p in zip(session.example_images(), session.example_paths)],
                                label="Examples (click one)", columns=6, height=200, format="png", fit_columns=False,
                                allow_preview=False, elem_id="cc-examples")
                        else:
                            examples = None
                            gr.Markdown("*No examples: start with `--examples FOLDER`, or add exemplars to the "
                                        "model with `calibclust exemplars`.*")
                        preview = gr.Image(label=f"What the model sees ({session.labeler.input_size[0]}×"
                                           f"{session.labeler.input_size[1]}, upscaled)", interactive=False,
                                           format="png", height=240, value=first[4])
                    with gr.Column(scale=1):
                        # Labels name the outputs in the HTTP API (gradio_client); the page hides them.
                        badge = gr.HTML(first[1], elem_id="cc-badge", label="decision badge (HTML)", show_label=False)
                        summary = gr.Markdown(first[2], elem_id="cc-summary", label="summary (Markdown)", show_label=False)
                        probs = gr.Label(first[3] or None, num_top_classes=min(TOP_K, n_clusters),
                                         label="Calibrated probabilities (top-k)")
                        with gr.Accordion("Details", open=False):
                            details = gr.JSON(first[5], label="Prediction and thresholds")
            with gr.Tab("Clusters & naming", id="clusters"):
                if session.exemplars is None:
                    gr.Markdown(f"**No exemplars.** {session.exemplars_note}", elem_id="cc-exemplars-note")
                else:
                    gr.Markdown("Each cluster's most typical images (highest "
                                f"{session.exemplars.score_name}). Click a tile to open that cluster.")
                    tile_rows = math.ceil(n_clusters / OVERVIEW_COLUMNS)
                    overview = gr.Gallery(session.overview_gallery(), label="Clusters (most typical image)",
                                          columns=OVERVIEW_COLUMNS, fit_columns=False, format="png",
                                          height=min(420, 60 + 130 * tile_rows), allow_preview=False,
                                          elem_id="cc-overview")
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            cluster_dd = gr.Dropdown(cluster_choices, value=0, label="Cluster", scale=3)
                            prev_btn = gr.Button("◀ Previous", scale=0, size="sm")
                            next_btn = gr.Button("Next ▶", scale=0, size="sm")
                        cluster_gallery = gr.Gallery(session.cluster_gallery(0), label=session.gallery_label(0),
                                                     columns=6, fit_columns=False, height=300, format="png",
                                                     allow_preview=True, elem_id="cc-cluster-gallery")
                    with gr.Column(scale=2):
                        name_box = gr.Textbox(session.names[0], label="Name for this cluster",
                                              info="typing here fills the table below")
                        names_table = gr.Dataframe(
                            value={"headers": ["cluster", "name"], "data": names_rows(session.names)},
                            headers=["cluster", "name"], datatype=["number", "str"], type="array",
                            interactive=True, static_columns=[0], label="Cluster names (editable)",
                            row_count=n_clusters, max_height=300,
                        )
                        filename = gr.Textbox(session.suggested_filename(),
                                              label=f"New model file (saved in {session.save_dir})")
                        save_btn = gr.Button("Save named model", variant="primary")
                        save_msg = gr.Markdown(elem_id="cc-save-msg", label="save result (Markdown)", show_label=False)
            with gr.Tab("Batch", id="batch"):
                batch_state = gr.State(None)
                gr.Markdown(f"Several images or a .zip of images (up to {MAX_BATCH_FILES}; each upload up to "
                            f"{session.config.max_upload_mb:g} MB). For whole folders use `calibclust label`.")
                batch_files = gr.File(label="Images or .zip", file_count="multiple", type="filepath", height=160)
                batch_btn = gr.Button("Label these files", variant="primary")
                batch_msg = gr.Markdown(elem_id="cc-batch-msg", label="batch summary (Markdown)", show_label=False)
                batch_table = gr.Dataframe({"headers": BATCH_COLUMNS, "data": []}, label="Decisions",
                                           interactive=False, type="array", max_height=500)
                batch_csv = gr.File(label="predictions.csv (download)", interactive=False, height=80)

        # --- events -------------------------------------------------------------------------
        single_out = [badge, summary, probs, preview, details, pred_state]
        # change fires on upload, on picking an example and on clearing; this is the API endpoint.
        upload.change(safe(on_predict, predict_fallback), [upload, conf_slider, ood_slider], single_out,
                      api_name="predict", trigger_mode="always_last")
        if examples is not None:
            # A clicked example becomes the upload, whose change event runs the model.
            examples.select(on_example_select, None, upload, api_visibility="undocumented")
        for slider in (conf_slider, ood_slider):
            slider.change(safe(on_thresholds, lambda m: (badge_html("error", m), m, {})),
                          [pred_state, conf_slider, ood_slider], [badge, summary, details],
                          api_name="decide" if slider is conf_slider else False,
                          trigger_mode="always_last", show_progress="hidden")
            slider.change(safe(on_batch_thresholds, batch_fallback), [batch_state, conf_slider, ood_slider],
                          [batch_msg, batch_table, batch_csv, batch_state], api_visibility="undocumented",
                          trigger_mode="always_last", show_progress="hidden")
        reset.click(lambda: (conf0, ood_init), None, [conf_slider, ood_slider], api_visibility="undocumented",
                    queue=False)

        batch_btn.click(safe(on_batch, batch_fallback), [batch_files, conf_slider, ood_slider],
                        [batch_msg, batch_table, batch_csv, batch_state], api_name="label_batch")

        def on_unload(request):
            session.end_session(getattr(request, "session_hash", None))

        on_unload.__annotations__ = {"request": gr.Request}
        app.unload(on_unload)  # the page was closed: that visitor's batch tables are deleted

        cluster_dd.change(safe(on_select_cluster, lambda m: ([], gr.update())), [cluster_dd, names_table],
                          [cluster_gallery, name_box], api_visibility="undocumented")
        # Stepping runs in the browser (no round trip), so quick clicks each count.
        prev_btn.click(None, cluster_dd, cluster_dd, js=f"(c) => ((Number(c) || 0) + {n_clusters - 1}) % {n_clusters}",
                       api_visibility="undocumented")
        next_btn.click(None, cluster_dd, cluster_dd, js=f"(c) => ((Number(c) || 0) + 1) % {n_clusters}",
                       api_visibility="undocumented")
        # .change, not .input: fires for typing and for our own updates alike (and .input did not
        # reach the server from a headless browser with Gradio 6.31 in our tests).
        name_box.change(on_name_typed, [cluster_dd, name_box, names_table], names_table,
                       api_visibility="undocumented", trigger_mode="always_last", show_progress="hidden")
        if session.exemplars is not None:
            overview.select(on_overview_select, None, cluster_dd, api_visibility="undocumented")
        save_btn.click(safe(on_save, save_fallback), [names_table, filename], [save_msg, filename],
                       api_name="save_names")
    return app


# =============================================================================== running
@dataclass
class RunningDemo:
    app: Any
    session: DemoSession
    url: str

    def close(self) -> None:
        try:
            self.app.close(verbose=False)
        finally:
            self.session.close()


def check_exposure(config: DemoConfig) -> None:
    """A server reachable from other machines needs a login; without one only by an explicit
    ``--insecure-no-auth``, which is said loudly."""
    from calibclust.errors import InputError

    if not config.exposed or config.auth:
        return
    where = "a public share link" if config.share else f"{config.host} (reachable from other machines)"
    if not config.insecure_no_auth:
        raise InputError(f"the demo would listen on {where} with no login: anyone could label images and save "
                         f"models on this machine. Pass --auth USER:PASSWORD (or --auth-file FILE), or "
                         f"--insecure-no-auth if that is really meant")
    print(f"calibclust demo: WARNING: listening on {where} WITHOUT A LOGIN (--insecure-no-auth)",
          file=sys.stderr, flush=True)


def launch(config: DemoConfig, block: bool = True, quiet: bool = False) -> RunningDemo:
    """Build and start the app. ``block=False`` returns once the server listens (tests, notebooks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_exposure(config)
    session = DemoSession(config)
    try:
        app = build_app(session)
        app.queue(default_concurrency_limit=max(1, int(config.concurrency)), max_size=64)
        _, local_url, share_url = app.launch(
            server_name=config.host,
            server_port=config.port,
            share=config.share,
            max_file_size=config.max_upload_bytes,
            prevent_thread_lock=True,
            quiet=quiet,
            show_error=False,  # a handler failure shows our message, not Python's
            footer_links=["api"],
            css=CSS,
            allowed_paths=[str(session.work_dir)],
            auth=config.auth,  # Gradio's own login page and API check
        )
    except BaseException:
        session.close()
        raise
    running = RunningDemo(app, session, share_url or local_url)
    if block:
        try:
            app.block_thread()
        finally:
            running.close()
    return running
