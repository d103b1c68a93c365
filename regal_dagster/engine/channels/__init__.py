"""Alert channels: one module each, holding the channel's policy settings (`CHANNEL`, a `ChannelSettings`
with `kind: Literal["<kind>"]`) and its sender (`send(channel, notification, resolve_path)`).

`registry` finds them (every module here with both); the policy's `alerts.channels` accepts exactly the
kinds it finds, and `alerts.send` delivers through it. A new channel is one new module here.
"""
