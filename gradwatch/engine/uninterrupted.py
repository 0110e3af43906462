"""Restores that no signal can split: what a check moved is put back before an interrupt.

A KeyboardInterrupt (SIGINT) or the SystemExit of a SIGTERM handler is raised at
whatever bytecode the main thread is running. Raised inside a ``finally`` that is
putting tensors back, it leaves the rest of them perturbed (issue 27: the default
screen left its tensors at theta - h v once in 260 random SIGINTs); raised between the
end of a ``with`` body and its ``__exit__``, it skips the restore altogether.

Each place that moves something a user owns (parameters, an RNG state, a global)
opens a `restoring` region with the function that puts it back. While one is open,
this module's handler stands in for the SIGINT and SIGTERM handlers (installed once,
by the outermost region, on the main thread only):

- in a *closed* stretch (writing theta +- h v, putting it back) a signal is held and
  delivered when the stretch ends, after the restore;
- in an *open* stretch (J evaluating, `Region.run`; the body of a torch check,
  `Region.opened`) the signal's own handler runs at once, as without gradwatch; if it
  raises, every open region's restore runs first, innermost first, then the exception
  goes on (the handlers are put back: the check is over). Regions exiting after that
  restore again (the same values), except one a generator holds that is closed late
  (`Region.abandon`); one that the interrupt passed without ending (code inside caught
  it, or turned it into another error) raises it again: a Ctrl-C always ends the check.

Off the main thread no signal handler runs (Python runs them on the main thread only),
so a region there only restores on exit. The cost is about 2 us per region inside
`watching` (a handful per direction of the screen, one per bisection step), 25 us for
installing the handler once per check; the component-wise loop needs none: its
``finally`` is one store, which no signal can split.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

__all__ = ["Region", "restored_after", "restoring", "watching"]

T = TypeVar("T")

_SIGNALS = tuple(
    number
    for number in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
    if number is not None
)
_MAIN_THREAD = threading.main_thread().ident


class _State:
    """The main thread's regions: their restores (outermost first) and held signals."""

    __slots__ = ("closed", "generation", "interrupt", "pending", "previous", "restores")

    def __init__(self) -> None:
        self.closed = False
        self.generation = 0
        """Bumped when an interrupt put everything back: older regions have nothing left."""
        self.interrupt: tuple[int, BaseException] | None = None
        """The generation an interrupt ended, and its exception (re-raised if swallowed)."""
        self.pending: list[int] = []
        self.previous: dict[int, Callable[[int, FrameType | None], Any]] = {}
        self.restores: list[Callable[[], None]] = []


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Hold the signal in a closed stretch, else hand it to its own handler."""
    if _state.closed and _state.restores:
        _state.pending.append(signum)
        return
    _deliver(signum, frame)


def _deliver(signum: int, frame: FrameType | None) -> None:
    """Run the signal's own handler; if it raises, put everything back before it goes on."""
    handler = _state.previous.get(signum)
    if not callable(handler):
        return
    try:
        handler(signum, frame)
    except BaseException as interrupt:
        if _state.restores:
            _state.interrupt = (_state.generation, interrupt)
        _restore_all()
        raise


def _restore_all() -> None:
    """Every open region's restore (innermost first), the handlers back, the check over."""
    state = _state
    state.closed = True  # a second signal while restoring waits for the end
    for restore in reversed(state.restores):
        try:
            restore()
        except Exception:  # one failed restore must not stop the others
            continue
    state.restores = []
    state.generation += 1
    _uninstall()
    state.closed = False
    pending, state.pending = state.pending, []
    for signum in dict.fromkeys(pending):  # a different signal held meanwhile: its turn now
        handler = state.previous.get(signum)
        if callable(handler):
            handler(signum, None)


def _deliver_pending() -> None:
    pending, _state.pending = _state.pending, []
    for signum in dict.fromkeys(pending):
        _deliver(signum, None)


def _install() -> bool:
    """Stand in for the callable SIGINT/SIGTERM handlers; False where signals cannot be set.

    A signal arriving halfway (``signal.signal`` is Python code) leaves nothing behind.
    """
    installed: list[int] = []
    try:
        for signum in _SIGNALS:
            current = signal.getsignal(signum)
            if current is _on_signal or not callable(current):
                continue  # SIG_DFL ends the process and SIG_IGN nothing: nothing to restore for
            _state.previous[signum] = current
            installed.append(signum)  # before: the signal may land inside signal.signal
            signal.signal(signum, _on_signal)
    except (ValueError, OSError):  # not the main interpreter's main thread
        _put_back_handlers(installed)
        return False
    except BaseException:
        _put_back_handlers(installed)
        raise
    return True


def _uninstall() -> None:
    try:
        _put_back_handlers(list(_state.previous))
    except BaseException:  # a signal halfway: finish before its exception goes on
        _put_back_handlers(list(_state.previous))
        raise


def _put_back_handlers(signums: list[int]) -> None:
    for signum in signums:
        try:
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, _state.previous[signum])
        except (ValueError, OSError):
            continue


def _nothing() -> None:
    return None


class Region:
    """A stretch in which something is moved and ``restore`` puts it back (`restoring`).

    Closed while open as a context manager: a signal waits until the restore on exit is
    done. `run` (J) and `opened` (a long body, such as a whole torch check) let a
    signal through at once; if its handler raises, every region is restored first.
    """

    __slots__ = ("_finish", "_generation", "_restore", "_state", "_was_closed")

    def __init__(
        self, restore: Callable[[], None], finish: Callable[[], None] | None = None
    ) -> None:
        self._restore = restore
        self._finish = finish
        # Held here: a generator closed at interpreter exit finds module globals gone.
        self._state = _state
        self._generation = -1
        self._was_closed = False

    def __enter__(self) -> Region:
        state = self._state
        if not state.restores:  # the outermost region: a fresh state, the handler in
            state.closed = True
            state.pending = []
            self._was_closed = False
            if not _install():
                return self  # signals cannot be caught here: restore on exit only
        else:
            self._was_closed = state.closed
            state.closed = True
        state.restores.append(self._restore)
        self._generation = state.generation
        return self

    def __exit__(self, *exc: object) -> None:
        state = self._state
        if self._generation != state.generation:
            # Unguarded, or an interrupt put everything back already: again (it is the same
            # values, unless the interrupt was swallowed and the check went on).
            self._put_back()
            self._raise_swallowed(exc[1])
            return
        try:
            self._put_back()
        finally:
            state.restores.pop()
            if not state.restores:
                _uninstall()
            state.closed = self._was_closed
            if not self._was_closed and state.pending:
                _deliver_pending()

    def _raise_swallowed(self, current: object) -> None:
        """The interrupt that ended this region, if what unwinds it now is anything else.

        Code inside the region may have caught it (torch's mode stack turns an interrupt
        at the wrong moment into a RuntimeError, which a fallback then catches): the
        user's Ctrl-C must still end the check.
        """
        interrupt = self._state.interrupt
        if interrupt is None or interrupt[0] != self._generation or self._restore is _nothing:
            return
        self._state.interrupt = None
        if current is not interrupt[1]:
            raise interrupt[1]

    def _put_back(self) -> None:
        self._restore()
        if self._finish is not None:
            self._finish()

    def abandon(self) -> None:
        """Restore nothing on exit if an interrupt already did (a generator closed late)."""
        if self._generation != self._state.generation and self._generation != -1:
            self._restore = _nothing
            self._finish = None

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` (an evaluation of J) with signals delivered at once."""
        state = self._state
        if self._generation != state.generation:
            return function(*args)
        was_closed, state.closed = state.closed, False
        try:
            if state.pending:
                _deliver_pending()
            return function(*args)
        finally:
            if self._generation == state.generation:
                state.closed = was_closed

    def opened(self) -> _Opened:
        """A context manager: its body, like `run`, lets signals through at once."""
        return _Opened(self)


class _Opened:
    __slots__ = ("_region", "_was_closed")

    def __init__(self, region: Region) -> None:
        self._region = region
        self._was_closed = True

    def __enter__(self) -> None:
        if self._region._generation == _state.generation:
            self._was_closed, _state.closed = _state.closed, False
            if _state.pending:
                _deliver_pending()

    def __exit__(self, *exc: object) -> None:
        state = self._region._state  # not the module's: gone when closed at exit
        if self._region._generation == state.generation:
            state.closed = self._was_closed


class _Unguarded(Region):
    """A region off the main thread, where no signal handler runs: restore on exit only."""

    __slots__ = ()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self._put_back()

    def run(self, function: Callable[..., T], *args: Any) -> T:
        return function(*args)


def restoring(restore: Callable[[], None], finish: Callable[[], None] | None = None) -> Region:
    """A `Region` whose exit (or an interrupt inside it) calls ``restore``.

    ``restore`` must be idempotent (it may run twice: for an interrupt, then on exit)
    and must not raise in normal use. ``finish``, when given, runs after it on exit only:
    what the unwinding after an interrupt still needs (a mode its ``__exit__`` pops).

    Example:
        >>> import numpy as np
        >>> theta = np.zeros(3)
        >>> with restoring(lambda: theta.fill(0.0)) as region:
        ...     theta[1] = 1e-6
        ...     region.run(float, theta.sum()) > 0
        True
        >>> float(theta.sum())
        0.0
    """
    if threading.get_ident() != _MAIN_THREAD or not _SIGNALS:
        return _Unguarded(restore, finish)
    return Region(restore, finish)


@contextmanager
def watching() -> Iterator[None]:
    """The handler installed once around many regions, the body interruptible as usual.

    Installing and removing the handlers costs about 25 us (four ``signal.signal``
    calls); a region inside an installed one about 2 us. A check whose plan moves
    whole tensors (the screen, directions, bisection) runs inside one of these.
    """
    with restoring(_nothing) as region, region.opened():
        yield


@contextmanager
def restored_after(
    restore: Callable[[], None], finish: Callable[[], None] | None = None
) -> Iterator[Region]:
    """For a generator-based context manager that changes something and puts it back.

    Use as ``with restored_after(put_back): yield``: the body is interruptible as
    usual, ``put_back`` runs on exit and before any interrupt goes on, also one landing
    between the body's end and the generator's resumption (where a ``try/finally``
    around the ``yield`` never runs), and not again when the generator is closed late.
    """
    with restoring(restore, finish) as region:
        try:
            with region.opened():
                yield region
        except GeneratorExit:  # closed when collected: an interrupt restored long ago
            region.abandon()
            raise
