"""The real-data set generators draw what their docstrings promise."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests import realdata


def test_digits_anywhere_straddle_patches_and_name_the_centre_cell(tmp_path):
    realdata.digits_colour(tmp_path, num_train=4, num_val=40, num_test=4, questions="colour",
                           placement="anywhere")
    records = [json.loads(x) for x in (tmp_path / "val.jsonl").read_text().splitlines()]
    cells = json.loads((tmp_path / "val_cells.json").read_text())
    cell, off_grid = 8, 0  # digits straddling two cells
    for rec, named in zip(records, cells, strict=True):
        image = np.asarray(Image.open(tmp_path / rec["image"]), np.int64)
        # Pixels of the named digit: white blended towards its colour, so 255 - pixel points
        # the way 255 - colour does, and not faintly.
        away, want = 255 - image, 255 - np.asarray(realdata.COLOURS[rec["label"]])
        norm = np.linalg.norm(away, axis=-1)
        ink = (norm > 60) & ((away @ want) > 0.995 * norm * np.linalg.norm(want))
        ys, xs = np.nonzero(ink)
        assert ys.size, rec
        off_grid += ys.min() // cell != ys.max() // cell or xs.min() // cell != xs.max() // cell
        y, x = divmod(named, 4)
        assert y * cell - cell // 2 <= ys.mean() < (y + 1) * cell + cell // 2, (rec, named)
        assert x * cell - cell // 2 <= xs.mean() < (x + 1) * cell + cell // 2, (rec, named)
    assert off_grid >= 20, off_grid  # on the grid, each digit's ink stays inside its cell
