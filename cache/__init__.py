"""The token store: full patch-token maps on disk, in zarr (default) or HDF5, behind one API."""

from tokens.cache.store import (
    KEY_FIELDS,
    Split,
    StoreError,
    StoreSpec,
    TokenStore,
    create_or_open,
    open_store,
)

__all__ = ["KEY_FIELDS", "Split", "StoreError", "StoreSpec", "TokenStore", "create_or_open", "open_store"]
