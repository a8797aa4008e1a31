"""Custom GPU kernels in OpenAI Triton, each with a pure-torch reference in gpurec/."""
