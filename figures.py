"""Figures written as small PNGs: every plot of this repository goes through save_png.

Run folders and result tables are committed, and GPU sittings carry the whole working tree, so a plot's bytes count.
A plot needs few colours: the figure is rendered at 110 dpi and stored with a 256-colour palette, about a third of
the size of matplotlib's RGBA PNG. The palette holds every colour of matplotlib's colour cycle exactly, and the rest
is chosen by median cut: a quantiser alone sometimes merged two lines' colours (orange into red), which makes a
legend lie.
"""
import io
from pathlib import Path


def save_png(fig, path, dpi: int = 110) -> None:
    """Render a matplotlib figure and write it to path as a palette PNG (write_palette_png)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        write_palette_png(rendered.convert("RGB"), path)


def write_palette_png(image, path) -> None:
    """An RGB image as a 256-colour palette PNG: the colour cycle's colours exactly, the rest by median cut."""
    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image

    cycle = [tuple(round(255 * v) for v in matplotlib.colors.to_rgb(c))
             for c in plt.rcParams["axes.prop_cycle"].by_key().get("color", [])]
    adaptive = image.quantize(colors=256 - len(cycle), method=Image.Quantize.MEDIANCUT).getpalette()
    rest = [tuple(adaptive[i:i + 3]) for i in range(0, min(len(adaptive), 3 * (256 - len(cycle))), 3)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([v for colour in cycle + rest for v in colour])
    image.quantize(palette=palette, dither=Image.Dither.NONE).save(Path(path), optimize=True)
