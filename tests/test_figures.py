"""figures.save_png: the plot as a palette PNG of the same size in pixels, smaller than matplotlib's own, with every
colour of the default cycle kept (a quantiser that merges two lines' colours would make a legend lie)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from figures import save_png  # noqa: E402


def test_a_line_plot_is_written_as_a_small_palette_png_with_its_colours(tmp_path):
    cycle = [matplotlib.colors.to_rgb(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    fig, ax = plt.subplots(figsize=(5, 3))
    for k, colour in enumerate(cycle):
        ax.plot(range(50), [(i * (k + 1)) % 17 + k for i in range(50)], color=colour, linewidth=3, label=f"run {k}")
    ax.legend()
    fig.savefig(tmp_path / "plain.png", dpi=110)
    save_png(fig, tmp_path / "small.png")
    plt.close(fig)
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "small.png") as small:
        assert small.mode == "P" and small.size == plain.size == (550, 330)
        original = np.asarray(plain.convert("RGB")).astype(int)
        stored = np.asarray(small.convert("RGB")).astype(int)
    for colour in cycle:  # the pixels drawn in each line's colour keep it
        rgb = np.round(np.array(colour) * 255).astype(int)
        drawn = np.abs(original - rgb).max(axis=2) <= 2
        assert drawn.sum() > 50 and np.abs(stored[drawn] - rgb).max() <= 10, rgb
    assert (tmp_path / "small.png").stat().st_size < 0.6 * (tmp_path / "plain.png").stat().st_size
