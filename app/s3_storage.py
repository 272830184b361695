"""The S3-compatible backend of the `Storage` protocol (app/storage.py): objects in one bucket
of AWS S3, MinIO or SeaweedFS, each carrying its SHA-256 so that every download is verified."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from app.storage import (
    CHUNK,
    DamagedObject,
    StoredObject,
    check_key,
    check_size,
    replacing,
    sha256_file,
)

# Objects larger than this are uploaded in parts of this size, several at once: a multi-GB
# merged export neither sits in memory nor restarts from zero when one part fails.
MULTIPART_BYTES = 16 * 1024 * 1024
# Object metadata (x-amz-meta-sha256) that get_file checks a download against; an ETag is an
# MD5 only for single-part uploads, so it cannot serve for every object.
DIGEST_META = "sha256"


class S3Storage:
    """Objects in one bucket of an S3-compatible store; a key is the object's name.

    A put is atomic in S3 itself (an object appears whole when its upload completes), so no
    rename is needed to publish. boto3 is imported here only: the local backend runs without
    it."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        # Path-style addressing: MinIO and SeaweedFS serve buckets under the endpoint's path,
        # not as sub-domains. Retries cover a store's brief unavailability. A streamed download
        # holds its connection until the client has read it: room for as many as the API's
        # request threads.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=50,
        )
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            config=config,
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _head(self, key: str) -> dict[str, Any]:
        return self._call("head_object", key)

    def _get(self, key: str) -> dict[str, Any]:
        return self._call("get_object", key)

    def _call(self, operation: str, key: str) -> dict[str, Any]:
        """The client's `operation` (head_object, get_object) on `key`; FileNotFoundError when
        there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return cast(
                dict[str, Any],
                getattr(self.client, operation)(Bucket=self.bucket, Key=check_key(key)),
            )
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(f"no stored object {key}") from None
            raise

    def put(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self.client.put_object(
            Bucket=self.bucket,
            Key=check_key(key),
            Body=data,
            ContentMD5=md5,  # the store refuses a body damaged on the way
            Metadata={DIGEST_META: hashlib.sha256(data).hexdigest()},
        )

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(
            str(path),
            self.bucket,
            check_key(key),
            ExtraArgs={"Metadata": {DIGEST_META: sha256_file(path)}},
            Config=self.transfer,
        )

    def open(self, key: str) -> BinaryIO:
        response = self._get(key)
        return cast(BinaryIO, response["Body"])

    def get_file(self, key: str, dest: Path) -> None:
        response = self._get(key)
        expected = response.get("Metadata", {}).get(DIGEST_META)
        etag = str(response.get("ETag", "")).strip('"')
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)  # an ETag is an MD5
        with replacing(dest) as out:
            with response["Body"] as body:
                while chunk := body.read(CHUNK):
                    sha.update(chunk)
                    md5.update(chunk)
                    out.write(chunk)
            got = out.tell()
            if expected is not None:
                ok, stored = sha.hexdigest() == expected, f"sha256 {expected}"
            elif etag and "-" not in etag:  # written by another tool: its single-part MD5
                ok, stored = md5.hexdigest() == etag, f"MD5 {etag}"
            else:
                ok, stored = True, ""
            if not ok:
                raise DamagedObject(f"{key}: the download does not match the stored {stored}")
            check_size(what=key, size=int(response["ContentLength"]), got=got)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def collect_unfinished(self, older_than: float) -> list[str]:
        # A multipart upload whose process died is invisible to listings but keeps its parts
        # (and their cost) in the bucket until it is aborted.
        removed = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket)
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < older_than:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed.append(upload["Key"])
        return removed

    def list(self, prefix: str) -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=check_key(prefix) + "/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield StoredObject(
                    key=item["Key"],
                    size=int(item["Size"]),
                    modified=item["LastModified"].timestamp(),
                )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))  # no error if absent

    def delete_prefix(self, prefix: str) -> None:
        keys = [obj.key for obj in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects request takes
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            result = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if result.get("Errors"):
                raise OSError(f"could not remove everything under {prefix}: {result['Errors'][:3]}")

    def init(self) -> str:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return f"bucket {self.bucket} exists"
        except ClientError as exc:
            if not self._missing(exc) and "NoSuchBucket" not in str(exc):
                raise
        self.client.create_bucket(Bucket=self.bucket)
        return f"bucket {self.bucket} created"

    def download_url(
        self, key: str, *, filename: str | None, media_type: str, expires_s: float
    ) -> str | None:
        # The client gets the same name and type as from a streamed download.
        params = {"Bucket": self.bucket, "Key": check_key(key), "ResponseContentType": media_type}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url = self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=max(1, int(expires_s))
        )
        return cast(str, url)
