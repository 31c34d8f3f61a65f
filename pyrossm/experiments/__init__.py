"""Paper reproductions and experiments (not part of the library API).

* :mod:`pyrossm.experiments.nonlinear` -- JSB chorales DMM and the synthetic checks
  (``python -m pyrossm.experiments.nonlinear jsb|synthetic --help``).
* :mod:`pyrossm.experiments.synthetic` -- nonlinear models against Kalman baselines on
  simulated data.
* :mod:`pyrossm.experiments.ptb` -- the Penn Treebank sequence-VAE experiment
  (``python -m pyrossm.experiments.ptb --help``).
* :mod:`pyrossm.experiments.per_step` -- the per-time-step ``pyro.markov`` formulation of an
  LGSSM and its guide, the reference that benchmarks/svi.py and the SVI tests compare against.
* :mod:`pyrossm.experiments.common` -- the per-frame evaluation the experiments report.
"""
