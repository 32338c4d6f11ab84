"""scripts/plot_training.py on TensorBoard event files written the way megatron writes them:
scalars read back exactly (later event files win on repeated steps, as after a resume), one PNG
panel per tag that has data, and an error when no tag has any."""

from __future__ import annotations

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from scripts.plot_training import plot_runs, read_scalars, run_label


def write_run(directory, losses: dict[int, float], tag: str = "lm loss") -> str:
    writer = SummaryWriter(str(directory))
    for step, value in losses.items():
        writer.add_scalar(tag, value, step)
    writer.close()
    return str(directory)


def test_read_scalars_merges_event_files(tmp_path):
    run = tmp_path / "full" / "tensorboard"
    write_run(run, {1: 12.0, 2: 11.0, 3: 10.5})
    write_run(run, {3: 10.25, 4: 10.0})  # a resumed process writes a second file
    assert read_scalars(str(run), "lm loss") == {1: 12.0, 2: 11.0, 3: 10.25, 4: 10.0}
    assert read_scalars(str(run), "grad-norm") == {}


def test_plot_draws_one_panel_per_tag_with_data(tmp_path):
    full = write_run(tmp_path / "full" / "tensorboard", {i: 12.0 - 0.01 * i for i in range(1, 301)})
    resumed = write_run(tmp_path / "resumed" / "tensorboard", {i: 11.0 for i in range(101, 151)})
    out = tmp_path / "curve.png"
    missing = plot_runs([full, resumed], ["lm loss", "grad-norm"], str(out), "proxy")
    assert missing == ["grad-norm"]
    with Image.open(out) as image:
        width, height = image.size
    assert width > 400 and 150 < height < 400  # one panel of 2.6 inches at 110 dpi
    assert run_label(full) == "full"


def test_plot_without_any_data_is_an_error(tmp_path):
    empty = write_run(tmp_path / "empty", {1: 1.0}, tag="other")
    with pytest.raises(ValueError, match="none of the tags"):
        plot_runs([empty], ["lm loss"], str(tmp_path / "x.png"))
