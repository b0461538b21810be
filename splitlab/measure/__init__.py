"""What a run measured: ``Run`` and its metrics, analysis, profiles, ceilings, FLOP counts, sweeps."""
