"""Saving the same dict of the same arrays again reuses what the first save checked, and
never a stale result: a changed dtype, shape, key, array or tie is seen by the next save."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import aliases, statecache


def _state(n: int = 6) -> dict[str, np.ndarray]:
    return {f"p{i}": np.arange(8, dtype=np.float32) + i for i in range(n)}


def _saved(path: Path) -> tuple[dict[str, np.ndarray], ac.Checkpoint]:
    ckpt = ac.load_checkpoint(path)
    return {k: np.array(v) for k, v in ckpt.model.items()}, ckpt


@pytest.fixture
def ckpt():
    with ac.AsyncCheckpointer() as c:
        yield c


def _save(ckpt: ac.AsyncCheckpointer, path: Path, state: dict[str, np.ndarray]) -> None:
    ckpt.save(path, state).result()


def test_a_second_save_of_the_same_arrays_checks_nothing_again(tmp_path, ckpt, monkeypatch):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    calls = []
    monkeypatch.setattr(aliases, "find_aliases", lambda *a, **k: calls.append(1) or {})
    state["p0"] += 1  # new values, same arrays: nothing to check again
    _save(ckpt, tmp_path / "b", state)
    assert calls == []
    back, _ = _saved(tmp_path / "b")
    np.testing.assert_array_equal(back["p0"], np.arange(8, dtype=np.float32) + 1)


def test_a_dtype_changed_in_place_is_saved_as_the_new_dtype(tmp_path, ckpt):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    state["p1"].dtype = np.int32  # the same object, reinterpreted
    _save(ckpt, tmp_path / "b", state)
    back, _ = _saved(tmp_path / "b")
    assert back["p1"].dtype == np.int32
    np.testing.assert_array_equal(back["p1"], state["p1"])


def test_a_shape_changed_in_place_is_saved_as_the_new_shape(tmp_path, ckpt):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    state["p2"].shape = (2, 4)
    _save(ckpt, tmp_path / "b", state)
    back, _ = _saved(tmp_path / "b")
    assert back["p2"].shape == (2, 4)


def test_an_added_removed_or_replaced_array_is_seen(tmp_path, ckpt):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    state["new"] = np.ones(3, np.float64)
    del state["p0"]
    state["p1"] = np.full(8, 7, np.float32)
    _save(ckpt, tmp_path / "b", state)
    back, _ = _saved(tmp_path / "b")
    assert set(back) == set(state)
    np.testing.assert_array_equal(back["new"], np.ones(3))
    np.testing.assert_array_equal(back["p1"], np.full(8, 7, np.float32))


def test_a_new_tie_is_recorded_and_a_broken_one_stores_both(tmp_path, ckpt):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    state["p3"] = state["p2"]  # tied from now on
    _save(ckpt, tmp_path / "b", state)
    _, loaded = _saved(tmp_path / "b")
    assert loaded.model["p3"] is loaded.model["p2"]
    state["p3"] = state["p2"].copy()  # untied again
    _save(ckpt, tmp_path / "c", state)
    _, loaded = _saved(tmp_path / "c")
    assert loaded.model["p3"] is not loaded.model["p2"]


def test_a_new_partial_overlap_is_refused_before_anything_is_written(tmp_path, ckpt):
    base = np.arange(16, dtype=np.float32)
    state = {"a": base[:8], "b": base[8:]}
    _save(ckpt, tmp_path / "a", state)
    state["b"] = base[4:12]
    with pytest.raises(ac.InvalidInputError, match=r"'a'.*'b'.*partial overlap"):
        ckpt.save(tmp_path / "b", state)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ac.InvalidInputError, match="partial overlap"):
        ckpt.save(tmp_path / "b", state)  # a refused state is never cached as accepted


def test_a_value_that_is_no_longer_an_array_is_refused(tmp_path, ckpt):
    state: dict = _state()
    _save(ckpt, tmp_path / "a", state)
    state["p0"] = object()  # neither an array nor a JSON value
    with pytest.raises(ac.CheckpointError):
        ckpt.save(tmp_path / "b", state)
    assert not (tmp_path / "b").exists()


def test_the_cache_keeps_no_array_alive(tmp_path, ckpt):
    state = _state()
    ref = weakref.ref(state["p0"])
    _save(ckpt, tmp_path / "a", state)
    del state
    gc.collect()
    assert ref() is None


def test_only_plain_numpy_states_with_str_keys_are_cached():
    assert statecache.entry_for({"a": np.zeros(2)}) is not None
    assert statecache.entry_for({"a": np.ma.zeros(2)}) is None
    assert statecache.entry_for({"a": np.float32(1)}) is None
    assert statecache.entry_for({}) is None


def test_tied_and_overlapping_plain_numpy_arrays_are_still_found():
    x = np.arange(10.0)
    assert aliases.find_aliases({"a": x, "b": np.zeros(3), "c": x}, what="m") == {"c": "a"}
    assert aliases.find_aliases({"a": x[:5], "b": x[5:], "e": x[:0], "f": x[5:5]}, what="m") == {}
    with pytest.raises(ac.InvalidInputError, match="partial overlap"):
        aliases.find_aliases({"a": x[:6], "b": x[5:]}, what="m")
    with pytest.raises(ac.InvalidInputError, match="partial overlap"):
        aliases.find_aliases({"a": x[:6], "b": x[:6].reshape(2, 3)}, what="m")


def test_a_slab_of_mixed_shapes_and_dtypes_round_trips(tmp_path, ckpt):
    rng = np.random.default_rng(0)
    state = {
        "s0": np.float32(3).reshape(()),
        "s1": np.array(4.0, np.float32),
        "v": rng.random(5).astype(np.float32),
        "m": rng.random((3, 4)).astype(np.float32),
        "m2": rng.random((3, 4)).astype(np.float32),
        "e": np.zeros((0, 3), np.float32),
        "i": np.arange(7, dtype=np.int16),
        "d": rng.random((2, 2)),
        "b": np.array([True, False]),
    }
    for path in ("a", "b"):  # cold and warm
        _save(ckpt, tmp_path / path, state)
        back, _ = _saved(tmp_path / path)
        assert set(back) == set(state)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("key", ["", "a\x00b", "__metadata__", "\ud800"])
def test_an_invalid_key_among_many_is_refused_naming_it(tmp_path, ckpt, key):
    state = {**_state(50), key: np.zeros(2)}
    for attempt in ("a", "b"):  # also once the other arrays are cached
        with pytest.raises(ac.InvalidInputError, match="not a valid tensor name"):
            ckpt.save(tmp_path / attempt, state)
        assert not (tmp_path / attempt).exists()


def test_an_unsupported_dtype_is_refused_on_every_save(tmp_path, ckpt):
    state = {**_state(), "c": np.zeros(2, "datetime64[s]")}
    for attempt in ("a", "b"):
        with pytest.raises(ac.CheckpointError, match="'c'"):
            ckpt.save(tmp_path / attempt, state)
        assert not (tmp_path / attempt).exists()


def test_the_staging_layout_follows_a_dtype_changed_in_place():
    from arrayckpt import snapshot

    state = _state()

    def layout() -> tuple[list[tuple[int, bool]], list[list[str]]]:
        ((plan, _, _), *_) = snapshot._validated(state, None, None)
        buffers, smalls, _ = snapshot._staging_layout(plan)
        return buffers, [[key for key, *_ in small] for small in smalls]

    assert layout() == layout() == ([(6 * 32, False)], [list(state)])
    state["p0"].dtype = ">f4"  # big-endian: copied on its own, no longer in the slab
    assert layout() == layout() == ([(32, False), (5 * 32, False)], [list(state)[1:]])


def test_entries_of_states_that_are_gone_are_dropped():
    with statecache._lock:  # states of earlier tests in this process may still be alive
        statecache._entries.clear()
    for _ in range(3):
        statecache.entry_for(_state())  # each state dies at once
    live = _state()
    statecache.entry_for(live)
    assert [e.keys for e in statecache._entries] == [list(live)]


def _count_views(monkeypatch) -> list[int]:
    from arrayckpt import snapshot

    made: list[int] = []
    real = snapshot._slab_views

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "_slab_views", counted)
    return made


def test_a_second_save_reuses_the_slab_views_and_copies_the_new_values(tmp_path, ckpt, monkeypatch):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    made = _count_views(monkeypatch)
    state["p0"] += 10  # new values, same arrays: the same views into the same slab
    future = ckpt.save(tmp_path / "b", state)
    state["p0"] += 100  # after save returns: not in the checkpoint
    future.result()
    assert made == []
    back, _ = _saved(tmp_path / "b")
    np.testing.assert_array_equal(back["p0"], np.arange(8, dtype=np.float32) + 10)
    np.testing.assert_array_equal(back["p5"], np.arange(8, dtype=np.float32) + 5)


def _replace(state):
    state["p1"] = np.full(8, 7, np.float32)


def _retype(state):
    state["p1"].dtype = np.int32


def _reshape(state):
    state["p1"].shape = (2, 4)


@pytest.mark.parametrize("change", [_replace, _retype, _reshape])
def test_a_changed_array_makes_new_slab_views(tmp_path, ckpt, monkeypatch, change):
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    made = _count_views(monkeypatch)
    change(state)
    _save(ckpt, tmp_path / "b", state)
    assert made  # the cached views did not fit the changed state
    back, _ = _saved(tmp_path / "b")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)


def test_a_saved_array_cannot_move_its_data(tmp_path, ckpt):
    """What lets the cache trust an array's identity: NumPy refuses to resize an array
    with weak references, the one way an array's data could move under the same object."""
    state = _state()
    _save(ckpt, tmp_path / "a", state)
    with pytest.raises(ValueError, match="resize"):
        state["p1"].resize(12, refcheck=False)


def _slab_of(ckpt: ac.AsyncCheckpointer) -> weakref.ref[np.ndarray]:
    from arrayckpt import snapshot

    (views,) = snapshot._kept_views[ckpt.staging]
    return weakref.ref(views.buffer)


def test_closing_the_checkpointer_frees_the_slab_its_views_point_into(tmp_path):
    state = _state()
    ckpt = ac.AsyncCheckpointer()
    _save(ckpt, tmp_path / "a", state)
    slab = _slab_of(ckpt)
    ckpt.close()
    gc.collect()
    assert slab() is None


def test_saving_another_state_frees_the_old_slab_before_the_new_one_is_taken(
    tmp_path, ckpt, monkeypatch
):
    first, second = _state(6), _state(9)  # slabs of different sizes
    _save(ckpt, tmp_path / "a", first)
    slab = _slab_of(ckpt)
    alive_after_begin = []
    begin = ckpt.staging.begin

    def watched(sizes=None):
        begin(sizes)
        alive_after_begin.append(slab() is not None)

    monkeypatch.setattr(ckpt.staging, "begin", watched)
    _save(ckpt, tmp_path / "b", second)
    # The pool dropped it at `begin` and no views kept it: never two slabs at once.
    assert alive_after_begin == [False]
    back, _ = _saved(tmp_path / "b")
    np.testing.assert_array_equal(back["p8"], second["p8"])


def test_a_snapshot_counts_the_bytes_of_every_part():
    from arrayckpt import snapshot, staging

    snap = snapshot.take_snapshot(
        {"a": np.zeros(3), "b": np.zeros((2, 2), np.float32)},
        {"m": np.zeros(2, np.int16)},
        None,
        staging=staging.StagingPool(),
        extra={"e": np.zeros(5, np.int8)},
    )
    assert snap.nbytes == 24 + 16 + 4 + 5


def test_the_same_arrays_in_every_part_keep_their_values_on_every_save(tmp_path, ckpt):
    state = _state()  # one state's arrays in the model, the optimizer and the extra state
    for step in range(3):
        for v in state.values():
            v += 1
        future = ckpt.save(tmp_path / str(step), state, {"state": state}, extra=state)
        for v in state.values():
            v += 100  # after save returned: in no part of this checkpoint
        future.result()
        for v in state.values():
            v -= 100
        loaded = ac.load_checkpoint(tmp_path / str(step))
        for k, v in state.items():
            np.testing.assert_array_equal(np.asarray(loaded.model[k]), v)
            np.testing.assert_array_equal(np.asarray(loaded.optimizer["state"][k]), v)
            np.testing.assert_array_equal(np.asarray(loaded.extra[k]), v)
