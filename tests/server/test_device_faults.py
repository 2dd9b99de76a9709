"""Device faults: a CUDA error other than out-of-memory ends the worker (503s, a fresh worker, /health
503 meanwhile); an out-of-memory error ends only its step's requests. Injected on the CPU through
server.faults' fault file (the worker loop's side is in test_worker_loop.py)."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import torch
from server_support import GOOD, LONG, check_error_body, post_in_thread, wait_for

from server.faults import FAULT_FILE_ENV, FaultFile, is_device_fault
from server.worker import DEVICE_FAULT_EXIT


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as e:
        return e


def _raised_while(exc: BaseException, context: BaseException) -> BaseException:
    try:
        try:
            raise context
        except BaseException:
            raise exc  # noqa: B904 (the fault is to carry `context` as its __context__)
    except BaseException as e:
        return e


FATAL = {
    "accelerator-error": torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    "device-side-assert": RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be "
                                       "asynchronously reported at some other API call"),
    "launch-failure": RuntimeError("CUDA error: unspecified launch failure"),
    "misaligned": RuntimeError("CUDA error: misaligned address"),
    "cublas": RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, "
                           "m, n, k, &falpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &fbeta, c, CUDA_R_16BF, ldc)`"),
    "cudnn": RuntimeError("cuDNN error: CUDNN_STATUS_MAPPING_ERROR"),
    "triton": RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
    "driver": RuntimeError("CUDA driver error: unknown error"),
    "ecc": RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    "wrapped": _raised_from(ValueError("could not run the round"),
                            RuntimeError("CUDA error: an illegal memory access")),
    "while-handling": _raised_while(KeyError("slot"),
                                    torch.AcceleratorError("CUDA error: device-side assert triggered")),
}
PER_REQUEST = {
    "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                  "23.68 GiB of which 1.12 GiB is free."),
    "oom-as-accelerator-error": torch.AcceleratorError("CUDA error: out of memory"),
    "oom-as-runtime-error": RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    "cublas-alloc": RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "devices-mixed": RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                                  "cuda:0 and cpu!"),
    "shape": RuntimeError("The size of tensor a (4) must match the size of tensor b (5) at non-singleton dimension 1"),
    "bug": KeyError("slot"),
    "value-mentions-cuda": ValueError("CUDA error: not a runtime error, a message quoting one"),
}


@pytest.mark.parametrize("case", FATAL)
def test_device_errors_are_fatal(case):
    assert is_device_fault(FATAL[case])


@pytest.mark.parametrize("case", PER_REQUEST)
def test_other_errors_stay_with_their_requests(case):
    assert not is_device_fault(PER_REQUEST[case])


def test_the_fault_file_fires_once(tmp_path):
    path = tmp_path / "fault"
    faults = FaultFile(str(path))
    faults.check()  # no file: nothing
    for kind, expected in [("cuda", True), ("oom", False)]:
        path.write_text(kind)
        with pytest.raises(RuntimeError) as info:
            faults.check()
        assert is_device_fault(info.value) is expected
        assert not path.exists()
        faults.check()


# ---------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def faulty(start_server, tmp_path_factory):
    """One generation at a time and one waiting; faults injected through a file."""
    path = tmp_path_factory.mktemp("faults") / "fault"
    srv = start_server(max_running=1, max_queue=1, env={FAULT_FILE_ENV: str(path)})
    srv.fault_path = path
    return srv


def inject(srv, kind: str) -> None:
    tmp = srv.fault_path.with_suffix(".tmp")
    tmp.write_text(kind)
    os.replace(tmp, srv.fault_path)  # the worker never reads half a file


def health(srv) -> tuple[int, dict]:
    r = httpx.get(srv.base_url + "/health", timeout=10)
    return r.status_code, r.json()


def stream_rest(srv, kind: str) -> list[str]:
    """A LONG stream; once it runs, `kind` is injected; the lines that follow."""
    with httpx.stream("POST", srv.base_url + "/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        inject(srv, kind)
        return [line for line in lines if line]


def test_out_of_memory_fails_the_request_and_serving_goes_on(faulty):
    code, info = faulty.ready()
    assert code == 200
    rest = stream_rest(faulty, "oom")
    assert rest[-1] == "data: [DONE]"
    check_error_body(json.loads(rest[-2].removeprefix("data: ")), "internal_error")
    assert health(faulty) == (200, {"status": "ok"})
    r = httpx.post(faulty.base_url + "/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert faulty.ready()[1]["worker_pid"] == info["worker_pid"]  # the same worker


def test_a_cuda_error_restarts_the_worker_and_health_says_so(faulty):
    url = faulty.base_url + "/v1/completions"
    code, info = faulty.ready()
    assert code == 200 and health(faulty)[0] == 200
    old_pid = info["worker_pid"]
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=120) as a:
        lines = a.iter_lines()
        assert next(lines).startswith("data: ")
        t, b = post_in_thread(url, LONG)  # waits behind the stream
        assert wait_for(lambda: faulty.metric("adasd_num_requests_waiting") == 1), faulty.log_tail()
        inject(faulty, "cuda")
        rest = [line for line in lines if line]
    # the running stream: a 503 inside it, then [DONE]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))
    check_error_body(error, "device_error")
    assert error["error"]["type"] == "service_unavailable_error"
    # the waiting one: a plain 503 in the OpenAI error shape
    t.join(60)
    r = b["response"]
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    check_error_body(r.json(), "device_error")
    # /health is 503 with the reason until a fresh worker is ready, then 200
    assert wait_for(lambda: health(faulty)[0] != 200, timeout=5)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        code, body = health(faulty)
        if code == 200:
            break
        assert code == 503 and body["status"] == "restarting", body
        assert "device error" in body["error"] and "illegal memory access" in body["error"], body
        ready_code, ready_body = faulty.ready()  # not ready either, unless the fresh worker just came up
        assert (ready_code, ready_body.get("status")) == (503, "restarting") or (
            ready_code == 200 and ready_body["worker_pid"] != old_pid), ready_body
        seen.append(body)
        time.sleep(0.1)
    assert code == 200 and seen, faulty.log_tail()
    ready_code, ready_body = faulty.ready()
    assert ready_code == 200 and ready_body["worker_pid"] not in (None, old_pid)
    r = httpx.post(url, json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    log = faulty.log_tail(400)
    assert f"worker pid {old_pid} exited with code {DEVICE_FAULT_EXIT}" in log, log
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # gone and reaped
