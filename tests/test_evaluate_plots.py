"""The figure helpers of ``ood_jax.evaluate.plots`` that other reports build on."""

import numpy as np
from matplotlib.image import imread

from ood_jax.evaluate.plots import figure_grid, save_figure


def test_figure_grid_puts_three_panels_a_row_and_hides_the_unused():
    fig, axes = figure_grid(4)
    axes = list(axes)
    # 4 panels: ceil(4 / 3) = 2 rows of 3, 4.2 x 3.2 inches a panel.
    assert len(axes) == 6
    assert [ax.axison for ax in axes] == [True] * 4 + [False] * 2
    np.testing.assert_allclose(fig.get_size_inches(), [3 * 4.2, 2 * 3.2])
    fig, axes = figure_grid(2)
    assert len(list(axes)) == 2
    np.testing.assert_allclose(fig.get_size_inches(), [2 * 4.2, 3.2])


def test_save_figure_writes_a_png_at_100_dpi(tmp_path):
    fig, axes = figure_grid(1)
    next(iter(axes)).plot([0, 1], [0, 1])
    path = tmp_path / "line.png"
    save_figure(fig, str(path))
    image = imread(path)
    assert image.shape[:2] == (320, 420)  # 3.2 x 4.2 inches at 100 dpi
