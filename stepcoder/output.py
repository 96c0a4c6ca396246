"""Files that reports write: atomically (a crash leaves the old file or the new one, never half of
one), and figures drawn without a display."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def new_figure(size: tuple[float, float], columns: int = 1):
    """(figure, axes) on matplotlib's file-only backend; with `columns` > 1, a row of that many axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


def save_figure(figure, path: Path) -> None:
    """Writes `figure` to `path` atomically and frees it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
