"""Model registry: the qwen35_vl entry, its variant names and aliases, and the errors that list
the valid model, variant and dataset-provider names.
"""

from __future__ import annotations

import pytest

from models import MODEL_REGISTRY, get_model_entry

ALL_VARIANTS = [
    "proxy",
    "proxy-moe",
    "0.8b",
    "2b",
    "4b",
    "9b",
    "27b",
    "35b_a3b",
    "122b_a10b",
    "397b",
    "397b_a17b",
]


def test_registry_has_qwen35_vl():
    assert "qwen35_vl" in MODEL_REGISTRY
    assert get_model_entry("qwen35_vl") is MODEL_REGISTRY["qwen35_vl"]


def test_unknown_model_lists_registered_models():
    with pytest.raises(ValueError, match="unknown model 'nope'") as error:
        get_model_entry("nope")
    assert "qwen35_vl" in str(error.value)


def test_variant_names():
    names = get_model_entry("qwen35_vl").variant_names()
    assert set(ALL_VARIANTS) <= set(names)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_variant_resolves_to_a_config_named_after_it():
    entry = get_model_entry("qwen35_vl")
    for name in ALL_VARIANTS:
        config = entry.get_variant(name)
        assert config.name == entry.variant_aliases.get(name, name)


def test_alias_is_the_same_object():
    entry = get_model_entry("qwen35_vl")
    assert entry.get_variant("397b_a17b") is entry.get_variant("397b")


def test_unknown_variant_lists_valid_variants():
    entry = get_model_entry("qwen35_vl")
    with pytest.raises(ValueError, match=r"unknown Qwen3\.5-VL variant 'nope'") as error:
        entry.get_variant("nope")
    message = str(error.value)
    for name in ALL_VARIANTS:
        assert name in message


def test_unknown_dataset_provider_lists_providers():
    entry = get_model_entry("qwen35_vl")
    with pytest.raises(ValueError, match="unknown dataset provider 'nope'") as error:
        entry.dataset_provider("nope")
    assert "mock" in str(error.value)
    assert "cord_v2" in str(error.value)


def test_mock_dataset_provider_resolves():
    from data.mock import build_datasets

    assert get_model_entry("qwen35_vl").dataset_provider("mock") is build_datasets


def test_cord_v2_dataset_provider_resolves():
    from data.cord_v2 import build_datasets

    assert get_model_entry("qwen35_vl").dataset_provider("cord_v2") is build_datasets
