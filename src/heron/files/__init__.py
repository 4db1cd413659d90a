"""Files: uploads streamed to a blob store, sniffed, limited, and read back by id."""
