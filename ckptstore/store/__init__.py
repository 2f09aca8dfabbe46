"""The content-addressed store: layout, manifests, chunk I/O, reports. No torch here."""

from ckptstore.store.blobs import BlobReader, BlobWriter
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.facade import Store
from ckptstore.store.manifest import Blob, ChunkRef, Manifest, Shard, TensorEntry
from ckptstore.store.reports import (
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
    "Store",
    "TensorEntry",
    "TensorReport",
    "VerifyReport",
    "inspect",
    "verify",
]
