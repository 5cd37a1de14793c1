"""When the certificates loopwatch presents are valid: the listener's
(`tls.cert_file`) and its client certificate for upstreams
(`upstream_tls.cert_file`).

The data plane checks that each file parses and matches its key, not its
dates: rustls serves an expired certificate, and every client refuses it
(nginx and HAProxy load one without a word too; Envoy and Traefik export the
expiry). So the dates are read here, as the data plane took the files (at
start and at each reload that applied): a warning line when a certificate is
expired, not valid yet or ends within `SOON`, and the end as a gauge
(`loopwatch_certificate_expiry_timestamp_seconds`) to alert on.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

if TYPE_CHECKING:
    from ..app.settings import Settings

# How long before its end a certificate is worth a warning line (the alert,
# LoopwatchCertificateExpiringSoon, fires a week before).
SOON = datetime.timedelta(days=14)
MAX_FILE_SIZE = 4 << 20  # as the data plane reads a PEM file


@dataclass(frozen=True, slots=True)
class Validity:
    """A certificate's dates: the first of its file, the one presented."""

    setting: str  # "tls.cert_file" or "upstream_tls.cert_file"
    path: str
    not_before: datetime.datetime
    not_after: datetime.datetime


def presented(settings: Settings) -> dict[str, str | None]:
    """The certificate files a configuration names, by setting."""
    return {"tls.cert_file": settings.tls.cert_file, "upstream_tls.cert_file": settings.upstream_tls.cert_file}


def validities(files: Mapping[str, str | None]) -> list[Validity]:
    """The dates of the certificates in `files` (setting: path or None). A
    file that cannot be read here is left out: the data plane's own check
    names what is wrong with it, and a reload refused for it keeps the
    certificate in force."""
    found = []
    for setting, path in files.items():
        if path is None:
            continue
        try:
            with open(path, "rb") as file:
                certificate = x509.load_pem_x509_certificate(file.read(MAX_FILE_SIZE))
        except (OSError, ValueError):
            continue
        found.append(Validity(setting, path, certificate.not_valid_before_utc, certificate.not_valid_after_utc))
    return found


def warnings(found: list[Validity], now: datetime.datetime) -> list[str]:
    """A line for each certificate that peers refuse now or soon will."""
    lines = []
    for v in found:
        who = "clients refuse it" if v.setting == "tls.cert_file" else "upstreams that ask for it refuse it"
        if now >= v.not_after:
            lines.append(f"{v.setting}: the certificate in {v.path!r} expired on {_when(v.not_after)}: {who}")
        elif now < v.not_before:
            lines.append(f"{v.setting}: the certificate in {v.path!r} is not valid until {_when(v.not_before)}: {who}")
        elif v.not_after - now < SOON:
            days = (v.not_after - now) / datetime.timedelta(days=1)
            lines.append(f"{v.setting}: the certificate in {v.path!r} expires on {_when(v.not_after)}, in {days:.1f} days")
    return lines


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
