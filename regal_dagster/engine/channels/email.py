"""E-mail: SMTP with STARTTLS, SSL or plain; the password comes from an environment variable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..settings import Duration
from .base import ChannelError, ChannelSettings, Notification, secret

if TYPE_CHECKING:
    import smtplib


class EmailChannel(ChannelSettings):
    kind: Literal["email"]
    host: str
    port: int = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the SMTP password")
    sender: str
    recipients: list[str] = Field(min_length=1)
    ca_file: str | None = Field(None, description="CA bundle for the server's certificate (default: system's)")
    timeout: Duration = timedelta(seconds=15)


CHANNEL = EmailChannel

def send(channel: EmailChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    import email.policy  # here: loading the policy does not load the mail and TLS libraries
    import smtplib
    import ssl
    from email.message import EmailMessage

    unfolded = email.policy.SMTP.clone(max_line_length=998)  # Python folds long subjects badly: keep them whole
    message = EmailMessage(policy=unfolded)
    message["Subject"] = notification.subject
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.recipients)
    message.set_content(notification.text)
    context = ssl.create_default_context(cafile=str(resolve_path(channel.ca_file)) if channel.ca_file else None)
    timeout = channel.timeout.total_seconds()
    try:
        if channel.security == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(channel.host, channel.port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(channel.host, channel.port, timeout=timeout)
        with smtp:
            if channel.security == "starttls":
                smtp.starttls(context=context)
            if channel.username:
                smtp.login(channel.username, secret(channel.password_env or "", "SMTP password"))
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise ChannelError(f"SMTP {channel.host}:{channel.port}: {type(exc).__name__}: {exc}") from None
