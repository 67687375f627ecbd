"""Every random stream of a run, in one place.

A draw is keyed ``(seed, round, stream, [inner epoch,] global sample index)`` (see
``flow.sample_generator``), so results depend neither on the number of processes nor on batching.
Changing a number here changes every run's results.
"""

from __future__ import annotations

SAMPLING_NOISE = 0  # the rollout's starting noise
TRAIN_NOISE = 1  # eps of the training path x_sigma
TRAIN_SIGMA = 2  # the training sigmas
VALIDATION = 3  # validation renders: (seed, 0, VALIDATION, prompt index), the same noise every time
PROMPT_ORDER = 7  # the per-pass permutation of the prompts: (seed, PROMPT_ORDER, pass)
SDE_NOISE = 4  # Flow-GRPO: the per-step noise of the stochastic steps
SDE_WINDOW = 5  # Flow-GRPO: where the SDE window sits in a round
NFT_TIMESTEPS = 8  # DiffusionNFT: each sample's order of the rollout grid's timesteps, per inner epoch
