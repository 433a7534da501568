"""Test-session settings: skip the tests that need the real data sets when they are not there.

See shared_data.py: ``@requires_shared_data`` tests are skipped when ``../shared/data`` (or
``$HSQFORMER_SHARED_DATA``) is missing, and one line at the end of the session says how many and why,
instead of one "SKIPPED" line per test location.
"""

from __future__ import annotations

import os

import pytest
from shared_data import DATA, ENV_VAR, HAS_SHARED_DATA, SKIP_REASON

NO_DATA_KEY = "skipped (no real data)"

# Under `pytest -n N` every worker would start torch with one thread per core, N times too many: OpenMP
# threads then wait for each other at every operation (a small model's training step, measured on 2 busy
# cores, took 11 s with 2 threads and 1 s with one). Each worker gets its share of the cores instead; set
# before torch is imported (this file imports nothing heavy) and inherited by the CLIs tests start.
_WORKERS = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _WORKERS and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(_WORKERS)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"requires_shared_data: {SKIP_REASON} (see tests/shared_data.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_SHARED_DATA:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("requires_shared_data"):
            item.add_marker(skip)


def _is_no_data_skip(report: pytest.TestReport) -> bool:
    longrepr = getattr(report, "longrepr", None)
    return isinstance(longrepr, tuple) and len(longrepr) == 3 and SKIP_REASON in str(longrepr[2])


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line for all real-data skips; they leave the per-location "SKIPPED" list of ``-ra``."""
    skipped = terminalreporter.stats.get("skipped", [])
    no_data = [report for report in skipped if _is_no_data_skip(report)]
    if not no_data:
        return
    terminalreporter.stats["skipped"] = [report for report in skipped if not _is_no_data_skip(report)]
    terminalreporter.stats[NO_DATA_KEY] = no_data
    terminalreporter.write_line(
        f"{len(no_data)} real-data test{'s' if len(no_data) > 1 else ''} skipped: {DATA} not found (set {ENV_VAR} or put the sets in "
        "../shared/data beside the repository); the other tests ran on the sample embedded in the package",
        yellow=True,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished HSQformer-S smoke run (2 folds) on the embedded sample, with real weights."""
    import warnings

    from trained_runs import train_smoke_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_smoke_run(tmp_path_factory.mktemp("smoke_run") / "run")


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished smoke run of EfficientNet-Lite0 alone (a plain timm baseline) on the embedded sample."""
    import warnings

    from trained_runs import BASELINE, train_smoke_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_smoke_run(tmp_path_factory.mktemp("baseline_run") / "run", *BASELINE)
