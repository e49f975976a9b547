"""One module per ``probe`` command: the only layer that reads checkpoints and writes files.

``cli.py`` parses flags and calls ``commands.<name>.run_<name>``; each returns a small dataclass
(paths and tables) that the CLI prints. The measures, figures and claim rules live in
``analysis/``, extraction and probes in ``probe/``, models, training and file helpers in
``training/``. Modules are imported on use (``from commands.layer_grid import run_layer_grid``), so
``import commands`` is cheap.
"""

__all__ = ["common", "train", "layer_grid", "similarity", "diversity", "pca", "umap", "attribute", "curves",
           "correlate", "sample", "eval", "demo"]
