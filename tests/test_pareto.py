import numpy as np
import pytest

from ditplan.plansearch.pareto import hypervolume, pareto_mask


def test_hypervolume_of_known_rectangles():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4] = 3 + 2 + 1
    assert hypervolume(points, ["minimize", "minimize"], [4.0, 4.0]) == pytest.approx(6.0)


def test_hypervolume_handles_maximised_objectives_and_points_outside():
    points = np.array([[0.5, 30.0], [2.0, 40.0]])  # (cost ↓, psnr ↑); the second is beyond the reference
    assert hypervolume(points, ["minimize", "maximize"], [1.0, 20.0]) == pytest.approx(0.5 * 10.0)
    assert hypervolume(np.empty((0, 2)), ["minimize", "maximize"], [1.0, 20.0]) == 0.0


def test_pareto_mask_drops_dominated_points():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [2.5, 2.5], [3.0, 1.0]])
    assert pareto_mask(points, ["minimize", "minimize"]).tolist() == [True, True, False, True]
