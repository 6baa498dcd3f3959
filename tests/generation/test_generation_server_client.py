"""The vLLM server client turns every way a server can fail mid-answer into one ServerError naming the URL.

No vLLM here: a stand-in HTTP server answers /health, then misbehaves on the next request the way a server that is
killed mid-answer does (headers sent, body cut short; or connection dropped before any status line).
"""
import socket
import threading

import pytest

from posttrain.generation.server import ServerError, VLLMServerClient
from posttrain.models import tiny_tokenizer

HEALTH = b'{"version": 3}'


def _serve(behaviour: str):
    """A one-thread socket server: /health answers properly, any other path gets `behaviour`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                if request.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(HEALTH)).encode() + b"\r\nConnection: close\r\n\r\n" + HEALTH)
                elif behaviour == "truncated":      # promises 48 bytes, sends none, hangs up
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 48\r\nConnection: close\r\n\r\n")
                elif behaviour == "hangup":         # closes before a status line
                    pass
                elif behaviour == "not_json":
                    body = b"<html>hello</html>"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                                 + b"\r\nConnection: close\r\n\r\n" + body)

    threading.Thread(target=loop, daemon=True).start()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("behaviour,says", [("truncated", "IncompleteRead"), ("hangup", "RemoteDisconnected"),
                                            ("not_json", "not JSON")])
def test_a_server_failing_mid_answer_raises_server_error(behaviour, says):
    sock, url = _serve(behaviour)
    try:
        client = VLLMServerClient(url, tokenizer=tiny_tokenizer(), eos_token_ids=[0], timeout_s=5)
        assert client.version == 3
        with pytest.raises(ServerError) as e:
            client._request("/update_weights", data=b"x" * 10, headers={"Content-Type": "application/octet-stream"})
        assert url in str(e.value) and "/update_weights" in str(e.value) and says in str(e.value)
    finally:
        sock.close()


def test_sync_to_a_server_that_dies_mid_answer_keeps_the_version():
    """The trainer's version only advances when the server confirmed the new weights."""
    from posttrain.models import tiny_model

    sock, url = _serve("truncated")
    try:
        client = VLLMServerClient(url, tokenizer=tiny_tokenizer(), eos_token_ids=[0], timeout_s=5)
        with pytest.raises(ServerError, match="did not answer /update_weights"):
            client.sync(tiny_model())
        assert client.version == 3
    finally:
        sock.close()
