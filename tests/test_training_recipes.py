import pytest

from sparsetorch.training import SRSTE, Gradual, RigL
from sparsetorch.training.recipes import RECIPES, recipe, register_recipe


def test_recipes_scale_their_steps_to_the_run():
    assert recipe("rigl", 1000, 0.9).schedule == RigL(sparsity=0.9, end=750, every=100, grad_steps=100)
    assert recipe("rigl", 200, 0.9).schedule == RigL(sparsity=0.9, end=150, every=37, grad_steps=37)  # 4 updates
    assert recipe("rigl", 100_000, 0.9).schedule.every == 100  # RigL's Delta T on long runs
    assert recipe("rigl", 1000, 0.9).distribution == "erk"
    assert recipe("gmp", 1000, 0.9).schedule == Gradual(sparsity=0.9, start=100, end=600, every=75)
    assert recipe("srste", 1000, 0.9).schedule == SRSTE() and recipe("srste", 1000, 0.9).pattern == "2:4"
    assert recipe("dense", 10, 0.9).schedule is None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_for_short_runs(name):
    assert recipe(name, 2, 0.5).name == name


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown sparse-training method 'magic'; available: dense, gmp"):
        recipe("magic", 100, 0.5)


def test_too_few_steps_are_refused():
    with pytest.raises(ValueError, match="at least 2 steps"):
        recipe("rigl", 1, 0.5)


def test_registering_a_recipe_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_recipe("rigl")(lambda steps, sparsity: None)
