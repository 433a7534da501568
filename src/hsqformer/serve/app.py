"""The screening page (gradio) and the server behind ``hsqformer serve``.

Two tabs share one model card: *One image* shows the image as the models see it (a DICOM cropped
and its burned-in text blacked out), the ensemble's probability, the decision at the run's
operating point and the heat map; *Batch* screens many files and offers the table as CSV.

Privacy and offline use:
- every upload is moved out of gradio's upload folder into a temporary folder of its request,
  removed when the request ends (:func:`hsqformer.serve.uploads.received`);
- what the page shows (images, heat maps, CSVs) lives in the server's own temporary folder, which
  gradio purges of files older than ``RESULT_MAX_AGE_S`` and which is removed when the server stops;
- the server binds 127.0.0.1 unless told otherwise, never opens a share link, sends no analytics,
  and its page loads nothing from the web (gradio's assets and fonts ship in its wheel);
- a file that cannot be screened gives a one-line message in the page; errors never show a traceback.
"""

from __future__ import annotations

import html
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hsqformer.errors import HSQformerError
from hsqformer.interrupts import Interrupted
from hsqformer.serve.card import PROBABILITY_DIGITS, ModelCard
from hsqformer.serve.screening import Screener, Screening
from hsqformer.serve.uploads import ACCEPTED, received

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr
    from PIL import Image

#: Shown images, heat maps and CSVs are deleted this long after they were made (checked every RESULT_SWEEP_S).
RESULT_MAX_AGE_S = 900
RESULT_SWEEP_S = 300
CSV_NAME = "hsqformer-screening.csv"
#: Pixels of height of the shown image and heat map (small images are enlarged to it, large ones shrunk).
IMAGE_HEIGHT = 360

_CSS = """
#hsq-result .hsq-probability { font-size: 1.6em; font-weight: 700; }
#hsq-result .hsq-positive { color: #b42318; }
#hsq-result .hsq-negative { color: #067647; }
#hsq-result .hsq-small { opacity: 0.8; font-size: 0.9em; }
#hsq-image img, #hsq-heatmap img { width: 100%; height: 100%; object-fit: contain; }
.hsq-message { border-left: 4px solid #dc6803; padding: 0.4em 0.8em; }
"""


class Handlers:
    """What the page's events call: plain functions of the uploaded paths, testable without a browser."""

    def __init__(self, screener: Screener, results_dir: Path) -> None:
        self.screener = screener
        self.results_dir = results_dir  # inside gradio's cache folder, so the CSV is served without a copy

    def single(self, path: str | None) -> tuple[Image.Image | None, Image.Image | None, str]:
        """One uploaded file: (image shown, heat map overlay, result HTML); a bad file: a message only."""
        if not path:
            return None, None, ""
        with received([path]) as [(local, name)]:
            try:
                result = self.screener.screen_file(local, name)
            except HSQformerError as err:  # an unreadable upload (UploadError) or another user-facing error
                return None, None, message_html(str(err))
        return result.scan.image, result.heatmap, result_html(result, self.screener.card)

    def batch(
        self, paths: list[str] | None, progress: Callable[..., Any] | None = None
    ) -> tuple[pd.DataFrame | None, str | None, str]:
        """Many uploaded files: (table shown, CSV path, status HTML)."""
        if not paths:
            return None, None, ""
        with received(paths) as files:
            table = self.screener.screen_files(files, progress)
        csv = self.results_dir / uuid.uuid4().hex / CSV_NAME
        csv.parent.mkdir(parents=True)
        table.to_csv(csv, index=False)
        shown = table.copy()
        for column in ("probability", "threshold"):
            shown[column] = ["" if pd.isna(v) else f"{v:.{PROBABILITY_DIGITS}f}" for v in table[column]]
        return shown, str(csv), batch_status_html(table, self.screener.card)


def result_html(result: Screening, card: ModelCard) -> str:
    """The single-image result: file, probability, decision at the operating point and what that point did in CV."""
    scan = result.scan
    what = html.escape(" · ".join(part for part in (scan.name, scan.kind, scan.note) if part))
    css = "hsq-positive" if result.positive else "hsq-negative"
    val = card.validation
    return (
        f'<div class="hsq-file">{what}</div>'
        f'<p>{html.escape(card.positive_class)} probability (ensemble of {card.n_folds} fold models): '
        f'<span class="hsq-probability" id="hsq-probability">{result.probability:.{PROBABILITY_DIGITS}f}</span></p>'
        f'<p>Decision at the operating point (≥ {card.threshold:.{PROBABILITY_DIGITS}f}): '
        f'<b class="{css}" id="hsq-decision">{html.escape(result.decision)}</b></p>'
        f'<p class="hsq-small">In cross-validation this operating point had sensitivity '
        f"{html.escape(val.sensitivity.text())} and specificity {html.escape(val.specificity.text())}.</p>"
        f'<p class="hsq-small">{html.escape(result.heatmap_note)}</p>'
    )


def message_html(message: str) -> str:
    """A one-line message in the page (no traceback, ever)."""
    return f'<div class="hsq-message" role="alert" id="hsq-message">{html.escape(message)}</div>'


def batch_status_html(table: pd.DataFrame, card: ModelCard) -> str:
    """The batch's summary line and the messages of the files that could not be read."""
    failed = table[table["error"] != ""]
    scored = table[table["error"] == ""]
    positive = int((scored["decision"] == card.positive_class).sum())
    lines = [
        f"<p>{len(scored)} image{'s' if len(scored) != 1 else ''} screened: {positive} {html.escape(card.positive_class)} "
        f"at the operating point (≥ {card.threshold:.{PROBABILITY_DIGITS}f}); {len(failed)} file"
        f"{'s' if len(failed) != 1 else ''} could not be read.</p>"
    ]
    lines += [message_html(str(message)) for message in failed["error"]]
    return "".join(lines)


def build_app(screener: Screener, results_dir: Path) -> gr.Blocks:
    """The page: a one-image tab, a batch tab and the model card; events run one at a time (one CPU model)."""
    import gradio as gr

    card = screener.card
    handlers = Handlers(screener, results_dir)

    def batch(
        paths: list[str] | None, progress: gr.Progress = gr.Progress()
    ) -> tuple[pd.DataFrame | None, str | None, str]:
        """``Handlers.batch`` with gradio's progress bar (gradio passes it to a parameter whose default is one)."""
        return handlers.batch(paths, progress)

    with gr.Blocks(
        title="HSQformer screening", analytics_enabled=False, delete_cache=(RESULT_SWEEP_S, RESULT_MAX_AGE_S)
    ) as demo:
        gr.Markdown(
            f"# HSQformer screening\nRun `{card.run_name}` ({card.model}): {card.positive_class} when the probability "
            f"is ≥ {card.threshold:.{PROBABILITY_DIGITS}f}. Uploads are deleted when each request ends; a DICOM is "
            "cropped to its scan area and its burned-in text blacked out, and no header value is shown."
        )
        with gr.Tab("One image", id="single"):
            with gr.Row():
                with gr.Column(scale=2):
                    single_file = gr.File(label=f"Ultrasound image: {ACCEPTED}", elem_id="hsq-single-upload")
                    result = gr.HTML(elem_id="hsq-result")
                with gr.Column(scale=3):
                    with gr.Row():
                        shown = gr.Image(
                            label="Image screened", type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                            buttons=["download", "fullscreen"], elem_id="hsq-image",
                        )
                        heatmap = gr.Image(
                            label=f"Heat map ({screener.method})", type="pil", format="png", interactive=False,
                            height=IMAGE_HEIGHT,
                            buttons=["download", "fullscreen"], elem_id="hsq-heatmap",
                        )
        with gr.Tab("Batch", id="batch"):
            batch_files = gr.File(
                label=f"Ultrasound images: {ACCEPTED}, several at once", file_count="multiple",
                elem_id="hsq-batch-upload",
            )
            status = gr.HTML(elem_id="hsq-batch-status")
            table = gr.Dataframe(label="Results", interactive=False, elem_id="hsq-batch-table")
            csv = gr.File(label="Results as CSV", interactive=False, elem_id="hsq-batch-csv")
        with gr.Accordion("Model card", open=True):
            gr.Markdown(card.markdown(), elem_id="hsq-card")
        single_file.upload(
            handlers.single, inputs=single_file, outputs=[shown, heatmap, result], concurrency_id="model",
            show_progress="full",
        )
        single_file.clear(lambda: (None, None, ""), outputs=[shown, heatmap, result])
        batch_files.upload(batch, inputs=batch_files, outputs=[table, csv, status], concurrency_id="model")
    return demo


@contextmanager
def running(screener: Screener, *, host: str = "127.0.0.1", port: int = 7860) -> Iterator[tuple[gr.Blocks, Path]]:
    """The page of ``screener``, serving (in gradio's server thread) while the block runs: yields the launched
    app and its temporary folder; on exit the server stops and the folder, with everything in it, is removed."""
    with tempfile.TemporaryDirectory(prefix="hsqformer-serve-") as cache, _environment(
        GRADIO_TEMP_DIR=cache, GRADIO_ANALYTICS_ENABLED="False"
    ):
        demo = build_app(screener, Path(cache) / "results")
        demo.queue(default_concurrency_limit=1)
        try:
            demo.launch(
                server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                show_error=False, quiet=True, footer_links=[], ssr_mode=False, mcp_server=False,
                enable_monitoring=False, css=_CSS,
            )
        except OSError as err:
            raise HSQformerError(f"cannot serve on {host}:{port} ({err}); choose another --port or --host") from None
        try:
            yield demo, Path(cache)
        finally:
            demo.close(verbose=False)


def serve(
    run: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    method: str = "gradcam",
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the screening page for ``run`` until interrupted (Ctrl-C or SIGTERM); then remove every file it made."""
    with running(Screener(run, method), host=host, port=port) as (demo, cache):
        echo(f"serving run {run} at {demo.local_url} (Ctrl-C stops the server)")
        echo(f"temporary files: {cache} (removed when the server stops)")
        try:
            while demo.is_running:
                time.sleep(0.5)
        except Interrupted as err:
            err.hint = "server stopped; its temporary files are removed"
            raise


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (gradio reads its folder and analytics switch from them)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
