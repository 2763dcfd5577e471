"""Process memory housekeeping around config loads: pausing the cyclic GC, handing memory back.

This module owns three process-wide levers, each used where a config is parsed, validated and
compiled (``extproc.config``, ``routing.table``, ``extproc.reload``):

* ``gc_paused``: a load allocates millions of small objects that all stay alive until it ends
  (YAML data, pydantic models, the compiled table). Every 700 allocations CPython's cyclic GC
  runs, and every so often it walks every object in the process, so at 10,000 virtual models the
  collector, not the load, took most of the time (YAML 7.6 s of which ~6 s GC; validation and
  compilation about 3x slower with it). A load creates no reference cycles worth collecting
  mid-way, so it runs with the collector paused; nesting is fine, and the previous state comes
  back at the end even on error. Re-enabling alone would only defer the cost: the next
  allocation would collect the youngest generation, now holding every object the load made
  (0.12 s per load step at 10,000 virtual models). So the outermost pause ends with
  ``gc.freeze(); gc.unfreeze()``, which moves every tracked object into the oldest generation
  without looking at them (both calls splice linked lists): the load's objects are examined at
  the next full collection instead, like any other long-lived object. ``unfreeze`` would also
  release whatever ``freeze_loaded`` froze, so when objects are frozen already the pause ends
  with a plain re-enable instead (that load then pays the one collection).
* ``release_memory``: after a load, the garbage it left (parse tree, validated config) has been
  freed, but glibc keeps the freed heap pages. ``malloc_trim(0)`` returns them to the kernel
  (resident memory drops; peak memory, ``VmHWM``, does not). A no-op where there is no glibc.
* ``freeze_loaded``: ``gc.freeze()`` moves every object alive now (the served table) out of the
  collector's reach, so later collections do not walk tens of megabytes of immutable routing
  objects; done once at start-up. Frozen objects are never collected, which is why a reload does
  not freeze (the replaced table must be freeable): an old table has no reference cycles, so
  reference counting frees it anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector disabled (restored afterwards)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if not gc.get_freeze_count():
                gc.freeze()  # promote everything to the oldest generation (see the module docs)
                gc.unfreeze()
            gc.enable()


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_MALLOC_TRIM = _load_trim()


def release_memory() -> bool:
    """Give freed heap memory back to the kernel (glibc only); whether it could be done."""
    if _MALLOC_TRIM is None:
        return False
    try:
        _MALLOC_TRIM(0)
    except OSError:
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True


def freeze_loaded() -> None:
    """Collect what is garbage now, then exempt every live object from future collections."""
    gc.collect()
    gc.freeze()
