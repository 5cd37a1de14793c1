"""The base of every settings model, shared by proxy/app/settings.py and the modules
that own a config section (proxy/dataplane/identity.py, …), so neither imports the other."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..detectors.settings import SettingsModel

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


class Section(SettingsModel):
    """Base of the proxy's settings sections: the same rules as the engine's."""
