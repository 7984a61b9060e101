"""Pipeline stages: the stage-partition DP (``stage_dp``) and the per-stage recomputation policies on top of it
(``stage_policies``). Schedule orders and in-flight counts come from ``autopar.schedule``."""
