"""The commands and the pipeline they share: restore (its demo, its Dask cluster mode: demo,
distributed, cluster), evaluate, oracle, profile, draw, convert."""
