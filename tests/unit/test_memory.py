"""extproc.memory: the collector paused around loads, and restored the way it was."""

from __future__ import annotations

import gc

import pytest

from extproc.memory import gc_paused, release_memory


def test_gc_paused_disables_and_restores_the_collector() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one in place
    assert gc.isenabled()


def test_gc_paused_restores_the_collector_on_error() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("load failed")
    assert gc.isenabled()


def test_gc_paused_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gc_paused_keeps_frozen_objects_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with gc_paused():
            junk = [[] for _ in range(100)]
        del junk
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_release_memory_never_fails() -> None:
    assert release_memory() in (True, False)
