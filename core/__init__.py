"""The ground floor: small infrastructure every other floor shares.

* :mod:`repdyn.core.files`: atomic writes that honour the umask, exclusive locks;
* :mod:`repdyn.core.runtime`: devices, joining a torchrun group, sharding work over ranks, the machine;
* :mod:`repdyn.core.noise`: the one per-sample random-number scheme (training, extraction, sampling);
* :mod:`repdyn.core.timesteps`: how a timestep is written;
* :mod:`repdyn.core.messages`: one-line warnings for users.
"""
