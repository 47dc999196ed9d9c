"""The commands and the pipeline they share: restore, evaluate, distributed, oracle, profile, draw,
convert."""
