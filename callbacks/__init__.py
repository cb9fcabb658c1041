"""Lightning callbacks: per-epoch retrieval evaluation (faiss + official uAP) and galleries."""
