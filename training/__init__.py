"""The trainer's home: :mod:`repdyn.training.trainer` (the loop, EMA, exact resume, DDP),
:mod:`repdyn.training.config` (config, presets, the method grammar) and :mod:`repdyn.training.methods`
(SRA and DiverseDiT as loss terms). Models, paths, samplers and checkpoints are :mod:`repdyn.model`."""
