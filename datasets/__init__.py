"""Where images come from: Fashion-MNIST (Debian's IDX files), scikit-learn's digits, image folders
and SD-VAE latents, behind one ``make_dataset(spec, split)`` (:mod:`repdyn.datasets.sources`)."""
