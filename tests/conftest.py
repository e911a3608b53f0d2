"""Shared wiring of the harness's own tests."""

import contextlib
import signal

# Stages seed torch and numpy. pytester's in-process runs restore sys.modules after
# each run, and a C extension imported a second time in one process crashes; imported
# here first, they survive every restore.
import numpy  # noqa: F401
import pytest
import torch

from harness.fixtures.llm_server import llm_server_fixture  # noqa: F401  (the `llm_server` fixture)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' models are tiny: one thread beats two contending for shared cores
    (up to 10x on the 2-core CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server with a bucket, reachable from this process and those it starts
    (AWS_* variables set for the session)."""
    pytest.importorskip("moto")
    from harness.fixtures.s3_server import S3Server

    with S3Server() as server, server.environ():
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny world's model and tokenizer (built once, cached across runs): a directory
    usable as a spec's `base:`."""
    from harness.fixtures import tiny_world

    return tiny_world.build()


@pytest.fixture(scope="session")
def tiny_chat_dir():
    """The tiny chat world's model and tokenizer (with a chat template), built once."""
    from harness.fixtures import tiny_chat

    return tiny_chat.build()


@pytest.fixture(scope="session")
def save_adapter():
    """save(base, stage_dir, std, seed=0) -> stage_dir: a LoRA adapter on attention and MLP
    saved where a finetune stage keeps it (`<stage_dir>/adapter`), its B matrices drawn
    with `std` (0 keeps peft's initialisation, B = 0: an adapter that changes nothing)."""

    def save(base: str, stage_dir, std: float, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        from harness.lab.models import load_model

        torch.manual_seed(seed)
        modules = ["q_proj", "v_proj", "down_proj"]
        config = LoraConfig(r=4, lora_alpha=4, target_modules=modules, lora_dropout=0.0)
        model = get_peft_model(load_model(base, device="cpu"), config)
        if std:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, std)
        model.save_pretrained(stage_dir / "adapter")
        return stage_dir

    return save


@pytest.fixture
def within_seconds():
    """`with within_seconds(5): ...` fails the test, instead of hanging the suite, when the body
    blocks (opening a fifo, reading a device). Uses SIGALRM: the main thread only."""

    class Hung(Exception):  # not an OSError, which code under test may catch as unreadable
        pass

    def expire(signum, frame):
        raise Hung("still running at the deadline")

    @contextlib.contextmanager
    def within(seconds: int):
        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return within
