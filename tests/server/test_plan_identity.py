"""The saved draft plan belongs to the hardware it was measured on: load_engine's state identity (and so
the warm-state file's name) changes with the GPU model or the CPU model."""

import adasd_core.device
from server.settings import Settings
from server.worker import load_engine


def test_the_plan_identity_changes_with_the_hardware(pair_dir, tmp_path, monkeypatch):
    settings = Settings(target=str(pair_dir / "target"), draft=str(pair_dir / "draft"), device="cpu", dtype="float32",
                        max_running=2, warm_state_path=str(tmp_path)).model_dump()
    here = load_engine(settings)
    assert adasd_core.device.device_identity(here.pair.device).startswith("cpu ")
    monkeypatch.setattr(adasd_core.device, "device_identity", lambda device: "NVIDIA L4 sm_89")
    l4 = load_engine(settings)
    monkeypatch.setattr(adasd_core.device, "device_identity", lambda device: "NVIDIA H200 sm_90")
    h200 = load_engine(settings)
    assert len({here.state_identity, l4.state_identity, h200.state_identity}) == 3
    assert len({here.state_path, l4.state_path, h200.state_path}) == 3  # each keeps its own plan file
    assert h200.state_identity == load_engine(settings).state_identity  # the same card again: its plan is reused
