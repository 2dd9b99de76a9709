"""Device and dtype choices (adasd_core.device) on cards this machine does not have: torch.cuda's queries
are replaced by fakes."""

import pytest
import torch

from adasd_core import device as dev


@pytest.fixture
def fake_cards(monkeypatch):
    """fake_cards({index: (name, (major, minor))}): what torch.cuda reports for each card."""

    def install(cards: dict):
        def index(d):
            d = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
            return 0 if d.index is None else d.index

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cards[index(d or 0)][1])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: cards[index(d or 0)][0])
        # what is_bf16_supported() says on such cards: emulation counts, so True on every one
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.version, "hip", None)

    return install


@pytest.mark.parametrize("name, capability, want", [
    ("Tesla T4", (7, 5), torch.float16),
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
    ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16),
    ("NVIDIA GeForce RTX 3090", (8, 6), torch.bfloat16),
    ("NVIDIA H200", (9, 0), torch.bfloat16),
])
def test_auto_dtype_is_bf16_only_where_the_card_has_it_natively(fake_cards, name, capability, want):
    fake_cards({0: (name, capability), 1: ("Tesla T4", (7, 5))})
    assert dev.resolve_dtype("auto", torch.device("cuda:0")) == want
    assert dev.resolve_dtype("auto", torch.device("cuda")) == want  # the current card
    assert dev.resolve_dtype("auto", torch.device("cuda:1")) == torch.float16  # asked per card, not of card 0
    assert dev.resolve_dtype("bfloat16", torch.device("cuda:1")) == torch.bfloat16  # an explicit choice stays
    assert dev.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_device_identity_names_the_card_or_the_processor(fake_cards):
    fake_cards({0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA L4", (8, 9)), 2: ("NVIDIA H200", (9, 0))})
    h200, l4 = dev.device_identity(torch.device("cuda:0")), dev.device_identity(torch.device("cuda:1"))
    assert h200 == "NVIDIA H200 sm_90" and l4 == "NVIDIA L4 sm_89"
    assert dev.device_identity(torch.device("cuda:2")) == h200  # the same model on another card: the same plan
    cpu = dev.device_identity(torch.device("cpu"))
    assert cpu == f"cpu {dev.cpu_model()}" and dev.cpu_model() == dev.machine_info()["cpu"] and dev.cpu_model()
    assert cpu not in (h200, l4)


def test_fold_query_groups_is_on_by_default_and_can_be_forced(monkeypatch):
    monkeypatch.delenv(dev.FOLD_ENV, raising=False)
    assert dev.fold_query_groups(torch.device("cuda"))
    assert dev.fold_query_groups(torch.device("cpu"))
    monkeypatch.setenv(dev.FOLD_ENV, "0")
    assert not dev.fold_query_groups(torch.device("cuda"))
