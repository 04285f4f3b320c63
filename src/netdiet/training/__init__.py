"""One trainer for everything: `netdiet train`, compression fine-tuning and continual learning."""
from netdiet.training.loop import Callback, TrainConfig, TrainResult, evaluate_accuracy, fit, make_optimizer, predict

__all__ = ["Callback", "TrainConfig", "TrainResult", "evaluate_accuracy", "fit", "make_optimizer", "predict"]
