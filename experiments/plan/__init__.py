"""Compile-only TPU and GPU plans of the runner's own steps (``python -m experiments.plan.tpu``,
``python -m experiments.plan.gpu``): memory, sharding checks and roofline estimates."""
