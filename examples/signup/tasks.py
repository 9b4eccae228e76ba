"""The tasks. They declare the same dependencies as the routes, the same way."""

import os
from multiprocessing import current_process
from typing import Any

from fastapi import Depends, Request

from signup.broker import broker
from signup.dependencies import Mailer, UserRepository, get_users, mailer_session


@broker.task
async def send_welcome_email(
    user_id: str,
    request: Request,
    users: UserRepository = Depends(get_users),
    mailer: Mailer = Depends(mailer_session),
) -> dict[str, Any]:
    user = await users.get(user_id)
    if user is None:
        raise LookupError(f"no user {user_id}")
    # An absolute link to the API, from the worker's --base-url.
    link = str(request.url_for("read_user", user_id=user.id))
    message = mailer.send(
        to=user.email,
        subject=f"Welcome, {user.name}!",
        body=f"Your account is ready: {link}",
    )
    return {
        **message,
        "link": link,
        "worker": f"{current_process().name} (pid {os.getpid()})",
        "mailer_session": mailer.session,
    }
