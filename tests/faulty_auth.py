"""An authenticator plugin that misbehaves on request, registered by tests as `faulty`.

The credential says what to do: `ok:NAME` is the principal NAME (role `user`), `slow` never
answers (until cancelled), `late:NAME` answers NAME after `delay` seconds, `raise` raises an
error whose message holds the credential, `bad-name` returns a principal whose name would
inject a wildcard into topics, `not-a-principal` returns a string; anything else is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from attrs import define, frozen

from mqbroker.auth import AuthFailed, Principal
from mqbroker.plugins import Plugin


@frozen(kw_only=True)
class FaultySettings:
    delay: float = 0.5


@define
class FaultyAuthenticator:
    delay: float
    #: How many `slow` calls were cancelled (the broker's timeout must cancel them).
    cancelled: int = 0

    async def authenticate(self, credential: str | None) -> Any:
        credential = credential or ""
        if credential.startswith("ok:"):
            return Principal(name=credential[3:], roles=("user",))
        if credential.startswith("late:"):
            await trio.sleep(self.delay)
            return Principal(name=credential[5:], roles=("user",))
        if credential == "slow":
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        if credential.startswith("raise"):
            raise RuntimeError(f"the backend refused {credential} with a 500")
        if credential == "bad-name":
            return Principal(name="a/#", roles=("user",))
        if credential == "not-a-principal":
            return "alice"
        raise AuthFailed("unknown credential")


#: The authenticator the last broker opened, for tests to inspect.
opened: list[FaultyAuthenticator] = []


@asynccontextmanager
async def open_faulty(settings: FaultySettings) -> AsyncIterator[FaultyAuthenticator]:
    authenticator = FaultyAuthenticator(settings.delay)
    opened.append(authenticator)
    yield authenticator


plugin = Plugin(name="faulty", settings_type=FaultySettings, open_authenticator=open_faulty)
