"""The CptRun API: spec, status and resolved trainer config. Imports only pydantic and yaml."""
from .load import InvalidSpec, SpecError, load_run, parse_run, parse_spec
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, CptRun, CptRunSpec
from .status import CptRunStatus, Phase
from .trainer_config import TrainerConfig

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "CptRun", "CptRunSpec", "CptRunStatus",
    "InvalidSpec", "Phase", "SpecError", "TrainerConfig", "load_run", "parse_run", "parse_spec",
]
