"""Knowledge bases: documents parsed (`parsing`), cut into chunks (`chunking`) and embedded
(`embeddings`), then indexed and searched."""
