"""`megatron_compat.skip_main_weight_refresh_under_megatron_fsdp`: under Megatron-FSDP the
distributed optimizer skips the main-weight refresh that megatron-core 0.19 refuses after a
weights-only load (a fine-tune from an imported checkpoint); every other optimizer still
refreshes. The GPU run that needed it is in docs/results.md (FSDP fine-tune from an
`fsdp_dtensor` import)."""

from __future__ import annotations

import types

import pytest
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_compat import skip_main_weight_refresh_under_megatron_fsdp


def optimizer_stub(use_megatron_fsdp: bool):
    return types.SimpleNamespace(
        optimizer=None, ddp_config=types.SimpleNamespace(use_megatron_fsdp=use_megatron_fsdp)
    )


def test_megatron_alone_refuses_the_refresh_under_fsdp():
    # The reason for the hook; when megatron stops raising here, the hook can go.
    with pytest.raises(NotImplementedError, match="Megatron-FSDP"):
        DistributedOptimizer._copy_model_params_to_main_params(optimizer_stub(True))


def test_refresh_is_skipped_under_fsdp_and_kept_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(
        DistributedOptimizer,
        "_copy_model_params_to_main_params",
        lambda self, state_dict=None: calls.append(state_dict),
    )
    skip_main_weight_refresh_under_megatron_fsdp()
    skip_main_weight_refresh_under_megatron_fsdp()  # a second call must not wrap twice
    refresh = DistributedOptimizer._copy_model_params_to_main_params
    assert refresh(optimizer_stub(True)) is None
    assert calls == []
    refresh(optimizer_stub(False), state_dict={"w": 1})
    assert calls == [{"w": 1}]
