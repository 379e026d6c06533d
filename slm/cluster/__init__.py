"""Running on a cluster: the Composer launcher's flags from Slurm and SGE, and a suite array's tasks. Imports
slm.core only."""
