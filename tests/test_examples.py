"""The example model runs at toy size and its jagged and padded loss curves agree."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sequential_recommender.py"


def test_sequential_recommender_toy_curves_agree():
    spec = importlib.util.spec_from_file_location("sequential_recommender", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gap = module.main(["--toy", "--steps", "4", "--batch", "8"])
    assert gap < 1e-3
