"""The alert channels: every module under engine/channels/ that names its policy settings (`CHANNEL`) and
its sender (`send`). The policy's `alerts.channels` is the union of their settings, told apart by `kind`;
a message goes to the sender of its channel's kind, and a kind this registry does not know is an error."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..plugins import plugin_modules
from .base import ChannelError, ChannelSettings, Notification


@functools.cache
def _channels() -> dict[str, ModuleType]:
    found = {}
    for module in plugin_modules(__package__):
        model = getattr(module, "CHANNEL", None)
        if isinstance(model, type) and issubclass(model, ChannelSettings) and callable(getattr(module, "send", None)):
            found[model.model_fields["kind"].annotation.__args__[0]] = module  # type: ignore[union-attr]
    return dict(sorted(found.items()))


def channel_kinds() -> list[str]:
    return list(_channels())


def channel_models() -> list[type[ChannelSettings]]:
    """Each channel's policy settings (a discriminated union on `kind` in the policy)."""
    return [module.CHANNEL for module in _channels().values()]


def sender_for(kind: str) -> Callable[[Any, Notification, Callable[[str], Any]], None]:
    module = _channels().get(kind)
    if module is None:
        raise ChannelError(f"this regal-backup knows no alert channel kind '{kind}' "
                           f"(it knows {', '.join(channel_kinds())})")
    sender: Callable[[Any, Notification, Callable[[str], Any]], None] = module.send
    return sender


def send(channel: ChannelSettings, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    """Deliver one message on one channel; ChannelError says why it failed (without secrets)."""
    sender = sender_for(channel.kind)
    if not isinstance(channel, _channels()[channel.kind].CHANNEL):
        raise ChannelError(f"a '{channel.kind}' channel needs its own settings, not {type(channel).__name__}")
    sender(channel, notification, resolve_path)
