"""Server mode: a vLLM engine in its own process (`posttrain serve`), and the trainer-side client.

    posttrain serve model=runs/sft/final port=8000 [kv_cache_gib=1 max_model_len=1024]

The server wraps one `VLLMEngine` and answers, one request at a time (the engine is not re-entrant):

    GET  /health          {"status": "ok", "version": v, "model": folder}
    POST /generate        JSON {prompt_ids, params (SamplingParams fields), n, stop_token_ids, min_version}
                          -> {tokens [N][T_i], logps [N][T_i], finish [N], version, wall_s}
    POST /update_weights  body: a safetensors file of the full weights (HF names); header X-Weights-Version
                          -> {"version": v, "seconds": s}
    POST /shutdown        stop serving

Token ids in, token ids out: texts are decoded by the client with the trainer's tokenizer, so the trainer never
re-tokenises what the engine produced. Weights are versioned: the trainer sends version k after its k-th update and
every /generate names the version it needs (`min_version`); a server behind it answers 409, so a sample is never
drawn from stale weights. The client waits at most `timeout_s` for any answer; an unreachable, dead or failing
server stops the run with a PosttrainError naming the URL (the CLI exits with status 2; checkpoints are written
atomically, so the last one stays intact). On a CPU machine the server and the trainer are two local processes.
"""

from __future__ import annotations

import atexit
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import torch

from posttrain.config import field
from posttrain.errors import ConfigError, PosttrainError
from posttrain.generation.sampler import Rollouts, SamplingParams
from posttrain.generation.vllm_engine import build_rollouts, check_params

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "prompt_seeds")


class ServerError(PosttrainError):
    """The vLLM server is unreachable, died, or refused a request; the message names the URL and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    model: str = field(help="a local Hugging Face folder (or smollm2-135m-instruct) the engine loads")
    host: str = field("127.0.0.1", help="address to listen on")
    port: int = field(8000, help="port to listen on")
    dtype: str = field("float32", help="engine dtype: float32, bfloat16 or float16")
    max_model_len: int = field(0, help="prompt + completion tokens per sequence (0: the model's)")
    kv_cache_gib: float = field(1.0, help="KV-cache size in GiB on a CPU")
    gpu_memory_utilization: float = field(0.4, help="fraction of the GPU vLLM may take")
    seed: int = field(0, help="engine seed")

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"key 'port' must be in 1..65535, got {self.port}.")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"key 'kv_cache_gib' must be > 0, got {self.kv_cache_gib}.")


def _params_from_json(d: dict[str, Any]) -> SamplingParams:
    unknown = set(d) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling fields {sorted(unknown)}; expected {list(SAMPLING_FIELDS)}")
    values: dict[str, Any] = {k: (tuple(v) if k in ("stop", "prompt_seeds") and v is not None else v)
                              for k, v in d.items()}
    return SamplingParams(**values)


def _make_handler(engine, model_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
            return

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", "version": engine.version, "model": model_name})
            else:
                self._send(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self) -> None:
            try:
                if self.path == "/generate":
                    self._send(*self._generate(json.loads(self._body())))
                elif self.path == "/update_weights":
                    self._send(*self._update(self._body()))
                elif self.path == "/shutdown":
                    self._send(200, {"status": "stopping"})
                    self.server.stopping = True  # type: ignore[attr-defined]
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}"})
            except (ValueError, TypeError, KeyError, PosttrainError) as e:
                self._send(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # noqa: BLE001 - the engine failed; tell the client instead of hanging up
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def _generate(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            need = int(req.get("min_version", 0))
            if engine.version < need:
                return 409, {"error": f"server holds weights version {engine.version}, the request needs {need}",
                             "version": engine.version}
            params = _params_from_json(req["params"])
            params = dataclasses.replace(params, stop_token_ids=tuple(req["stop_token_ids"]))
            out = engine.generate([list(map(int, p)) for p in req["prompt_ids"]], params, int(req.get("n", 1)))
            return 200, {"tokens": out.token_lists(), "logps": out.logps_lists(), "finish": out.finish_reasons,
                         "version": engine.version, "wall_s": out.wall_s}

        def _update(self, body: bytes) -> tuple[int, dict[str, Any]]:
            from safetensors.torch import load as load_safetensors

            version = int(self.headers.get("X-Weights-Version", engine.version + 1))
            start = time.perf_counter()
            engine.load_weights(load_safetensors(body).items())
            engine.version = version
            return 200, {"version": engine.version, "seconds": time.perf_counter() - start}

    return Handler


def serve(config: ServeConfig) -> dict[str, Any]:
    """`posttrain serve`: load the engine, then answer requests until /shutdown or a signal."""
    from posttrain.generation.vllm_engine import VLLMEngine, import_vllm
    from posttrain.models.loading import resolve

    folder = resolve(config.model)  # a bad folder is reported before the (slow) engine import
    if isinstance(folder, str):
        raise ConfigError(f"key 'model': the server loads a saved folder, not {config.model!r}; save the model with "
                          f"save_pretrained and pass its path.")
    import_vllm()
    engine = VLLMEngine(folder, dtype=config.dtype, max_model_len=config.max_model_len or None,
                        kv_cache_gib=config.kv_cache_gib, gpu_memory_utilization=config.gpu_memory_utilization,
                        seed=config.seed)
    try:
        httpd = HTTPServer((config.host, config.port), _make_handler(engine, str(folder)))
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e}") from e
    httpd.stopping = False  # type: ignore[attr-defined]
    print(f"posttrain serve: ready on http://{config.host}:{config.port} (model {folder})", flush=True)
    try:
        while not httpd.stopping:  # type: ignore[attr-defined]
            httpd.handle_request()
    finally:
        httpd.server_close()
    return {"served": str(folder)}


# --------------------------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------------------------


def weights_bytes(model) -> bytes:
    """The policy's full weights (LoRA merged) as one safetensors blob; tied tensors are stored once each."""
    from safetensors.torch import save

    from posttrain.generation.vllm_engine import policy_weights

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for name, t in policy_weights(model):
            t = t.detach().to("cpu").contiguous()
            out[name] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
    return save(out)


class VLLMServerClient:
    """A `Generator` that samples on a `posttrain serve` process at `url` and sends it the trainer's weights.

    Every request waits at most `timeout_s`; failures raise ServerError naming the URL. `process`: a server this
    client started (stopped by `close()` and at interpreter exit).
    """

    def __init__(self, url: str, *, tokenizer, eos_token_ids: Sequence[int], timeout_s: float = 120.0,
                 process: subprocess.Popen | None = None, log_path: str | None = None):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))
        self.timeout_s = float(timeout_s)
        self.process = process
        self.log_path = log_path
        self.version = 0
        self.last_sync_server_s = 0.0
        if process is not None:
            atexit.register(self.close)
        self.version = int(self.wait_ready()["version"])

    def _request(self, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise ServerError(f"vLLM server {self.url} refused {path} (HTTP {e.code}): {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # HTTPException: the server died mid-answer (IncompleteRead, RemoteDisconnected, BadStatusLine)
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            died = self._died()
            raise ServerError(f"vLLM server {self.url} did not answer {path} ({reason}){died}; the run stops here "
                              f"(checkpoints already written are complete). Start it with `posttrain serve "
                              f"model=FOLDER port=PORT` or set vllm_url to a running server.") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ServerError(f"vLLM server {self.url} answered {path} with {len(body)} bytes that are not JSON "
                              f"(starting {body[:80]!r}): is vllm_url a `posttrain serve` server?") from None

    def _died(self) -> str:
        if self.process is not None and self.process.poll() is not None:
            return f"; the server process exited with status {self.process.returncode}"
        return ""

    def wait_ready(self) -> dict[str, Any]:
        """Poll /health until it answers, for at most timeout_s; ServerError after that (or if the process died)."""
        deadline = time.monotonic() + self.timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"the vLLM server process for {self.url} exited with status "
                                  f"{self.process.returncode} before it was ready{self._log_tail()}")
            try:
                return self._request("/health", timeout=min(5.0, self.timeout_s))
            except ServerError as e:
                last = e
                time.sleep(0.5)
        raise ServerError(f"vLLM server {self.url} was not ready within {self.timeout_s:.0f} s "
                          f"(key vllm_timeout_s): {last}{self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.log_path
        if not log or not os.path.exists(log):
            return ""
        with open(log, errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        return "; its last output: " + " | ".join(lines[-3:]) if lines else ""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        """Sample on the server with the current weights version; Rollouts as HFGenerator returns them."""
        check_params(params, n, prompt_ids)
        start = time.perf_counter()
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids
        payload = {"prompt_ids": [list(map(int, p)) for p in prompt_ids], "n": n, "min_version": self.version,
                   "stop_token_ids": list(stop_ids),
                   "params": {k: (list(v) if isinstance(v, tuple) else v)
                              for k in SAMPLING_FIELDS for v in [getattr(params, k)]}}
        out = self._request("/generate", data=json.dumps(payload).encode(),
                            headers={"Content-Type": "application/json"})
        if int(out["version"]) != self.version:
            raise ServerError(f"vLLM server {self.url} sampled with weights version {out['version']}, expected "
                              f"{self.version}: another trainer is updating it")
        return build_rollouts(prompt_ids, out["tokens"], out["logps"], out["finish"], n=n, tokenizer=self.tokenizer,
                              stop=params.stop, pad_token_id=self.pad_token_id, wall_s=time.perf_counter() - start)

    def sync(self, model) -> float:
        """Send the trainer's weights as the next version and wait for the server to hold them; seconds taken."""
        start = time.perf_counter()
        body = weights_bytes(model)
        out = self._request("/update_weights", data=body,
                            headers={"Content-Type": "application/octet-stream",
                                     "X-Weights-Version": str(self.version + 1)})
        self.version = int(out["version"])
        self.last_sync_server_s = float(out["seconds"])
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop a server this client started and remove its log (no-op for an external one)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._request("/shutdown", data=b"{}", timeout=5.0)
                proc.wait(timeout=10)
            except (ServerError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.log_path and os.path.exists(self.log_path):
            os.remove(self.log_path)


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_local_server(folder: str, *, tokenizer, eos_token_ids: Sequence[int], dtype: str = "float32",
                       max_model_len: int | None = None, kv_cache_gib: float = 1.0, seed: int = 0,
                       timeout_s: float = 120.0, port: int | None = None) -> VLLMServerClient:
    """Start `posttrain serve` on this machine as a child process and return a client once it is ready."""
    import tempfile

    port = port or free_port()
    args = [sys.executable, "-m", "posttrain.cli", "serve", f"model={folder}", f"port={port}", f"dtype={dtype}",
            f"kv_cache_gib={kv_cache_gib}", f"seed={seed}", f"max_model_len={max_model_len or 0}"]
    log = tempfile.NamedTemporaryFile(prefix="posttrain-serve-", suffix=".log", delete=False)  # noqa: SIM115 - the child server writes to it for its whole life
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        client = VLLMServerClient(url, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                                  timeout_s=max(timeout_s, 60.0), process=proc, log_path=log.name)
    except BaseException:
        proc.kill()
        raise
    client.timeout_s = timeout_s
    return client
