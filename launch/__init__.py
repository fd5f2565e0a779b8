"""Worldsmith: launching on SLURM (sbatch scripts, sweeps, preemption and requeue); see launch/README.md."""
