"""The torch adapter: DCP StorageWriter/StorageReader over the store."""

from ckptstore.dcp.reader import LoadInfo, Reader, load_object
from ckptstore.dcp.writer import SaveInfo, Writer

__all__ = ["LoadInfo", "Reader", "SaveInfo", "Writer", "load_object"]
