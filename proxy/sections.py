"""The base of every settings model, shared by proxy/config.py and the modules
that own a config section (proxy/identity.py, …), so neither imports the other."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

Loc = tuple[str | int, ...]


class FieldError(ValueError):
    """Raise from a cross-field validator to report the error at a key inside the model.

    A model validator's error otherwise points at the model itself ("tls: …");
    this lets it point at the key the user has to change ("tls.key_file: …").
    """

    def __init__(self, loc: str | int | Loc, message: str) -> None:
        super().__init__(message)
        self.loc: Loc = loc if isinstance(loc, tuple) else (loc,)


class _SecretMarker:
    def __repr__(self) -> str:
        return "SECRET"


# Annotated metadata: dump_settings shows the field as "***" unless redact=False.
SECRET = _SecretMarker()

# An optional secret string: redacted in dumps, and left out of repr() so it
# never reaches a log line by accident.
OptionalSecret = Annotated[str | None, SECRET, Field(repr=False)]

class Section(BaseModel):
    """Base of every settings model: immutable, no unknown keys, defaults validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        # A section whose keys are all commented out ("tls:") is YAML null: all defaults.
        return {} if data is None else data
