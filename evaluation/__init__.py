"""Generation evaluation: sample files (:mod:`repdyn.evaluation.images`), metrics
(:mod:`repdyn.evaluation.metrics`: ``fd_<dataset>``, class accuracy, Inception / ADM metrics), the
SD-VAE (:mod:`repdyn.evaluation.vae`) and one checkpoint's evaluation row
(:mod:`repdyn.evaluation.evaluate`)."""
