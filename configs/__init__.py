"""Experiment configs: each module's `get_config(arg)` returns an ml_collections ConfigDict (moejax.config
layout), and its docstring gives the command, the expected result and the runtime. Use them by path on the
command line (--config=configs/deepseekmoe_table1.py:method=gshard,scale=tiny) or import them
(`from configs import deepseekmoe_table1`); the package is installed with moejax.

  deepseekmoe_table1     DeepSeekMoE Table 1: Dense, Hash, Switch, GShard, DeepSeekMoE at equal compute
  deepseekmoe_ablations  the paper's ablations and the baselines beyond Table 1, on Table 1's recipe
  deepseekmoe_16b        DeepSeekMoE 16B (for the TPU compile and cost checks of moejax.aot)
"""
