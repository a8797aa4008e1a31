"""gpurec: a GPU-native real-time recommender (Monolith's loop on the NVIDIA + PyTorch stack)."""

__version__ = "0.1.0"
