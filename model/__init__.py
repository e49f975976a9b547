"""The model core that training, evaluation and probing share.

* :mod:`repdyn.model.backbone`: the DiT/SiT backbone and its registry (``build_model("SiT-XL/2")``);
* :mod:`repdyn.model.flow` / :mod:`repdyn.model.diffusion` / :mod:`repdyn.model.objectives`: the SiT
  interpolant paths, DiT's DDPM, and the generation losses;
* :mod:`repdyn.model.samplers`: ODE / SDE / DDPM samplers with guidance;
* :mod:`repdyn.model.checkpoint`: saving, listing and loading checkpoints, ours and published ones;
  :mod:`repdyn.model.torch_file` reads a file (once, with one-line errors),
  :mod:`repdyn.model.pickled` says what it pickles and :mod:`repdyn.model.foreign` what a published
  layout is;
* :mod:`repdyn.model.classifier` / :mod:`repdyn.model.frechet`: the dataset's own classifier (the
  feature space of ``fd_<dataset>``) and the Frechet maths.
"""
