"""The dates of the certificates loopwatch presents (proxy/observe/certificates.py).

rustls serves an expired listener certificate (it parses and matches its key),
and every client refuses it; a reload that swapped one in was a success
(the tlsid probe). Now: a `config_warning` at start and after a reload (a
`note:` from check-config), and the end as a gauge for
LoopwatchCertificateExpiringSoon (dashboards/rules/tests/certificate_test.yml).
"""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.observe.certificates import validities, warnings
from tests.conftest import free_port, self_signed_cert
from tests.processes import loopwatch_run
from tests.test_service_links import process_env

NOW = datetime.datetime.now(datetime.UTC)


def cert_in(tmp_path: Path, name: str, valid_days: tuple[float, float]) -> tuple[str, str]:
    folder = tmp_path / name
    folder.mkdir()
    return self_signed_cert(folder, ["localhost"], valid_days)


def not_after(cert: str) -> datetime.datetime:
    return x509.load_pem_x509_certificate(Path(cert).read_bytes()).not_valid_after_utc


def test_each_certificate_peers_refuse_now_or_soon_is_named(tmp_path: Path) -> None:
    expired = cert_in(tmp_path, "expired", (-30, -1))
    future = cert_in(tmp_path, "future", (2, 90))
    soon = cert_in(tmp_path, "soon", (-1, 5))
    fine = cert_in(tmp_path, "fine", (-1, 90))
    lines = warnings(validities({"tls.cert_file": expired[0], "upstream_tls.cert_file": future[0]}), NOW)
    assert len(lines) == 2
    assert lines[0].startswith(f"tls.cert_file: the certificate in {expired[0]!r} expired on ")
    assert lines[0].endswith(": clients refuse it")
    assert lines[1].startswith(f"upstream_tls.cert_file: the certificate in {future[0]!r} is not valid until ")
    (line,) = warnings(validities({"tls.cert_file": soon[0], "upstream_tls.cert_file": None}), NOW)
    assert line.startswith("tls.cert_file: ") and line.endswith(", in 5.0 days")
    assert warnings(validities({"tls.cert_file": fine[0]}), NOW) == []
    # A file it cannot read is the data plane's to name: nothing here.
    assert validities({"tls.cert_file": str(tmp_path / "missing.pem")}) == []


def test_check_config_notes_an_expired_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("LOOPWATCH_")]:
        monkeypatch.delenv(name)
    cert, key = cert_in(tmp_path, "expired", (-30, -1))
    config = tmp_path / "loopwatch.yaml"
    config.write_text(f'upstream: "ws://127.0.0.1:1"\ntls: {{cert_file: "{cert}", key_file: "{key}"}}\n')
    assert check_config_main(str(config)) == 0  # it works; it is refused by every client
    err = capsys.readouterr().err
    assert err.startswith(f"note: tls.cert_file: the certificate in {cert!r} expired on "), err


async def expiry(admin: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/metrics") as r:
        text = await r.text()
    return {
        s.labels["setting"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "loopwatch_certificate_expiry_timestamp_seconds"
    }


async def test_the_end_is_a_gauge_and_a_reload_to_an_expired_certificate_is_said(tmp_path: Path) -> None:
    soon = cert_in(tmp_path, "soon", (-1, 3))
    renewed = cert_in(tmp_path, "renewed", (-1, 90))
    expired = cert_in(tmp_path, "expired", (-30, -1))
    config = tmp_path / "loopwatch.yaml"

    def write(cert: tuple[str, str]) -> None:
        config.write_text(f'tls: {{cert_file: "{cert[0]}", key_file: "{cert[1]}"}}\n')

    write(soon)
    args = ("--config", str(config), "--upstream", f"ws://127.0.0.1:{free_port()}",
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")  # fmt: skip
    async with loopwatch_run(*args, env=process_env({})) as run:
        warning = await run.until("config_warning")
        assert warning["message"].startswith(f"tls.cert_file: the certificate in {soon[0]!r} expires on ")
        admin = (await run.until("listening"))["admin"]
        assert await expiry(admin) == {"tls.cert_file": not_after(soon[0]).timestamp()}
        # Renewed and reloaded: the gauge follows, and nothing is said.
        write(renewed)
        run.proc.send_signal(signal.SIGHUP)
        assert (await run.until("config_loaded", 2))["result"] == "ok"
        assert await expiry(admin) == {"tls.cert_file": not_after(renewed[0]).timestamp()}
        # An expired one swapped in is taken (it parses, it matches its key): said.
        write(expired)
        run.proc.send_signal(signal.SIGHUP)
        assert (await run.until("config_loaded", 3))["result"] == "ok"
        warning = await run.until("config_warning", 2)
        assert warning["message"].startswith(f"tls.cert_file: the certificate in {expired[0]!r} expired on ")
        assert await expiry(admin) == {"tls.cert_file": not_after(expired[0]).timestamp()}
        assert len(run.events("config_warning")) == 2
