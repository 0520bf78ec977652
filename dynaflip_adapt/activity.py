"""What the library is busy with, for front ends to show.

Library code never prints. Work that can take more than a couple of seconds (a registry
bootstrap, an audit, a download) runs inside ``with step("auditing v3 against 2 policies"):``;
listeners (the CLI's spinner on stderr) are told the innermost step's message whenever it
changes. ``quiet()`` hides the spinner while a command draws a progress bar of its own. Without
listeners a step costs a list append.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Listener = Callable[[str | None], None]
_listeners: list[Listener] = []
_stack: list[str | None] = []


def _notify() -> None:
    current = _stack[-1] if _stack else None
    for fn in list(_listeners):
        fn(current)


@contextlib.contextmanager
def step(message: str | None) -> Iterator[None]:
    """Announces `message` for the duration of the block (None: nothing to show)."""
    _stack.append(message)
    _notify()
    try:
        yield
    finally:
        _stack.pop()
        _notify()


def quiet() -> contextlib.AbstractContextManager[None]:
    """No spinner inside the block (a progress bar is drawn instead)."""
    return step(None)


@contextlib.contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Calls `fn(message or None)` whenever the current step changes inside the block."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)
