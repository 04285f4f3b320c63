"""Model zoo registry and loader: one call for built-in names and for a user's code.

    create_model("lenet5")                       # zoo name
    create_model("mypkg.nets:build", width=64)   # package.module:callable
    create_model("path/to/file.py:build")        # file.py:callable
"""
from netdiet.models.registry import (
    ModelEntry,
    ModelSpec,
    create_model,
    default_inputs,
    get_entry,
    list_models,
    make_inputs,
    parse_model_kw,
    register_model,
    resolve,
)
from netdiet.models.inputs import (InputSpec, bind_inputs, input_specs, integer_range, parse_input,
                                   structured_forward)
from netdiet.models import zoo as _zoo  # noqa: F401  (registers the zoo)

__all__ = [
    "ModelEntry", "ModelSpec", "create_model", "default_inputs", "get_entry", "list_models",
    "make_inputs", "parse_model_kw", "register_model", "resolve",
    "InputSpec", "bind_inputs", "input_specs", "integer_range", "parse_input", "structured_forward",
]
