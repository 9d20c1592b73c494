"""Running the workflow on a SLURM cluster: what the cluster offers, and the checks and adapters the SLURM
profile (``profiles/slurm``) installs into Snakemake's SLURM executor plugin.

- :mod:`mcibi.cluster.slurm`: ``scontrol``/``sacct`` read and parsed (accounting, MinJobAge, preemption, GPUs,
  partitions and node sizes), the job-status command that works on this cluster, job states normalised, each
  job's request checked against what its partition offers.
- :mod:`mcibi.cluster.profile`: the profile's site file (``profiles/slurm/site.yaml``) merged rule by rule and
  resource by resource, and the adapters installed into the plugin (status command chosen, states normalised,
  the pre-flight check before the first submission).

Nothing here imports torch or pandas: the profile loads it in the process that runs Snakemake.
"""
