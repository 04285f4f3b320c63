"""netdiet: what a neural network really costs, and how to make it cheaper.

The public API is the functions named in `__all__` (defined in `netdiet.api`). They are resolved on first use
(PEP 562), so `import netdiet` and the CLI's start do not import torch; no public name is also the name of a
module of the package, so no import can shadow one.
"""
__version__ = "0.1.0"

__all__ = ["continual", "list_models", "create_model", "get_dataset", "load_model", "report", "demo_summary",
           "profile", "largest_batch_within", "compress", "list_recipes", "load_recipe", "evaluate", "train", "train_ensemble", "sweep",
           "list_datasets", "describe_data", "estimate_memory", "measure_memory", "measure_latency", "weight_storage",
           "plan"]


def __getattr__(name: str):
    if name in __all__:
        from netdiet import api  # the package root's one lazy import: the API and everything it runs on
        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'netdiet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
