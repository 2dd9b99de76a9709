"""Where models load and where their KV fits, on GPUs this machine does not have: torch.cuda's memory
queries and transformers' loader are replaced by fakes that record what they were asked.

- load_model puts the weights straight on the device (a device map of one card), never host-then-copy;
- the pre-load memory check covers device maps (all GPUs together, the draft on its card) and hub ids
  (the hub's safetensors summary), and says why when a size is unknown;
- plan_blocks holds each device's share of a KV block against that device's free memory."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adasd_core import kv_cache, model_files, models
from adasd_core.drafting import WINDOW
from adasd_core.errors import ModelLoadError
from adasd_core.model_files import TINY_DIR, ModelSource

GiB = 2**30


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus([(free, total), ...]): torch.cuda reports these cards."""

    def install(cards):
        def mem(device=None):
            d = torch.device("cuda", 0) if device is None else torch.device(device)
            return cards[d.index or 0]

        monkeypatch.setattr(torch.cuda, "mem_get_info", mem)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    return install


# ---------------------------------------------------------------------------- loading straight to the device


@pytest.fixture
def recorded_loads(monkeypatch):
    """from_pretrained replaced: it records its kwargs and returns the tiny target (loaded once here), whose
    .to() must not be called afterwards."""
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR / "target", dtype=torch.float32)
    calls = []

    def fake(name, **kwargs):
        calls.append(kwargs)
        return model

    def moved(*args, **kwargs):
        raise AssertionError(f"the loaded model was moved again: .to{args}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(model, "to", moved)
    return calls


def test_a_gpu_load_goes_straight_to_the_card(recorded_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    models.load_model(str(TINY_DIR / "target"), torch.device("cuda"), torch.bfloat16, None, False)
    models.load_model(str(TINY_DIR / "target"), torch.device("cuda:0"), torch.bfloat16, None, False)
    models.load_model(str(TINY_DIR / "target"), torch.device("cuda"), torch.bfloat16, "auto", False)
    assert [c.get("device_map") for c in recorded_loads] == [{"": torch.device("cuda", 1)},
                                                             {"": torch.device("cuda", 0)}, "auto"]
    assert all(c["dtype"] == torch.bfloat16 for c in recorded_loads)


def test_a_cpu_load_is_as_before(recorded_loads):
    models.load_model(str(TINY_DIR / "target"), torch.device("cpu"), torch.float32, None, False)
    assert len(recorded_loads) == 1 and "device_map" not in recorded_loads[0]


def test_transformers_takes_a_one_device_map_and_loads_once(monkeypatch):
    """The real loader with the device map a GPU gets, pointed here at the CPU: every parameter and buffer
    on the requested device, from one from_pretrained call and no move after it, and the same logits as
    the plain load."""
    real, cpu = AutoModelForCausalLM.from_pretrained, torch.device("cpu")
    calls = []

    def loader(name, **kwargs):
        calls.append(dict(kwargs))
        return real(name, **{**kwargs, "device_map": {"": cpu}})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader)
    mapped = models.load_model(str(TINY_DIR / "target"), SimpleNamespace(type="gpu-like"), torch.float32, None, False)
    assert len(calls) == 1 and set(calls[0]["device_map"]) == {""}
    assert {t.device for t in [*mapped.parameters(), *mapped.buffers()]} == {cpu}
    plain = real(str(TINY_DIR / "target"), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(mapped(ids).logits, plain(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the pre-load memory check


def _tiny_sizes(device):
    sources = {role: ModelSource("tiny", str(TINY_DIR / role), "builtin") for role in ("target", "draft")}
    return models._Sizes(sources, torch.bfloat16, device)


NAMES = {"target": "tiny", "draft": "tiny"}


def test_a_device_map_is_checked_against_every_gpu_together(fake_gpus):
    sizes = _tiny_sizes(torch.device("cuda"))
    need, draft = sizes.total(), sizes.bytes["draft"]
    assert need and draft and draft < need / 2
    fake_gpus([(int(0.6 * need), 80 * GiB), (int(0.6 * need), 80 * GiB)])  # neither card alone, both together
    models._check_memory(sizes, torch.device("cuda"), NAMES, "auto")
    with pytest.raises(ModelLoadError, match="do not fit on cuda"):
        models._check_memory(sizes, torch.device("cuda"), NAMES, None)
    fake_gpus([(int(0.4 * need), 80 * GiB), (int(0.4 * need), 80 * GiB)])
    spread_advice = "do not fit on the 2 GPUs together.*host memory or on disk.*more or larger"
    with pytest.raises(ModelLoadError, match=spread_advice):
        models._check_memory(sizes, torch.device("cuda"), NAMES, "auto")
    fake_gpus([(draft // 2, 80 * GiB), (2 * need, 80 * GiB)])  # room in all, but not for the draft on its card
    with pytest.raises(ModelLoadError, match="the draft 'tiny' .* does not fit on cuda"):
        models._check_memory(sizes, torch.device("cuda"), NAMES, "auto")


def test_a_hub_id_is_sized_from_the_hubs_summary(monkeypatch, fake_gpus, caplog):
    from huggingface_hub import HfApi

    asked = []

    def info(self, name, expand=None, timeout=None):
        asked.append((name, tuple(expand or ())))
        if name == "org/no-safetensors":
            return SimpleNamespace(safetensors=None)
        if name == "org/offline":
            raise OSError("unreachable")
        return SimpleNamespace(safetensors=SimpleNamespace(total=8_030_000_000, parameters={"BF16": 8_030_000_000}))

    monkeypatch.setattr(HfApi, "model_info", info)
    model_files.hub_parameter_count.cache_clear()
    sources = {"target": ModelSource("org/llama-8b", "org/llama-8b", "hub")}
    sizes = models._Sizes(sources, torch.bfloat16, torch.device("cuda"))
    assert sizes.bytes["target"] == 2 * 8_030_000_000 and asked == [("org/llama-8b", ("safetensors",))]
    fake_gpus([(12 * GiB, 24 * GiB)])
    with pytest.raises(ModelLoadError, match="do not fit on cuda: weights in bfloat16: target 15.0 GiB"):
        models._check_memory(sizes, torch.device("cuda"), {"target": "org/llama-8b"})

    caplog.set_level(logging.INFO, logger="adasd_core.models")
    for name in ("org/no-safetensors", "org/offline"):
        sizes = models._Sizes({"target": ModelSource(name, name, "hub")}, torch.bfloat16, torch.device("cuda"))
        assert sizes.bytes["target"] is None
        models._check_memory(sizes, torch.device("cuda"), {"target": name})  # cannot tell: loads, and says why
        assert f"memory pre-check skipped: the size of the target '{name}' is unknown" in caplog.text
        assert "the hub gives no safetensors size for it" in caplog.text
    model_files.hub_parameter_count.cache_clear()


# ---------------------------------------------------------------------------- the KV budget per device


def _llama(layers, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _layer_kv(model, capacity):  # one layer's K and V for one slot, float32
    cfg = model.config
    return 2 * cfg.num_key_value_heads * capacity * (cfg.hidden_size // cfg.num_attention_heads) * 4


def test_each_devices_kv_share_is_held_against_that_device(fake_gpus):
    """A target split over two cards (half its layers each) and its draft on the first: the first card is
    nearly full, the second empty. The first card's share (half the target's KV and all the draft's) is
    what limits; the second card's free memory does not count for it, nor the first's for the second."""
    target, draft = _llama(4), _llama(2, seed=1)
    target.hf_device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                            "model.layers.2": 1, "model.layers.3": "cuda:1", "model.norm": 1, "lm_head": 1}
    draft.hf_device_map = {"": 0}
    assert kv_cache.layer_devices(target) == [torch.device("cuda", 0)] * 2 + [torch.device("cuda", 1)] * 2
    pair = SimpleNamespace(target=target, draft=draft, context_length=100)
    per_seq = -(-(100 + WINDOW + 2) // 16)  # blocks of one full-length sequence
    on0, on1 = 2 * _layer_kv(target, 16) + 2 * _layer_kv(draft, 16), 2 * _layer_kv(target, 16)  # one block's bytes
    total = 80 * GiB
    fake_gpus([(int(0.1 * total) + 7 * per_seq * on0 + 5, total), (int(0.1 * total) + 1000 * per_seq * on1, total)])
    blocks, per_block = kv_cache.plan_blocks(pair, max_running=64, memory_fraction=0.9)
    assert (blocks, per_block) == (7 * per_seq, on0 + on1)  # 7 sequences fit on cuda:0; cuda:1 has room for 1000
    assert kv_cache.kv_bytes_per_slot(target, 16) + kv_cache.kv_bytes_per_slot(draft, 16) == per_block
    fake_gpus([(int(0.1 * total) + 1000 * per_seq * on0, total), (int(0.1 * total) + 3 * per_seq * on1, total)])
    assert kv_cache.plan_blocks(pair, 64)[0] == 3 * per_seq  # now the second card limits
    assert kv_cache.plan_blocks(pair, 2)[0] == 2 * per_seq  # never more than max_running full sequences
    fake_gpus([(int(0.1 * total) + per_seq * on0 // 2, total), (total, total)])
    with pytest.raises(ModelLoadError, match=r"needs \d+ MiB of KV on cuda:0 but only"):
        kv_cache.plan_blocks(pair, 64)


def test_offloaded_layers_keep_their_kv_on_the_card_they_run_on():
    target = _llama(4)
    target.hf_device_map = {"model.embed_tokens": 1, "model.layers.0": 1, "model.layers.1": 2, "model.layers.2": "cpu",
                            "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    assert kv_cache.layer_devices(target) == [torch.device("cuda", 1), torch.device("cuda", 2), torch.device("cuda", 1),
                                              torch.device("cuda", 1)]
    target.hf_device_map = {"model": 0, "lm_head": 0}
    assert kv_cache.layer_devices(target) == [torch.device("cuda", 0)] * 4
    del target.hf_device_map
    assert kv_cache.layer_devices(target) == [torch.device("cpu")] * 4
    assert kv_cache.kv_bytes_per_device(target, 10) == {torch.device("cpu"): 4 * _layer_kv(target, 10)}
