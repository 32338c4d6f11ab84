"""Model registry: every entry is a typed `ModelSpec` named after its key; the qwen35_vl spec, its
variant names and aliases, the errors that list the valid model, variant and dataset-provider
names, and the architecture flags megatron gets, generated from the spec's one source.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from arguments import architecture_dests, megatron_flags
from models import MODEL_REGISTRY, get_model_spec
from models.spec import DatasetProvider, ModelSpec, WeightConversion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_registry_entries_are_model_specs_named_by_their_key():
    assert {"qwen35_vl", "qwen3_vl"} <= set(MODEL_REGISTRY)
    for name, spec in MODEL_REGISTRY.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert get_model_spec(name) is spec
        data = ("name", "variants", "variant_aliases", "dataset_providers", "weights")
        for field in dataclasses.fields(ModelSpec):
            if field.name not in data:
                assert callable(getattr(spec, field.name)), f"{name}.{field.name} is not callable"
        for field in dataclasses.fields(WeightConversion):
            value = getattr(spec.weights, field.name)
            if field.name != "fsdp_dtensor_tp_note":
                assert callable(value), f"{name}.weights.{field.name} is not callable"
        assert all(isinstance(p, DatasetProvider) for p in spec.dataset_providers.values())


def test_unknown_model_lists_registered_models():
    with pytest.raises(ValueError, match="unknown model 'nope'") as error:
        get_model_spec("nope")
    assert "qwen35_vl" in str(error.value)


def test_variant_names():
    names = get_model_spec("qwen35_vl").variant_names()
    assert set(ALL_VARIANTS) <= set(names)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_variant_resolves_to_a_config_named_after_it():
    spec = get_model_spec("qwen35_vl")
    for name in ALL_VARIANTS:
        config = spec.get_variant(name)
        assert config.name == spec.variant_aliases.get(name, name)


def test_alias_is_the_same_object():
    spec = get_model_spec("qwen35_vl")
    assert spec.get_variant("397b_a17b") is spec.get_variant("397b")


def test_unknown_variant_lists_valid_variants():
    spec = get_model_spec("qwen35_vl")
    with pytest.raises(ValueError, match=r"unknown Qwen3\.5-VL variant 'nope'") as error:
        spec.get_variant("nope")
    message = str(error.value)
    for name in ALL_VARIANTS:
        assert name in message


def test_unknown_dataset_provider_lists_providers():
    spec = get_model_spec("qwen35_vl")
    with pytest.raises(ValueError, match="unknown dataset provider 'nope'") as error:
        spec.dataset_provider("nope")
    assert "mock" in str(error.value)
    assert "cord_v2" in str(error.value)


def test_dataset_providers_call_the_data_modules(monkeypatch):
    from data import cord_v2, mock

    spec = get_model_spec("qwen35_vl")
    for name, module in (("mock", mock), ("cord_v2", cord_v2)):
        monkeypatch.setattr(
            module, "build_datasets", lambda *args, name=name: ("built", name, args)
        )
        monkeypatch.setattr(module, "describe_dataset", lambda *args, name=name: [name])
        assert spec.dataset_provider(name).build("args", "config", (1, 0, 0)) == (
            "built",
            name,
            ("args", "config", (1, 0, 0)),
        )
        assert spec.dataset_provider(name).describe("args", "config") == [name]


def test_registry_lookup_imports_no_megatron_or_data_module():
    """Looking up names and variants stays cheap: the launcher's lookup runs it first."""
    code = (
        "import sys; import models; "
        "print(sorted(m for m in sys.modules if m.startswith(('megatron.core', 'data.'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def megatron_config_of(flags: list[str]):
    """The language TransformerConfig megatron itself derives from `flags` (its parser, its
    validation, its `core_transformer_config_from_args`), on the CPU."""
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from planner import planning_device

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(
        [*flags, "--micro-batch-size=1", "--seq-length=64", "--use-cpu-initialization"]
    )
    args.rank, args.world_size = 0, 1
    with planning_device(dry_run=True):  # the planned GPU stands in for the missing one
        validate_args(args)
    return core_transformer_config_from_args(args)


@pytest.mark.parametrize(
    "model, variant",
    [
        ("qwen35_vl", "proxy"),
        ("qwen35_vl", "proxy-moe"),
        ("qwen35_vl", "9b"),
        ("qwen35_vl", "397b"),
        ("qwen3_vl", "proxy"),
        ("qwen3_vl", "proxy-moe"),
        ("qwen3_vl", "8b"),
        ("qwen3_vl", "235b_a22b"),
    ],
)
def test_megatron_derives_the_factorys_language_config_from_the_generated_flags(model, variant):
    """One source: the flags come from the spec's language fields and model arguments, and
    megatron's own parsing turns them back into exactly those TransformerConfig fields."""
    spec = get_model_spec(model)
    config = spec.get_variant(variant)
    derived = megatron_config_of(megatron_flags(architecture_dests(spec, config)))
    for name, value in spec.language_fields(config).items():
        got = getattr(derived, name)
        if isinstance(value, list | tuple):
            got, value = list(got), list(value)
        assert got == value, f"{variant}: {name} {got!r} from megatron, {value!r} in the spec"


def test_flags_for_unknown_arguments_are_refused():
    with pytest.raises(ValueError, match="megatron has no argument for not_an_argument"):
        megatron_flags({"not_an_argument": 1})
