"""The patch contract helpers: exact undo of attributes and environment, reverse-order removal."""
from __future__ import annotations

import os

import pytest

from patches.base import PatchHandle, PatchStack, keep_attr, set_env, swap_attr


class Thing:
    default = "class default"


def test_remove_runs_the_undo_once():
    undone = []
    handle = PatchHandle("p", lambda: undone.append(1))
    handle.remove()
    handle.remove()
    assert undone == [1] and not handle.active


def test_stack_removes_last_first_and_survives_a_failing_member():
    order = []

    def failing():
        order.append("b")
        raise RuntimeError("b broke")

    stack = PatchStack("tier")
    stack.push(PatchHandle("a", lambda: order.append("a")))
    stack.push(PatchHandle("b", failing))
    stack.push(PatchHandle("c", lambda: order.append("c")))
    with pytest.raises(RuntimeError, match="b broke"):
        stack.remove()
    assert order == ["c", "b", "a"]


def test_swap_attr_restores_the_class_default_or_the_instance_value():
    thing = Thing()
    undo = swap_attr(thing, "default", "patched")
    assert thing.default == "patched"
    undo()
    assert "default" not in vars(thing) and thing.default == "class default"

    thing.default = "own"
    undo = keep_attr(thing, "default")
    thing.default = "changed"
    undo()
    assert vars(thing)["default"] == "own"


def test_set_env_undo_restores_the_previous_value_or_absence(monkeypatch):
    monkeypatch.setenv("WANFLOW_TEST_VAR", "user")
    undo = set_env("WANFLOW_TEST_VAR", "ours")
    assert os.environ["WANFLOW_TEST_VAR"] == "ours"
    undo()
    assert os.environ["WANFLOW_TEST_VAR"] == "user"
    monkeypatch.delenv("WANFLOW_TEST_VAR")
    undo = set_env("WANFLOW_TEST_VAR", "ours")
    undo()
    assert "WANFLOW_TEST_VAR" not in os.environ
    undo = set_env("WANFLOW_TEST_VAR", "ours")
    os.environ["WANFLOW_TEST_VAR"] = "changed since"
    undo()
    assert os.environ["WANFLOW_TEST_VAR"] == "changed since"   # a later change is not ours to undo
