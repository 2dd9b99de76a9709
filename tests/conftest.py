import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Where the shared engines below run: cpu / float32 unless set (scripts/gpu_check.sh sets cuda).
TEST_DEVICE = os.environ.get("ADASD_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("ADASD_TEST_DTYPE", "float32")


@pytest.fixture(scope="session")
def quick_pair_dir(tmp_path_factory) -> Path:
    """A tiny trained pair from the demo build's quick mode (seconds)."""
    from adasd_core.demo.build import BuildConfig, build

    out = tmp_path_factory.mktemp("quick_pair")
    build(out, BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
    return out


@pytest.fixture(scope="session")
def random_pair_dir(quick_pair_dir, tmp_path_factory) -> Path:
    """Random-weight Llama target and draft on the quick tokenizer: they rarely agree."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("random_pair")
    tok = AutoTokenizer.from_pretrained(quick_pair_dir / "target")
    for role, (layers, width, seed) in {"target": (2, 64, 1), "draft": (1, 32, 2)}.items():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)  # peaked distributions, so greedy ties are impossible
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
    return out


@pytest.fixture(scope="session")
def tempered_pair_dir(random_pair_dir, tmp_path_factory) -> Path:
    """The random target, and as draft the same model at twice the temperature (lm_head halved).

    Unlike a trained pair, what happens to candidates does not depend on how training went on this
    machine: the draft ranks tokens as the target does but spreads its mass wider, so at
    temperature 1 a candidate is accepted with probability 1 - TV(p, q), about 0.4 here, and
    rejected otherwise. A few dozen tokens fill both groups of the statistics (T_G and T_V known)
    except with a vanishing probability, on any machine."""
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tempered_pair")
    shutil.copytree(random_pair_dir / "target", out / "target")
    model = LlamaForCausalLM.from_pretrained(out / "target")
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(out / "draft")
    AutoTokenizer.from_pretrained(out / "target").save_pretrained(out / "draft")
    return out


@pytest.fixture(scope="session")
def quick_engine(quick_pair_dir):
    from adasd_core.llm import LLM
    from adasd_core.models import load_pair

    return LLM(load_pair(str(quick_pair_dir / "target"), str(quick_pair_dir / "draft"), device=TEST_DEVICE,
                                       dtype=TEST_DTYPE))


@pytest.fixture(scope="session")
def random_engine(random_pair_dir):
    from adasd_core.llm import LLM
    from adasd_core.models import load_pair

    return LLM(load_pair(str(random_pair_dir / "target"), str(random_pair_dir / "draft"), device=TEST_DEVICE,
                                       dtype=TEST_DTYPE))


# ---------------------------------------------------------------------------- no silent skips
# `make test` must run everything the docs promise: a skipped test fails the run.


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} test(s) skipped: this suite allows no skip; install what they "
                                    "need (make test does) or make them fail loudly", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
