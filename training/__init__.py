"""Student training: data, rollouts, losses (DCKD, ADPA, baselines) and trainers."""
