"""Training tests that do not look at their figures: common.plot_curves replaced by a stand-in that writes the PNG
empty. matplotlib's figure and savefig cost ~0.2 s a plot (more on a loaded machine), paid at every checkpoint of
every run; the figures themselves are tested where a test requests real_plots (or calls plot_curves as such).

A test module takes both with `no_plots, real_plots = plot_stub.no_plots, plot_stub.real_plots`."""
from pathlib import Path

import pytest

from tritongpt.train import common

REAL = common.plot_curves


def empty_plot(rows, png_path, keys=("loss", "val_loss"), title="training"):
    """plot_curves' reading of the rows (a row without its step still fails) and its file, empty: what the
    callers check, that a figure was drawn again or not (common.replot reads the file's presence), stays as it was."""
    [(r["step"], float(r[key])) for key in keys for r in rows if key in r and r[key] is not None]  # (plot's numbers)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    Path(png_path).write_bytes(b"")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(common, "plot_curves", empty_plot)


@pytest.fixture
def real_plots(no_plots, monkeypatch):
    """The figures drawn by matplotlib, for a test that reads them."""
    monkeypatch.setattr(common, "plot_curves", REAL)
