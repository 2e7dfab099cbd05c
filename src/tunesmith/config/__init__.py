"""The run configuration: a pydantic schema, loaded from YAML plus dotted ``key=value`` overrides.

Every field is described once, in the section it belongs to; that text reaches ``tunesmith config keys``
(keys.py). Where each piece lives:

    base.py         Strict (the base of every section) and how validation errors read
    sections.py     model, peft, data, train, eval, log
    guard_rails.py  retention (forgetting) and privacy (DP-SGD)
    search.py       the search: block (what an Optuna study varies)
    schema.py       Config (the whole file, checks across sections) and the stages
    load.py         YAML + overrides -> Config; derived configs; the resolved YAML
    yaml_loader.py  safe YAML that refuses duplicate keys
    keys.py         the key listing behind `tunesmith config keys`

Everything other modules use is re-exported here: `from tunesmith.config import Config, load_config`.
"""

from tunesmith.config.base import Strict, format_validation_error
from tunesmith.config.guard_rails import Privacy, Replay, Retention, RetentionSet
from tunesmith.config.load import config_from_dict, derive, dump_config, flatten, load_config, parse_overrides
from tunesmith.config.schema import Config, Stage, stage_config
from tunesmith.config.search import Dist, SearchConfig, unknown_keys
from tunesmith.config.sections import (
    CANONICAL_COLUMNS,
    DEFAULT_PROMPTS,
    DEFAULT_TASK,
    FORMATS,
    MAX_LENGTH_CAP,
    TASKS,
    DataConfig,
    EarlyStopping,
    EvalConfig,
    LogConfig,
    ModelConfig,
    PeftConfig,
    PreferenceConfig,
    TrainConfig,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_PROMPTS",
    "DEFAULT_TASK",
    "FORMATS",
    "MAX_LENGTH_CAP",
    "TASKS",
    "Config",
    "DataConfig",
    "Dist",
    "EarlyStopping",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "PeftConfig",
    "PreferenceConfig",
    "Privacy",
    "Replay",
    "Retention",
    "RetentionSet",
    "SearchConfig",
    "Stage",
    "Strict",
    "TrainConfig",
    "config_from_dict",
    "derive",
    "dump_config",
    "flatten",
    "format_validation_error",
    "load_config",
    "parse_overrides",
    "stage_config",
    "unknown_keys",
]
