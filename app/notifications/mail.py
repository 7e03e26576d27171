"""Sending one email over SMTP (`SWITCHBOARD_SMTP_URL`: `smtp://[user:password@]host[:port]`,
`smtps://…` for TLS from the start, `?starttls=1` to upgrade). No Flask here."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlparse


def send(url: str, sender: str, to: str, subject: str, body: str, timeout: float = 10) -> None:
    """Raises OSError or smtplib.SMTPException when the message was not accepted."""
    parts = urlparse(url)
    secure = parts.scheme == "smtps"
    port = parts.port or (465 if secure else 25)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message.set_content(body)
    smtp_class = smtplib.SMTP_SSL if secure else smtplib.SMTP
    with smtp_class(parts.hostname or "localhost", port, timeout=timeout) as smtp:
        if parse_qs(parts.query).get("starttls") == ["1"]:
            smtp.starttls()
        if parts.username:
            smtp.login(unquote(parts.username), unquote(parts.password or ""))
        smtp.send_message(message)
