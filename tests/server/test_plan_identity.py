"""The saved draft plan belongs to the hardware it was measured on: load_engine's state identity (and so
the warm-state file's name) changes with the GPU model or the CPU model."""

import adasd_core.device
from server.settings import Settings
from server.worker import load_engine


def test_the_plan_identity_changes_with_the_hardware(pair_dir, tmp_path, monkeypatch):
    settings = Settings(target=str(pair_dir / "target"), draft=str(pair_dir / "draft"), device="cpu", dtype="float32",
                        max_running=2, warm_state_path=str(tmp_path)).model_dump()
    here, _ = load_engine(settings)
    assert adasd_core.device.device_identity(here.pair.device).startswith("cpu ")
    monkeypatch.setattr(adasd_core.device, "device_identity", lambda device: "NVIDIA L4 sm_89")
    l4, _ = load_engine(settings)
    monkeypatch.setattr(adasd_core.device, "device_identity", lambda device: "NVIDIA H200 sm_90")
    h200, _ = load_engine(settings)
    assert len({here.warm.identity, l4.warm.identity, h200.warm.identity}) == 3
    assert len({here.warm.path, l4.warm.path, h200.warm.path}) == 3  # each keeps its own plan file
    assert h200.warm.identity == load_engine(settings)[0].warm.identity  # the same card again: its plan is reused
