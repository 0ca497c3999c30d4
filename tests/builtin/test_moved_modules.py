"""Reward functions named in recipes saved before the package moved into rooms keep working:
`rrhf_lite.tasks_constraints:reward` and `rrhf_lite.tiny.tasks:reward` load the moved modules,
with a FutureWarning that names the new path."""

from __future__ import annotations

import pytest

from rrhf_lite.builtin import constraints
from rrhf_lite.builtin.sources import MOVED_MODULES, current_module_name
from rrhf_lite.builtin.tiny import tasks
from rrhf_lite.stages.eval_extras import breakdown_function
from rrhf_lite.stages.score import import_reward_function


@pytest.mark.parametrize(("old", "module"), [
    ("rrhf_lite.tasks_constraints:reward", constraints),
    ("rrhf_lite.tiny.tasks:reward", tasks),
])
def test_old_reward_paths_load_the_moved_function_with_a_warning(old, module):
    new = MOVED_MODULES[old.partition(":")[0]]
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        fn = import_reward_function(old)
    assert fn is module.reward
    assert fn(["Copy abc ="], ["abc"]) == module.reward(["Copy abc ="], ["abc"])


def test_new_paths_load_without_a_warning(recwarn):
    assert import_reward_function("rrhf_lite.builtin.constraints:reward") is constraints.reward
    assert import_reward_function("rrhf_lite.builtin.tiny.tasks:reward") is tasks.reward
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    assert current_module_name("my_package.rewards") == "my_package.rewards"


def test_the_report_breakdown_follows_the_old_path_too():
    with pytest.warns(FutureWarning):
        hook = breakdown_function("rrhf_lite.tasks_constraints:reward")
    assert hook is constraints.success_by_kind


def test_old_module_names_are_not_importable_any_more():
    """The table above is the only way the old names resolve (no stub modules at the top)."""
    import importlib

    for old in MOVED_MODULES:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
