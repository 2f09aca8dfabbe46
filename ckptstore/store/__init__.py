"""The content-addressed store: layout, manifests, chunk I/O, reports. No torch here."""

from ckptstore.store.blobs import BlobReader, BlobWriter
from ckptstore.store.manifest import Blob, ChunkRef, Manifest, Shard, TensorEntry
from ckptstore.store.reports import (
    CheckpointSummary,
    InspectReport,
    TensorReport,
    VerifyReport,
    inspect,
    verify,
)
from ckptstore.store.repository import Repository

__all__ = [
    "Blob",
    "BlobReader",
    "BlobWriter",
    "CheckpointSummary",
    "ChunkRef",
    "InspectReport",
    "Manifest",
    "Repository",
    "Shard",
    "TensorEntry",
    "TensorReport",
    "VerifyReport",
    "inspect",
    "verify",
]
