"""``hsqformer serve``: the model card, in-memory uploads, the screening handlers, and the page end to end in a
real browser (Debian's chromium driven by Playwright, with every request outside the app blocked)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import Patient, UsCase, liver_pngs, make_us_case, write_us_dicom
from PIL import Image
from run_fixtures import binormal_scores, write_run
from shared_data import DATA, sample_images

from hsqformer.data.images import load_image
from hsqformer.dicom.convert import ConvertOptions, convert_tree
from hsqformer.errors import HSQformerError
from hsqformer.evaluation.compare import compare_runs, load_run
from hsqformer.evaluation.statistics import wilson
from hsqformer.serve.card import model_card
from hsqformer.serve.uploads import UploadError, read_upload, received
from hsqformer.training.inference import predict_run

LIVER = DATA / "liver-sysu"


def dicom2png(dicom: Path, out: Path, *, detect_text: bool = True) -> Path:
    """The PNG that ``hsqformer dicom2png`` writes for a single-frame ``dicom``."""
    source = out / "in"
    source.mkdir(parents=True)
    shutil.copy(dicom, source / dicom.name)
    convert_tree(source, out / "out", ConvertOptions(salt="s", detect_text=detect_text), workers=1, progress=False)
    (png,) = (out / "out" / "images").glob("*.png")
    return png


def screening_image() -> Path:
    """A liver-sysu image when the real data is there, else one of the embedded BUSI sample."""
    if LIVER.is_dir():
        return sorted((LIVER / "malignant").glob("*.png"))[0]
    return sample_images("malignant", 1)[0]


@pytest.fixture(scope="module")
def screener(smoke_run):
    """The smoke run's Screener (fold models, model card, text detector), loaded once for the module."""
    from hsqformer.serve.screening import Screener

    return Screener(smoke_run)


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> tuple[UsCase, Path]:
    """An ultrasound DICOM with patient text burned in around and inside the scan, and dicom2png's PNG of it."""
    folder = tmp_path_factory.mktemp("serve_dicom")
    case = make_us_case(liver_pngs()[0], folder / "uploads" / "us-case.dcm", Patient(), text_in_scan=True)
    return case, dicom2png(case.path, folder / "convert")


@pytest.fixture(scope="module")
def predicted(smoke_run: Path, dicom_case) -> dict[Path, float]:
    """``hsqformer predict``'s prob_ensemble of every image the tests screen (one call: loading the run costs)."""
    paths = [*sample_images("benign", 3), *sample_images("malignant", 3), screening_image(), dicom_case[1]]
    table = predict_run(smoke_run, paths)
    return dict(zip(paths, table["prob_ensemble"].astype(float), strict=True))


# ---------------------------------------------------------------------------------------------- model card


def test_card_uses_compares_operating_point_and_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 60
    truth = np.arange(n) % 2 == 1
    labels = ["malignant" if t else "benign" for t in truth]
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    test_scores = np.stack([binormal_scores(truth, 1.5, rng) for _ in range(2)])
    run = write_run(
        tmp_path / "run", images=[f"v{i}.png" for i in range(n)], labels=labels, patients=patients,
        folds=(np.arange(n) // 2) % 2, validation_scores=binormal_scores(truth, 1.0, rng),
        tests={"high-risk": ([f"t{i}.png" for i in range(n)], labels, [f"q{i}" for i in range(n)], test_scores)},
    )
    (run / "config.yaml").write_text("augment:\n  img_size: 160\ntrainer:\n  epochs: 8\n")
    card = model_card(run)

    report = compare_runs([load_run(run)], n_resamples=10)
    assert card.threshold == report["operating_point"]["thresholds"]["run"]
    for cohort, name in zip(card.cohorts, ("validation", "high-risk"), strict=True):
        expected = report["cohorts"][name]["models"]["run"]
        assert cohort.name == name
        assert cohort.auc == pytest.approx(expected["auc"])
        assert cohort.auc_ci == pytest.approx(expected["auc_ci"])
        confusion = expected["at_operating_point"]["confusion"]
        assert (cohort.sensitivity.successes, cohort.sensitivity.trials) == (confusion["tp"], confusion["tp"] + confusion["fn"])
        assert (cohort.specificity.successes, cohort.specificity.trials) == (confusion["tn"], confusion["tn"] + confusion["fp"])
        assert (cohort.sensitivity.low, cohort.sensitivity.high) == wilson(confusion["tp"], confusion["tp"] + confusion["fn"])
    assert [c.n_patients for c in card.cohorts] == [30, 60]
    assert card.decision(card.threshold) == "malignant" and card.decision(card.threshold - 1e-9) == "benign"
    text = card.markdown()
    assert "| high-risk | fold ensemble | 60 (30) | 60 |" in text
    assert "160-pixel inputs" in text and "8 epochs per fold" in text and "synthetic" in text


def test_card_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(HSQformerError, match="not an hsqformer cv run folder"):
        model_card(tmp_path)


# ---------------------------------------------------------------------------------------------- uploads


def test_received_moves_uploads_into_a_folder_removed_after_the_request(tmp_path: Path) -> None:
    uploads = []
    for i in range(2):
        (tmp_path / f"u{i}").mkdir()
        uploads.append(tmp_path / f"u{i}" / "scan.png")
        shutil.copy(sample_images("benign", 1)[0], uploads[-1])
    with received([*uploads, uploads[0]]) as files:
        folder = files[0][0].parents[1]
        assert [name for _, name in files] == ["scan.png"] * 3
        assert not any(p.exists() for p in uploads) and not (tmp_path / "u0").exists()  # gradio's folders go too
        assert files[0][0].is_file() and files[1][0].is_file()
        with pytest.raises(UploadError, match="no longer on the server"):
            read_upload(files[2][0], "scan.png", None)  # the same upload twice: taken by the first
    assert not folder.exists()


def test_image_uploads_decode_as_predict_loads_them(tmp_path: Path) -> None:
    png = sample_images("malignant", 1)[0]
    (scan,) = read_upload(png, "a.png", None)
    assert scan.kind == "PNG" and np.array_equal(np.asarray(scan.image), np.asarray(load_image(png)))
    jpeg = tmp_path / "b.jpg"
    Image.open(png).convert("RGB").save(jpeg, quality=90)
    assert read_upload(jpeg, "b.jpg", None)[0].kind == "JPEG"

    gif, text, empty, cut = tmp_path / "c.gif", tmp_path / "d.png", tmp_path / "e.png", tmp_path / "f.png"
    Image.open(png).save(gif)
    text.write_text("not an image")
    empty.write_bytes(b"")
    cut.write_bytes(png.read_bytes()[:600])
    cases = {gif: "GIF images are not supported", text: "not a PNG, JPEG or DICOM file", empty: "empty", cut: "unreadable"}
    for path, message in cases.items():
        with pytest.raises(UploadError, match=message) as err:
            read_upload(path, path.name, None)
        assert str(tmp_path) not in str(err.value) and "\n" not in str(err.value)  # names the upload, not the folder


def test_dicom_upload_equals_dicom2png_then_predicts_loading(tmp_path: Path, screener, dicom_case) -> None:
    """In memory, through the detector: the pixels predict would read from dicom2png's PNG; no header value shown."""
    case, png = dicom_case
    (scan,) = read_upload(case.path, "case.dcm", screener.detector)
    assert np.array_equal(np.asarray(scan.image), np.asarray(load_image(png)))
    assert scan.kind == "DICOM" and scan.note.startswith("cropped to the scan area; ")
    assert int(re.search(r"(\d+) burned-in text regions? blacked out", scan.note).group(1)) >= 1
    x0, y0, x1, y1 = case.region
    assert not np.asarray(scan.image)[case.text_mask[y0:y1, x0:x1]].any()  # the ID drawn in the scan is black

    # 16-bit grey without a region: scaled by its bit depth as predict scales dicom2png's 16-bit PNG
    grey = (np.linspace(0, 4095, 120 * 90).reshape(90, 120)).astype(np.uint16)
    deep = tmp_path / "deep.dcm"
    write_us_dicom(deep, grey, Patient(), region=None, photometric="MONOCHROME2")
    (scan,) = read_upload(deep, "deep.dcm", None)
    expected = load_image(dicom2png(deep, tmp_path / "convert_deep", detect_text=False))
    assert np.array_equal(np.asarray(scan.image), np.asarray(expected)) and "not cropped" in scan.note


def test_bad_dicoms_give_one_line_without_header_values(tmp_path: Path) -> None:
    patient = Patient()
    case = make_us_case(liver_pngs()[0], tmp_path / "good.dcm", patient)
    good = case.path
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-50_000])
    write_us_dicom(tmp_path / "cine.dcm", np.stack([case.frame, case.frame]), patient, region=None)
    for path in (tmp_path / "no_pixels.dcm", cut):
        with pytest.raises(UploadError) as err:
            read_upload(path, path.name, None)
        message = str(err.value)
        assert message.startswith(f"{path.name}: DICOM ") and "\n" not in message
        assert not any(value in message for value in patient.header_values())
    frames = read_upload(tmp_path / "cine.dcm", "cine.dcm", None)
    assert [f.name for f in frames] == ["cine.dcm [frame 1 of 2]", "cine.dcm [frame 2 of 2]"]
    assert len(read_upload(tmp_path / "cine.dcm", "cine.dcm", None, frames="first")) == 1


# ---------------------------------------------------------------------------------------------- screening


def test_probabilities_equal_predicts(screener, predicted) -> None:
    paths = sample_images("benign", 3) + sample_images("malignant", 3)
    expected = [predicted[p] for p in paths]
    got = screener.probabilities([load_image(p) for p in paths])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_handlers_single_and_batch(tmp_path: Path, screener, predicted, monkeypatch) -> None:
    from hsqformer.serve import screening
    from hsqformer.serve.app import Handlers

    monkeypatch.setattr(screening, "BATCH_SIZE", 1)  # a batch is scored in parts as it is read

    handlers = Handlers(screener, tmp_path / "results")
    upload = tmp_path / "u" / "scan.png"
    upload.parent.mkdir()
    shutil.copy(sample_images("malignant", 1)[0], upload)
    expected = predicted[sample_images("malignant", 1)[0]]
    image, heatmap, html = handlers.single(str(upload))
    assert not upload.exists()
    shown_probability = re.search(r'id="hsq-probability">([0-9.]+)<', html).group(1)
    assert len(shown_probability) == 8 and float(shown_probability) == pytest.approx(expected, abs=1e-6)
    assert heatmap is not None and heatmap.size == image.size and "gradcam" in html

    bad = tmp_path / "notes.png"  # the upload's folder went with the first upload, as gradio's do
    bad.write_text("not an image")
    image, heatmap, html = handlers.single(str(bad))
    assert image is None and heatmap is None and "notes.png: not a PNG, JPEG or DICOM file" in html

    files = [tmp_path / "b" / str(i) / name for i, name in enumerate(["one.png", "two.png", "notes.txt"])]
    for path, source in zip(files, sample_images("benign", 2), strict=False):
        path.parent.mkdir(parents=True)
        shutil.copy(source, path)
    files[2].parent.mkdir(parents=True)
    files[2].write_text("not an image")
    expected = [predicted[p] for p in sample_images("benign", 2)]
    shown, csv_path, status = handlers.batch([str(f) for f in files])
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert Path(csv_path).is_relative_to(tmp_path / "results")
    assert [r["file"] for r in rows] == [f.name for f in files]
    np.testing.assert_allclose([float(r["probability"]) for r in rows[:2]], expected, atol=1e-6)
    assert rows[2]["probability"] == "" and "notes.txt: not a PNG, JPEG or DICOM file" in rows[2]["error"]
    assert [float(p) for p in shown["probability"][:2]] == pytest.approx(expected, abs=1e-6)
    assert "2 images screened" in status and "1 file could not be read" in status


def test_serve_command_reports_a_bad_run_in_one_line(tmp_path: Path, capsys) -> None:
    from hsqformer.cli import main

    argv = sys.argv
    sys.argv = ["hsqformer", "serve", "--run", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err == f"error: {tmp_path} is not an hsqformer cv run folder (no run.json)"


def test_attention_heat_maps_on_a_run_without_query_stages_fail_at_start(baseline_run: Path) -> None:
    from hsqformer.serve.screening import Screener

    with pytest.raises(HSQformerError, match=r"^--method attention needs an HSQformer with query stages; this run holds"):
        Screener(baseline_run, "attention", detect_text=False)


# ---------------------------------------------------------------------------------------------- in a browser


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeCommand:
    """``hsqformer serve`` in a child process, as a user starts it; a thread collects its stderr (so that a full
    pipe never blocks it) and notes the lines that give its address and its temporary folder."""

    def __init__(self, run: Path, port: int) -> None:
        code = "from hsqformer.cli import main; main()"
        args = [sys.executable, "-c", code, "serve", "--run", str(run), "--port", str(port)]
        self.process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("temporary files: "):
                self.ready.set()
        self.ready.set()  # the server ended

    def wait_ready(self, timeout: float = 240) -> tuple[str, Path]:
        """The page's URL and the server's temporary folder, once it serves."""
        if not self.ready.wait(timeout) or self.process.poll() is not None:
            self.process.kill()
            pytest.fail("hsqformer serve did not start:\n" + "\n".join(self.lines[-30:]))
        url = next(re.search(r" at (http://\S+) ", line) for line in self.lines if line.startswith("serving run "))
        folder = next(line.split()[2] for line in self.lines if line.startswith("temporary files: "))
        return url.group(1).rstrip("/"), Path(folder)

    def stop(self) -> int:
        """SIGTERM, as a scheduler stops it; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.kill()
            self.reader.join(timeout=10)


@pytest.mark.skipif(chromium() is None, reason="no chromium (install Debian's chromium or set CHROMIUM)")
def test_page_in_a_browser_offline(tmp_path: Path, smoke_run: Path, dicom_case, predicted) -> None:
    """``hsqformer serve`` on the smoke run; in chromium, upload a liver-sysu PNG (without the real data, one of the
    embedded sample), a DICOM with burned-in patient text, a bad file and a batch: the probabilities shown equal
    predict's, nothing outside the app is requested, screenshots go to tmp_path; SIGTERM stops it and its files go."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    image = screening_image()
    case, dicom_png = dicom_case
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(case.path.read_bytes()[:-50_000])  # cut short
    expected_png, expected_dicom = predicted[image], predicted[dicom_png]

    port = free_port()
    server = ServeCommand(smoke_run, port)
    outside: list[str] = []
    try:
        url, cache = server.wait_ready()
        assert url == f"http://127.0.0.1:{port}"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium())
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def only_the_app(route) -> None:
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort("internetdisconnected")

            page.route("**/*", only_the_app)

            def upload_one(path: Path, shot: str) -> str:
                page.goto(url)
                page.locator("#hsq-single-upload input[type=file]").set_input_files(path)
                result = page.wait_for_selector("#hsq-result #hsq-probability, #hsq-result #hsq-message", timeout=120_000)
                page.wait_for_timeout(500)  # let the images render for the screenshot
                page.screenshot(path=tmp_path / shot, full_page=True)
                return result.inner_text()

            assert float(upload_one(image, "single_png.png")) == pytest.approx(expected_png, abs=1e-6)
            assert "heat map of the fold ensemble" in page.locator("#hsq-result").inner_text()
            sync_api.expect(page.locator("#hsq-heatmap img")).to_have_count(1, timeout=30_000)
            assert "out-of-fold" in page.locator("#hsq-card").inner_text()
            assert float(upload_one(case.path, "single_dicom.png")) == pytest.approx(expected_dicom, abs=1e-6)
            assert "cropped to the scan area" in page.locator("#hsq-result").inner_text()
            assert not any(value in page.content() for value in case.patient.header_values())
            message = upload_one(bad, "single_bad.png")
            assert message.startswith("broken.dcm: DICOM ") and "Traceback" not in page.content()

            page.goto(url)
            page.get_by_role("tab", name="Batch").click()
            page.locator("#hsq-batch-upload input[type=file]").set_input_files([image, case.path, bad])
            page.wait_for_selector("#hsq-batch-status p", timeout=120_000)
            link = page.locator("#hsq-batch-csv a").first.get_attribute("href")
            page.screenshot(path=tmp_path / "batch.png", full_page=True)
            rows = list(csv.DictReader(io.StringIO(page.request.get(link if link.startswith("http") else url + link).text())))
            browser.close()
        leftovers = [p.name for p in cache.rglob("*") if p.name in (image.name, case.path.name, bad.name)]
    finally:
        status = server.stop()
    assert [float(r["probability"]) for r in rows[:2]] == pytest.approx([expected_png, expected_dicom], abs=1e-6)
    assert rows[2]["file"] == "broken.dcm" and rows[2]["error"].startswith("broken.dcm: DICOM")
    assert leftovers == []  # each upload left gradio's folder with its request
    assert outside == []  # the page works offline
    assert not any(value in line for value in case.patient.header_values() for line in server.lines)  # nor logged
    assert status == 143 and server.lines[-1] == "interrupted by SIGTERM; server stopped; its temporary files are removed"
    assert not cache.exists()
    assert all((tmp_path / shot).stat().st_size > 10_000 for shot in ("single_png.png", "single_dicom.png", "batch.png"))
