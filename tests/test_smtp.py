"""SmtpMailer against a real SMTP server (aiosmtpd on loopback), and OutboxMailer on disk."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.message import Message as MimeMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from delivery.smtp import Mailer, OutboxMailer, SmtpMailer
from events import Message
from rendering.email import DigestItem, render_digest
from rendering.push import Recipient
from settings import SmtpTarget

HOST = "127.0.0.1"
USERNAME = "mailer"
PASSWORD = "s3cret:p@ss"
RECIPIENT = Recipient(7, "grace@example.com", "Grace Hopper", "Acme", "https://chat.acme.test")


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A loopback port nobody listens on right now (aiosmtpd cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    peer: Any
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: bytes | None


def _transport_is_tls(server: SMTP) -> bool:
    # aiosmtpd fills `session.ssl` only after STARTTLS, not for implicit TLS.
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it received and can be told to refuse."""

    received: list[Received] = field(default_factory=list)
    servers: list[SMTP] = field(default_factory=list)
    data_reply: str | None = None
    auth_mechanisms: list[str] = field(default_factory=list)
    # Seconds between the end of a message's data and the answer to it.
    data_delay: float = 0.0
    # DATA commands whose message data arrived, answered or not.
    data_commands: int = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(
                peer=session.peer,
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                content=bytes(envelope.original_content or b""),
                tls=session.ssl is not None or _transport_is_tls(server),
                login=login,
            )
        )
        self.servers.append(server)
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.auth_mechanisms.append(mechanism)
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == USERNAME.encode()
            and auth_data.password == PASSWORD.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1 and contexts to serve and to trust it."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return Tls(server=server, client=client)


@dataclass
class Server:
    port: int
    recorder: Recorder
    controller: Controller


@pytest.fixture
def start_server() -> Iterator[Any]:
    """Starts aiosmtpd servers on free loopback ports; stops them after the test."""
    controllers: list[Controller] = []

    def start(**kwargs: Any) -> Server:
        recorder = Recorder()
        if kwargs.pop("auth", False):
            kwargs["authenticator"] = recorder.authenticate
        port = free_port()
        controller = Controller(recorder, hostname=HOST, port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return Server(port, recorder, controller)

    yield start
    for controller in controllers:
        controller.stop()


def make_message(to: str = RECIPIENT.email) -> MimeMessage:
    message = Message.model_validate(
        {
            "id": 1001,
            "sender_id": 3,
            "sender_full_name": "Ada Lovelace",
            "sender_email": "ada@example.com",
            "recipient_type": "stream",
            "stream": "design",
            "stream_id": 12,
            "topic": "logo",
            "content_html": "<p>New logo draft: <strong>v2</strong> ✨</p>",
            "date_sent": 1_700_000_000,
        }
    )
    recipient = Recipient(7, to, "Grace Hopper", "Acme", "https://chat.acme.test")
    (email_message,) = render_digest(
        recipient,
        [DigestItem(message, "mentioned")],
        from_addr="herald <noreply@herald.test>",
        unsubscribe_url="https://herald.test/v1/unsubscribe/tok",
    )
    return email_message


def mailer_for(url: str, tls: Tls | None = None, timeout: float = 5.0) -> SmtpMailer:
    return SmtpMailer(
        SmtpTarget(url),
        timeout=timeout,
        ssl_context=tls.client if tls else None,
        local_hostname="herald.test",
    )


def parse(content: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(content, policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    return parsed


# ------------------------------------------------------------------------------ tests


def test_mailers_satisfy_the_protocol(tmp_path: Path) -> None:
    mailers: list[Mailer] = [mailer_for("smtp://127.0.0.1:25"), OutboxMailer(tmp_path)]
    assert all(callable(m.send) for m in mailers)


def test_plain_delivery_arrives_intact(start_server: Any) -> None:
    server = start_server()
    sent = make_message()
    with mailer_for(f"smtp://{HOST}:{server.port}") as mailer:
        mailer.send(sent)

    (got,) = server.recorder.received
    assert got.mail_from == "noreply@herald.test"
    assert got.rcpt_tos == ["grace@example.com"]
    assert not got.tls
    received = parse(got.content)
    assert received["Subject"] == "#design > logo"
    assert received["To"] == "Grace Hopper <grace@example.com>"
    assert received["From"] == "herald <noreply@herald.test>"
    assert received["Message-ID"] == sent["Message-ID"]
    assert received["Date"]
    assert received["List-Unsubscribe"] == "<https://herald.test/v1/unsubscribe/tok>"
    assert received["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert received["Auto-Submitted"] == "auto-generated"
    assert received.get_content_type() == "multipart/alternative"
    text_part, html_part = received.iter_parts()
    assert text_part.get_content_type() == "text/plain"
    assert html_part.get_content_type() == "text/html"
    assert "New logo draft: v2 ✨" in text_part.get_content()
    assert "<strong>v2</strong> ✨" in html_part.get_content()


def test_starttls_delivery(start_server: Any, tls: Tls) -> None:
    server = start_server(tls_context=tls.server, require_starttls=True)
    with mailer_for(f"smtp://{HOST}:{server.port}?starttls=1", tls) as mailer:
        mailer.send(make_message())
    (got,) = server.recorder.received
    assert got.tls


def test_starttls_with_an_untrusted_certificate_is_transient(start_server: Any, tls: Tls) -> None:
    server = start_server(tls_context=tls.server, require_starttls=True)
    # The default context trusts only the system store, not our self-signed cert.
    with (
        mailer_for(f"smtp://{HOST}:{server.port}?starttls=1") as mailer,
        pytest.raises(TransientDeliveryError, match="TLS"),
    ):
        mailer.send(make_message())
    assert server.recorder.received == []


def test_implicit_tls_delivery(start_server: Any, tls: Tls) -> None:
    server = start_server(ssl_context=tls.server)
    with mailer_for(f"smtps://{HOST}:{server.port}", tls) as mailer:
        mailer.send(make_message())
    (got,) = server.recorder.received
    assert got.tls
    assert parse(got.content)["Subject"] == "#design > logo"


def test_auth_plain_over_starttls(start_server: Any, tls: Tls) -> None:
    server = start_server(tls_context=tls.server, require_starttls=True, auth=True)
    # The password is percent-encoded in the URL, as SMTP_URL requires for ':' and '@'.
    url = f"smtp://{USERNAME}:s3cret%3Ap%40ss@{HOST}:{server.port}?starttls=1"
    with mailer_for(url, tls) as mailer:
        mailer.send(make_message())
    assert server.recorder.auth_mechanisms == ["PLAIN"]
    (got,) = server.recorder.received
    assert got.login == USERNAME.encode()


def test_auth_login_without_tls(start_server: Any) -> None:
    server = start_server(auth=True, auth_require_tls=False, auth_exclude_mechanism=["PLAIN"])
    url = f"smtp://{USERNAME}:s3cret%3Ap%40ss@{HOST}:{server.port}"
    with mailer_for(url) as mailer:
        mailer.send(make_message())
    assert server.recorder.auth_mechanisms == ["LOGIN"]
    assert server.recorder.received[0].login == USERNAME.encode()


def test_wrong_password_is_transient_and_not_echoed(start_server: Any) -> None:
    server = start_server(auth=True, auth_require_tls=False)
    mailer = mailer_for(f"smtp://{USERNAME}:wrong-pw@{HOST}:{server.port}")
    with mailer, pytest.raises(TransientDeliveryError, match="AUTH") as info:
        mailer.send(make_message())
    assert "wrong-pw" not in info.value.reason
    assert "wrong-pw" not in repr(mailer)
    assert server.recorder.received == []


def test_451_on_data_is_transient(start_server: Any) -> None:
    server = start_server()
    server.recorder.data_reply = "451 4.3.0 Mailbox busy, try later"
    with (
        mailer_for(f"smtp://{HOST}:{server.port}") as mailer,
        pytest.raises(TransientDeliveryError, match="451"),
    ):
        mailer.send(make_message())


def test_554_on_data_is_permanent(start_server: Any) -> None:
    server = start_server()
    server.recorder.data_reply = "554 5.7.1 Message rejected"
    with (
        mailer_for(f"smtp://{HOST}:{server.port}") as mailer,
        pytest.raises(PermanentDeliveryError, match="554"),
    ):
        mailer.send(make_message())


def test_control_characters_in_a_reply_are_left_out_of_the_reason(start_server: Any) -> None:
    # The reason becomes a dead letter's: PostgreSQL refuses text holding a NUL.
    server = start_server()
    server.recorder.data_reply = "554 5.7.1 rejected\x00content\x07\x1b[31m here\x7f"
    with (
        mailer_for(f"smtp://{HOST}:{server.port}") as mailer,
        pytest.raises(PermanentDeliveryError) as info,
    ):
        mailer.send(make_message())
    assert info.value.reason == "SMTP 554 on DATA: 5.7.1 rejected content [31m here"


def test_550_on_rcpt_is_permanent(start_server: Any) -> None:
    server = start_server()
    with mailer_for(f"smtp://{HOST}:{server.port}") as mailer:
        with pytest.raises(PermanentDeliveryError, match=r"550 on RCPT: 5\.1\.1 No such user"):
            mailer.send(make_message(to="nobody@example.com"))
        # The mailer is still usable afterwards.
        mailer.send(make_message())
    assert len(server.recorder.received) == 1


def test_connection_refused_is_transient() -> None:
    mailer = mailer_for(f"smtp://{HOST}:{free_port()}")
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        mailer.send(make_message())


def test_silent_server_times_out_as_transient() -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        mailer = mailer_for(f"smtp://{HOST}:{port}", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError):
            mailer.send(make_message())
        assert time.monotonic() - started < 3


def test_connection_is_reused_across_sends(start_server: Any) -> None:
    server = start_server()
    with mailer_for(f"smtp://{HOST}:{server.port}") as mailer:
        mailer.send(make_message())
        mailer.send(make_message())
        assert mailer.connections_opened == 1
    first, second = server.recorder.received
    assert first.peer == second.peer


def test_reconnects_after_the_server_dropped_the_connection(start_server: Any) -> None:
    server = start_server()
    with mailer_for(f"smtp://{HOST}:{server.port}") as mailer:
        mailer.send(make_message())
        (smtp_session,) = server.recorder.servers
        closed = threading.Event()

        def drop() -> None:
            assert smtp_session.transport is not None
            smtp_session.transport.close()
            closed.set()

        server.controller.loop.call_soon_threadsafe(drop)
        assert closed.wait(5)
        time.sleep(0.1)  # let the FIN reach the client socket
        mailer.send(make_message())
        assert mailer.connections_opened == 2
    first, second = server.recorder.received
    assert first.peer != second.peer


def test_a_reused_connection_timing_out_after_the_data_does_not_send_it_again(
    start_server: Any,
) -> None:
    # The server answers the final "." after the client has stopped waiting: smtplib
    # reports that as a disconnect, like a connection closed while idle, but the
    # server may have queued the message, and sending it again at once doubles it.
    server = start_server()
    with mailer_for(f"smtp://{HOST}:{server.port}", timeout=0.5) as mailer:
        mailer.send(make_message())  # opens the connection the next send reuses
        server.recorder.data_delay = 1.5
        with pytest.raises(TransientDeliveryError, match="may have accepted"):
            mailer.send(make_message())
        time.sleep(1.0)  # a second copy, sent at once, would have arrived by now
    assert server.recorder.data_commands == 2, "one DATA per send"


def test_concurrent_sends_share_the_mailer(start_server: Any) -> None:
    server = start_server()
    errors: list[BaseException] = []
    with mailer_for(f"smtp://{HOST}:{server.port}") as mailer:

        def work() -> None:
            try:
                for _ in range(3):
                    mailer.send(make_message())
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert len(server.recorder.received) == 12
    assert mailer.connections_opened == 1


def test_outbox_writes_parseable_eml_files_in_send_order(tmp_path: Path) -> None:
    outbox = OutboxMailer(tmp_path / "nested" / "outbox")
    first, second = make_message(), make_message()
    del second["Subject"]
    second["Subject"] = "second"
    outbox.send(first)
    outbox.send(second)

    files = sorted((tmp_path / "nested" / "outbox").iterdir())
    assert [f.suffix for f in files] == [".eml", ".eml"]
    parsed = [parse(f.read_bytes()) for f in files]
    assert [p["Subject"] for p in parsed] == ["#design > logo", "second"]
    assert parsed[0]["Message-ID"] == first["Message-ID"]
    assert parsed[0].get_content_type() == "multipart/alternative"
    assert parsed[0].get_body(preferencelist=("plain",)) is not None
