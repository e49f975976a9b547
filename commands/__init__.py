"""One module per ``probe`` command: with the study, the only code that reads checkpoints and writes files.

``repdyn.cli`` parses flags and calls ``repdyn.commands.<name>.run_<name>``; each returns a small
dataclass (paths and tables) that the CLI prints. Modules are imported on use
(``from repdyn.commands.layer_grid import run_layer_grid``), so ``import repdyn.commands`` is cheap.
"""

__all__ = ["features", "outputs", "train", "layer_grid", "similarity", "diversity", "pca", "umap", "align", "spatial",
           "attribute", "curves", "correlate", "sample", "eval", "encode", "demo"]
