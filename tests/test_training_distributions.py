import pytest

from sparsetorch.training.distributions import er_score, erk_score, layer_sparsities, register_distribution, scaled_densities


def test_uniform_gives_every_layer_the_global_sparsity():
    assert layer_sparsities("uniform", {"a": (4, 4), "b": (8, 2)}, 0.75) == {"a": 0.75, "b": 0.75}


def test_erk_by_hand_on_two_linear_layers():
    # scores (10+100)/1000 = 0.11 and 200/10000 = 0.02; keep 10% of 11000 = 1100 weights:
    # eps = 1100 / (0.11*1000 + 0.02*10000) = 1100/310, densities 0.11*eps and 0.02*eps
    result = layer_sparsities("erk", {"a": (10, 100), "b": (100, 100)}, 0.9)
    eps = 1100 / 310
    assert result["a"] == pytest.approx(1 - 0.11 * eps)
    assert result["b"] == pytest.approx(1 - 0.02 * eps)
    kept = (1 - result["a"]) * 1000 + (1 - result["b"]) * 10000
    assert kept == pytest.approx(1100)


def test_a_layer_that_would_pass_density_one_is_made_dense_and_the_rest_resolved():
    # (4, 4) scores 8/16 = 0.5, (100, 100) scores 0.02; budget 0.5 * 10016 = 5008.
    # First eps = 5008/208 gives the small layer density 12 > 1: it goes dense (16 weights),
    # then eps = (5008 - 16) / 200 and the big layer keeps 4992 of 10000.
    result = layer_sparsities("erk", {"small": (4, 4), "big": (100, 100)}, 0.5)
    assert result["small"] == 0.0
    assert result["big"] == pytest.approx(1 - 4992 / 10000)


def test_er_ignores_the_kernel_and_erk_counts_it():
    assert er_score((8, 4, 3, 3)) == pytest.approx(12 / 32)
    assert erk_score((8, 4, 3, 3)) == pytest.approx(18 / 288)
    assert er_score((8, 4)) == erk_score((8, 4))
    er = layer_sparsities("er", {"conv": (8, 4, 3, 3), "fc": (10, 128)}, 0.8)
    erk = layer_sparsities("erk", {"conv": (8, 4, 3, 3), "fc": (10, 128)}, 0.8)
    assert er["conv"] != pytest.approx(erk["conv"])


def test_scaled_densities_keep_the_budget():
    densities = scaled_densities({"a": 1.0, "b": 4.0, "c": 0.1}, {"a": 50, "b": 10, "c": 1000}, 0.3)
    assert sum(densities[k] * n for k, n in {"a": 50, "b": 10, "c": 1000}.items()) == pytest.approx(0.3 * 1060)
    assert max(densities.values()) <= 1.0


def test_custom_map_takes_the_first_matching_key():
    shapes = {"enc.fc1": (4, 4), "enc.fc2": (4, 4), "head": (2, 4)}
    result = layer_sparsities({"fc1": 0.25, "re:enc\\..*": 0.5, "head": 0.0}, shapes, None)
    assert result == {"enc.fc1": 0.25, "enc.fc2": 0.5, "head": 0.0}


def test_custom_map_missing_a_layer_names_it():
    with pytest.raises(ValueError, match="no entry for layer 'b'"):
        layer_sparsities({"a": 0.5}, {"a": (4, 4), "b": (4, 4)}, None)


def test_custom_map_with_a_global_sparsity_is_refused():
    with pytest.raises(ValueError, match="sparsity=None"):
        layer_sparsities({"a": 0.5}, {"a": (4, 4)}, 0.5)


def test_custom_map_sparsity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer_sparsities({"a": 1.0}, {"a": (4, 4)}, None)


def test_unknown_distribution_lists_the_known_ones():
    with pytest.raises(ValueError, match="available: er, erk, uniform"):
        layer_sparsities("gaussian", {"a": (4, 4)}, 0.5)


def test_global_sparsity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        layer_sparsities("erk", {"a": (4, 4)}, 1.0)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_distribution("erk")(lambda shapes, sparsity: {})
