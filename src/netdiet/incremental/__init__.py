"""Continual learning under a byte budget: scenarios, strategies, the byte ledger and metrics.

    from netdiet.incremental import ContinualConfig, make_scenario, run_continual
    (or simply netdiet.api.continual(...), which builds the scenario and the model for you)
"""
from netdiet.incremental.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer
from netdiet.incremental.runner import ContinualResult, StrategyResult, continual, run_continual, run_strategy
from netdiet.incremental.scenarios import SCENARIOS, SETTINGS, Scenario, Task, make_scenario
from netdiet.incremental.strategies import STRATEGIES, ContinualConfig, create_strategy

__all__ = ["ContinualConfig", "ContinualResult", "SCENARIOS", "SETTINGS", "STRATEGIES", "Scenario", "StrategyResult",
           "Task", "average_accuracy", "backward_transfer", "continual", "create_strategy", "forgetting",
           "forward_transfer", "make_scenario", "run_continual", "run_strategy"]
