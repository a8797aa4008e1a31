"""Custom GPU kernels in OpenAI Triton. A leaf package: nothing here imports gpurec (each kernel's
torch reference is `cuckoo_layout` plus the CPU table in gpurec.embedding.cuckoo, which builds on it)."""
