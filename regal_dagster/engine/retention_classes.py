"""The retention classes, lowest to highest (a higher class scheduled at the same minute wins the tick). A
module of its own so that the CLI's parser names them without loading the policy's models."""

from __future__ import annotations

from typing import Literal, get_args

RetentionClass = Literal["hourly", "daily", "weekly", "monthly"]
RETENTION_CLASSES: tuple[RetentionClass, ...] = get_args(RetentionClass)
